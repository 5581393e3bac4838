//! Ingest: validate and decode an Arrow batch for a view, decide lateness per event in
//! arrival order, and append the accepted events to a columnar buffer.
//!
//! A batch with a missing or mistyped column is rejected whole (no row of it can be
//! aggregated) with a [`PanesError::Schema`]. Otherwise bad rows (null key, null or
//! unparsable time) are rejected one by one with a reason, and the good rows of the
//! same batch are accepted. Null and NaN values are not rejections: the event counts
//! (e.g. for `count` of rows) and the value is skipped by value aggregations.

use std::collections::HashSet;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, Float64Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};

mod cap;
pub mod distinct;
pub mod ipc;
pub mod keys;
pub mod strings;
mod view_core;

/// A decoded value column: numbers (or hashes) as Float64, strings as Utf8, or nulls
/// only (as Float64), which have no kind.
enum Values {
    Numbers(arrow_array::ArrayRef),
    Strings(arrow_array::ArrayRef),
    Nulls(arrow_array::ArrayRef),
}

pub(crate) use cap::{KeyCap, string_charge};
pub use cap::{StateBudget, memory_limit};

use panes_kernels::MAX_TIME_MS;

pub(crate) use view_core::{Delta, ViewCore};

use crate::error::{PanesError, Result};
use crate::spec::CompiledView;
use keys::{KeyColumn, KeyIndex};
use strings::StringValues;

/// Why a row was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The key is null.
    NullKey,
    /// The time is null.
    NullTime,
    /// The time cannot be parsed or is out of range.
    BadTime,
    /// The batch lacks a column or has one of the wrong type.
    Schema,
    /// The key is new and the view holds its `max_keys`, or the process's state
    /// memory budget is spent (see [`KeyCap`]).
    KeyLimit,
}

impl RejectReason {
    /// Every reason, in counter order.
    pub const ALL: [RejectReason; 5] = [
        RejectReason::NullKey,
        RejectReason::NullTime,
        RejectReason::BadTime,
        RejectReason::Schema,
        RejectReason::KeyLimit,
    ];

    /// The name used in metrics.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::NullKey => "null_key",
            RejectReason::NullTime => "null_time",
            RejectReason::BadTime => "bad_time",
            RejectReason::Schema => "schema",
            RejectReason::KeyLimit => "key_limit",
        }
    }
}

/// Counters of one view.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewCounters {
    /// Events accepted (aggregated).
    pub accepted: u64,
    /// Events rejected as late.
    pub late: u64,
    /// Rejected rows, by [`RejectReason`] (indexed like `RejectReason::ALL`).
    pub rejected: [u64; 5],
    /// Null values met in value columns of accepted events (skipped).
    pub null_values: u64,
    /// NaN values met in value columns of accepted events (skipped).
    pub nan_values: u64,
    /// Rows the view's filter left out (as if they never arrived).
    pub filtered: u64,
    /// Rows for which an expression (a derived column or a filter) could not be
    /// evaluated; the expression is null for them.
    pub expr_errors: u64,
    /// Accepted event × level pairs whose pane had already been recycled (see
    /// `panes_kernels::FoldStats::expired`); zero unless the ring is undersized.
    pub expired: u64,
}

impl ViewCounters {
    /// Rejected rows for one reason.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize]
    }

    /// All rejected rows.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// One rejected row, as reported to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Row index in the pushed batch.
    pub row: usize,
    /// Why.
    pub reason: RejectReason,
    /// A message naming the column and what was expected.
    pub message: String,
}

/// Outcome of one push.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Rows accepted.
    pub accepted: usize,
    /// Rows rejected as late.
    pub late: usize,
    /// Rows rejected for a [`RejectReason`].
    pub rejected: usize,
    /// Rows the view's filter left out.
    pub filtered: usize,
    /// The first [`MAX_REPORTED`] rejections, with messages.
    pub rejections: Vec<Rejection>,
    /// Row indices of the late rows (for a dead-letter output).
    pub late_rows: Vec<u32>,
    /// Row indices of the rejected rows, with the reason (for a dead-letter output).
    pub rejected_rows: Vec<(u32, RejectReason)>,
}

