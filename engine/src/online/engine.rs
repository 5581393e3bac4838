//! The engine: its views, options and backend; pushes, folds, publishes, checkpoints
//! and counters.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow_array::RecordBatch;
use panes_kernels::{Backend, BackendKind};

use super::frame::ViewMetrics;
use super::replicas::{View, Writer, adopt, poisoned, push_into};
use crate::checkpoint::{self, CheckpointInfo, SourcePosition};
use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::ingest::ViewCore;
use crate::ingest::{PushReport, StateBudget};
use crate::spec::CompiledView;
use crate::spec::FeatureFile;

/// How an [`Engine`] runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The backend; `None` reads `PANES_BACKEND` and falls back to `auto`.
    pub backend: Option<BackendKind>,
    /// Key shards per view (a power of two): the unit of parallel folding.
    pub shards: usize,
    /// A pending micro-batch is folded once it holds this many events…
    pub batch_rows: usize,
    /// …or once its oldest event waited this long (checked on push, flush and read).
    pub batch_age: Duration,
    /// Whether the `Cpu` backend keeps key-major read copies of the pane state (see
    /// `PaneState::keep_read_copy`): reads of scattered keys about twice as fast, for
    /// as much memory again as the rings and some 10 % of ingest throughput.
    pub read_copy: bool,
    /// At most this many keys per view whose definition sets no `max_keys`
    /// (`None`: no limit). Rows of further new keys are rejected as `key_limit`.
    pub max_keys: Option<usize>,
    /// A budget of state memory that every new key is charged to (shared with other
    /// engines built with a clone of these options); `None`: no budget.
    pub state_budget: Option<Arc<StateBudget>>,
    /// The clock of `read_time = "wall_clock"` views (tests set their own).
    pub clock: Clock,
}

/// Wall-clock time for reads of `read_time = "wall_clock"` views: the system clock,
/// or any function of epoch milliseconds (tests move time forward by hand).
#[derive(Clone, Default)]
pub struct Clock(Option<Arc<dyn Fn() -> i64 + Send + Sync>>);

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Clock(None)
    }

    /// A clock reading `now()`, epoch ms.
    pub fn from_fn(now: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Clock(Some(Arc::new(now)))
    }

    /// The time now, epoch ms.
    pub fn now_ms(&self) -> i64 {
        self.0.as_ref().map_or_else(now_ms, |f| f())
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Clock(injected)"
        } else {
            "Clock(system)"
        })
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: None,
            shards: 32,
            batch_rows: 64 * 1024,
            batch_age: Duration::from_millis(50),
            read_copy: true,
            max_keys: None,
            state_budget: None,
            clock: Clock::system(),
        }
    }
}

impl EngineOptions {
    /// Builds the backend these options name.
    ///
    /// # Errors
    /// An unknown `PANES_BACKEND` value, or a backend that cannot run here.
    pub fn create_backend(&self) -> Result<Arc<dyn Backend>> {
        let kind = match self.backend {
            Some(k) => k,
            None => BackendKind::from_env()?.unwrap_or(BackendKind::Auto),
        };
        Ok(kind.create()?)
    }
}

