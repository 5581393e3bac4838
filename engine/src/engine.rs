//! The online engine: push batches, read feature vectors.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Schema};
use ndarray::Array2;
use panes_kernels::{Agg, Backend, BackendKind, FeatureMerge, MergeOutput};

use crate::checkpoint::{self, CheckpointInfo, SourcePosition};
use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::ingest::{PushReport, RejectReason, ViewCounters};
use crate::keys::{KeyColumn, KeyIndex, KeyValue};
use crate::spec::{FeatureFile, ReadTime};
use crate::view::{CompiledView, ViewCore, check_exact};

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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: None,
            shards: 32,
            batch_rows: 64 * 1024,
            batch_age: Duration::from_millis(50),
            read_copy: true,
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

/// Feature values of some keys as of one time.
#[derive(Clone, Debug)]
pub struct FeatureFrame {
    /// Feature names, the columns of `values`.
    pub names: Vec<String>,
    /// `keys × features`; NaN where `valid` is false.
    pub values: Array2<f64>,
    /// Validity of each value (false = null).
    pub valid: Array2<bool>,
    /// The read time, epoch ms.
    pub at: i64,
}

/// The output field of a feature: `count` as Int64, every other aggregation as
/// Float64; nullable.
pub fn feature_field(name: &str, agg: Agg) -> Field {
    let ty = if agg == Agg::Count {
        DataType::Int64
    } else {
        DataType::Float64
    };
    Field::new(name, ty, true)
}

/// The output column of a feature from `(value, valid)` pairs, typed as
/// [`feature_field`]; null where not valid.
pub fn feature_column(agg: Agg, rows: impl Iterator<Item = (f64, bool)>) -> ArrayRef {
    if agg == Agg::Count {
        Arc::new(Int64Array::from_iter(
            rows.map(|(v, ok)| ok.then_some(v as i64)),
        ))
    } else {
        let (values, valid): (Vec<f64>, Vec<bool>) = rows.unzip();
        let nulls = NullBuffer::from(valid);
        let nulls = (nulls.null_count() > 0).then_some(nulls);
        Arc::new(Float64Array::new(values.into(), nulls))
    }
}

/// A point-in-time snapshot of a view's counters and state size.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewMetrics {
    /// The view.
    pub view: String,
    /// Counters.
    pub counters: ViewCounters,
    /// Distinct keys.
    pub keys: usize,
    /// Bytes of pane state (both replicas, with the `Cpu` backend's read copies).
    pub state_bytes: usize,
    /// Latest accepted event time.
    pub max_event_time: Option<i64>,
    /// The watermark: latest event time − allowed lateness.
    pub watermark: Option<i64>,
    /// Accepted events not yet folded.
    pub pending: usize,
    /// The backend in use.
    pub backend: &'static str,
    /// Events folded into the state.
    pub folded: u64,
    /// Publishes so far.
    pub version: u64,
}

impl ViewMetrics {
    /// `(reason, count)` for every rejection reason.
    pub fn rejected_by_reason(&self) -> Vec<(&'static str, u64)> {
        RejectReason::ALL
            .iter()
            .map(|r| (r.name(), self.counters.rejected(*r)))
            .collect()
    }
}

/// One view: its definition, two replicas of its core, and the writer's log.
///
/// See [`Engine`] for the protocol.
#[derive(Debug)]
struct View {
    compiled: CompiledView,
    /// Held by the one writer (push, fold, publish); guards the back replica's use.
    writer: Mutex<Writer>,
    replicas: [RwLock<ViewCore>; 2],
    /// Index of the replica readers use.
    front: AtomicUsize,
    /// Publishes so far: a read reports the version it saw.
    version: AtomicU64,
    /// Durations of this view's folds (both replicas).
    fold_time: Arc<Histogram>,
}

/// The writer's side of a view: what the back replica has taken since the last
/// publish, for the other replica to replay.
#[derive(Debug, Default)]
struct Writer {
    log: Vec<(RecordBatch, usize)>,
    /// Set when a replay failed and the replicas may differ: the view refuses writes.
    broken: Option<String>,
}