impl PushReport {
    /// Appends the report of the next slice of a pushed batch (its row numbers
    /// already count from the start of the whole batch).
    pub fn append(&mut self, o: PushReport) {
        self.absorb(&o);
        self.late_rows.extend(o.late_rows);
        self.rejected_rows.extend(o.rejected_rows);
    }

    /// Adds another report's counts (row indices are not merged).
    pub fn absorb(&mut self, o: &PushReport) {
        self.accepted += o.accepted;
        self.late += o.late;
        self.rejected += o.rejected;
        self.filtered += o.filtered;
        for r in &o.rejections {
            if self.rejections.len() < MAX_REPORTED {
                self.rejections.push(r.clone());
            }
        }
    }
}

/// Rejections reported with messages per push; the rest are counted.
pub const MAX_REPORTED: usize = 8;

/// Accepted events in arrival order, columnar.
#[derive(Clone, Debug, Default)]
pub struct Decoded {
    /// Key ids.
    pub ids: Vec<u32>,
    /// Event times, epoch ms.
    pub ts: Vec<i64>,
    /// One column per view value column; NaN for null / NaN.
    pub values: Vec<Vec<f64>>,
}

impl Decoded {
    /// An empty buffer for `columns` value columns.
    pub fn new(columns: usize) -> Self {
        Decoded {
            ids: Vec::new(),
            ts: Vec::new(),
            values: vec![Vec::new(); columns],
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Removes every event, keeping the allocations.
    pub fn clear(&mut self) {
        self.ids.clear();
        self.ts.clear();
        self.values.iter_mut().for_each(Vec::clear);
    }
}

const BAD_TIME_HINT: &str = "expected a timestamp such as 2026-01-31T09:26:56Z";

/// What time columns may be.
pub(crate) const TIME_TYPES: &str = "Timestamp (any unit, any time zone), Date32, Date64, Int64 epoch milliseconds, or RFC 3339 strings";

/// Per-row time of a column, in epoch ms: `Ok(Some(ms))`, `Ok(None)` for null, or
/// `Err(message)` for an unparsable or out-of-range value.
pub(crate) enum TimeColumn<'a> {
    Ms(Vec<i64>, &'a dyn Array, i64, bool),
    Str(Box<dyn Fn(usize) -> Option<&'a str> + 'a>),
}

impl<'a> TimeColumn<'a> {
    /// Views `array` as a time column, or says why it cannot be one.
    pub(crate) fn new(array: &'a dyn Array) -> std::result::Result<Self, String> {
        // (values, multiplier or divisor, whether it multiplies)
        let prim = |v: &[i64], f: i64, mul: bool| TimeColumn::Ms(v.to_vec(), array, f, mul);
        Ok(match array.data_type() {
            DataType::Timestamp(unit, _) => {
                let v = match unit {
                    TimeUnit::Second => array.as_primitive::<TimestampSecondType>().values(),
                    TimeUnit::Millisecond => {
                        array.as_primitive::<TimestampMillisecondType>().values()
                    }
                    TimeUnit::Microsecond => {
                        array.as_primitive::<TimestampMicrosecondType>().values()
                    }
                    TimeUnit::Nanosecond => {
                        array.as_primitive::<TimestampNanosecondType>().values()
                    }
                };
                match unit {
                    TimeUnit::Second => prim(v, 1000, true),
                    TimeUnit::Millisecond => prim(v, 1, true),
                    TimeUnit::Microsecond => prim(v, 1000, false),
                    TimeUnit::Nanosecond => prim(v, 1_000_000, false),
                }
            }
            DataType::Int64 => prim(array.as_primitive::<Int64Type>().values(), 1, true),
            DataType::Date64 => prim(array.as_primitive::<Date64Type>().values(), 1, true),
            DataType::Date32 => {
                let v: Vec<i64> = array
                    .as_primitive::<Date32Type>()
                    .values()
                    .iter()
                    .map(|&d| d as i64)
                    .collect();
                TimeColumn::Ms(v, array, 86_400_000, true)
            }
            DataType::Utf8 => {
                let a = array.as_string::<i32>();
                TimeColumn::Str(Box::new(move |i| a.is_valid(i).then(|| a.value(i))))
            }
            DataType::LargeUtf8 => {
                let a = array.as_string::<i64>();
                TimeColumn::Str(Box::new(move |i| a.is_valid(i).then(|| a.value(i))))
            }
            DataType::Utf8View => {
                let a = array.as_string_view();
                TimeColumn::Str(Box::new(move |i| a.is_valid(i).then(|| a.value(i))))
            }
            other => {
                return Err(format!(
                    "has type {other}; a time column must be {TIME_TYPES}"
                ));
            }
        })
    }

    /// The time of row `i`.
    #[inline]
    pub(crate) fn get(&self, i: usize) -> std::result::Result<Option<i64>, String> {
        let ms = match self {
            TimeColumn::Ms(v, a, f, mul) => {
                if a.is_null(i) {
                    return Ok(None);
                }
                let x = v[i];
                if *mul {
                    x.checked_mul(*f)
                        .ok_or_else(|| format!("value {x} is out of range as epoch milliseconds"))?
                } else {
                    x.div_euclid(*f)
                }
            }
            TimeColumn::Str(get) => match get(i) {
                None => return Ok(None),
                Some(s) => arrow_cast::parse::string_to_timestamp_nanos(s.trim())
                    .map(|ns| ns.div_euclid(1_000_000))
                    .map_err(|_| format!("cannot parse {s:?} as a time; {BAD_TIME_HINT}"))?,
            },
        };
        if ms.unsigned_abs() > MAX_TIME_MS {
            return Err(format!(
                "{ms} ms is out of range (more than ±{MAX_TIME_MS} ms, about 36 million years, from 1970)"
            ));
        }
        Ok(Some(ms))
    }
}

/// Finds a column of `batch` by name.
fn column<'b>(
    view: &CompiledView,
    batch: &'b RecordBatch,
    name: &str,
    role: &str,
) -> Result<&'b dyn Array> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| {
            let have: Vec<_> = batch
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            PanesError::Schema {
                view: view.spec.name.clone(),
                column: name.to_string(),
                message: format!(
                    "the {role} column is missing; the batch has columns [{}]",
                    have.join(", ")
                ),
            }
        })
}