/// The feature engine: views of a feature file, their state, and a backend.
///
/// # Reads never wait for folds: two replicas per view
/// Each view keeps two replicas of its core (key index, pane state, counters): a
/// *front* one that reads use and a *back* one that the single writer ingests into and
/// folds. When the back replica has folded all it took, the writer *publishes* it: it
/// swaps the front index (one atomic store), then takes the old front — waiting only
/// for reads already inside it — and replays the logged pushes into it, so both are
/// equal again. A read takes the front replica's read lock with `try_read`; if the
/// writer holds it, the front has just moved and the read retries on the new one. So a
/// read never waits for a fold, and it always sees a published state: all of a push
/// or none of it. The price is twice the state memory and twice the ingest work.
///
/// The alternatives were rejected: a single state behind a lock makes reads wait for
/// folds; a seqlock makes readers retry for as long as folds keep coming and needs
/// atomic access to every cell; copy-on-write snapshots copy the touched shards on
/// every fold while any read holds the old ones, which under steady reads is the
/// whole state per fold.
///
/// A push holds the view's writer lock while its fold runs on rayon's global pool, so
/// do not push from a worker of that pool: while it waits for its fold, rayon may run
/// another queued push on the same thread, which then waits for the lock forever (the
/// server pushes from plain threads for that reason).
///
/// [`Engine::read`] publishes pending events first (read-your-writes for embedded use);
/// [`Engine::read_snapshot`] (the server's read) never folds and sees what
/// [`Engine::fold_due`], a push or a flush published last.
#[derive(Debug)]
pub struct Engine {
    pub(super) file: FeatureFile,
    pub(super) views: Vec<View>,
    /// The on-demand features of each service of `file` (same order).
    pub(super) services: Vec<crate::expr::Program>,
    pub(super) backend: Arc<dyn Backend>,
    pub(super) options: EngineOptions,
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Engine {
    /// An engine for `file`.
    ///
    /// # Errors
    /// When the backend cannot be built or `options.shards` is not a power of two.
    pub fn new(file: &FeatureFile, options: EngineOptions) -> Result<Self> {
        let backend = options.create_backend()?;
        Self::with_backend(file, options, backend)
    }

    /// An engine for `file` on a backend shared with other engines (`options.backend`
    /// is not looked at).
    ///
    /// # Errors
    /// When `options.shards` is not a power of two.
    pub fn with_backend(
        file: &FeatureFile,
        options: EngineOptions,
        backend: Arc<dyn Backend>,
    ) -> Result<Self> {
        crate::error::ensure!(
            options.shards.is_power_of_two(),
            "shards must be a power of two, got {}",
            options.shards
        );
        let views = file
            .views
            .iter()
            .map(|v| {
                let compiled = CompiledView::new(v, options.shards);
                compiled.check_backend(&*backend)?;
                let fold_time = Arc::new(Histogram::default());
                let replica = || -> Result<RwLock<ViewCore>> {
                    let mut core = ViewCore::new(&compiled)?;
                    adopt(&mut core, &options, &fold_time);
                    Ok(RwLock::new(core))
                };
                let replicas = [replica()?, replica()?];
                Ok(View {
                    compiled,
                    writer: Mutex::new(Writer::default()),
                    replicas,
                    front: AtomicUsize::new(0),
                    version: AtomicU64::new(0),
                    fold_time,
                    freshness: Histogram::default(),
                })
            })
            .collect::<Result<_>>()?;
        let services = file
            .services
            .iter()
            .map(|s| crate::expr::Program::new(s.on_demand.clone(), None, Vec::new()))
            .collect();
        Ok(Engine {
            file: file.clone(),
            views,
            services,
            backend,
            options,
        })
    }

    /// The feature definitions the engine runs.
    pub fn file(&self) -> &FeatureFile {
        &self.file
    }

    /// The options the engine was built with.
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// The backend in use.
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The backend, to share with another engine ([`Engine::with_backend`]).
    pub fn shared_backend(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    /// The compiled views.
    pub fn views(&self) -> impl Iterator<Item = &CompiledView> {
        self.views.iter().map(|v| &v.compiled)
    }

    /// The compiled view named `name`.
    ///
    /// # Errors
    /// [`PanesError::UnknownView`], listing the views.
    pub fn compiled(&self, name: &str) -> Result<&CompiledView> {
        Ok(&self.view(name)?.compiled)
    }

    pub(super) fn view(&self, name: &str) -> Result<&View> {
        self.views
            .iter()
            .find(|v| v.compiled.spec.name == name)
            .ok_or_else(|| PanesError::UnknownView {
                name: name.to_string(),
                known: self
                    .views
                    .iter()
                    .map(|v| v.compiled.spec.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Pushes a batch of events into `view`.
    ///
    /// Rows are validated and decided (accepted / late / rejected) now, in order; the
    /// accepted ones are folded with the pending micro-batch once it is full or old.
    /// A batch larger than a micro-batch is taken in zero-copy slices of
    /// `batch_rows`, so the memory a push needs does not grow with the batch. The
    /// view stays locked for the whole push: a read sees all of it or none of it.
    ///
    /// # Errors
    /// [`PanesError::Schema`] when the batch lacks a column or has one of the wrong
    /// type (the whole batch is rejected and counted); unknown view.
    pub fn push(&self, view: &str, batch: &RecordBatch) -> Result<PushReport> {
        self.push_at(view, batch, 0)
    }

    /// Like [`Engine::push`], for a batch that starts at row `first_row` of a longer
    /// stream: reported row numbers count from the stream's start.
    ///
    /// # Errors
    /// As [`Engine::push`].
    pub fn push_at(&self, view: &str, batch: &RecordBatch, first_row: usize) -> Result<PushReport> {
        let arrived = std::time::Instant::now();
        let v = self.view(view)?;
        let mut writer = v.writer()?;
        let mut back = v.back(&writer)?;
        let mut cap = v.cap(&self.options);
        let result = push_into(
            &mut back,
            &v.compiled,
            batch,
            first_row,
            &self.options,
            self.backend.as_ref(),
            true,
            &mut cap,
        );
        let settled = back.pending.is_empty();
        back.take_delta(&mut writer.delta);
        drop(back);
        writer.charged += cap.charged;
        writer.charged_strings += cap.charged_strings;
        writer.pushed = true;
        if let Ok(r) = &result
            && r.accepted > 0
        {
            writer.arrivals.push((arrived, r.accepted as u64));
        }
        if let Err(e) = &result
            && !matches!(e, PanesError::Schema { .. } | PanesError::Invalid(_))
        {
            writer.broken = Some(format!("a fold failed: {e}"));
            return result;
        }
        // Publish once the back replica holds no unfolded events: then it holds a
        // whole number of pushes, folded.
        if settled {
            v.publish(&mut writer, self.backend.as_ref())?;
        }
        result
    }

    /// Folds every pending micro-batch now and publishes it to reads.
    ///
    /// # Errors
    /// A backend failure.
    pub fn flush(&self) -> Result<()> {
        self.views.iter().try_for_each(|v| self.settle(v))
    }

    /// Folds and publishes the pending micro-batches that are older than
    /// `batch_age`; a view whose writer is busy is skipped (its push folds what is due).
    /// Servers call this on a timer so that reads stay fresh between pushes.
    ///
    /// # Errors
    /// A backend failure.
    pub fn fold_due(&self) -> Result<()> {
        for v in &self.views {
            let mut writer = match v.writer.try_lock() {
                Ok(w) => w,
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Poisoned(_)) => return Err(poisoned(v.name())),
            };
            if writer.broken.is_some() || !writer.pushed {
                continue;
            }
            let due = v
                .back(&writer)?
                .pending_since
                .is_none_or(|t| t.elapsed() >= self.options.batch_age);
            if due {
                v.publish(&mut writer, self.backend.as_ref())?;
            }
        }
        Ok(())
    }

    /// Folds `view`'s pending events and publishes them, so that every read from now
    /// on sees them (the server does this when an ingest stream ends).
    ///
    /// # Errors
    /// Unknown view; a backend failure.
    pub fn publish(&self, view: &str) -> Result<()> {
        self.settle(self.view(view)?)
    }

    /// Settles `view` and encodes its state, watermark and counters as a checkpoint
    /// (see [`crate::checkpoint`]) that covers the source `positions`. Writes wait
    /// while it is encoded; reads do not.
    ///
    /// # Errors
    /// Unknown view; a backend failure while settling or downloading a GPU state.
    pub fn checkpoint(&self, view: &str, positions: &[SourcePosition]) -> Result<Vec<u8>> {
        let v = self.view(view)?;
        let mut writer = v.writer()?;
        v.publish(&mut writer, self.backend.as_ref())?;
        // Both replicas are equal now; the back one is the writer's alone.
        let back = v.back(&writer)?;
        checkpoint::encode(&v.compiled, &back, positions)
    }

    /// Replaces `view`'s state with a checkpoint's, in both replicas, and returns what
    /// the checkpoint covers. Events pushed before and not in the checkpoint are gone.
    ///
    /// # Errors
    /// Unknown view; [`PanesError::Invalid`] saying what is wrong with `bytes`
    /// (truncated, checksum mismatch, another format version, another view or
    /// definition).
    pub fn restore(&self, view: &str, bytes: &[u8]) -> Result<CheckpointInfo> {
        let v = self.view(view)?;
        let decode = || {
            checkpoint::decode(&v.compiled, bytes).map(|(mut core, info)| {
                adopt(&mut core, &self.options, &v.fold_time);
                (core, info)
            })
        };
        let invalid =
            |why: String| PanesError::Invalid(format!("view {view:?}: checkpoint: {why}"));
        let (a, info) = decode().map_err(invalid)?;
        let (b, _) = decode().map_err(invalid)?;
        let mut writer = v.writer.lock().map_err(|_| poisoned(view))?;
        v.recharge(&mut writer, &self.options, a.keys.len(), &a.strings);
        let front = v.front.load(Ordering::Acquire);
        *v.replicas[1 - front].write().map_err(|_| poisoned(view))? = b;
        *v.replicas[front].write().map_err(|_| poisoned(view))? = a;
        writer.pushed = false;
        writer.delta = Default::default();
        writer.broken = None;
        v.version.fetch_add(1, Ordering::AcqRel);
        Ok(info)
    }

    /// Publishes events of `view` pushed so far, so that a read sees them.
    pub(super) fn settle(&self, view: &View) -> Result<()> {
        let mut writer = view.writer()?;
        view.publish(&mut writer, self.backend.as_ref())
    }

    /// Durations of `view`'s micro-batch folds (each publish folds on both replicas).
    ///
    /// # Errors
    /// Unknown view.
    pub fn fold_time(&self, view: &str) -> Result<&Histogram> {
        Ok(&self.view(view)?.fold_time)
    }

    /// Freshness of `view`: per accepted event, the time from the arrival of the push
    /// that carried it to the publish that made it visible to reads (micro-batching,
    /// waiting for the writer, the fold and the publish).
    ///
    /// # Errors
    /// Unknown view.
    pub fn freshness(&self, view: &str) -> Result<&Histogram> {
        Ok(&self.view(view)?.freshness)
    }

    /// Counters and sizes of `view`.
    ///
    /// # Errors
    /// Unknown view.
    pub fn metrics(&self, view: &str) -> Result<ViewMetrics> {
        let v = self.view(view)?;
        // The back replica has taken every push; the writer lock keeps it still.
        let writer = v.writer.lock().map_err(|_| poisoned(view))?;
        let core = v.back(&writer)?;
        Ok(ViewMetrics {
            view: view.to_string(),
            counters: core.counters.clone(),
            keys: core.keys.len(),
            // Both replicas, each with its string table.
            state_bytes: 2
                * (core.state.memory_bytes() + core.events.memory_bytes() + core.strings.bytes()),
            max_event_time: core.max_ts,
            watermark: core
                .max_ts
                .map(|m| m.saturating_sub(v.compiled.spec.allowed_lateness)),
            pending: core.pending.len(),
            backend: self.backend.kind().name(),
            folded: core.folded,
            version: v.version.load(Ordering::Acquire),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(budget) = self.options.state_budget.as_deref() {
            for v in &self.views {
                v.release(&self.options, budget);
            }
        }
    }
}