/// A consistent, published state of a view, held for one read.
struct Snapshot<'a> {
    core: RwLockReadGuard<'a, ViewCore>,
    version: u64,
}

/// Feature values with per-key serving metadata (see [`Engine::read_snapshot`]).
#[derive(Clone, Debug)]
pub struct ServedFrame {
    /// The features.
    pub frame: FeatureFrame,
    /// Per key: time of its latest folded event (`i64::MIN` for a key never seen).
    pub latest_event_ms: Vec<i64>,
    /// Per key: events in the widest window among the features read, as of `frame.at`.
    pub window_events: Vec<u64>,
    /// Publishes of the view so far when the read started.
    pub version: u64,
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
    file: FeatureFile,
    views: Vec<View>,
    backend: Arc<dyn Backend>,
    options: EngineOptions,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Makes `core` a replica of this engine's view: the engine's read-copy setting and
/// the view's fold-time histogram (for new replicas and for restored ones alike).
fn adopt(core: &mut ViewCore, options: &EngineOptions, fold_time: &Arc<Histogram>) {
    core.state.keep_read_copy(options.read_copy);
    core.fold_time = Some(fold_time.clone());
}

fn poisoned(view: &str) -> PanesError {
    PanesError::Internal(format!("view {view:?}: a fold panicked"))
}

/// Ingests `batch` (rows from `first_row` of the pushed stream) into `core` in slices
/// of `batch_rows`, folding whenever the pending micro-batch is due (by size; by age
/// too when `by_age`).
fn push_into(
    core: &mut ViewCore,
    compiled: &CompiledView,
    batch: &RecordBatch,
    first_row: usize,
    options: &EngineOptions,
    backend: &dyn Backend,
    by_age: bool,
) -> Result<PushReport> {
    let rows = batch.num_rows();
    let step = options.batch_rows.max(1);
    let mut report = PushReport::default();
    let mut offset = 0;
    loop {
        let len = step.min(rows - offset);
        let part = batch.slice(offset, len);
        match core.ingest(compiled, &part, first_row + offset) {
            Ok(r) => report.append(r),
            Err(e) => {
                // Every slice has the batch's schema, so a schema error comes from
                // the first one; the rest of the batch is rejected with it.
                if matches!(e, PanesError::Schema { .. }) {
                    core.counters.rejected[RejectReason::Schema as usize] +=
                        (rows - offset - len) as u64;
                }
                return Err(e);
            }
        }
        let due = core.pending.len() >= options.batch_rows
            || (by_age
                && core
                    .pending_since
                    .is_some_and(|t| t.elapsed() >= options.batch_age));
        if due {
            core.fold_pending(backend)?;
        }
        offset += len;
        if offset >= rows {
            return Ok(report);
        }
    }
}

impl View {
    fn name(&self) -> &str {
        &self.compiled.spec.name
    }

    fn writer(&self) -> Result<MutexGuard<'_, Writer>> {
        let w = self.writer.lock().map_err(|_| poisoned(self.name()))?;
        if let Some(why) = &w.broken {
            return Err(PanesError::Internal(format!(
                "view {:?} stopped taking writes: {why}",
                self.name()
            )));
        }
        Ok(w)
    }

    /// The back replica; only the holder of the writer lock may call this.
    fn back(&self, _writer: &MutexGuard<'_, Writer>) -> Result<RwLockWriteGuard<'_, ViewCore>> {
        let back = 1 - self.front.load(Ordering::Acquire);
        self.replicas[back]
            .write()
            .map_err(|_| poisoned(self.name()))
    }

    /// A published replica, for one read. Never waits for the writer.
    fn snapshot(&self) -> Result<Snapshot<'_>> {
        loop {
            let version = self.version.load(Ordering::Acquire);
            let i = self.front.load(Ordering::Acquire);
            match self.replicas[i].try_read() {
                Ok(core) => return Ok(Snapshot { core, version }),
                // The writer holds it: the front moved after our load. Retry on the new one.
                Err(TryLockError::WouldBlock) => std::thread::yield_now(),
                Err(TryLockError::Poisoned(_)) => return Err(poisoned(self.name())),
            }
        }
    }