/// Finds column `name` of `batch` and views it with `new`, or says which column is
/// missing or mistyped and what was expected.
fn typed<'b, T>(
    view: &CompiledView,
    batch: &'b RecordBatch,
    name: &str,
    role: &str,
    new: impl FnOnce(&'b dyn Array) -> std::result::Result<T, String>,
) -> Result<T> {
    new(column(view, batch, name, role)?).map_err(|m| PanesError::Schema {
        view: view.spec.name.clone(),
        column: name.to_string(),
        message: format!("{role} column {m}"),
    })
}

/// The view's key column of `batch`, or the parts of its composite key as one tuple
/// column; says which part is missing or mistyped.
pub(crate) fn key_column<'b>(view: &CompiledView, batch: &'b RecordBatch) -> Result<KeyColumn<'b>> {
    let mut parts = Vec::with_capacity(view.spec.key.len());
    for name in &view.spec.key {
        let part = typed(view, batch, name, "key", |a| match KeyColumn::new(a) {
            Ok(KeyColumn::Tuple(..)) => Err(format!(
                "has type {}; a key column must be {}",
                a.data_type(),
                keys::KEY_TYPES
            )),
            other => other,
        })?;
        parts.push(part);
    }
    Ok(if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        KeyColumn::tuple(parts)
    })
}

