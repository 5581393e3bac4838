//! `panes._core`: the Rust engine as a Python extension module.
//!
//! A thin layer: Arrow data comes in through the Arrow PyCapsule interface (zero-copy
//! for primitive columns), goes to [`panes_engine`] unchanged, and results go back as
//! Arrow streams or numpy arrays. Definitions, ingest, windows and backfill are the
//! engine's; the Python package `panes` only shapes arguments and results.
//!
//! Every call that does real work releases the GIL, and an `Engine` may be shared by
//! Python threads: the engine serialises pushes and reads per view itself.
//!
//! One file of about 630 lines: the `#[pymodule]` with its classes and functions, each
//! only argument conversion around one engine call, and the one mapping of engine
//! errors to Python exceptions.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{
    Array, ArrayRef, Int64Array, RecordBatch, RecordBatchReader, StringArray, UInt64Array,
};
use arrow_schema::{ArrowError, SchemaRef};
use numpy::{PyArray2, PyReadonlyArray1};
use panes_engine::error::ErrorDomain;
use panes_engine::spec::format_duration;
use panes_engine::{
    BackendKind, BackfillOptions, Engine, EngineOptions, FeatureFile, PanesError, PushReport,
    ReadTime, StateBudget, ViewMetrics, Window,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use pyo3_arrow::input::AnyRecordBatch;
use pyo3_arrow::{PyArray, PyChunkedArray, PyTable};

/// Result of an engine call, before the GIL is taken back.
type EngineResult<T> = std::result::Result<T, PanesError>;

/// Turns an engine error into the matching `panes` exception, with its fields as
/// attributes (`view`, `column`, `issues`, …).
fn to_py(py: Python<'_>, e: PanesError) -> PyErr {
    build_error(py, &e).unwrap_or_else(|err| err)
}

fn build_error(py: Python<'_>, e: &PanesError) -> PyResult<PyErr> {
    let attrs = PyDict::new(py);
    let class = match e {
        PanesError::Spec(s) => {
            attrs.set_item("origin", &s.origin)?;
            let issues: Vec<(&str, &str, &str)> = s
                .issues
                .iter()
                .map(|i| (i.location.as_str(), i.field.as_str(), i.message.as_str()))
                .collect();
            attrs.set_item("issues", issues)?;
            "SpecError"
        }
        PanesError::Schema { view, column, .. } => {
            attrs.set_item("view", view)?;
            attrs.set_item("column", column)?;
            "SchemaError"
        }
        PanesError::UnknownView { name, .. } => {
            attrs.set_item("name", name)?;
            "UnknownViewError"
        }
        PanesError::UnknownFeature { view, name, .. } => {
            attrs.set_item("view", view)?;
            attrs.set_item("name", name)?;
            "UnknownFeatureError"
        }
        PanesError::InexactRead { view, key, at, .. } => {
            attrs.set_item("view", view)?;
            attrs.set_item("key", key)?;
            attrs.set_item("at", at)?;
            "InexactReadError"
        }
        PanesError::File { path, .. } => {
            attrs.set_item("path", path.display().to_string())?;
            "PanesFileError"
        }
        PanesError::Invalid(_)
        | PanesError::Arrow(_)
        | PanesError::ResourceExhausted(_)
        | PanesError::FailedPrecondition(_) => "DataError",
        PanesError::Unavailable(_) | PanesError::Fenced(_) => "BackendError",
        PanesError::Kernel(k) if k.domain() == ErrorDomain::User => "DataError",
        PanesError::Kernel(_) => "BackendError",
        _ => "InternalError",
    };
    let cls = py.import("panes._errors")?.getattr(class)?;
    let value = cls.call((e.to_string(),), Some(&attrs))?;
    Ok(PyErr::from_value(value))
}

fn data_error(py: Python<'_>, message: String) -> PyErr {
    to_py(py, PanesError::Invalid(message))
}

fn arrow_error(py: Python<'_>, what: &str, e: ArrowError) -> PyErr {
    data_error(py, format!("{what}: {e}"))
}

/// The feature engine (see `panes.Engine`, which wraps it).
#[pyclass(frozen, name = "Engine", module = "panes._core")]
struct PyEngine {
    inner: Arc<Engine>,
}

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (toml, origin = "<python>", backend = None, shards = 32, batch_rows = 65536, batch_age_ms = 50, read_copy = true, max_keys = None, max_state_bytes = None))]
    fn new(
        py: Python<'_>,
        toml: &str,
        origin: &str,
        backend: Option<&str>,
        shards: usize,
        batch_rows: usize,
        batch_age_ms: u64,
        read_copy: bool,
        max_keys: Option<usize>,
        max_state_bytes: Option<u64>,
    ) -> PyResult<Self> {
        let file = FeatureFile::parse(toml, origin).map_err(|e| to_py(py, e))?;
        let backend = backend
            .map(|b| b.parse::<BackendKind>())
            .transpose()
            .map_err(|e| to_py(py, PanesError::Kernel(e)))?;
        if batch_rows == 0 {
            return Err(data_error(py, "batch_rows must be positive".into()));
        }
        let options = EngineOptions {
            backend,
            shards,
            batch_rows,
            batch_age: Duration::from_millis(batch_age_ms),
            read_copy,
            max_keys,
            state_budget: max_state_bytes.map(|b| Arc::new(StateBudget::new(b))),
            ..EngineOptions::default()
        };
        let inner = Engine::new(&file, options).map_err(|e| to_py(py, e))?;
        Ok(PyEngine {
            inner: Arc::new(inner),
        })
    }

    /// The backend in use: `scalar`, `cpu` or `gpu`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend().kind().name()
    }

    /// The definitions as TOML; `Engine.from_toml_str` of it gives the same engine.
    fn to_toml(&self) -> String {
        self.inner.file().to_toml()
    }

    /// The views as plain data: `[{name, key, time, pane, allowed_lateness, read_time,
    /// features: [{name, agg, column, window, hop, half_life, precision, q,
    /// relative_accuracy, n, k, capacity}]}]`, durations formatted (each parameter None but for the
    /// aggregations that take it).
    fn views<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for v in &self.inner.file().views {
            let d = PyDict::new(py);
            d.set_item("name", &v.name)?;
            match v.key.as_slice() {
                [one] => d.set_item("key", one)?,
                parts => d.set_item("key", parts)?,
            }
            d.set_item("time", &v.time)?;
            d.set_item("pane", format_duration(v.pane))?;
            d.set_item("allowed_lateness", format_duration(v.allowed_lateness))?;
            let rt = match v.read_time {
                ReadTime::EventTime => "event_time",
                ReadTime::WallClock => "wall_clock",
            };
            d.set_item("read_time", rt)?;
            let features = PyList::empty(py);
            for f in &v.features {
                let fd = PyDict::new(py);
                fd.set_item("name", &f.name)?;
                fd.set_item("agg", f.agg.name())?;
                fd.set_item("column", &f.column)?;
                match f.window {
                    Window::Session(gap) => {
                        fd.set_item("window", py.None())?;
                        fd.set_item("session_gap", format_duration(gap))?;
                    }
                    w => fd.set_item("window", w.to_string())?,
                }
                let hop = (!f.window.is_event_window()).then(|| format_duration(f.hop));
                fd.set_item("hop", hop)?;
                fd.set_item("half_life", f.agg.half_life().map(format_duration))?;
                let precision = match f.agg {
                    panes_engine::Agg::ApproxDistinct { precision } => Some(precision),
                    _ => None,
                };
                fd.set_item("precision", precision)?;
                let (q, accuracy) = match f.agg {
                    panes_engine::Agg::Quantile {
                        q,
                        relative_accuracy,
                    } => (Some(q.get()), Some(relative_accuracy.get())),
                    _ => (None, None),
                };
                fd.set_item("q", q)?;
                fd.set_item("relative_accuracy", accuracy)?;
                let n = match f.agg {
                    panes_engine::Agg::LastN { n } => Some(n),
                    _ => None,
                };
                fd.set_item("n", n)?;
                let (k, capacity) = match f.agg {
                    panes_engine::Agg::TopK { k, capacity } => (Some(k), Some(capacity)),
                    _ => (None, None),
                };
                fd.set_item("k", k)?;
                fd.set_item("capacity", capacity)?;
                fd.set_item("filter", &f.filter)?;
                features.append(fd)?;
            }
            d.set_item("features", features)?;
            d.set_item("filter", &v.filter)?;
            let columns = PyDict::new(py);
            for c in &v.columns {
                columns.set_item(&c.name, &c.expr)?;
            }
            d.set_item("columns", columns)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Pushes every batch of `data` (anything exporting `__arrow_c_stream__` or
    /// `__arrow_c_array__`) into `view`, or into the one view whose key and time
    /// columns the data has. Returns the view and the report as a dict.
    #[pyo3(signature = (data, view = None))]
    fn push<'py>(
        &self,
        py: Python<'py>,
        data: AnyRecordBatch,
        view: Option<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let schema = data.schema()?;
        let view = match view {
            Some(v) => v,
            None => self.view_for_schema(&schema).map_err(|e| to_py(py, e))?,
        };
        let reader = data.into_reader()?;
        let engine = self.inner.clone();
        let name = view.clone();
        let report = py
            .detach(move || push_stream(&engine, &name, reader))
            .map_err(|e| to_py(py, e))?;
        report_dict(py, &view, &report)
    }

    /// Folds every pending micro-batch now.
    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        let engine = self.inner.clone();
        py.detach(move || engine.flush()).map_err(|e| to_py(py, e))
    }

    /// Reads features as an Arrow table (key column first), plus the read time.
    #[pyo3(signature = (keys, view = None, at = None, features = None))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        view: Option<String>,
        at: Option<i64>,
        features: Option<Vec<String>>,
    ) -> PyResult<(PyTable, i64)> {
        let (batch, at) = self.read_with(py, keys, view, features, move |e, view, keys, f| {
            e.read_batch(view, &keys, at, f)
        })?;
        let schema = batch.schema();
        Ok((PyTable::try_new(vec![batch], schema)?, at))
    }

    /// Reads features of every key the view holds as an Arrow table (key column
    /// first, keys in the state's order), plus the read time.
    #[pyo3(signature = (view = None, at = None, features = None))]
    fn read_all(
        &self,
        py: Python<'_>,
        view: Option<String>,
        at: Option<i64>,
        features: Option<Vec<String>>,
    ) -> PyResult<(PyTable, i64)> {
        let view = self
            .view_for_read(view, features.as_deref())
            .map_err(|e| to_py(py, e))?;
        let engine = self.inner.clone();
        let (batch, at) = py
            .detach(move || {
                let names: Option<Vec<&str>> = features
                    .as_ref()
                    .map(|f| f.iter().map(String::as_str).collect());
                engine.read_all(&view, at, names.as_deref())
            })
            .map_err(|e| to_py(py, e))?;
        let schema = batch.schema();
        Ok((PyTable::try_new(vec![batch], schema)?, at))
    }

    /// Reads features as a `keys × features` float64 matrix (NaN for null), with the
    /// feature names and the read time.
    #[pyo3(signature = (keys, view = None, at = None, features = None))]
    fn read_numpy<'py>(
        &self,
        py: Python<'py>,
        keys: &Bound<'py, PyAny>,
        view: Option<String>,
        at: Option<i64>,
        features: Option<Vec<String>>,
    ) -> PyResult<(Bound<'py, PyArray2<f64>>, Vec<String>, i64)> {
        let frame = self.read_with(py, keys, view, features, move |e, view, keys, f| {
            e.read(view, keys.as_ref(), at, f)
        })?;
        if !frame.lists.is_empty() {
            return Err(PyValueError::new_err(
                "a numpy read cannot hold list-valued features (last_n, top_k); read them as \
                 a DataFrame, or leave them out with features=[...]",
            ));
        }
        if let Some(c) = frame.text.iter().position(|&t| t) {
            return Err(PyValueError::new_err(format!(
                "a numpy float64 read cannot hold feature {:?}, whose values are strings; read \
                 it as a DataFrame, or leave it out with features=[...]",
                frame.names[c]
            )));
        }
        // The matrix moves into numpy without a copy.
        let values = PyArray2::from_owned_array(py, frame.values);
        Ok((values, frame.names, frame.at))
    }

    /// Point-in-time features for every spine row (DESIGN §3 backfill). `events` and
    /// `spine` are Arrow data or file paths (Parquet, CSV, Arrow IPC). Returns the
    /// spine with feature columns, the dead letters (when asked) and a report.
    #[pyo3(signature = (events, spine, at_column = "ts", dead_letter = false, service = None))]
    fn backfill<'py>(
        &self,
        py: Python<'py>,
        events: &Bound<'py, PyAny>,
        spine: &Bound<'py, PyAny>,
        at_column: &str,
        dead_letter: bool,
        service: Option<String>,
    ) -> PyResult<(PyTable, Option<PyTable>, Bound<'py, PyDict>)> {
        let events = Source::extract(events)?;
        let spine = Source::extract(spine)?;
        let engine = self.inner.clone();
        let options = BackfillOptions {
            at_column: at_column.to_string(),
            shards: engine.options().shards,
            progress: false,
            dead_letter,
        };
        let (schema, batches, mut report, events_schema) = py
            .detach(move || {
                let (events_schema, events) = events.load()?;
                let (spine_schema, spine) = spine.load()?;
                let backend = engine.backend().kind().create()?;
                let (schema, batches, report) = match &service {
                    Some(name) => panes_engine::backfill_service(
                        engine.file(),
                        name,
                        &events,
                        &spine_schema,
                        &spine,
                        backend,
                        &options,
                    )?,
                    None => panes_engine::backfill(
                        engine.file(),
                        &events,
                        &spine_schema,
                        &spine,
                        backend,
                        &options,
                    )?,
                };
                Ok::<_, PanesError>((schema, batches, report, events_schema))
            })
            .map_err(|e| to_py(py, e))?;
        let table = PyTable::try_new(batches, schema)?;
        let dead = if dead_letter {
            let schema = panes_engine::offline::backfill::dead_letter_schema(&events_schema);
            Some(PyTable::try_new(
                std::mem::take(&mut report.dead_letter),
                schema,
            )?)
        } else {
            None
        };
        let out = PyDict::new(py);
        out.set_item("spine_rows", report.spine_rows)?;
        out.set_item("spine_rows_without_time", report.spine_rows_without_time)?;
        out.set_item("skipped_views", &report.skipped_views)?;
        let views = PyDict::new(py);
        for (name, counters, keys) in &report.views {
            let d = PyDict::new(py);
            d.set_item("accepted", counters.accepted)?;
            d.set_item("late", counters.late)?;
            d.set_item("rejected", counters.rejected_total())?;
            d.set_item("keys", keys)?;
            views.set_item(name, d)?;
        }
        out.set_item("views", views)?;
        out.set_item("on_demand_errors", report.on_demand_errors)?;
        Ok((table, dead, out))
    }

    /// Reads feature service `service` for each row of `request` (Arrow data: the key
    /// columns of the service's views, an optional `at_column` time, the columns its
    /// on-demand features use): its features, then its on-demand features, one row
    /// per request row.
    #[pyo3(signature = (service, request, at_column = "ts"))]
    fn read_service(
        &self,
        py: Python<'_>,
        service: String,
        request: &Bound<'_, PyAny>,
        at_column: &str,
    ) -> PyResult<PyTable> {
        let request = Source::Data(request.extract::<AnyRecordBatch>()?.into_reader()?);
        let engine = self.inner.clone();
        let at_column = at_column.to_string();
        let batch = py
            .detach(move || {
                let (schema, batches) = request.load()?;
                let request = arrow_select::concat::concat_batches(&schema, &batches)?;
                engine.read_service(&service, &request, &at_column)
            })
            .map_err(|e| to_py(py, e))?;
        let schema = batch.schema();
        PyTable::try_new(vec![batch], schema)
    }

    /// The feature services: `[{name, features, on_demand: [{name, expr}]}]`.
    fn services<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for s in &self.inner.file().services {
            let d = PyDict::new(py);
            d.set_item("name", &s.name)?;
            d.set_item("features", &s.features)?;
            let od = PyList::empty(py);
            for x in &s.on_demand {
                let e = PyDict::new(py);
                e.set_item("name", &x.name)?;
                e.set_item("expr", &x.expr)?;
                od.append(e)?;
            }
            d.set_item("on_demand", od)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Counters and sizes of every view: `{view: {...}}`.
    fn metrics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for v in &self.inner.file().views {
            let m = self.inner.metrics(&v.name).map_err(|e| to_py(py, e))?;
            out.set_item(&v.name, metrics_dict(py, &m)?)?;
        }
        Ok(out)
    }
}

