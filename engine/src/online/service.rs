//! Feature services (DESIGN §3b): one vector per request row, built from the features
//! of several views and from on-demand features computed at read time over them and
//! the request's own columns.
//!
//! Online, [`Engine::read_service`] reads each view the service needs once per
//! distinct request time (rows without a time read the view at its read time) and puts
//! the rows back in request order; backfill (`backfill --service`) computes the same
//! feature columns for a spine. Both then compute the on-demand features with
//! [`on_demand`], the same expression layer as a view's derived columns, so online and
//! offline agree by construction.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch, StructArray, UInt32Array};
use arrow_schema::{Field, Fields, Schema, SchemaRef};

use super::Engine;
use crate::error::{PanesError, Result};
use crate::expr::Program;
use crate::ingest::TimeColumn;
use crate::spec::{FeatureFile, ServiceSpec, ViewSpec};

/// Most request rows one service read takes.
pub const MAX_SERVICE_ROWS: usize = 100_000;

/// The error for a service name the file does not define.
pub(crate) fn unknown_service(file: &FeatureFile, name: &str) -> PanesError {
    let known: Vec<&str> = file.services.iter().map(|s| s.name.as_str()).collect();
    PanesError::Invalid(if known.is_empty() {
        format!("unknown service {name:?}: the feature file defines no [[services]]")
    } else {
        format!(
            "unknown service {name:?}; the services are {}",
            known.join(", ")
        )
    })
}

/// The views service `s` reads, in file order, each with the names of the service's
/// features it holds (in service order).
pub fn service_views<'a>(
    file: &'a FeatureFile,
    s: &'a ServiceSpec,
) -> Vec<(&'a ViewSpec, Vec<&'a str>)> {
    file.views
        .iter()
        .filter_map(|v| {
            let features: Vec<&str> = s
                .features
                .iter()
                .filter(|f| v.features.iter().any(|x| &x.name == *f))
                .map(String::as_str)
                .collect();
            (!features.is_empty()).then_some((v, features))
        })
        .collect()
}

/// The columns of `batch` a service's read or backfill row is missing for `view`'s key,
/// as an error naming them; `what` says where the rows come from (`request`, `spine`).
pub(crate) fn check_key_columns(
    service: &ServiceSpec,
    view: &ViewSpec,
    schema: &Schema,
    what: &str,
) -> Result<()> {
    let missing: Vec<&str> = view
        .key
        .iter()
        .filter(|k| schema.field_with_name(k).is_err())
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let has: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    Err(PanesError::Invalid(format!(
        "service {:?} needs key column(s) {} of view {:?}, which the {what} lacks; its columns are [{}]",
        service.name,
        missing.join(", "),
        view.name,
        has.join(", ")
    )))
}

/// The key of `view` for each row of `batch`: its key column, or for a composite key a
/// struct of its parts.
fn request_keys(view: &ViewSpec, batch: &RecordBatch) -> Result<ArrayRef> {
    let part = |k: &String| {
        batch
            .column_by_name(k)
            .cloned()
            .ok_or_else(|| PanesError::Internal(format!("key column {k:?} checked")))
    };
    if let [one] = view.key.as_slice() {
        return part(one);
    }
    let columns = view.key.iter().map(part).collect::<Result<Vec<_>>>()?;
    let fields: Fields = view
        .key
        .iter()
        .zip(&columns)
        .map(|(k, c)| Field::new(k, c.data_type().clone(), true))
        .collect();
    Ok(Arc::new(StructArray::try_new(fields, columns, None)?))
}

/// The on-demand features of `service` for rows whose request (or spine) columns are
/// `request` and whose service features are `features` (fields and columns, in service
/// order): the fields and columns appended, in order. A row whose expression cannot be
/// evaluated gets null there; their number is returned too.
///
/// # Errors
/// A request column named like a feature or an on-demand feature; an expression that
/// names a column neither the service nor the request has, or mistypes.
pub fn on_demand(
    service: &ServiceSpec,
    program: &Program,
    request: &RecordBatch,
    features: &[(Field, ArrayRef)],
) -> Result<(Vec<(Field, ArrayRef)>, u64)> {
    if service.on_demand.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let schema = request.schema();
    let taken = features
        .iter()
        .map(|(f, _)| f.name().as_str())
        .chain(service.on_demand.iter().map(|d| d.name.as_str()));
    for name in taken {
        if schema.field_with_name(name).is_ok() {
            return Err(PanesError::Invalid(format!(
                "service {:?}: the request has a column {name:?}, the name of one of the service's features; rename it",
                service.name
            )));
        }
    }
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = request.columns().to_vec();
    for (f, c) in features {
        fields.push(f.clone());
        columns.push(c.clone());
    }
    let inputs = RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(request.num_rows())),
    )?;
    let applied = program.apply(&inputs).map_err(|e| {
        let field = e
            .field
            .strip_prefix("columns.")
            .map_or(e.field.clone(), |f| format!("on_demand.{f}"));
        PanesError::Invalid(format!(
            "service {:?}: {field}: {} (an on-demand expression may use the service's features and the request's columns)",
            service.name, e.error
        ))
    })?;
    let out = applied.batch;
    let first = out.num_columns() - service.on_demand.len();
    let schema = out.schema();
    let added = (first..out.num_columns())
        .map(|i| (schema.field(i).clone(), out.column(i).clone()))
        .collect();
    Ok((added, applied.expr_errors))
}