impl CompiledView {
    /// What would stop events of `schema` from being ingested: a key column (each
    /// part of a composite key) or the time column missing, a key column of a type no
    /// key can have, an expression that does not fit the columns. Each problem as
    /// (field of the view, message); `panes check --events` reports them.
    pub fn schema_issues(&self, schema: &arrow_schema::SchemaRef) -> Vec<(String, String)> {
        let spec = &self.spec;
        let mut issues = Vec::new();
        let have = || {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            names.join(", ")
        };
        for (p, name) in spec.key.iter().enumerate() {
            let field = if spec.is_composite() {
                format!("key[{p}]")
            } else {
                "key".to_string()
            };
            match schema.field_with_name(name) {
                Err(_) => issues.push((
                    field,
                    format!(
                        "key column {name:?} is not in the events; they have [{}]",
                        have()
                    ),
                )),
                Ok(f) => {
                    let empty = arrow_array::new_empty_array(f.data_type());
                    if let Err(m) = KeyColumn::new(empty.as_ref()).and_then(|k| match k {
                        KeyColumn::Tuple(..) => Err(format!(
                            "has type {}; a key column must be {}",
                            f.data_type(),
                            keys::KEY_TYPES
                        )),
                        _ => Ok(()),
                    }) {
                        issues.push((field, format!("key column {name:?} {m}")));
                    }
                }
            }
        }
        if schema.field_with_name(&spec.time).is_err() {
            issues.push((
                "time".to_string(),
                format!(
                    "time column {:?} is not in the events; they have [{}]",
                    spec.time,
                    have()
                ),
            ));
        }
        if let Err(e) = self.exprs.check(schema) {
            issues.push((e.field, e.error.to_string()));
        }
        issues
    }
}

/// Pushes of at least this many rows look up their keys on every core first.
const PARALLEL_LOOKUP_MIN: usize = 16 * 1024;

/// The ids of the rows' keys that `keys` holds (`None`: null or unknown), found on
/// rayon's threads for a large batch, or nothing (an empty list) for a small one. The
/// index only grows, so an id found here is the one the serial pass would find; the
/// serial pass looks up only the rest, of which keys new in this batch. (Ingest
/// benchmark profile, 100 K keys: the lookup was about 14 % of the engine's time, all
/// of it on the pushing thread while the fold's threads waited.)
fn known_ids(key_col: &KeyColumn<'_>, keys: &KeyIndex, rows: usize) -> Vec<Option<u32>> {
    use rayon::prelude::*;
    const CHUNK: usize = 4096;
    if rows < PARALLEL_LOOKUP_MIN || rayon::current_num_threads() < 2 {
        return Vec::new();
    }
    let mut known = vec![None; rows];
    known
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (j, id) in chunk.iter_mut().enumerate() {
                *id = key_col.lookup(c * CHUNK + j, keys);
            }
        });
    known
}