impl PyEngine {
    /// Resolves the keys and the view of a read, then runs `read` without the GIL.
    fn read_with<T: Send>(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        view: Option<String>,
        features: Option<Vec<String>>,
        read: impl FnOnce(&Engine, &str, ArrayRef, Option<&[&str]>) -> EngineResult<T> + Send,
    ) -> PyResult<T> {
        let keys = keys_array(py, keys)?;
        let view = self
            .view_for_read(view, features.as_deref())
            .map_err(|e| to_py(py, e))?;
        let engine = self.inner.clone();
        py.detach(move || {
            let names: Option<Vec<&str>> = features
                .as_ref()
                .map(|f| f.iter().map(String::as_str).collect());
            read(&engine, &view, keys, names.as_deref())
        })
        .map_err(|e| to_py(py, e))
    }

    /// The one view whose key and time columns `schema` has.
    fn view_for_schema(&self, schema: &SchemaRef) -> EngineResult<String> {
        let views = &self.inner.file().views;
        if let [only] = views.as_slice() {
            return Ok(only.name.clone());
        }
        let has = |c: &str| schema.field_with_name(c).is_ok();
        let matching: Vec<&str> = views
            .iter()
            .filter(|v| v.key.iter().all(|k| has(k)) && has(&v.time))
            .map(|v| v.name.as_str())
            .collect();
        match matching.as_slice() {
            [one] => Ok(one.to_string()),
            [] => Err(PanesError::Invalid(format!(
                "the data has the key and time columns of no view ({}); pass view=",
                views
                    .iter()
                    .map(|v| format!("{:?}: {} and {:?}", v.name, v.key_label(), v.time))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            many => Err(PanesError::Invalid(format!(
                "the data fits several views ({}); pass view= to choose one",
                many.join(", ")
            ))),
        }
    }

    /// The view a read addresses: named, the only one, or the one holding `features`.
    fn view_for_read(
        &self,
        view: Option<String>,
        features: Option<&[String]>,
    ) -> EngineResult<String> {
        if let Some(v) = view {
            return Ok(v);
        }
        let views = &self.inner.file().views;
        if let [only] = views.as_slice() {
            return Ok(only.name.clone());
        }
        let Some(features) = features.filter(|f| !f.is_empty()) else {
            return Err(PanesError::Invalid(format!(
                "the engine has {} views ({}); pass view= or features=",
                views.len(),
                views
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let owner = |f: &str| {
            views
                .iter()
                .find(|v| v.features.iter().any(|x| x.name == f))
                .map(|v| v.name.clone())
        };
        let first = owner(&features[0]).ok_or_else(|| {
            PanesError::Invalid(format!("no view has a feature {:?}", features[0]))
        })?;
        for f in &features[1..] {
            match owner(f) {
                Some(v) if v == first => {}
                Some(v) => {
                    return Err(PanesError::Invalid(format!(
                        "features {:?} (view {first:?}) and {f:?} (view {v:?}) are in different views; \
                         read each view separately",
                        features[0]
                    )));
                }
                None => {
                    return Err(PanesError::Invalid(format!("no view has a feature {f:?}")));
                }
            }
        }
        Ok(first)
    }
}

/// Pushes a stream of batches; row numbers in the report count from the stream's
/// first row.
fn push_stream(
    engine: &Engine,
    view: &str,
    reader: Box<dyn RecordBatchReader + Send>,
) -> EngineResult<PushReport> {
    let mut report = PushReport::default();
    let mut offset = 0;
    for batch in reader {
        let batch = batch?;
        report.append(engine.push_at(view, &batch, offset)?);
        offset += batch.num_rows();
    }
    Ok(report)
}

fn report_dict<'py>(py: Python<'py>, view: &str, r: &PushReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("view", view)?;
    d.set_item("accepted", r.accepted)?;
    d.set_item("late", r.late)?;
    d.set_item("rejected", r.rejected)?;
    let rejections: Vec<(usize, &str, &str)> = r
        .rejections
        .iter()
        .map(|x| (x.row, x.reason.name(), x.message.as_str()))
        .collect();
    d.set_item("rejections", rejections)?;
    Ok(d)
}

fn metrics_dict<'py>(py: Python<'py>, m: &ViewMetrics) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("accepted", m.counters.accepted)?;
    d.set_item("late", m.counters.late)?;
    let rejected = PyDict::new(py);
    for (reason, n) in m.rejected_by_reason() {
        rejected.set_item(reason, n)?;
    }
    d.set_item("rejected", rejected)?;
    d.set_item("null_values", m.counters.null_values)?;
    d.set_item("nan_values", m.counters.nan_values)?;
    d.set_item("expired", m.counters.expired)?;
    d.set_item("filtered", m.counters.filtered)?;
    d.set_item("expr_errors", m.counters.expr_errors)?;
    d.set_item("keys", m.keys)?;
    d.set_item("state_bytes", m.state_bytes)?;
    d.set_item("max_event_time", m.max_event_time)?;
    d.set_item("watermark", m.watermark)?;
    d.set_item("pending", m.pending)?;
    d.set_item("backend", m.backend)?;
    Ok(d)
}

/// Events or a spine: Arrow data already in memory, or a file to read.
enum Source {
    Path(String),
    Data(Box<dyn RecordBatchReader + Send>),
}

impl Source {
    fn extract(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(Source::Path(s.to_str()?.to_string()));
        }
        Ok(Source::Data(
            obj.extract::<AnyRecordBatch>()?.into_reader()?,
        ))
    }

    fn load(self) -> EngineResult<(SchemaRef, Vec<RecordBatch>)> {
        match self {
            Source::Path(p) => panes_engine::offline::io::read_file(std::path::Path::new(&p)),
            Source::Data(reader) => {
                let schema = reader.schema();
                let batches = reader.collect::<Result<Vec<_>, _>>()?;
                Ok((schema, batches))
            }
        }
    }
}

/// Keys of a read as one Arrow array: an Arrow array or chunked array (pyarrow,
/// polars Series, …), a 1-D int64 numpy array, or a sequence of `int`, `str` or
/// `None`.
fn keys_array(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<ArrayRef> {
    if obj.hasattr("__arrow_c_array__")? {
        let a: PyArray = obj.extract()?;
        return Ok(a.into_inner().0);
    }
    if obj.hasattr("__arrow_c_stream__")? {
        let c: PyChunkedArray = obj.extract()?;
        let (chunks, field) = c.into_inner();
        return match chunks.as_slice() {
            [one] => Ok(one.clone()),
            _ => {
                let refs: Vec<&dyn Array> = chunks.iter().map(|a| a.as_ref()).collect();
                if refs.is_empty() {
                    return Ok(arrow_array::new_empty_array(field.data_type()));
                }
                arrow_select::concat::concat(&refs).map_err(|e| arrow_error(py, "keys", e))
            }
        };
    }
    if let Ok(a) = obj.extract::<PyReadonlyArray1<'_, i64>>() {
        return Ok(Arc::new(Int64Array::from(a.as_slice()?.to_vec())));
    }
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<pyo3::types::PyBytes>() {
        return Err(PyTypeError::new_err(
            "keys must be a sequence of keys, not a single string; wrap it in a list",
        ));
    }
    let Ok(items) = obj.try_iter() else {
        return Err(PyTypeError::new_err(format!(
            "keys must be a list, a numpy array, a pyarrow array or a polars Series; got {}",
            obj.get_type().name()?
        )));
    };
    let mut keys: Vec<PyKey> = Vec::new();
    for (i, item) in items.enumerate() {
        let item = item?;
        keys.push(if item.is_none() {
            PyKey::Null
        } else if let Ok(s) = item.cast::<PyString>() {
            PyKey::Str(s.to_str()?.to_string())
        } else if let Ok(v) = item.extract::<i64>() {
            PyKey::Int(v)
        } else if let Ok(v) = item.extract::<u64>() {
            PyKey::Big(v)
        } else {
            return Err(data_error(
                py,
                format!(
                    "keys[{i}]: expected an int, a str or None, got {}",
                    item.get_type().name()?
                ),
            ));
        });
    }
    let any = |f: fn(&PyKey) -> bool| keys.iter().any(f);
    let is_int = |k: &PyKey| matches!(k, PyKey::Int(_) | PyKey::Big(_));
    let is_str = |k: &PyKey| matches!(k, PyKey::Str(_));
    if any(is_str) {
        if any(is_int) {
            return Err(data_error(
                py,
                "keys mix str and int values; use one key type".into(),
            ));
        }
        return Ok(Arc::new(StringArray::from_iter(keys.into_iter().map(
            |k| match k {
                PyKey::Str(s) => Some(s),
                _ => None,
            },
        ))));
    }
    if any(|k| matches!(k, PyKey::Big(_))) {
        if any(|k| matches!(k, PyKey::Int(v) if *v < 0)) {
            return Err(data_error(
                py,
                "keys mix negative ints and ints above 2^63; no integer type holds both".into(),
            ));
        }
        return Ok(Arc::new(UInt64Array::from_iter(keys.into_iter().map(
            |k| match k {
                PyKey::Int(v) => Some(v as u64),
                PyKey::Big(v) => Some(v),
                _ => None,
            },
        ))));
    }
    Ok(Arc::new(Int64Array::from_iter(keys.into_iter().map(
        |k| match k {
            PyKey::Int(v) => Some(v),
            _ => None,
        },
    ))))
}

/// One key of a Python sequence.
enum PyKey {
    Null,
    Int(i64),
    Big(u64),
    Str(String),
}

/// The `panes._core` module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("__all__", vec!["Engine", "__version__"])?;
    Ok(())
}
