//! The online engine: push batches, read feature vectors.

use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch};
use arrow_buffer::NullBuffer;
use arrow_schema::{DataType, Field, Schema};
use ndarray::Array2;
use panes_kernels::{Agg, Backend, BackendKind, MergeOutput};

use crate::error::{PanesError, Result};
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
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            backend: None,
            shards: 32,
            batch_rows: 64 * 1024,
            batch_age: Duration::from_millis(50),
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
    /// Bytes of pane state.
    pub state_bytes: usize,
    /// Latest accepted event time.
    pub max_event_time: Option<i64>,
    /// The watermark: latest event time − allowed lateness.
    pub watermark: Option<i64>,
    /// Accepted events not yet folded.
    pub pending: usize,
    /// The backend in use.
    pub backend: &'static str,
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

#[derive(Debug)]
struct View {
    compiled: CompiledView,
    core: RwLock<ViewCore>,
}

/// The feature engine: views of a feature file, their state, and a backend.
///
/// Thread-safe: pushes and reads of one view are serialised by a lock; a micro-batch
/// is folded under the write lock, so a read sees all of a micro-batch or none of it.
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

impl Engine {
    /// An engine for `file`.
    ///
    /// # Errors
    /// When the backend cannot be built or `options.shards` is not a power of two.
    pub fn new(file: &FeatureFile, options: EngineOptions) -> Result<Self> {
        let backend = options.create_backend()?;
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
                let core = RwLock::new(ViewCore::new(&compiled)?);
                Ok(View { compiled, core })
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

    /// The compiled views.
    pub fn views(&self) -> impl Iterator<Item = &CompiledView> {
        self.views.iter().map(|v| &v.compiled)
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

    fn lock<'a>(&self, view: &'a View) -> Result<RwLockWriteGuard<'a, ViewCore>> {
        view.core.write().map_err(|_| {
            PanesError::Internal(format!(
                "view {:?}: a fold panicked",
                view.compiled.spec.name
            ))
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
        let mut core = self.lock(v)?;
        let rows = batch.num_rows();
        let step = self.options.batch_rows.max(1);
        let mut report = PushReport::default();
        let mut offset = 0;
        loop {
            let len = step.min(rows - offset);
            let part = batch.slice(offset, len);
            match core.ingest(&v.compiled, &part, first_row + offset) {
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
            let due = core.pending.len() >= self.options.batch_rows
                || core
                    .pending_since
                    .is_some_and(|t| t.elapsed() >= self.options.batch_age);
            if due {
                core.fold_pending(self.backend.as_ref())?;
            }
            offset += len;
            if offset >= rows {
                return Ok(report);
            }
        }
    }

    /// Folds every pending micro-batch now.
    ///
    /// # Errors
    /// A backend failure.
    pub fn flush(&self) -> Result<()> {
        for v in &self.views {
            self.lock(v)?.fold_pending(self.backend.as_ref())?;
        }
        Ok(())
    }

    /// Reads the features of `keys` (an Arrow array of any key type) from `view` as of
    /// `at` (epoch ms; default: the view's read time). `features` selects and orders
    /// the features; `None` returns all of the view's.
    ///
    /// Pending events are folded first, so a read sees every event pushed before it.
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

    /// Folds pending events, resolves key ids with `ids`, merges, and checks exactness
    /// (`key_of` names a key in errors).
    fn read_with(
        &self,
        view: &str,
        at: Option<i64>,
        features: Option<&[&str]>,
        ids: impl FnOnce(&KeyIndex) -> Result<Vec<Option<u32>>>,
        key_of: impl Fn(usize) -> String,
    ) -> Result<FeatureFrame> {
        let v = self.view(view)?;
        let mut core = self.lock(v)?;
        core.fold_pending(self.backend.as_ref())?;
        let ids = ids(&core.keys)?;
        let ids = ids.as_slice();
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
            ReadTime::EventTime => core.max_ts.unwrap_or(0),
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
        let shape = (ids.len(), merges.len());
        let values = Array2::from_shape_vec(shape, out.values)
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        let valid = Array2::from_shape_vec(shape, out.valid)
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        Ok(FeatureFrame {
            names: selected
                .iter()
                .map(|&i| compiled.spec.features[i].name.clone())
                .collect(),
            values,
            valid,
            at,
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
        let compiled = &self.view(view)?.compiled;
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
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        Ok((batch, frame.at))
    }

    /// Counters and sizes of `view`.
    ///
    /// # Errors
    /// Unknown view.
    pub fn metrics(&self, view: &str) -> Result<ViewMetrics> {
        let v = self.view(view)?;
        let core = v
            .core
            .read()
            .map_err(|_| PanesError::Internal("a fold panicked".into()))?;
        Ok(ViewMetrics {
            view: view.to_string(),
            counters: core.counters.clone(),
            keys: core.keys.len(),
            state_bytes: core.state.memory_bytes(),
            max_event_time: core.max_ts,
            watermark: core
                .max_ts
                .map(|m| m.saturating_sub(v.compiled.spec.allowed_lateness)),
            pending: core.pending.len(),
            backend: self.backend.kind().name(),
        })
    }
}