/// Decodes `batch` for `view`: rejected rows are counted, late rows are counted, and
/// accepted rows are appended to `out` (their keys inserted into `keys`, the view's
/// `max_ts` advanced). `offset` is the position of `batch` in the batch the caller
/// pushed (when it is a slice of one); reported row numbers include it. A row whose key
/// is new is rejected for [`RejectReason::KeyLimit`] when `cap` refuses another key.
///
/// # Errors
/// [`PanesError::Schema`] when a column is missing or has the wrong type; every row of
/// the batch is then counted as rejected for [`RejectReason::Schema`].
pub(crate) fn ingest(
    view: &CompiledView,
    batch: &RecordBatch,
    offset: usize,
    keys: &mut KeyIndex,
    cap: &mut KeyCap<'_>,
    string_values: &mut StringValues,
    max_ts: &mut Option<i64>,
    out: &mut Decoded,
    counters: &mut ViewCounters,
) -> Result<PushReport> {
    let rows = batch.num_rows();
    let schema_error = |counters: &mut ViewCounters, e: PanesError| {
        counters.rejected[RejectReason::Schema as usize] += rows as u64;
        Err(e)
    };
    let spec = &view.spec;
    // Derived columns, the view's filter and the features' filters (DESIGN §3b).
    let applied = if view.exprs.is_empty() {
        None
    } else {
        match view.exprs.apply(batch) {
            Ok(a) => Some(a),
            Err(e) => {
                return schema_error(
                    counters,
                    PanesError::Schema {
                        view: spec.name.clone(),
                        column: e.field,
                        message: format!("expression: {}", e.error),
                    },
                );
            }
        }
    };
    let keep = applied.as_ref().and_then(|a| a.keep.as_deref());
    let mut report = PushReport::default();
    if let Some(a) = &applied {
        counters.filtered += a.filtered;
        counters.expr_errors += a.expr_errors;
        report.filtered = a.filtered as usize;
    }
    let batch = applied.as_ref().map_or(batch, |a| &a.batch);
    let key_col = match key_column(view, batch) {
        Ok(k) => k,
        Err(e) => return schema_error(counters, e),
    };
    let time_col = match typed(view, batch, &spec.time, "time", TimeColumn::new) {
        Ok(t) => t,
        Err(e) => return schema_error(counters, e),
    };
    let mut value_cols = Vec::with_capacity(view.decoded.len());
    for (j, d) in view.decoded.iter().enumerate() {
        let name = &view.columns[d.column];
        let mistyped = |message: String| PanesError::Schema {
            view: spec.name.clone(),
            column: name.clone(),
            message,
        };
        let array = match column(view, batch, name, "value") {
            Ok(a) => a,
            Err(e) => return schema_error(counters, e),
        };
        // A column of nulls only has no kind: a null is a null of numbers or of
        // strings alike (a JSON field null in every message of a batch, a pyarrow
        // column of `None`s), so it neither fixes nor contradicts the column's kind.
        if array.logical_null_count() == array.len() {
            value_cols.push(Values::Nulls(Arc::new(Float64Array::new_null(array.len()))));
            continue;
        }
        if d.hashed {
            match distinct::hashes(array) {
                Ok(codes) => value_cols.push(Values::Numbers(codes)),
                Err(message) => return schema_error(counters, mistyped(message)),
            }
            continue;
        }
        let ty = array.data_type();
        let text = strings::is_text(ty);
        if !text && !ty.is_numeric() {
            let message = format!(
                "value column has type {ty}; expected an integer, float or decimal type, or strings"
            );
            return schema_error(counters, mistyped(message));
        }
        if text && let Some(f) = view.numeric_reader(j) {
            let message = format!(
                "value column has type {ty}; feature {:?} ({}) takes numbers (an integer, float or decimal type)",
                f.name,
                f.agg.name()
            );
            return schema_error(counters, mistyped(message));
        }
        if let Err(m) = string_values.check_kind(j, text) {
            return schema_error(
                counters,
                mistyped(format!("value column has type {ty}: {m}")),
            );
        }
        value_cols.push(if text {
            Values::Strings(strings::as_utf8(array)?)
        } else {
            Values::Numbers(arrow_cast::cast(array, &DataType::Float64)?)
        });
    }
    if value_cols.iter().any(|c| matches!(c, Values::Strings(_)))
        && string_values.len() + rows * value_cols.len() > strings::MAX_STRINGS
    {
        let e = PanesError::Schema {
            view: spec.name.clone(),
            column: view.columns[view.decoded[0].column].clone(),
            message: format!(
                "the view holds {} distinct string values, near the most it can ({})",
                string_values.len(),
                strings::MAX_STRINGS
            ),
        };
        return schema_error(counters, e);
    }
    for (j, c) in value_cols.iter().enumerate() {
        let text = match c {
            Values::Strings(_) => true,
            Values::Numbers(_) => false,
            Values::Nulls(_) => continue,
        };
        if !view.decoded[j].hashed {
            // Checked above: cannot fail.
            let _ = string_values.fix_kind(j, text);
        }
    }

    let mut accepted_rows: Vec<u32> = Vec::with_capacity(rows);
    let mut accepted_ts: Vec<i64> = Vec::with_capacity(rows);
    let mut reject =
        |report: &mut PushReport, row: usize, reason: RejectReason, message: String| {
            let row = row + offset;
            counters.rejected[reason as usize] += 1;
            report.rejected += 1;
            report.rejected_rows.push((row as u32, reason));
            if report.rejections.len() < MAX_REPORTED {
                report.rejections.push(Rejection {
                    row,
                    reason,
                    message,
                });
            }
        };
    let lateness = spec.allowed_lateness;
    let mut max = *max_ts;
    let known = known_ids(&key_col, keys, rows);
    let text_cols: Vec<&arrow_array::StringArray> = value_cols
        .iter()
        .filter_map(|c| match c {
            Values::Strings(c) => Some(c.as_string::<i32>()),
            Values::Numbers(_) | Values::Nulls(_) => None,
        })
        .collect();
    // Per string column, the ids of the accepted rows' strings, looked up once in the
    // loop below; `NEW_STRING` for a null or a string new to the table (interned after).
    const NEW_STRING: u32 = u32::MAX;
    let mut row_ids = vec![NEW_STRING; text_cols.len()];
    let mut text_ids: Vec<Vec<u32>> = text_cols.iter().map(|_| Vec::with_capacity(rows)).collect();
    // The new strings of the rows accepted so far (interned after the loop), and
    // their bytes: a later row with one of them adds nothing new.
    let mut fresh: HashSet<&str> = HashSet::new();
    let mut added = 0usize;
    let mut row_new: Vec<&str> = Vec::new();
    for i in 0..rows {
        // A row the view's filter leaves out is as if it never arrived.
        if keep.is_some_and(|k| !k[i]) {
            continue;
        }
        if key_col.is_null(i) {
            reject(
                &mut report,
                i,
                RejectReason::NullKey,
                format!(
                    "row {}: key column {:?} is null",
                    i + offset,
                    spec.key[key_col.null_part(i).unwrap_or(0)]
                ),
            );
            continue;
        }
        let ts = match time_col.get(i) {
            Ok(Some(ts)) => ts,
            Ok(None) => {
                reject(
                    &mut report,
                    i,
                    RejectReason::NullTime,
                    format!("row {}: time column {:?} is null", i + offset, spec.time),
                );
                continue;
            }
            Err(m) => {
                reject(
                    &mut report,
                    i,
                    RejectReason::BadTime,
                    format!("row {}: time column {:?}: {m}", i + offset, spec.time),
                );
                continue;
            }
        };
        if let Some(m) = max
            && ts < m.saturating_sub(lateness)
        {
            report.late += 1;
            report.late_rows.push((i + offset) as u32);
            continue;
        }
        // New strings only while the view's string table has room.
        row_new.clear();
        for (t, c) in text_cols.iter().enumerate() {
            row_ids[t] = NEW_STRING;
            if c.is_valid(i) {
                let v = c.value(i);
                match string_values.id(v) {
                    Some(id) => row_ids[t] = id,
                    None if !fresh.contains(v) && !row_new.contains(&v) => row_new.push(v),
                    None => {}
                }
            }
        }
        let new_bytes: usize = row_new.iter().map(|v| v.len()).sum();
        let new_strings = row_new.len();
        // The table must have room for them, and the budget pays for them before the
        // key is created.
        let strings_charge = string_charge(new_bytes, new_strings);
        let room = if new_strings == 0 {
            Ok(())
        } else if string_values.string_bytes() + added + new_bytes > strings::MAX_STRING_BYTES {
            Err(format!(
                "the view's string values hold {} bytes, the most it keeps is {}",
                string_values.string_bytes() + added,
                strings::MAX_STRING_BYTES
            ))
        } else {
            cap.admit_strings(strings_charge)
        };
        if let Err(why) = room {
            let message = if report.rejections.len() < MAX_REPORTED {
                format!("row {}: a new string value: {why}", i + offset)
            } else {
                String::new()
            };
            reject(&mut report, i, RejectReason::KeyLimit, message);
            continue;
        }
        // Keys of accepted rows only: rejected and late rows create no state.
        let found = match known.get(i) {
            Some(&Some(id)) => Some(id),
            _ => key_col.lookup(i, keys),
        };
        let id = match found {
            Some(id) => id,
            None => match cap.admit(keys.len()).and_then(|()| {
                key_col.id_or_insert(i, keys).map_err(|e| {
                    cap.refund();
                    e.to_string()
                })
            }) {
                Ok(id) => id,
                Err(why) => {
                    if new_strings > 0 {
                        cap.refund_strings(strings_charge);
                    }
                    // Formatting is skipped for rows past the reported ones: a hostile
                    // message may carry millions of new keys.
                    let message = if report.rejections.len() < MAX_REPORTED {
                        let key = key_col.value(i).map(|k| k.to_string()).unwrap_or_default();
                        format!("row {}: new key {key}: {why}", i + offset)
                    } else {
                        String::new()
                    };
                    reject(&mut report, i, RejectReason::KeyLimit, message);
                    continue;
                }
            },
        };
        added += new_bytes;
        fresh.extend(row_new.iter().copied());
        for (ids, &id) in text_ids.iter_mut().zip(&row_ids) {
            ids.push(id);
        }
        max = Some(max.map_or(ts, |m| m.max(ts)));
        accepted_rows.push(i as u32);
        accepted_ts.push(ts);
        out.ids.push(id);
    }
    *max_ts = max;
    counters.late += report.late as u64;
    out.ts.extend_from_slice(&accepted_ts);
    let mut text_ids = text_ids.into_iter();
    for (j, (dst, col)) in out.values.iter_mut().zip(&value_cols).enumerate() {
        // A feature filter's column is null where its filter fails: not a null value.
        let mut skipped = ViewCounters::default();
        let counters = if view.filter_column(j) {
            &mut skipped
        } else {
            &mut *counters
        };
        let col = match col {
            Values::Numbers(col) | Values::Nulls(col) => col,
            Values::Strings(col) => {
                let col = col.as_string::<i32>();
                let ids = text_ids.next().expect("one id list per string column");
                dst.reserve(accepted_rows.len());
                for (&i, id) in accepted_rows.iter().zip(ids) {
                    let i = i as usize;
                    if col.is_null(i) {
                        counters.null_values += 1;
                        dst.push(f64::NAN);
                    } else if id == NEW_STRING {
                        dst.push(f64::from(string_values.intern(col.value(i))));
                    } else {
                        dst.push(f64::from(id));
                    }
                }
                continue;
            }
        };
        let f = col.as_primitive::<Float64Type>();
        let vals = f.values();
        dst.reserve(accepted_rows.len());
        if f.null_count() == 0 {
            for &i in &accepted_rows {
                let v = vals[i as usize];
                counters.nan_values += v.is_nan() as u64;
                dst.push(v);
            }
        } else {
            for &i in &accepted_rows {
                if f.is_null(i as usize) {
                    counters.null_values += 1;
                    dst.push(f64::NAN);
                } else {
                    let v = vals[i as usize];
                    counters.nan_values += v.is_nan() as u64;
                    dst.push(v);
                }
            }
        }
    }
    report.accepted = accepted_rows.len();
    counters.accepted += report.accepted as u64;
    Ok(report)
}
