//! Backfill: point-in-time feature values for a spine of `(key, time)` rows, computed
//! by the same ingest, fold and read code as the online engine.
//!
//! For each view whose key column the spine has:
//! 1. every event batch goes through the online ingest in file order, so lateness is
//!    decided exactly as online (per event, in arrival order);
//! 2. the accepted events are stably sorted by time (ties keep arrival order, so
//!    `last` still picks the event ingested last);
//! 3. spine rows are visited in time order; before the rows at time `t` are read, every
//!    accepted event with `ts <= t` is folded, and the read at `t` is then exact.
//!
//! Memory is the accepted events (`4 + 8 + 8 × value columns` bytes each, twice while
//! sorting) plus the pane state plus the output columns.

use std::io::IsTerminal;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use indicatif::{ProgressBar, ProgressStyle};
use panes_kernels::{Agg, Backend, FoldBatch, MergeOutput, ReadStatus};

use crate::error::{PanesError, Result};
use crate::ingest::ViewCore;
use crate::ingest::keys::KeyColumn;
use crate::ingest::strings::finish_lists;
use crate::ingest::{Decoded, KeyCap, PushReport, TimeColumn, ViewCounters};
use crate::online::{Strings, feature_column, feature_field, list_column};
use crate::spec::{CompiledView, state_values};
use crate::spec::{FeatureFile, ViewSpec};

/// How a backfill runs.
#[derive(Clone, Debug)]
pub struct BackfillOptions {
    /// The spine's time column.
    pub at_column: String,
    /// Key shards of the pane state (a power of two).
    pub shards: usize,
    /// Show a progress bar (on stderr).
    pub progress: bool,
    /// Collect the late and rejected events (see [`BackfillReport::dead_letter`]).
    pub dead_letter: bool,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            at_column: "ts".into(),
            shards: 32,
            progress: std::io::stdout().is_terminal(),
            dead_letter: false,
        }
    }
}

/// What a backfill did, per view.
#[derive(Clone, Debug, Default)]
pub struct BackfillReport {
    /// `(view, counters, distinct keys)` for each view computed.
    pub views: Vec<(String, ViewCounters, usize)>,
    /// Views skipped because the spine lacks their key column.
    pub skipped_views: Vec<String>,
    /// Spine rows.
    pub spine_rows: usize,
    /// Spine rows whose time was null or unparsable (their features are null).
    pub spine_rows_without_time: usize,
    /// With [`BackfillOptions::dead_letter`]: the late and rejected events, as the
    /// events' columns plus `panes_view` and `panes_reason` (`late`, `null_key`,
    /// `null_time`, `bad_time`, `schema`, `key_limit`), in file order per view.
    pub dead_letter: Vec<RecordBatch>,
    /// Spine rows whose on-demand expression could not be evaluated (null there), with
    /// `--service`.
    pub on_demand_errors: u64,
}

/// Schema of the dead-letter output for events of schema `events`.
pub fn dead_letter_schema(events: &Schema) -> SchemaRef {
    let mut fields: Vec<Field> = events.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new("panes_view", DataType::Utf8, false));
    fields.push(Field::new("panes_reason", DataType::Utf8, false));
    Arc::new(Schema::new(fields))
}

/// The rows of `batch` a push report did not accept, with the view and the reason.
fn dead_letters(
    view: &str,
    batch: &RecordBatch,
    report: &PushReport,
) -> Result<Option<RecordBatch>> {
    let mut rows: Vec<(u32, &'static str)> =
        report.late_rows.iter().map(|&r| (r, "late")).collect();
    rows.extend(
        report
            .rejected_rows
            .iter()
            .map(|&(r, reason)| (r, reason.name())),
    );
    if rows.is_empty() {
        return Ok(None);
    }
    rows.sort_unstable_by_key(|r| r.0);
    let idx = UInt32Array::from_iter_values(rows.iter().map(|r| r.0));
    let mut cols = batch
        .columns()
        .iter()
        .map(|c| arrow_select::take::take(c.as_ref(), &idx, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    cols.push(Arc::new(StringArray::from(vec![view; rows.len()])));
    cols.push(Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.1),
    )));
    Ok(Some(RecordBatch::try_new(
        dead_letter_schema(&batch.schema()),
        cols,
    )?))
}

