//! `panes serve`: feature serving and ingest over gRPC (tonic) and Arrow Flight, with
//! gRPC health, server reflection and a Prometheus text endpoint (feature `serve`).
//!
//! ```text
//!  clients ──► tonic (tokio) ──► GetFeatures ─┬─ ≤ 128 keys: inline ──┬─► Engine::read_snapshot
//!                  │                            └─ more: read pool ──────┘   (front replica)
//!                  ├──────────► Ingest / DoPut ──► write pool ──► Engine::push_at
//!                  │                                         (back replica, then publish)
//!                  └─ health, reflection, Flight DoGet      timer ──► Engine::fold_due
//! ```
//!
//! # Design decision: no fold and no large read on tokio's threads
//! Writes (decode, fold, publish) run on threads of their own, and so do reads of
//! more than [`ServeOptions::inline_read_keys`] keys, each answering through a oneshot
//! channel: a long fold or a read of thousands of keys never holds up the network
//! I/O of other requests, and reads never queue behind folds (the engine's two
//! replicas make reads independent of folds; see [`Engine`]). The write threads run
//! at a lower scheduling priority ([`WritePriority`], `SCHED_IDLE` by default), so
//! that on shared cores a read preempts a fold rather than waiting for its time slice
//! to end; [`ReadPriority::Realtime`] (opt-in) goes further and puts the reads ahead
//! of every normal thread. The rejected alternative, `spawn_blocking` per request, has no bound on
//! threads and would let a burst of ingest starve reads of cores.
//!
//! Small reads run on the network thread that received them. A read never waits for
//! a lock held across a fold, so it only costs its own work: about 15 µs for one key
//! and 0.18 ms for 100 keys × 20 features under ingest (most of it cache misses). The
//! two hand-offs to a read thread and back cost more than that at the tail: timed
//! inside the server under the serving benchmark's 1 M events/s ingest, the server's
//! time for one key had a p99 of about 0.95 ms with the hand-offs (0.5–0.9 ms each) and
//! 32 µs without; for 100 keys, 1.7–2.6 ms against 0.8 ms.
//!
//! # Errors at the boundary
//! Engine errors become gRPC statuses here and only here: a caller's mistake is
//! `INVALID_ARGUMENT` with a `BadRequest` detail naming the field, a request over a
//! configured limit is `RESOURCE_EXHAUSTED`, a bug is `INTERNAL`.

mod flight;
mod grpc;
mod metrics;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::engine::{Engine, ViewMetrics};
use crate::error::PanesError;
use crate::histogram::Histogram;

/// Generated protobuf messages and gRPC stubs of `proto/panes/v1/panes.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("panes.v1");

    /// The encoded descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/panes_descriptor.bin"));
}

/// How `panes serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most keys in one `GetFeatures` or Flight `DoGet`; more is `RESOURCE_EXHAUSTED`.
    pub max_keys: usize,
    /// Largest message accepted, bytes; larger is `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// Threads serving reads of more than `inline_read_keys` keys.
    pub read_threads: usize,
    /// Reads of at most this many keys run on the network thread that received them
    /// instead of on a read thread: they take less time than the two thread hand-offs
    /// would add (see the module docs). 0 sends every read to the read threads.
    pub inline_read_keys: usize,
    /// Threads ingesting (decode, fold, publish).
    pub write_threads: usize,
    /// After a shutdown signal, how long in-flight requests may still run.
    pub shutdown_grace: Duration,
    /// Scheduling priority of the write threads (and of the kernels' rayon pool)
    /// relative to the threads serving reads. With cores shared, a read that wakes up
    /// then preempts a fold instead of queueing behind it.
    pub write_priority: WritePriority,
    /// Scheduling priority of the read threads. The network threads belong to the
    /// runtime the server runs on: its builder gives them the same priority with
    /// [`ReadPriority::apply_or_warn`] in `on_thread_start`, as `panes serve` does.
    pub read_priority: ReadPriority,
    /// Where checkpoints go: `<dir>/<view>/` for pushed views, `<dir>/<view>/p<N>/`
    /// for each partition of a Kafka view (shared by every instance of its group).
    /// Pushed views are restored from it at start; `None` turns checkpoints off, which
    /// Kafka views do not allow.
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Time between checkpoints of a view (or partition) that took events.
    pub checkpoint_interval: Duration,
    /// The address other instances reach this one at, for reads they route here
    /// (default: the gRPC listen address, which must then not be a wildcard).
    pub advertise: Option<String>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ServeOptions {
            max_keys: 10_000,
            max_message_bytes: 64 << 20,
            read_threads: cores,
            inline_read_keys: 128,
            write_threads: cores,
            shutdown_grace: Duration::from_secs(30),
            write_priority: WritePriority::Idle,
            read_priority: ReadPriority::Normal,
            checkpoint_dir: None,
            checkpoint_interval: Duration::from_secs(10),
            advertise: None,
        }
    }
}