    /// Folds the back replica's pending events and, if it took anything since the last
    /// publish, publishes it and brings the other replica up to date.
    fn publish(
        &self,
        writer: &mut MutexGuard<'_, Writer>,
        options: &EngineOptions,
        backend: &dyn Backend,
    ) -> Result<()> {
        {
            let mut back = self.back(writer)?;
            back.fold_pending(backend)?;
        }
        if writer.log.is_empty() {
            return Ok(());
        }
        let old = self.front.load(Ordering::Acquire);
        self.front.store(1 - old, Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
        // Waits for the reads already inside the old front; new reads use the new one.
        let mut core = self.replicas[old]
            .write()
            .map_err(|_| poisoned(self.name()))?;
        let replay = (|| {
            for (batch, first_row) in &writer.log {
                // The same rows in the same order make the same decisions; the errors
                // were reported when the rows were first pushed.
                match push_into(
                    &mut core,
                    &self.compiled,
                    batch,
                    *first_row,
                    options,
                    backend,
                    false,
                ) {
                    Ok(_) | Err(PanesError::Schema { .. } | PanesError::Invalid(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            core.fold_pending(backend)
        })();
        writer.log.clear();
        if let Err(e) = &replay {
            writer.broken = Some(format!("replaying a publish failed: {e}"));
        }
        replay
    }
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
                })
            })
            .collect::<Result<_>>()?;
        Ok(Engine {
            file: file.clone(),
            views,
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

    fn view(&self, name: &str) -> Result<&View> {
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
        let v = self.view(view)?;
        let mut writer = v.writer()?;
        let mut back = v.back(&writer)?;
        let result = push_into(
            &mut back,
            &v.compiled,
            batch,
            first_row,
            &self.options,
            self.backend.as_ref(),
            true,
        );
        let settled = back.pending.is_empty();
        drop(back);
        writer.log.push((batch.clone(), first_row));
        if let Err(e) = &result
            && !matches!(e, PanesError::Schema { .. } | PanesError::Invalid(_))
        {
            writer.broken = Some(format!("a fold failed: {e}"));
            return result;
        }
        // Publish once the back replica holds no unfolded events: then it holds a
        // whole number of pushes, folded.
        if settled {
            v.publish(&mut writer, &self.options, self.backend.as_ref())?;
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
            if writer.broken.is_some() || writer.log.is_empty() {
                continue;
            }
            let due = v
                .back(&writer)?
                .pending_since
                .is_none_or(|t| t.elapsed() >= self.options.batch_age);
            if due {
                v.publish(&mut writer, &self.options, self.backend.as_ref())?;
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
        v.publish(&mut writer, &self.options, self.backend.as_ref())?;
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
        let front = v.front.load(Ordering::Acquire);
        *v.replicas[1 - front].write().map_err(|_| poisoned(view))? = b;
        *v.replicas[front].write().map_err(|_| poisoned(view))? = a;
        writer.log.clear();
        writer.broken = None;
        v.version.fetch_add(1, Ordering::AcqRel);
        Ok(info)
    }

    /// Publishes events of `view` pushed so far, so that a read sees them.
    fn settle(&self, view: &View) -> Result<()> {
        let mut writer = view.writer()?;
        view.publish(&mut writer, &self.options, self.backend.as_ref())
    }

    /// Reads the features of `keys` (an Arrow array of any key type) from `view` as of
    /// `at` (epoch ms; default: the view's read time). `features` selects and orders
    /// the features; `None` returns all of the view's.
    ///
    /// Events pushed before are folded and published first, so a read sees every one
    /// of them (the server reads with [`Engine::read_snapshot`], which never folds).
    /// Unknown and null keys get the empty-window values.
    ///
    /// # Errors
    /// Unknown view or feature; keys of an unsupported type, or strings for a view
    /// whose keys are all integers (and the reverse);
    /// [`PanesError::InexactRead`] when `at` lies before the events already folded for
    /// a key in a way the panes cannot separate (use backfill for history).
    pub fn read(
        &self,
        view: &str,
        keys: &dyn Array,
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<FeatureFrame> {
        let col = KeyColumn::new(keys)
            .map_err(|m| PanesError::Invalid(format!("view {view:?}: keys {m}")))?;
        self.read_with(
            view,
            at,
            features,
            |index| {
                if keys.null_count() < keys.len() {
                    index.check_kind(view, col.is_text(), keys.data_type())?;
                }
                Ok((0..keys.len()).map(|i| col.lookup(i, index)).collect())
            },
            |k| {
                col.value(k)
                    .map_or_else(|| "null".into(), |k| k.to_string())
            },
        )
    }

    /// Like [`Engine::read`], with keys given as values.
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_keys(
        &self,
        view: &str,
        keys: &[KeyValue],
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<FeatureFrame> {
        self.read_with(
            view,
            at,
            features,
            |index| Ok(keys.iter().map(|k| index.get(k)).collect()),
            |k| keys[k].to_string(),
        )
    }

    /// Reads `keys` of `view` from the published state, without folding: the
    /// server's read. It never waits for a fold and sees all of a push or none of it.
    /// Besides the values it returns, per key, the time of the key's latest event and
    /// the number of events in the widest window read (support for a model).
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_snapshot(
        &self,
        view: &str,
        keys: &[KeyValue],
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<ServedFrame> {
        let v = self.view(view)?;
        let text = keys.iter().any(|k| matches!(k, KeyValue::Str(_)));
        crate::error::ensure!(
            keys.iter().all(|k| matches!(k, KeyValue::Str(_)) == text),
            "view {view:?}: keys mix strings and integers"
        );
        let snap = v.snapshot()?;
        if !keys.is_empty() {
            let given = if text {
                DataType::Utf8
            } else {
                DataType::Int64
            };
            snap.core.keys.check_kind(view, text, &given)?;
        }
        let ids: Vec<Option<u32>> = keys.iter().map(|k| snap.core.keys.get(k)).collect();
        self.merge_at(v, &snap, &ids, at, features, true, |k| keys[k].to_string())
    }

    /// Publishes pending events, resolves key ids with `ids`, merges, and checks
    /// exactness (`key_of` names a key in errors).
    fn read_with(
        &self,
        view: &str,
        at: Option<i64>,
        features: Option<&[&str]>,
        ids: impl FnOnce(&KeyIndex) -> Result<Vec<Option<u32>>>,
        key_of: impl Fn(usize) -> String,
    ) -> Result<FeatureFrame> {
        let v = self.view(view)?;
        self.settle(v)?;
        let snap = v.snapshot()?;
        let ids = ids(&snap.core.keys)?;
        Ok(self
            .merge_at(v, &snap, &ids, at, features, false, key_of)?
            .frame)
    }

    /// Merges `features` (all if `None`) of key `ids` from a snapshot as of `at`
    /// (default: the view's read time); with `meta`, also the per-key metadata.
    #[allow(clippy::too_many_arguments)]
    fn merge_at(
        &self,
        v: &View,
        snap: &Snapshot<'_>,
        ids: &[Option<u32>],
        at: Option<i64>,
        features: Option<&[&str]>,
        meta: bool,
        key_of: impl Fn(usize) -> String,
    ) -> Result<ServedFrame> {
        let core = &snap.core;
        let compiled = &v.compiled;
        let selected: Vec<usize> = match features {
            None => (0..compiled.merges.len()).collect(),
            Some(names) => names
                .iter()
                .map(|n| compiled.feature_index(n))
                .collect::<Result<_>>()?,
        };
        let merges: Vec<_> = selected.iter().map(|&i| compiled.merges[i]).collect();
        let at = at.unwrap_or_else(|| match compiled.spec.read_time {
            ReadTime::EventTime => core.folded_max_ts.unwrap_or(0),
            ReadTime::WallClock => now_ms(),
        });
        crate::error::ensure!(
            at.unsigned_abs() <= panes_kernels::MAX_TIME_MS,
            "read time {at} ms is out of range: times must lie within ±2^60 ms of the epoch"
        );
        let mut out = MergeOutput::default();
        self.backend
            .merge(&core.state, &merges, ids, at, &mut out)?;
        check_exact(compiled, &out, at, key_of)?;
        let (mut window_events, mut latest_event_ms) = (Vec::new(), Vec::new());
        if meta {
            // Events behind the widest window read: a count of rows over its panes.
            let widest = merges.iter().max_by_key(|m| {
                m.panes.map_or(u128::MAX, |p| {
                    p as u128 * compiled.state.levels[m.level].hop as u128
                })
            });
            window_events = match widest {
                Some(w) => {
                    let count = FeatureMerge {
                        agg: Agg::Count,
                        column: None,
                        ..*w
                    };
                    let mut support = MergeOutput::default();
                    self.backend
                        .merge(&core.state, &[count], ids, at, &mut support)?;
                    support.values.iter().map(|&c| c as u64).collect()
                }
                None => vec![0; ids.len()],
            };
            latest_event_ms = ids
                .iter()
                .map(|id| {
                    id.and_then(|id| core.latest.get(id as usize).copied())
                        .unwrap_or(i64::MIN)
                })
                .collect();
        }
        let shape = (ids.len(), merges.len());
        let values = Array2::from_shape_vec(shape, out.values)
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        let valid = Array2::from_shape_vec(shape, out.valid)
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        Ok(ServedFrame {
            frame: FeatureFrame {
                names: selected
                    .iter()
                    .map(|&i| compiled.spec.features[i].name.clone())
                    .collect(),
                values,
                valid,
                at,
            },
            latest_event_ms,
            window_events,
            version: snap.version,
        })
    }

    /// Like [`Engine::read`], as a record batch: the keys as given (column named by
    /// the view's key), then one column per feature (see [`feature_field`]).
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_batch(
        &self,
        view: &str,
        keys: &ArrayRef,
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<(RecordBatch, i64)> {
        let frame = self.read(view, keys.as_ref(), at, features)?;
        let batch = self.frame_batch(view, keys, &frame)?;
        Ok((batch, frame.at))
    }

    /// `frame` (read from `view` for `keys`) as a record batch: the keys as given
    /// (column named by the view's key), then one column per feature (see
    /// [`feature_field`]).
    ///
    /// # Errors
    /// Unknown view or feature; `keys` not as long as the frame.
    pub fn frame_batch(
        &self,
        view: &str,
        keys: &ArrayRef,
        frame: &FeatureFrame,
    ) -> Result<RecordBatch> {
        let compiled = self.compiled(view)?;
        let mut fields = vec![Field::new(
            compiled.spec.key.clone(),
            keys.data_type().clone(),
            true,
        )];
        let mut columns = vec![keys.clone()];
        for (j, name) in frame.names.iter().enumerate() {
            let agg = compiled.spec.features[compiled.feature_index(name)?].agg;
            fields.push(feature_field(name, agg));
            let col = frame.values.column(j);
            let valid = frame.valid.column(j);
            columns.push(feature_column(
                agg,
                col.iter().zip(valid.iter()).map(|(v, ok)| (*v, *ok)),
            ));
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }

    /// The kind of keys `view` holds in its published state: `"int"`, `"string"`, or
    /// `None` before any.
    ///
    /// # Errors
    /// Unknown view.
    pub fn key_kind(&self, view: &str) -> Result<Option<&'static str>> {
        Ok(self.view(view)?.snapshot()?.core.keys.kind())
    }

    /// Durations of `view`'s micro-batch folds (each publish folds on both replicas).
    ///
    /// # Errors
    /// Unknown view.
    pub fn fold_time(&self, view: &str) -> Result<&Histogram> {
        Ok(&self.view(view)?.fold_time)
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
            state_bytes: 2 * core.state.memory_bytes(),
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
