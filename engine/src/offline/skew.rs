//! The skew check (`panes skew`): served-feature log rows (see `panes serve
//! --log-reads`) recomputed through backfill from the events, value by value.
//!
//! Each logged row is a spine row (its key columns and `at_ms`); backfill computes the
//! view's features at that time from the events file, replayed in file order, and each
//! feature the read returned is compared with its recomputed value: exactly for `count`,
//! `min`, `max`, `first`, `last`, `approx_distinct`, `quantile`, lists and strings (the
//! float's bits, so `-0.0` differs from `0.0`), within 1e-9 of max(|served|,
//! |recomputed|, 1) for the aggregations whose order of summation may differ (`sum`,
//! `mean`, `var`, `std`, `decayed_sum`, `decayed_count`: DESIGN §3's contract). Both
//! null is equal.
//!
//! A mismatch means a served value that the events do not give at its read time: events
//! that arrived after the read with times at or before its read time (late data the
//! read could not see), an events file that is not what the server took, or a bug.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema, SchemaRef};
use panes_kernels::{Agg, Backend};

use super::backfill::{BackfillOptions, backfill};
use crate::error::{PanesError, Result};
use crate::spec::FeatureFile;

/// Relative tolerance of the aggregations whose summation order may differ.
pub const TOLERANCE: f64 = 1e-9;

/// Examples kept per feature.
const EXAMPLES: usize = 5;

/// What the check found for one view.
#[derive(Clone, Debug, Default)]
pub struct ViewSkew {
    /// The view.
    pub view: String,
    /// Logged rows (key vectors) checked.
    pub rows: usize,
    /// Per feature of the view, in its order.
    pub features: Vec<FeatureSkew>,
}

/// What the check found for one feature.
#[derive(Clone, Debug, Default)]
pub struct FeatureSkew {
    /// The feature.
    pub name: String,
    /// Logged values compared (rows whose read returned this feature).
    pub compared: u64,
    /// Values that differ.
    pub mismatches: u64,
    /// The first few mismatches.
    pub examples: Vec<Mismatch>,
}

/// One served value that the events do not give.
#[derive(Clone, Debug)]
pub struct Mismatch {
    /// The key, as text.
    pub key: String,
    /// The read time.
    pub at_ms: i64,
    /// What was served, and what backfill computes, as text.
    pub served: String,
    /// What backfill computes at the same time.
    pub recomputed: String,
}

impl ViewSkew {
    /// Mismatches over every feature.
    pub fn mismatches(&self) -> u64 {
        self.features.iter().map(|f| f.mismatches).sum()
    }
}

/// Every log file under `dir` (`view=<name>/…/*.parquet`, a local directory), by view:
/// one batch per file.
///
/// # Errors
/// A directory or file that cannot be read; no log file at all.
pub fn read_log(dir: &Path) -> Result<BTreeMap<String, Vec<RecordBatch>>> {
    let mut paths = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| PanesError::file(&d, e))? {
            let p = e.map_err(|e| PanesError::file(&d, e))?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                paths.push(p);
            }
        }
    }
    paths.sort();
    let mut by_view: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for p in &paths {
        let Some(view) = p
            .components()
            .filter_map(|c| {
                c.as_os_str()
                    .to_str()?
                    .strip_prefix("view=")
                    .map(str::to_string)
            })
            .next_back()
        else {
            continue;
        };
        let (schema, batches) = super::io::read_file(p)?;
        let batch = arrow_select::concat::concat_batches(&schema, &batches)?;
        by_view.entry(view).or_default().push(batch);
    }
    if by_view.is_empty() {
        return Err(PanesError::Invalid(format!(
            "{}: no log files (view=<name>/…/*.parquet) under it",
            dir.display()
        )));
    }
    Ok(by_view)
}