/// Scheduling priority of the threads that ingest (Linux; elsewhere all are normal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePriority {
    /// Normal scheduling: the same as the reads', unless those are real-time (write
    /// threads never are).
    Normal,
    /// Lower by this `nice` increment (1–19). The scheduler may still let a running
    /// fold finish its time slice before a woken read runs.
    Nice(i32),
    /// `SCHED_IDLE`: ingest runs whenever no read needs the core, and a read that wakes
    /// up preempts it at once. Under a read load that saturates the cores, ingest
    /// slows down and pushes back on its producers (freshness suffers, reads do not).
    ///
    /// The kernels' rayon pool gets the same priority, and reads of
    /// [`PARALLEL_MERGE_MIN`](panes_kernels::cpu::PARALLEL_MERGE_MIN) keys or more
    /// are split across that pool: such a read waits like a fold when the cores are
    /// busy. Small reads (fewer keys) run on the read threads alone.
    Idle,
}

impl std::str::FromStr for WritePriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(WritePriority::Normal),
            "idle" => Ok(WritePriority::Idle),
            _ => level(s, "nice:", 1..=19)
                .map(WritePriority::Nice)
                .ok_or_else(|| {
                    format!(
                        "write priority {s:?}: expected normal, idle or nice:N with N in 1..=19"
                    )
                }),
        }
    }
}

/// `N` of `{prefix}N` when it lies in `range`.
fn level(s: &str, prefix: &str, range: std::ops::RangeInclusive<i32>) -> Option<i32> {
    s.strip_prefix(prefix)?
        .parse()
        .ok()
        .filter(|n| range.contains(n))
}

/// Scheduling priority of the threads that serve reads: the network threads and the
/// read threads (Linux; elsewhere all are normal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadPriority {
    /// The same as other threads'.
    Normal,
    /// `SCHED_FIFO` at this real-time priority (1–99). A network or read thread that
    /// wakes up runs at once, before every normal thread on the machine: other
    /// processes', and this process's ingest. Under EEVDF (Linux 6.6+), a woken
    /// normal thread may instead wait for a running one's slice to end, which is what
    /// most of the serving benchmark's tail was. Needs `CAP_SYS_NICE` or an
    /// `RLIMIT_RTPRIO` of at least N; without it the threads stay normal and one
    /// warning says so. Linux's real-time throttling (by default 95 % of each second)
    /// keeps a runaway reader from locking up the machine.
    Realtime(i32),
}

impl ReadPriority {
    /// Gives the calling thread this priority.
    ///
    /// # Errors
    /// The OS error when the thread may not have it (no permission).
    pub fn apply(self) -> std::io::Result<()> {
        match self {
            ReadPriority::Normal => Ok(()),
            #[cfg(target_os = "linux")]
            ReadPriority::Realtime(n) => {
                let param = libc::sched_param { sched_priority: n };
                // SAFETY: `param` is a valid sched_param that outlives the call.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            }
            #[cfg(not(target_os = "linux"))]
            ReadPriority::Realtime(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "real-time priority is only supported on Linux",
            )),
        }
    }

    /// [`ReadPriority::apply`], and on failure one warning on stderr per process (the
    /// thread then keeps its priority).
    pub fn apply_or_warn(self) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if let Err(e) = self.apply()
            && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("panes serve: read priority {self:?}: {e}; reads run at normal priority");
        }
    }
}

