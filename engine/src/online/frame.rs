//! What reads return: feature frames with per-key serving metadata, their Arrow
//! form, and a view's counters.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, ListArray, StringArray};
use arrow_buffer::{NullBuffer, OffsetBuffer};
use arrow_schema::{DataType, Field};
use ndarray::Array2;
use panes_kernels::Agg;

use crate::ingest::{RejectReason, ViewCounters};

/// Feature values of some keys as of one time.
#[derive(Clone, Debug)]
pub struct FeatureFrame {
    /// Feature names, the columns of `values`.
    pub names: Vec<String>,
    /// `keys × features`; NaN where `valid` is false.
    pub values: Array2<f64>,
    /// Validity of each value (false = null).
    pub valid: Array2<bool>,
    /// The values of list-valued features (`last_n`), row-major like `values` (whose
    /// entry is then the list's length); empty when the frame has none.
    pub lists: Vec<Vec<f64>>,
    /// The read time, epoch ms.
    pub at: i64,
    /// Per feature: whether its values are strings (`first`, `last`, `last_n` and
    /// `top_k` of a string column): its entries in `values` (and its list items) are
    /// then indices into `strings`.
    pub text: Vec<bool>,
    /// The strings of string-valued features; empty when the frame has none.
    pub strings: Vec<String>,
    /// Per feature: whether it is list-valued (`last_n`, `top_k`).
    pub is_list: Vec<bool>,
}

impl FeatureFrame {
    /// The list of feature `c` of row `r` (empty unless the feature is a list).
    pub fn list(&self, r: usize, c: usize) -> &[f64] {
        self.lists
            .get(r * self.values.ncols() + c)
            .map_or(&[], Vec::as_slice)
    }

    /// Rows `rows` of the frame, in that order (the strings are shared whole).
    pub fn select(&self, rows: &[usize]) -> FeatureFrame {
        let nf = self.values.ncols();
        let values =
            ndarray::Array2::from_shape_fn((rows.len(), nf), |(i, c)| self.values[[rows[i], c]]);
        let valid =
            ndarray::Array2::from_shape_fn((rows.len(), nf), |(i, c)| self.valid[[rows[i], c]]);
        let lists = if self.lists.is_empty() {
            Vec::new()
        } else {
            rows.iter()
                .flat_map(|&r| (0..nf).map(move |c| self.list(r, c).to_vec()))
                .collect()
        };
        FeatureFrame {
            names: self.names.clone(),
            values,
            valid,
            lists,
            at: self.at,
            text: self.text.clone(),
            strings: self.strings.clone(),
            is_list: self.is_list.clone(),
        }
    }

    /// Feature `c` of all rows as an Arrow column, typed as [`feature_field`].
    pub fn column(&self, c: usize, agg: Agg) -> ArrayRef {
        let rows = 0..self.values.nrows();
        let valid = self.valid.column(c);
        let text = self.text.get(c).copied().unwrap_or(false);
        let strings: Option<&dyn Strings> = text.then_some(&self.strings);
        if agg.is_list() {
            return list_column(rows.map(|r| (self.list(r, c), valid[r])), strings);
        }
        let values = self.values.column(c);
        feature_column(
            agg,
            values.iter().zip(valid.iter()).map(|(v, ok)| (*v, *ok)),
            strings,
        )
    }
}

/// Where the values of a string-valued feature point: a frame's strings, or a view's.
pub trait Strings {
    /// The string value `v` stands for (empty if it stands for none).
    fn text(&self, v: f64) -> &str;
}

impl Strings for Vec<String> {
    fn text(&self, v: f64) -> &str {
        self.get(v as usize).map_or("", String::as_str)
    }
}

impl Strings for crate::ingest::strings::StringValues {
    fn text(&self, v: f64) -> &str {
        self.get(v).unwrap_or_default()
    }
}

/// The output field of a feature: `count` and `approx_distinct` as Int64, `last_n` and
/// `top_k` as a List of Float64, every other aggregation as Float64; nullable. With
/// `text` (a feature whose values are strings), Utf8 for Float64.
pub fn feature_field(name: &str, agg: Agg, text: bool) -> Field {
    let item = if text {
        DataType::Utf8
    } else {
        DataType::Float64
    };
    let ty = if agg.is_list() {
        DataType::List(Arc::new(Field::new_list_field(item, false)))
    } else if text {
        item
    } else if agg.integer_valued() {
        DataType::Int64
    } else {
        DataType::Float64
    };
    Field::new(name, ty, true)
}

/// The output column of a list-valued feature from `(list, valid)` pairs (typed as
/// [`feature_field`]); null where not valid. With `text`, the items are strings, which
/// `text` gives for each item.
pub fn list_column<'a>(
    rows: impl Iterator<Item = (&'a [f64], bool)>,
    text: Option<&dyn Strings>,
) -> ArrayRef {
    let mut offsets = vec![0i32];
    let mut values = Vec::new();
    let mut valid = Vec::new();
    for (l, ok) in rows {
        values.extend_from_slice(l);
        offsets.push(values.len() as i32);
        valid.push(ok);
    }
    let nulls = NullBuffer::from(valid);
    let (item, items): (_, ArrayRef) = match text {
        Some(text) => (
            DataType::Utf8,
            Arc::new(StringArray::from_iter_values(
                values.iter().map(|&v| text.text(v)),
            )),
        ),
        None => (DataType::Float64, Arc::new(Float64Array::from(values))),
    };
    Arc::new(ListArray::new(
        Arc::new(Field::new_list_field(item, false)),
        OffsetBuffer::new(offsets.into()),
        items,
        (nulls.null_count() > 0).then_some(nulls),
    ))
}

/// The output column of a feature from `(value, valid)` pairs, typed as
/// [`feature_field`]; null where not valid. With `text`, the values are strings, which
/// `text` gives for each value.
pub fn feature_column(
    agg: Agg,
    rows: impl Iterator<Item = (f64, bool)>,
    text: Option<&dyn Strings>,
) -> ArrayRef {
    if let Some(text) = text {
        Arc::new(StringArray::from_iter(
            rows.map(|(v, ok)| ok.then(|| text.text(v))),
        ))
    } else if agg.integer_valued() {
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
    /// Bytes of pane state (both replicas, with the `Cpu` backend's read copies and
    /// the view's string values).
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