/// Computes features for every spine row.
///
/// Returns the spine's batches with one column per feature appended (named by the
/// feature; `count` as Int64, everything else Float64; null where the spine row has no
/// time, or where the aggregation is null), in spine order.
///
/// # Errors
/// A missing or mistyped column in the events or the spine; a feature name that
/// collides with a spine column; no view matching the spine.
pub fn backfill(
    file: &FeatureFile,
    events: &[RecordBatch],
    spine_schema: &SchemaRef,
    spine: &[RecordBatch],
    backend: Arc<dyn Backend>,
    options: &BackfillOptions,
) -> Result<(SchemaRef, Vec<RecordBatch>, BackfillReport)> {
    let rows: usize = spine.iter().map(|b| b.num_rows()).sum();
    let mut report = BackfillReport {
        spine_rows: rows,
        ..Default::default()
    };
    let times = SpineTimes::new(spine_schema, spine, &options.at_column)?;
    report.spine_rows_without_time = times.at.iter().filter(|t| t.is_none()).count();
    let views = views_on_spine(file, spine_schema, &mut report)?;
    let progress = progress_bar(options.progress, (rows * views.len()) as u64);

    let mut fields: Vec<Field> = spine_schema
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut columns: Vec<Vec<ArrayRef>> = spine.iter().map(|b| b.columns().to_vec()).collect();
    for spec in views {
        progress.set_message(format!("view {}", spec.name));
        let view = CompiledView::new(spec, options.shards);
        view.check_backend(&*backend)?;
        let mut core = ViewCore::new(&view)?;
        // Reads here come between folds, in time order: the key-major read copy
        // serving keeps would cost memory and copying and rarely be used.
        core.state.keep_read_copy(false);
        for b in events {
            // A view's max_keys holds offline as online; the process's memory
            // budget is the server's alone.
            let pushed = core.ingest(&view, b, 0, &mut KeyCap::keys(spec.max_keys))?;
            if options.dead_letter {
                report
                    .dead_letter
                    .extend(dead_letters(&spec.name, b, &pushed)?);
            }
        }
        let values = replay(&view, &mut core, spine, &times, backend.as_ref(), &progress)?;
        progress.inc(report.spine_rows_without_time as u64);
        let all: Vec<usize> = (0..view.merges.len()).collect();
        let text = view.text_features(&all, core.strings.kinds());
        for (f, (name, agg)) in spine_features(&view).enumerate() {
            let strings: Option<&dyn Strings> = text[f].then_some(&core.strings);
            if fields.iter().any(|x| x.name() == &name) {
                return Err(PanesError::Invalid(format!(
                    "feature {name:?} has the name of a spine column; rename the feature or the column"
                )));
            }
            fields.push(feature_field(&name, agg, text[f]));
            let mut start = 0;
            for (b, cols) in spine.iter().zip(columns.iter_mut()) {
                let range = start..start + b.num_rows();
                start = range.end;
                cols.push(if agg.is_list() {
                    list_column(
                        range.map(|r| (values.list(r, f), values.get(r, f).1)),
                        strings,
                    )
                } else {
                    feature_column(agg, range.map(|r| values.get(r, f)), strings)
                });
            }
        }
        report
            .views
            .push((spec.name.clone(), core.counters.clone(), core.keys.len()));
    }
    progress.finish_and_clear();

    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        spine_schema.metadata().clone(),
    ));
    let batches = columns
        .into_iter()
        .map(|cols| RecordBatch::try_new(schema.clone(), cols))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches, report))
}