impl std::str::FromStr for ReadPriority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(ReadPriority::Normal),
            "realtime" => Ok(ReadPriority::Realtime(1)),
            _ => level(s, "realtime:", 1..=99)
                .map(ReadPriority::Realtime)
                .ok_or_else(|| {
                    format!(
                        "read priority {s:?}: expected normal, realtime or realtime:N with N in 1..=99"
                    )
                }),
        }
    }
}

/// State shared by the services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub options: ServeOptions,
    reads: Workers,
    writes: Workers,
    /// Server-side duration of reads, per view.
    pub read_time: HashMap<String, Histogram>,
    /// Held while checkpoints of pushed views are written.
    checkpointing: std::sync::Mutex<()>,
    /// Views fed by Kafka, by name.
    #[cfg(feature = "kafka")]
    pub kafka: HashMap<String, Arc<crate::kafka::KafkaView>>,
}

impl Shared {
    /// Runs `f` on the read pool.
    pub async fn on_reads<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        run_on(&self.reads, f).await
    }

    /// Runs `f`, the work of a read of `keys` keys, on the calling (network) thread
    /// when `keys` is at most [`ServeOptions::inline_read_keys`], else on the read pool.
    /// `f` must not block: it may only take locks that are never held across a fold.
    pub async fn on_reads_for<T: Send + 'static>(
        &self,
        keys: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        if keys <= self.options.inline_read_keys {
            Ok(f())
        } else {
            self.on_reads(f).await
        }
    }

    /// Runs `f` on the write pool.
    pub async fn on_writes<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        run_on(&self.writes, f).await
    }

    /// Reads `keys` of `view` as of `at` from the published state: the engine's, or for
    /// a Kafka view the partitions' wherever they are owned (`forwarded`: a read
    /// another instance routed here, answered from local partitions only).
    pub async fn read(
        self: &Arc<Self>,
        view: String,
        keys: Vec<crate::keys::KeyValue>,
        at: Option<i64>,
        features: Vec<String>,
        forwarded: bool,
    ) -> Result<crate::ServedFrame, Status> {
        #[cfg(feature = "kafka")]
        if let Some(k) = self.kafka.get(&view) {
            return crate::kafka::read(self, k, keys, at, features, forwarded).await;
        }
        let _ = forwarded;
        let engine = self.engine.clone();
        self.on_reads_for(keys.len(), move || {
            let names: Vec<&str> = features.iter().map(String::as_str).collect();
            let names = (!names.is_empty()).then_some(names.as_slice());
            engine.read_snapshot(&view, &keys, at, names)
        })
        .await?
        .map_err(|e| status(e, "keys"))
    }

    /// `FAILED_PRECONDITION` for a push into a view that takes its events from Kafka.
    pub fn check_pushable(&self, view: &str) -> Result<(), Status> {
        let sourced = self
            .engine
            .compiled(view)
            .is_ok_and(|v| v.spec.source.is_some());
        if sourced {
            return Err(Status::failed_precondition(format!(
                "view {view:?} takes its events from Kafka; produce them to its topic"
            )));
        }
        Ok(())
    }

    /// A view's counters: the engine's, or summed over a Kafka view's partitions.
    pub fn view_metrics(&self, view: &str) -> crate::Result<ViewMetrics> {
        #[cfg(feature = "kafka")]
        if let Some(k) = self.kafka.get(view) {
            return k.metrics();
        }
        self.engine.metrics(view)
    }

    /// Writes a checkpoint of every pushed view that changed since `done` says.
    ///
    /// One at a time: at shutdown a periodic checkpoint may still be running on
    /// another write thread (aborting its task does not stop its job), and two writers
    /// would take the same sequence number, so the final checkpoint could fail or be
    /// overwritten by an older state.
    fn checkpoint_pushed(&self, done: &mut HashMap<String, u64>) {
        let Some(root) = &self.options.checkpoint_dir else {
            return;
        };
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        for v in self.engine.views() {
            let name = &v.spec.name;
            if v.spec.source.is_some() {
                continue;
            }
            let version = self.engine.metrics(name).map_or(0, |m| m.version);
            if done.get(name) == Some(&version) {
                continue;
            }
            let written = self
                .engine
                .checkpoint(name, &[])
                .and_then(|bytes| crate::CheckpointDir::new(root.join(name), 3).write(&bytes));
            match written {
                Ok(_) => {
                    done.insert(name.clone(), version);
                }
                Err(e) => eprintln!("panes serve: view {name:?}: checkpoint failed: {e}"),
            }
        }
    }

    /// `RESOURCE_EXHAUSTED` when a request asks for more keys than allowed.
    pub fn check_keys(&self, n: usize) -> Result<(), Status> {
        if n > self.options.max_keys {
            return Err(Status::resource_exhausted(format!(
                "{n} keys in one request; the limit is {} (ServeOptions::max_keys, --max-keys)",
                self.options.max_keys
            )));
        }
        Ok(())
    }
}

