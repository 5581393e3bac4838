//! How `panes serve` runs: limits, thread counts, checkpoints, and the scheduling
//! priorities of the threads that read and write.

use std::sync::Arc;
use std::time::Duration;

use super::auth::{TlsFiles, Tokens};

/// How `panes serve` runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most keys in one `GetFeatures` or Flight `DoGet`; more is `RESOURCE_EXHAUSTED`.
    pub max_keys: usize,
    /// Most features named in one read (a name may repeat); more is
    /// `RESOURCE_EXHAUSTED`. A read's reply holds keys × features values, so this and
    /// `max_keys` bound its size (by default 10 000 × 1 024 × 8 B = 82 MB).
    pub max_features: usize,
    /// Largest message accepted, bytes; larger is `RESOURCE_EXHAUSTED`.
    pub max_message_bytes: usize,
    /// Most input bytes that writes queued for and running on the write threads may
    /// hold; an ingest message waits (and its stream is not read further) until room
    /// is free. Pushback instead of a queue that grows with the load.
    pub max_write_queue_bytes: usize,
    /// Most connections open at once on the gRPC port; more are closed on accept.
    pub max_connections: usize,
    /// Most `Subscribe` streams open at once; more are `RESOURCE_EXHAUSTED`.
    pub max_subscriptions: usize,
    /// Most concurrent streams (requests) per connection, advertised to clients in the
    /// HTTP/2 settings.
    pub max_streams_per_connection: u32,
    /// A connection that sends nothing this long after it is accepted (no HTTP/2
    /// preface) is closed.
    pub handshake_timeout: Duration,
    /// A connection that moves no byte either way this long is closed (gRPC clients
    /// reconnect when they next need it; their keepalive pings count as traffic).
    pub idle_timeout: Duration,
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
    pub checkpoint_dir: Option<crate::checkpoint::CheckpointRoot>,
    /// Time between checkpoints of a view (or partition) that took events.
    pub checkpoint_interval: Duration,
    /// The address other instances reach this one at, for reads they route here
    /// (default: the gRPC listen address, which must then not be a wildcard).
    pub advertise: Option<String>,
    /// TLS on the gRPC port (and Flight) and the metrics port; `None`: plain text.
    pub tls: Option<TlsFiles>,
    /// Bearer tokens and their scopes; `None`: every caller may do everything.
    pub tokens: Option<Arc<Tokens>>,
    /// The served-feature log: where `GetFeatures` reads are logged, and how many.
    pub read_log: Option<super::ReadLogOptions>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        ServeOptions {
            max_keys: 10_000,
            max_features: 1_024,
            max_message_bytes: 64 << 20,
            max_write_queue_bytes: 256 << 20,
            max_connections: 1_024,
            max_subscriptions: 256,
            max_streams_per_connection: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            read_threads: cores,
            inline_read_keys: 128,
            write_threads: cores,
            shutdown_grace: Duration::from_secs(30),
            write_priority: WritePriority::Idle,
            read_priority: ReadPriority::Normal,
            checkpoint_dir: None,
            checkpoint_interval: Duration::from_secs(10),
            advertise: None,
            tls: None,
            tokens: None,
            read_log: None,
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
            tracing::warn!(
                priority = ?self,
                error = %e,
                "cannot set the read priority; reads run at normal priority"
            );
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

/// Sets the calling thread's scheduling priority (Linux applies `setpriority` and
/// `sched_setscheduler` with pid 0 to the calling thread only).
pub(super) fn lower_priority(priority: WritePriority) {
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