/// [`backfill`] for the feature service `service` (DESIGN §3b): the spine's columns,
/// then the service's features in its order, then its on-demand features, computed
/// over the features and the spine's columns as an online service read computes them
/// over the request's ([`crate::online::service::on_demand`]).
///
/// # Errors
/// An unknown service, a spine without a key column the service needs, and the errors
/// of [`backfill`] and of the on-demand expressions.
pub fn backfill_service(
    file: &FeatureFile,
    service: &str,
    events: &[RecordBatch],
    spine_schema: &SchemaRef,
    spine: &[RecordBatch],
    backend: Arc<dyn Backend>,
    options: &BackfillOptions,
) -> Result<(SchemaRef, Vec<RecordBatch>, BackfillReport)> {
    use crate::online::service::{check_key_columns, on_demand, service_views, unknown_service};
    let s = file
        .service(service)
        .ok_or_else(|| unknown_service(file, service))?;
    let views = service_views(file, s);
    for (v, _) in &views {
        check_key_columns(s, v, spine_schema, "spine")?;
    }
    // Only the service's views and features.
    let own = FeatureFile {
        views: views
            .iter()
            .map(|(v, names)| ViewSpec {
                features: v
                    .features
                    .iter()
                    .filter(|f| names.contains(&f.name.as_str()))
                    .cloned()
                    .collect(),
                ..(*v).clone()
            })
            .collect(),
        services: Vec::new(),
        sinks: Vec::new(),
    };
    let (schema, batches, mut report) =
        backfill(&own, events, spine_schema, spine, backend, options)?;
    let program = crate::expr::Program::new(s.on_demand.clone(), None, Vec::new());
    let empty = RecordBatch::new_empty(schema.clone());
    let empty_spine = RecordBatch::new_empty(spine_schema.clone());
    let pairs: Vec<(&RecordBatch, &RecordBatch)> = if batches.is_empty() {
        vec![(&empty, &empty_spine)]
    } else {
        batches.iter().zip(spine).collect()
    };
    let mut out = Vec::with_capacity(pairs.len());
    let mut out_schema = None;
    for (b, request) in pairs {
        let features = s
            .features
            .iter()
            .map(|f| {
                let i = schema.index_of(f)?;
                Ok((schema.field(i).clone(), b.column(i).clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let (extra, errors) = on_demand(s, &program, request, &features)?;
        report.on_demand_errors += errors;
        let (fields, columns): (Vec<Field>, Vec<ArrayRef>) = spine_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .zip(request.columns().iter().cloned())
            .chain(features)
            .chain(extra)
            .unzip();
        let schema = Arc::new(Schema::new_with_metadata(
            fields,
            spine_schema.metadata().clone(),
        ));
        out.push(RecordBatch::try_new(schema.clone(), columns)?);
        out_schema = Some(schema);
    }
    if batches.is_empty() {
        out.clear();
    }
    let schema = out_schema.ok_or_else(|| PanesError::Internal("no output schema".into()))?;
    Ok((schema, out, report))
}

/// The spine's read times, and its rows with a time in time order.
struct SpineTimes {
    /// Per spine row (in spine order): its time, `None` when null.
    at: Vec<Option<i64>>,
    /// Rows with a time, sorted by it (stable: spine order among equal times).
    order: Vec<u32>,
}

impl SpineTimes {
    fn new(schema: &SchemaRef, spine: &[RecordBatch], at_column: &str) -> Result<Self> {
        if schema.field_with_name(at_column).is_err() {
            return Err(PanesError::Invalid(format!(
                "the spine has no time column {at_column:?} (set it with --at-column); its columns are [{}]",
                field_names(schema)
            )));
        }
        let at = spine_times(spine, at_column)?;
        let mut order: Vec<u32> = (0..at.len() as u32)
            .filter(|&r| at[r as usize].is_some())
            .collect();
        order.sort_by_key(|&r| at[r as usize]);
        Ok(SpineTimes { at, order })
    }
}

/// The views whose key columns (every part of a composite key) the spine has; the
/// others are listed in `report`.
fn views_on_spine<'a>(
    file: &'a FeatureFile,
    spine_schema: &Schema,
    report: &mut BackfillReport,
) -> Result<Vec<&'a ViewSpec>> {
    let (views, skipped): (Vec<_>, Vec<_>) = file.views.iter().partition(|v| {
        v.key
            .iter()
            .all(|k| spine_schema.field_with_name(k).is_ok())
    });
    report
        .skipped_views
        .extend(skipped.iter().map(|v| v.name.clone()));
    if views.is_empty() {
        return Err(PanesError::Invalid(format!(
            "the spine has none of the views' key columns ({}); its columns are [{}]",
            file.views
                .iter()
                .map(|v| v.key_label())
                .collect::<Vec<_>>()
                .join(", "),
            field_names(spine_schema)
        )));
    }
    Ok(views)
}

fn progress_bar(shown: bool, spine_rows: u64) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(spine_rows);
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {human_pos}/{human_len} spine rows ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Feature values of every spine row of one view, row-major (`features` per row).
struct SpineValues {
    features: usize,
    values: Vec<f64>,
    valid: Vec<bool>,
    /// The lists of list-valued features, row-major; empty when there are none.
    lists: Vec<Vec<f64>>,
}

impl SpineValues {
    fn get(&self, row: usize, feature: usize) -> (f64, bool) {
        let i = row * self.features + feature;
        (self.values[i], self.valid[i])
    }

    fn list(&self, row: usize, feature: usize) -> &[f64] {
        self.lists
            .get(row * self.features + feature)
            .map_or(&[], Vec::as_slice)
    }
}

/// Replays the view's accepted events (already ingested into `core.pending`, with the
/// lateness rules applied in arrival order) in time order, and reads each group of
/// spine rows with the same time once every event at or before it is folded.
fn replay(
    view: &CompiledView,
    core: &mut ViewCore,
    spine: &[RecordBatch],
    times: &SpineTimes,
    backend: &dyn Backend,
    progress: &ProgressBar,
) -> Result<SpineValues> {
    let events = std::mem::replace(&mut core.pending, Decoded::new(view.decoded.len()));
    core.pending_since = None;
    let events = sort_by_time(events);
    let ids = spine_ids(core, view, spine)?;
    let (at, order) = (&times.at, &times.order);
    let nf = view.merges.len();
    let mut out_values = SpineValues {
        features: nf,
        values: vec![f64::NAN; at.len() * nf],
        valid: vec![false; at.len() * nf],
        lists: if view.merges.iter().any(|m| m.agg().is_list()) {
            vec![Vec::new(); at.len() * nf]
        } else {
            Vec::new()
        },
    };
    let all: Vec<usize> = (0..nf).collect();
    let text = view.text_features(&all, core.strings.kinds());
    let aggs: Vec<Agg> = view.merges.iter().map(|m| m.agg()).collect();
    let mut out = MergeOutput::default();
    let mut group_ids = Vec::new();
    let mut ones = Vec::new();
    let mut folded = 0usize;
    let mut g = 0;
    while g < order.len() {
        let t = at[order[g] as usize].unwrap_or_default();
        let h = g + order[g..].partition_point(|&r| at[r as usize] == Some(t));
        let end = folded + events.ts[folded..].partition_point(|&ts| ts <= t);
        if end > folded {
            let vals = state_values(&view.sources, &events.values, folded..end, &mut ones);
            let batch = FoldBatch {
                ids: &events.ids[folded..end],
                ts: &events.ts[folded..end],
                values: &vals,
            };
            if !core.state.spec().levels.is_empty() {
                let stats = backend.fold(&mut core.state, &batch)?;
                core.counters.expired += stats.expired;
            }
            core.events.fold(&batch)?;
            folded = end;
        }
        group_ids.clear();
        group_ids.extend(order[g..h].iter().map(|&r| ids[r as usize]));
        panes_kernels::merge(
            backend,
            &core.state,
            &core.events,
            &view.merges,
            &group_ids,
            t,
            &mut out,
        )?;
        if let Some(k) = out.status.iter().position(|s| *s != ReadStatus::Exact) {
            return Err(PanesError::Internal(format!(
                "backfill read of spine row {} at {t} was not exact ({:?})",
                order[g + k],
                out.status[k]
            )));
        }
        finish_lists(&aggs, &text, &core.strings, &mut out);
        for (k, &r) in order[g..h].iter().enumerate() {
            let (r, o) = (r as usize * nf..(r as usize + 1) * nf, k * nf..(k + 1) * nf);
            out_values.values[r.clone()].copy_from_slice(&out.values[o.clone()]);
            out_values.valid[r.clone()].copy_from_slice(&out.valid[o.clone()]);
            if !out.lists.is_empty() {
                for (dst, src) in out_values.lists[r].iter_mut().zip(&mut out.lists[o]) {
                    *dst = std::mem::take(src);
                }
            }
        }
        progress.inc((h - g) as u64);
        g = h;
    }
    Ok(out_values)
}

fn spine_features(view: &CompiledView) -> impl Iterator<Item = (String, Agg)> + '_ {
    view.spec.features.iter().map(|f| (f.name.clone(), f.agg))
}

fn field_names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Spine times (None for null or unparsable).
fn spine_times(spine: &[RecordBatch], at_column: &str) -> Result<Vec<Option<i64>>> {
    let mut at = Vec::new();
    for b in spine {
        let col = b.column_by_name(at_column).ok_or_else(|| {
            PanesError::Invalid(format!("a spine batch has no column {at_column:?}"))
        })?;
        let t = TimeColumn::new(col.as_ref())
            .map_err(|m| PanesError::Invalid(format!("spine time column {at_column:?} {m}")))?;
        at.extend((0..b.num_rows()).map(|i| t.get(i).ok().flatten()));
    }
    Ok(at)
}

/// Key ids of the spine rows for one view (None for null or unknown keys).
fn spine_ids(
    core: &ViewCore,
    view: &CompiledView,
    spine: &[RecordBatch],
) -> Result<Vec<Option<u32>>> {
    let mut ids = Vec::new();
    let label = view.spec.key_label();
    for b in spine {
        let mut parts = Vec::with_capacity(view.spec.key.len());
        let mut types = Vec::with_capacity(view.spec.key.len());
        for name in &view.spec.key {
            let col = b.column_by_name(name).ok_or_else(|| {
                PanesError::Invalid(format!("a spine batch has no column {name:?}"))
            })?;
            let part = match KeyColumn::new(col.as_ref()) {
                Ok(KeyColumn::Tuple(..)) => Err(format!(
                    "has type {}; a key column must be {}",
                    col.data_type(),
                    crate::ingest::keys::KEY_TYPES
                )),
                other => other,
            }
            .map_err(|m| PanesError::Invalid(format!("spine key column {name:?} {m}")))?;
            types.push(Field::new(name, col.data_type().clone(), true));
            parts.push(part);
        }
        let (keys, given) = if parts.len() == 1 {
            let ty = types.pop().expect("one part").data_type().clone();
            (parts.pop().expect("one part"), ty)
        } else {
            (KeyColumn::tuple(parts), DataType::Struct(types.into()))
        };
        core.keys
            .check_kind(&view.spec.name, &keys.kinds(), &given)
            .map_err(|e| PanesError::Invalid(format!("spine key column {label}: {e}")))?;
        ids.extend((0..b.num_rows()).map(|i| keys.lookup(i, &core.keys)));
    }
    Ok(ids)
}

/// Stable sort of events by time (arrival order kept among equal times).
fn sort_by_time(events: Decoded) -> Decoded {
    if events.ts.is_sorted() {
        return events;
    }
    let mut perm: Vec<u32> = (0..events.len() as u32).collect();
    perm.sort_by_key(|&i| events.ts[i as usize]);
    let take_u32 = |v: &[u32]| perm.iter().map(|&i| v[i as usize]).collect();
    let take_i64 = |v: &[i64]| perm.iter().map(|&i| v[i as usize]).collect();
    let take_f64 = |v: &[f64]| perm.iter().map(|&i| v[i as usize]).collect();
    Decoded {
        ids: take_u32(&events.ids),
        ts: take_i64(&events.ts),
        values: events.values.iter().map(|v| take_f64(v)).collect(),
    }
}