async fn run_on<T: Send + 'static>(
    pool: &Workers,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let (tx, rx) = oneshot::channel();
    pool.spawn(Box::new(move || {
        let _ = tx.send(f());
    }))?;
    rx.await
        .map_err(|_| Status::internal("a worker thread panicked (this is a bug in Panes)"))
}

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of plain threads taking jobs from one queue.
///
/// Not a rayon pool on purpose: a rayon worker that waits for its own parallel work
/// (the `Cpu` backend's fold) runs other queued jobs meanwhile, and a queued push that
/// blocks on the view's writer lock, held further up that same thread's stack, would
/// deadlock it. Jobs here call into rayon's global pool from outside, which only ever
/// runs the kernels' own sub-tasks.
#[derive(Debug)]
struct Workers {
    queue: std::sync::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

impl Workers {
    /// `n` threads named `panes-{name}-{i}`, each calling `setup` first (to set its
    /// scheduling priority).
    fn new(
        name: &'static str,
        n: usize,
        setup: impl Fn() + Clone + Send + 'static,
    ) -> crate::Result<Workers> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let setup = setup.clone();
            std::thread::Builder::new()
                .name(format!("panes-{name}-{i}"))
                .spawn(move || {
                    setup();
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = match rx.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job drops its oneshot sender: the caller gets
                            // INTERNAL, and the thread keeps serving.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| {
                    PanesError::Internal(format!("cannot start the {name} threads: {e}"))
                })?;
        }
        Ok(Workers {
            queue: std::sync::Mutex::new(Some(tx)),
        })
    }

    fn spawn(&self, job: Job) -> Result<(), Status> {
        let queue = self
            .queue
            .lock()
            .map_err(|_| Status::internal("worker queue poisoned (this is a bug in Panes)"))?;
        queue
            .as_ref()
            .and_then(|q| q.send(job).ok())
            .ok_or_else(|| Status::unavailable("the server is shutting down"))
    }
}

/// Sets the calling thread's scheduling priority (Linux applies `setpriority` and
/// `sched_setscheduler` with pid 0 to the calling thread only).
fn lower_priority(priority: WritePriority) {
    // A thread inherits its creator's policy: one created by a real-time network thread
    // (`ReadPriority::Realtime`) must not fold at real-time priority. Leaving a
    // real-time policy needs no permission.
    #[cfg(target_os = "linux")]
    // SAFETY: no memory-safety preconditions; `param` outlives the call.
    unsafe {
        if matches!(
            libc::sched_getscheduler(0),
            libc::SCHED_FIFO | libc::SCHED_RR
        ) {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        }
    }
    #[cfg(target_os = "linux")]
    match priority {
        WritePriority::Normal => {}
        // SAFETY (both): no memory-safety preconditions; a failure (no permission)
        // only leaves the priority as it was.
        WritePriority::Nice(n) => unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, n);
        },
        WritePriority::Idle => unsafe {
            let param = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_IDLE, &param);
        },
    }
    #[cfg(not(target_os = "linux"))]
    let _ = priority;
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Closing the queue ends the threads once they finish their current job.
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
    }
}