impl Engine {
    /// The features of service `name` for each row of `request`, in request order:
    /// one column per feature of the service (typed as a view read gives them), then
    /// one per on-demand feature.
    ///
    /// `request` carries the key columns of every view the service reads (a composite
    /// key's parts as columns of their own), optionally a time column `at_column`
    /// (Timestamp, Date, Int64 epoch ms or RFC 3339 strings; a row without a time, or
    /// with a null one, reads each view at its read time), and any other columns the
    /// on-demand expressions use. Each view's features are read exactly as
    /// [`Engine::read`] reads them at that time (pending events are published first).
    ///
    /// # Errors
    /// An unknown service; a request missing a key column the service needs, with a
    /// time that cannot be read, over [`MAX_SERVICE_ROWS`] rows, or with columns the
    /// on-demand features cannot use; and any error of [`Engine::read`] (a key of the
    /// wrong kind, a read in the past the state cannot answer).
    pub fn read_service(
        &self,
        name: &str,
        request: &RecordBatch,
        at_column: &str,
    ) -> Result<RecordBatch> {
        self.service_rows(name, request, at_column, true)
    }

    /// [`Engine::read_service`] on the published state, without folding pending events
    /// first: the server's read, which never waits for a fold.
    ///
    /// # Errors
    /// As [`Engine::read_service`].
    pub fn read_service_published(
        &self,
        name: &str,
        request: &RecordBatch,
        at_column: &str,
    ) -> Result<RecordBatch> {
        self.service_rows(name, request, at_column, false)
    }

    fn service_rows(
        &self,
        name: &str,
        request: &RecordBatch,
        at_column: &str,
        settle: bool,
    ) -> Result<RecordBatch> {
        let (si, service) = self
            .file
            .services
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)
            .ok_or_else(|| unknown_service(&self.file, name))?;
        let n = request.num_rows();
        if n > MAX_SERVICE_ROWS {
            return Err(PanesError::ResourceExhausted(format!(
                "a service read takes at most {MAX_SERVICE_ROWS} request rows; this one has {n}"
            )));
        }
        let views = service_views(&self.file, service);
        for (view, _) in &views {
            check_key_columns(service, view, &request.schema(), "request")?;
        }
        let times: Vec<Option<i64>> = match request.column_by_name(at_column) {
            None => vec![None; n],
            Some(col) => {
                let t = TimeColumn::new(col.as_ref()).map_err(|m| {
                    PanesError::Invalid(format!("request time column {at_column:?} {m}"))
                })?;
                (0..n)
                    .map(|i| {
                        t.get(i).map_err(|m| {
                            PanesError::Invalid(format!(
                                "request time column {at_column:?}, row {i}: {m}"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let mut groups: BTreeMap<Option<i64>, Vec<u32>> = BTreeMap::new();
        for (i, t) in times.iter().enumerate() {
            groups.entry(*t).or_default().push(i as u32);
        }
        let mut columns: Vec<Option<(Field, ArrayRef)>> = vec![None; service.features.len()];
        for (view, features) in &views {
            let keys = request_keys(view, request)?;
            let mut parts: Vec<RecordBatch> = Vec::with_capacity(groups.len());
            let mut index = vec![(0usize, 0usize); n];
            for (g, (at, rows)) in groups.iter().enumerate() {
                let keys = if groups.len() == 1 {
                    keys.clone()
                } else {
                    arrow_select::take::take(keys.as_ref(), &UInt32Array::from(rows.clone()), None)?
                };
                let frame =
                    self.read_array(&view.name, keys.as_ref(), *at, Some(features), settle)?;
                let b = self.frame_batch(&view.name, &keys, &frame)?;
                for (j, &r) in rows.iter().enumerate() {
                    index[r as usize] = (g, j);
                }
                parts.push(b);
            }
            for f in features {
                let schema: SchemaRef = parts[0].schema();
                let field = schema.field_with_name(f)?.clone();
                let arrays: Vec<ArrayRef> = parts
                    .iter()
                    .map(|b| b.column_by_name(f).cloned())
                    .collect::<Option<_>>()
                    .ok_or_else(|| PanesError::Internal(format!("feature {f:?} read")))?;
                let column = match arrays.as_slice() {
                    [one] => one.clone(),
                    many => {
                        let refs: Vec<&dyn Array> = many.iter().map(|a| a.as_ref()).collect();
                        arrow_select::interleave::interleave(&refs, &index)?
                    }
                };
                let at = service
                    .features
                    .iter()
                    .position(|x| x == f)
                    .unwrap_or_default();
                columns[at] = Some((field, column));
            }
        }
        let features: Vec<(Field, ArrayRef)> =
            columns.into_iter().collect::<Option<_>>().ok_or_else(|| {
                PanesError::Internal(format!("service {name:?}: a feature was not read"))
            })?;
        let (extra, _) = on_demand(service, &self.services[si], request, &features)?;
        let (fields, columns): (Vec<Field>, Vec<ArrayRef>) =
            features.into_iter().chain(extra).unzip();
        Ok(RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            columns,
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }
}