/// Checks the logged reads `log` (per view, the log files' batches) against backfill
/// of `events` with the definitions of `file`.
///
/// # Errors
/// A view the file does not define; a log batch without the columns a log has; the
/// backfill's errors.
pub fn check(
    file: &FeatureFile,
    events: &[RecordBatch],
    log: &BTreeMap<String, Vec<RecordBatch>>,
    backend: Arc<dyn Backend>,
) -> Result<Vec<ViewSkew>> {
    let mut out = Vec::new();
    for (view, batches) in log {
        let spec = file.view(view).ok_or_else(|| {
            PanesError::Invalid(format!(
                "the log has reads of view {view:?}, which the feature file does not define"
            ))
        })?;
        let own = FeatureFile {
            views: vec![spec.clone()],
            ..FeatureFile::default()
        };
        // The spine: each logged row's key columns and read time.
        let mut spine_fields = Vec::new();
        for k in &spec.key {
            let first = batches.first().map(|b| b.schema());
            let field = first
                .as_ref()
                .and_then(|s| s.field_with_name(k).ok().cloned())
                .ok_or_else(|| missing(view, k))?;
            spine_fields.push(field);
        }
        spine_fields.push(arrow_schema::Field::new("at_ms", DataType::Int64, false));
        let spine_schema: SchemaRef = Arc::new(Schema::new(spine_fields));
        let spine = batches
            .iter()
            .map(|b| {
                let columns = spine_schema
                    .fields()
                    .iter()
                    .map(|f| {
                        b.column_by_name(f.name())
                            .cloned()
                            .ok_or_else(|| missing(view, f.name()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(RecordBatch::try_new(spine_schema.clone(), columns)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let options = BackfillOptions {
            at_column: "at_ms".into(),
            progress: false,
            ..BackfillOptions::default()
        };
        let (_, recomputed, _) = backfill(
            &own,
            events,
            &spine_schema,
            &spine,
            backend.clone(),
            &options,
        )?;
        let mut result = ViewSkew {
            view: view.clone(),
            rows: 0,
            features: spec
                .features
                .iter()
                .map(|f| FeatureSkew {
                    name: f.name.clone(),
                    ..FeatureSkew::default()
                })
                .collect(),
        };
        for (logged, got) in batches.iter().zip(&recomputed) {
            result.rows += logged.num_rows();
            compare(spec, logged, got, &mut result)?;
        }
        out.push(result);
    }
    Ok(out)
}

fn missing(view: &str, column: &str) -> PanesError {
    PanesError::Invalid(format!(
        "a log file of view {view:?} has no column {column:?}: not a served-feature log"
    ))
}

/// Compares one log batch with the backfill of its rows.
fn compare(
    spec: &crate::spec::ViewSpec,
    logged: &RecordBatch,
    got: &RecordBatch,
    out: &mut ViewSkew,
) -> Result<()> {
    let view = &spec.name;
    let served = logged
        .column_by_name("features")
        .ok_or_else(|| missing(view, "features"))?
        .as_string_opt::<i32>()
        .ok_or_else(|| missing(view, "features"))?;
    let at = logged
        .column_by_name("at_ms")
        .ok_or_else(|| missing(view, "at_ms"))?
        .as_primitive_opt::<arrow_array::types::Int64Type>()
        .ok_or_else(|| missing(view, "at_ms"))?;
    let key_text = |r: usize| {
        spec.key
            .iter()
            .filter_map(|k| logged.column_by_name(k))
            .map(|c| text(c, r))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (fi, f) in spec.features.iter().enumerate() {
        let (Some(a), Some(b)) = (logged.column_by_name(&f.name), got.column_by_name(&f.name))
        else {
            continue;
        };
        let tolerant = matches!(
            f.agg,
            Agg::Sum
                | Agg::Mean
                | Agg::Var
                | Agg::Std
                | Agg::DecayedSum { .. }
                | Agg::DecayedCount { .. }
        );
        let skew = &mut out.features[fi];
        for r in 0..logged.num_rows() {
            if !served.value(r).split(',').any(|n| n == f.name) {
                continue;
            }
            skew.compared += 1;
            if !same(a, b, r, tolerant) {
                skew.mismatches += 1;
                if skew.examples.len() < EXAMPLES {
                    skew.examples.push(Mismatch {
                        key: key_text(r),
                        at_ms: at.value(r),
                        served: text(a, r),
                        recomputed: text(b, r),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Whether row `r` of `a` and `b` hold the same value (see the module docs).
fn same(a: &ArrayRef, b: &ArrayRef, r: usize, tolerant: bool) -> bool {
    match (a.is_null(r), b.is_null(r)) {
        (true, true) => return true,
        (false, false) => {}
        _ => return false,
    }
    let float = |x: &ArrayRef| -> Option<f64> {
        let c = arrow_cast::cast(&x.slice(r, 1), &DataType::Float64).ok()?;
        Some(c.as_primitive::<Float64Type>().value(0))
    };
    let numeric = |t: &DataType| t.is_numeric();
    if numeric(a.data_type()) && numeric(b.data_type()) {
        let (Some(x), Some(y)) = (float(a), float(b)) else {
            return false;
        };
        if tolerant {
            return (x - y).abs() <= TOLERANCE * x.abs().max(y.abs()).max(1.0)
                || (x.is_nan() && y.is_nan());
        }
        return x.to_bits() == y.to_bits();
    }
    if a.data_type() == b.data_type() {
        return a.slice(r, 1).as_ref() == b.slice(r, 1).as_ref();
    }
    text(a, r) == text(b, r)
}

/// Row `r` of `a` as text.
fn text(a: &ArrayRef, r: usize) -> String {
    use arrow_cast::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("null");
    ArrayFormatter::try_new(a.as_ref(), &options)
        .map(|f| f.value(r).to_string())
        .unwrap_or_else(|_| "?".into())
}