/// Response metadata of `GetFeatures`: the server's own time for the request in whole
/// microseconds, from the decoded request to the reply ready for encoding. A client
/// subtracts it from its own latency to see what the network and its own threads took.
pub const SERVER_TIME_HEADER: &str = "panes-server-time-us";

/// Metadata key marking a read another instance routed here.
pub(crate) const FORWARDED: &str = "panes-forwarded";

/// `INVALID_ARGUMENT` naming `field`, in the message (for clients that read only
/// that) and as a `BadRequest` field violation.
pub(crate) fn bad_request(field: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// The gRPC status of an engine error; `field` names the request field a user error
/// most likely concerns when the error itself does not say.
pub(crate) fn status(e: PanesError, field: &str) -> Status {
    use crate::error::ErrorDomain;
    let field = match &e {
        PanesError::UnknownView { .. } => "view",
        PanesError::UnknownFeature { .. } => "features",
        PanesError::InexactRead { .. } => "at_ms",
        PanesError::Schema { column, .. } => column.as_str(),
        _ => field,
    }
    .to_string();
    match e.domain() {
        ErrorDomain::User => bad_request(&field, e.to_string()),
        ErrorDomain::External => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A stream error: tonic reports a message over the size limit as `OUT_OF_RANGE`;
/// the API promises `RESOURCE_EXHAUSTED`.
pub(crate) fn stream_error(s: Status) -> Status {
    if s.code() == Code::OutOfRange && s.message().contains("too large") {
        Status::resource_exhausted(s.message().to_string())
    } else {
        s
    }
}

/// What the server did, returned when it stops.
#[derive(Clone, Debug)]
pub struct ServeReport {
    /// Every view's counters after the final flush.
    pub views: Vec<ViewMetrics>,
    /// Whether in-flight requests were cut off at the grace deadline.
    pub cut_off: bool,
}

/// A bound server, not yet serving.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
}

impl Server {
    /// Binds the gRPC (and Flight) listener and, if given, the metrics listener.
    /// Port 0 picks a free port: see [`Server::grpc_addr`].
    ///
    /// # Errors
    /// When an address cannot be bound or the thread pools cannot be built.
    pub async fn bind(
        engine: Arc<Engine>,
        options: ServeOptions,
        grpc: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> crate::Result<Server> {
        let grpc = TcpListener::bind(grpc)
            .await
            .map_err(|e| PanesError::Invalid(format!("cannot listen on {grpc}: {e}")))?;
        let metrics = match metrics {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| PanesError::Invalid(format!("cannot listen on {a}: {e}")))?,
            ),
            None => None,
        };
        // The kernels' parallel work (a `Cpu` fold) runs on rayon's global pool: give
        // it the write threads' priority too, when this process has not built it yet.
        let (priority, read_priority) = (options.write_priority, options.read_priority);
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("panes-kernel-{i}"))
            .start_handler(move |_| lower_priority(priority))
            .build_global();
        let read_time = engine
            .views()
            .map(|v| (v.spec.name.clone(), Histogram::default()))
            .collect();
        if let Some(root) = &options.checkpoint_dir {
            restore_pushed(&engine, root)?;
        }
        let sourced: Vec<_> = engine
            .views()
            .filter(|v| v.spec.source.is_some())
            .map(|v| v.spec.clone())
            .collect();
        #[cfg(feature = "kafka")]
        let kafka = {
            let mut kafka = HashMap::new();
            if !sourced.is_empty() {
                let local = grpc
                    .local_addr()
                    .map_err(|e| PanesError::Internal(e.to_string()))?;
                let advertise = match &options.advertise {
                    Some(a) => a.clone(),
                    None if local.ip().is_unspecified() => {
                        return Err(PanesError::Invalid(format!(
                            "listening on {local}: Kafka views need --advertise HOST:PORT, the address other instances reach this one at"
                        )));
                    }
                    None => local.to_string(),
                };
                let root = options.checkpoint_dir.clone().ok_or_else(|| {
                    PanesError::Invalid(format!(
                        "view {:?} takes its events from Kafka and needs --checkpoint-dir (a directory every instance of its group shares)",
                        sourced[0].name
                    ))
                })?;
                let kafka_options = crate::kafka::KafkaOptions {
                    checkpoint_root: root,
                    checkpoint_every: options.checkpoint_interval,
                    advertise,
                };
                for spec in &sourced {
                    let view = crate::kafka::KafkaView::new(
                        spec,
                        engine.options().clone(),
                        engine.shared_backend(),
                        &kafka_options,
                    )?;
                    kafka.insert(spec.name.clone(), Arc::new(view));
                }
            }
            kafka
        };
        #[cfg(not(feature = "kafka"))]
        if let Some(v) = sourced.first() {
            return Err(PanesError::Invalid(format!(
                "view {:?} takes its events from Kafka, and this build of Panes has no `kafka` feature",
                v.name
            )));
        }
        let shared = Arc::new(Shared {
            reads: Workers::new("read", options.read_threads, move || {
                read_priority.apply_or_warn()
            })?,
            writes: Workers::new("write", options.write_threads, move || {
                lower_priority(priority)
            })?,
            engine,
            options,
            read_time,
            checkpointing: std::sync::Mutex::new(()),
            #[cfg(feature = "kafka")]
            kafka,
        });
        Ok(Server {
            shared,
            grpc,
            metrics,
        })
    }

    /// The gRPC and Flight address.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The metrics address, if any.
    pub fn metrics_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.metrics.as_ref().map(TcpListener::local_addr)
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish (for at
    /// most [`ServeOptions::shutdown_grace`]), folds every pending micro-batch, and
    /// reports.
    ///
    /// # Errors
    /// A transport failure, or a fold failure in the final flush.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> crate::Result<ServeReport> {
        let Server {
            shared,
            grpc,
            metrics,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<proto::features_server::FeaturesServer<grpc::FeaturesService>>()
            .await;
        health
            .set_serving::<arrow_flight::flight_service_server::FlightServiceServer<flight::Flight>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| PanesError::Internal(format!("reflection: {e}")))?;

        let limit = shared.options.max_message_bytes;
        let features =
            proto::features_server::FeaturesServer::new(grpc::FeaturesService::new(shared.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX);
        let flight = arrow_flight::flight_service_server::FlightServiceServer::new(
            flight::Flight::new(shared.clone()),
        )
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);

        // Keep reads fresh between pushes: publish micro-batches once they are due.
        let ticker = {
            let shared = shared.clone();
            let period = (shared.engine.options().batch_age / 4).max(Duration::from_millis(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let engine = shared.engine.clone();
                    match shared.on_writes(move || engine.fold_due()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => eprintln!("panes serve: a timed fold failed: {e}"),
                        Err(e) => eprintln!("panes serve: {}", e.message()),
                    }
                }
            })
        };
        let metrics_task = metrics.map(|l| tokio::spawn(metrics::serve(l, shared.clone())));
        #[cfg(feature = "kafka")]
        let sources = shared
            .kafka
            .values()
            .map(|v| crate::kafka::start(v.clone()))
            .collect::<crate::Result<Vec<_>>>()?;
        let checkpoints = shared.options.checkpoint_dir.as_ref().map(|_| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(shared.options.checkpoint_interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let done = Arc::new(std::sync::Mutex::new(HashMap::new()));
                loop {
                    tick.tick().await;
                    let (s, done) = (shared.clone(), done.clone());
                    let _ = shared
                        .on_writes(move || {
                            if let Ok(mut d) = done.lock() {
                                s.checkpoint_pushed(&mut d);
                            }
                        })
                        .await;
                }
            })
        });

        let mut signalled = stop_rx.clone();
        let server = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(too_large_is_exhausted))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(features)
            .add_service(flight)
            .serve_with_incoming_shutdown(
                // Nagle off: a reply's trailers must not wait for the client's ACK.
                tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
                async move {
                    let _ = signalled.wait_for(|s| *s).await;
                },
            );
        let mut graced = stop_rx.clone();
        let grace = shared.options.shutdown_grace;
        let deadline = async move {
            let _ = graced.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let cut_off = tokio::select! {
            r = server => {
                r.map_err(|e| PanesError::Internal(format!("gRPC transport: {e}")))?;
                false
            }
            () = deadline => true,
        };
        health
            .set_not_serving::<proto::features_server::FeaturesServer<grpc::FeaturesService>>()
            .await;
        ticker.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = checkpoints {
            t.abort();
        }
        #[cfg(feature = "kafka")]
        for source in sources {
            if !source.stop(shared.options.shutdown_grace.max(Duration::from_secs(10))) {
                eprintln!(
                    "panes serve: a Kafka source did not finish its final checkpoint in time"
                );
            }
        }
        let s = shared.clone();
        let views = shared
            .on_writes(move || {
                s.engine.flush()?;
                s.checkpoint_pushed(&mut HashMap::new());
                s.engine
                    .views()
                    .map(|v| s.view_metrics(&v.spec.name))
                    .collect::<crate::Result<Vec<_>>>()
            })
            .await
            .map_err(|s| PanesError::Internal(s.message().to_string()))??;
        Ok(ServeReport { views, cut_off })
    }
}

/// Restores each pushed view from the newest valid checkpoint under `root/<view>/`.
fn restore_pushed(engine: &Engine, root: &std::path::Path) -> crate::Result<()> {
    for v in engine.views() {
        let name = &v.spec.name;
        if v.spec.source.is_some() {
            continue;
        }
        let dir = crate::CheckpointDir::new(root.join(name), 3);
        let restored = dir.restore_newest(
            |bytes| engine.restore(name, bytes).map_err(|e| e.to_string()),
            |path, why| {
                eprintln!(
                    "panes serve: view {name:?}: skipping checkpoint {}: {why}",
                    path.display()
                );
            },
        )?;
        if let Some((info, path)) = restored {
            eprintln!(
                "panes serve: view {name:?}: restored {} ({} events)",
                path.display(),
                info.folded
            );
        }
    }
    Ok(())
}

/// tonic answers a request over the decoding limit with `OUT_OF_RANGE` before any
/// handler runs; the API promises `RESOURCE_EXHAUSTED`.
fn too_large_is_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if too_large {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// A future that completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::{ReadPriority, WritePriority};

    #[test]
    fn write_priority_parses_and_explains_bad_values() {
        assert_eq!("idle".parse(), Ok(WritePriority::Idle));
        assert_eq!("normal".parse(), Ok(WritePriority::Normal));
        assert_eq!("nice:10".parse(), Ok(WritePriority::Nice(10)));
        for bad in ["nice:0", "nice:20", "nice:x", "low", ""] {
            let e = bad.parse::<WritePriority>().unwrap_err();
            assert!(e.contains("expected normal, idle or nice:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn read_priority_parses_and_explains_bad_values() {
        assert_eq!("normal".parse(), Ok(ReadPriority::Normal));
        assert_eq!("realtime".parse(), Ok(ReadPriority::Realtime(1)));
        assert_eq!("realtime:50".parse(), Ok(ReadPriority::Realtime(50)));
        for bad in ["realtime:0", "realtime:100", "realtime:x", "fifo", ""] {
            let e = bad.parse::<ReadPriority>().unwrap_err();
            assert!(
                e.contains("expected normal, realtime or realtime:N"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn write_threads_never_keep_an_inherited_real_time_policy() {
        std::thread::spawn(|| {
            // Without CAP_SYS_NICE there is no real-time policy to inherit.
            if ReadPriority::Realtime(1).apply().is_ok() {
                super::lower_priority(WritePriority::Normal);
                // SAFETY: no preconditions.
                assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_read_priority_is_given_or_refused_with_the_os_reason() {
        // On a thread of its own: the test runner's threads keep their priority.
        std::thread::spawn(|| {
            assert!(ReadPriority::Normal.apply().is_ok());
            match ReadPriority::Realtime(1).apply() {
                Ok(()) => {
                    #[cfg(target_os = "linux")]
                    // SAFETY: no preconditions.
                    assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
                }
                // Without CAP_SYS_NICE: the OS's reason, and the thread is unchanged.
                Err(e) => assert!(
                    e.raw_os_error().is_some() || !cfg!(target_os = "linux"),
                    "{e}"
                ),
            }
        })
        .join()
        .unwrap();
    }
}
