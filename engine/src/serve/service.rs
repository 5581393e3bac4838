//! Feature-service reads over gRPC (`GetFeatures` with `service` and `request`) and
//! Arrow Flight (`DoGet` with a service ticket): the request rows decoded with every
//! length checked, the caller's read scope checked on every view the service reads,
//! and the engine's [`Engine::read_service_published`] run on the read pool.
//!
//! [`Engine::read_service_published`]: crate::online::Engine::read_service_published

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Float64Type;
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow_schema::{DataType, Field, Schema};
use tonic::Status;

use super::auth::{Caller, Scope};
use super::grpc::bitmap;
use super::proto;
use super::server::Shared;
use super::status::{bad_request, status};
use crate::online::service::{service_views, unknown_service};

/// Most columns a service request may have.
pub(crate) const MAX_REQUEST_COLUMNS: usize = 256;

/// The time column of a request when none is named.
pub(crate) const DEFAULT_AT_COLUMN: &str = "ts";

impl Shared {
    /// Reads `service` for the rows of `request` on the published state, for `caller`.
    ///
    /// # Errors
    /// An unknown service; a view the caller may not read; a view a Kafka source feeds
    /// (not served through services yet); more rows than `--max-keys` or more columns
    /// out than `--max-features`; and the engine's errors.
    pub(crate) async fn read_service(
        self: &Arc<Self>,
        caller: &Caller,
        service: String,
        request: RecordBatch,
        at_column: String,
    ) -> Result<RecordBatch, Status> {
        let file = self.engine.file();
        let s = file
            .service(&service)
            .ok_or_else(|| status(unknown_service(file, &service), "service"))?;
        for (v, _) in service_views(file, s) {
            caller.check(Scope::Read, &v.name)?;
            if self.sources.contains_key(&v.name) {
                return Err(Status::failed_precondition(format!(
                    "service {service:?} reads view {:?}, which a Kafka source feeds: services over \
                     Kafka-fed views are not served yet; read the view itself",
                    v.name
                )));
            }
        }
        self.check_keys(request.num_rows())
            .map_err(|e| status(e, "request"))?;
        self.check_features(s.features.len() + s.on_demand.len())
            .map_err(|e| status(e, "service"))?;
        let engine = self.engine.clone();
        self.on_reads_for(request.num_rows(), move || {
            engine.read_service_published(&service, &request, &at_column)
        })
        .await?
        .map_err(|e| status(e, "request"))
    }
}

/// The rows of a `ServiceRequest` as one record batch, and its time column's name.
///
/// # Errors
/// `INVALID_ARGUMENT` naming the field: no data, Arrow IPC that does not decode, columns
/// of different lengths, a null position out of range, an empty or repeated name, or
/// more than [`MAX_REQUEST_COLUMNS`] columns.
pub(crate) fn request_batch(
    r: Option<proto::ServiceRequest>,
) -> Result<(RecordBatch, String), Status> {
    use proto::request_column::Values;
    use proto::service_request::Data;
    let r = r.ok_or_else(|| {
        bad_request(
            "request",
            "a service read needs request rows: set request.arrow_ipc or request.columns",
        )
    })?;
    let at_column = if r.at_column.is_empty() {
        DEFAULT_AT_COLUMN.to_string()
    } else {
        r.at_column
    };
    let batch = match r.data {
        None => return Err(bad_request("request", "no rows: set arrow_ipc or columns")),
        Some(Data::ArrowIpc(bytes)) => {
            let batches = crate::ingest::ipc::decode_stream(&bytes)
                .map_err(|e| bad_request("request.arrow_ipc", e))?;
            let Some(first) = batches.first() else {
                return Err(bad_request(
                    "request.arrow_ipc",
                    "the stream holds no record batch",
                ));
            };
            arrow_select::concat::concat_batches(&first.schema(), &batches)
                .map_err(|e| bad_request("request.arrow_ipc", e.to_string()))?
        }
        Some(Data::Columns(c)) => {
            if c.columns.is_empty() || c.columns.len() > MAX_REQUEST_COLUMNS {
                return Err(bad_request(
                    "request.columns",
                    format!(
                        "{} columns; a request has 1 to {MAX_REQUEST_COLUMNS}",
                        c.columns.len()
                    ),
                ));
            }
            let mut fields = Vec::with_capacity(c.columns.len());
            let mut arrays: Vec<ArrayRef> = Vec::with_capacity(c.columns.len());
            let mut rows = None;
            for (i, col) in c.columns.into_iter().enumerate() {
                let field = format!("request.columns[{i}]");
                if col.name.is_empty() || fields.iter().any(|f: &Field| f.name() == &col.name) {
                    return Err(bad_request(
                        &field,
                        format!("empty or repeated name {:?}", col.name),
                    ));
                }
                let n = match &col.values {
                    Some(Values::Strings(v)) => v.keys.len(),
                    Some(Values::Ints(v)) => v.keys.len(),
                    Some(Values::Doubles(v)) => v.values.len(),
                    None => {
                        return Err(bad_request(
                            &field,
                            "no values: set strings, ints or doubles",
                        ));
                    }
                };
                if *rows.get_or_insert(n) != n {
                    return Err(bad_request(
                        &field,
                        format!("{n} values; the columns before have {}", rows.unwrap_or(0)),
                    ));
                }
                let mut valid = vec![true; n];
                for &p in &col.nulls {
                    *valid.get_mut(p as usize).ok_or_else(|| {
                        bad_request(
                            &format!("{field}.nulls"),
                            format!("position {p} of {n} values"),
                        )
                    })? = false;
                }
                let nulls = Some(arrow_buffer::NullBuffer::from(valid));
                let (ty, array): (DataType, ArrayRef) = match col.values {
                    Some(Values::Strings(v)) => {
                        let valid = nulls.as_ref().map(|n| n.iter().collect::<Vec<_>>());
                        let strings: StringArray = v
                            .keys
                            .iter()
                            .enumerate()
                            .map(|(i, s)| valid.as_ref().is_none_or(|v| v[i]).then_some(s.as_str()))
                            .collect();
                        (DataType::Utf8, Arc::new(strings))
                    }
                    Some(Values::Ints(v)) => (
                        DataType::Int64,
                        Arc::new(Int64Array::new(v.keys.into(), nulls)),
                    ),
                    Some(Values::Doubles(v)) => (
                        DataType::Float64,
                        Arc::new(Float64Array::new(v.values.into(), nulls)),
                    ),
                    None => unreachable!("checked above"),
                };
                fields.push(Field::new(&col.name, ty, true));
                arrays.push(array);
            }
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .map_err(|e| bad_request("request.columns", e.to_string()))?
        }
    };
    Ok((batch, at_column))
}

/// A service read's reply: every column as `GetFeaturesResponse` carries features
/// (numbers as doubles, strings in `strings`, lists in `lists`; other types, such as
/// dates an on-demand expression made, as their text).
///
/// # Errors
/// `INTERNAL` when a column cannot be turned into numbers nor text (no type Panes makes).
pub(crate) fn response(batch: &RecordBatch) -> Result<proto::GetFeaturesResponse, Status> {
    let (rows, nf) = (batch.num_rows(), batch.num_columns());
    let mut values = vec![f64::NAN; rows * nf];
    let mut valid = vec![false; rows * nf];
    let (mut lists, mut strings, mut string_features) = (Vec::new(), Vec::new(), Vec::new());
    let internal = |e: arrow_schema::ArrowError| Status::internal(e.to_string());
    for (c, col) in batch.columns().iter().enumerate() {
        for r in 0..rows {
            valid[r * nf + c] = col.is_valid(r);
        }
        match col.data_type() {
            DataType::List(_) => {
                let l = col.as_list::<i32>();
                let text = matches!(
                    l.value_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                );
                if text {
                    string_features.push(c as u32);
                }
                let mut offsets = vec![0u32];
                let (mut vals, mut strs) = (Vec::new(), Vec::new());
                for r in 0..rows {
                    let items = l.value(r);
                    values[r * nf + c] = items.len() as f64;
                    if text {
                        let items = arrow_cast::cast(&items, &DataType::Utf8).map_err(internal)?;
                        strs.extend(
                            items
                                .as_string::<i32>()
                                .iter()
                                .map(|s| s.unwrap_or_default().to_string()),
                        );
                    } else {
                        let items =
                            arrow_cast::cast(&items, &DataType::Float64).map_err(internal)?;
                        vals.extend(
                            items
                                .as_primitive::<Float64Type>()
                                .iter()
                                .map(|v| v.unwrap_or(f64::NAN)),
                        );
                    }
                    offsets.push((vals.len() + strs.len()) as u32);
                }
                lists.push(proto::FeatureList {
                    feature: c as u32,
                    offsets,
                    values: vals,
                    strings: strs,
                });
            }
            t if t.is_numeric() || *t == DataType::Boolean => {
                let x = arrow_cast::cast(col, &DataType::Float64).map_err(internal)?;
                for (r, v) in x.as_primitive::<Float64Type>().iter().enumerate() {
                    values[r * nf + c] = v.unwrap_or(f64::NAN);
                }
            }
            _ => {
                let x = arrow_cast::cast(col, &DataType::Utf8).map_err(internal)?;
                string_features.push(c as u32);
                strings.push(proto::FeatureStrings {
                    feature: c as u32,
                    values: x
                        .as_string::<i32>()
                        .iter()
                        .map(|s| s.unwrap_or_default().to_string())
                        .collect(),
                });
            }
        }
    }
    Ok(proto::GetFeaturesResponse {
        features: batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect(),
        rows: rows as u32,
        values,
        validity: bitmap(valid.into_iter()),
        lists,
        strings,
        string_features,
        ..Default::default()
    })
}

/// A Flight `DoGet` service ticket's rows: `{"service": "...", "request": {"column":
/// [values...], ...}, "at_column": "ts"}`, each column all integers, all numbers, all
/// strings or all booleans (nulls anywhere).
///
/// # Errors
/// `INVALID_ARGUMENT` naming the ticket's field.
pub(crate) fn ticket_request(
    v: &serde_json::Value,
) -> Result<(String, RecordBatch, String), Status> {
    use serde_json::Value;
    let service = v
        .get("service")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("ticket.service", "not a string"))?
        .to_string();
    let at_column = match v.get("at_column") {
        None | Some(Value::Null) => DEFAULT_AT_COLUMN.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(bad_request("ticket.at_column", "not a string")),
    };
    let columns = v.get("request").and_then(Value::as_object).ok_or_else(|| {
        bad_request(
            "ticket.request",
            "missing or not an object of columns: {\"card\": [1, 2], \"amount\": [9.5, null]}",
        )
    })?;
    if columns.is_empty() || columns.len() > MAX_REQUEST_COLUMNS {
        return Err(bad_request(
            "ticket.request",
            format!(
                "{} columns; a request has 1 to {MAX_REQUEST_COLUMNS}",
                columns.len()
            ),
        ));
    }
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (name, values) in columns {
        let field = format!("ticket.request.{name}");
        let values = values
            .as_array()
            .ok_or_else(|| bad_request(&field, "not an array of values"))?;
        let present = || values.iter().filter(|x| !x.is_null());
        let array: ArrayRef = if present().all(|x| x.is_i64()) {
            Arc::new(values.iter().map(Value::as_i64).collect::<Int64Array>())
        } else if present().all(Value::is_number) {
            Arc::new(values.iter().map(Value::as_f64).collect::<Float64Array>())
        } else if present().all(Value::is_string) {
            Arc::new(values.iter().map(Value::as_str).collect::<StringArray>())
        } else if present().all(Value::is_boolean) {
            Arc::new(values.iter().map(Value::as_bool).collect::<BooleanArray>())
        } else {
            return Err(bad_request(
                &field,
                "mixed values: a column is all integers, all numbers, all strings or all booleans (or null)",
            ));
        };
        fields.push(Field::new(name, array.data_type().clone(), true));
        arrays.push(array);
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| bad_request("ticket.request", e.to_string()))?;
    Ok((service, batch, at_column))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::request_column::Values;

    fn columns(columns: Vec<proto::RequestColumn>) -> Option<proto::ServiceRequest> {
        Some(proto::ServiceRequest {
            data: Some(proto::service_request::Data::Columns(
                proto::RequestColumns { columns },
            )),
            at_column: String::new(),
        })
    }

    fn ints(name: &str, keys: Vec<i64>, nulls: Vec<u32>) -> proto::RequestColumn {
        proto::RequestColumn {
            name: name.into(),
            values: Some(Values::Ints(proto::IntKeys { keys })),
            nulls,
        }
    }

    fn field_of(s: &Status) -> String {
        s.message()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn typed_columns_become_a_batch_with_their_nulls() {
        let strings = proto::RequestColumn {
            name: "m".into(),
            values: Some(Values::Strings(proto::StringKeys {
                keys: vec!["a".into(), "b".into()],
            })),
            nulls: vec![0],
        };
        let (b, at) =
            request_batch(columns(vec![ints("card", vec![1, 2], vec![1]), strings])).unwrap();
        assert_eq!(at, "ts");
        assert_eq!((b.num_rows(), b.num_columns()), (2, 2));
        assert!(b.column(0).is_null(1) && b.column(1).is_null(0) && b.column(1).is_valid(1));
    }

    #[test]
    fn malformed_requests_are_invalid_arguments_naming_the_field() {
        let cases: Vec<(Option<proto::ServiceRequest>, &str)> = vec![
            (None, "request"),
            (
                Some(proto::ServiceRequest {
                    data: None,
                    at_column: String::new(),
                }),
                "request",
            ),
            (columns(vec![]), "request.columns"),
            (
                columns(vec![ints("a", vec![1], vec![5])]),
                "request.columns[0].nulls",
            ),
            (
                columns(vec![
                    ints("a", vec![1, 2], vec![]),
                    ints("b", vec![1], vec![]),
                ]),
                "request.columns[1]",
            ),
            (
                columns(vec![ints("a", vec![1], vec![]), ints("a", vec![1], vec![])]),
                "request.columns[1]",
            ),
            (
                columns(vec![ints("", vec![1], vec![])]),
                "request.columns[0]",
            ),
            (
                columns(vec![proto::RequestColumn {
                    name: "a".into(),
                    values: None,
                    nulls: vec![],
                }]),
                "request.columns[0]",
            ),
            (
                columns(
                    (0..=MAX_REQUEST_COLUMNS)
                        .map(|i| ints(&format!("c{i}"), vec![1], vec![]))
                        .collect(),
                ),
                "request.columns",
            ),
            (
                Some(proto::ServiceRequest {
                    data: Some(proto::service_request::Data::ArrowIpc(vec![0xff; 64])),
                    at_column: String::new(),
                }),
                "request.arrow_ipc",
            ),
            (
                Some(proto::ServiceRequest {
                    data: Some(proto::service_request::Data::ArrowIpc(Vec::new())),
                    at_column: String::new(),
                }),
                "request.arrow_ipc",
            ),
        ];
        for (request, field) in cases {
            let s = request_batch(request).unwrap_err();
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
            assert_eq!(field_of(&s), field, "{s:?}");
        }
    }

    #[test]
    fn service_tickets_are_typed_per_column_and_checked() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"service": "s", "request": {"k": [1, null, 3], "x": [1, 2.5, null], "m": ["a", null, "c"], "b": [true, false, null]}}"#,
        )
        .unwrap();
        let (service, b, at) = ticket_request(&v).unwrap();
        assert_eq!(
            (service.as_str(), at.as_str(), b.num_rows()),
            ("s", "ts", 3)
        );
        let types: Vec<DataType> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        assert_eq!(
            types,
            [
                DataType::Boolean,
                DataType::Int64,
                DataType::Utf8,
                DataType::Float64
            ]
        );
        for (ticket, field) in [
            (r#"{"service": 1, "request": {"k": [1]}}"#, "ticket.service"),
            (r#"{"service": "s"}"#, "ticket.request"),
            (r#"{"service": "s", "request": {}}"#, "ticket.request"),
            (
                r#"{"service": "s", "request": {"k": 1}}"#,
                "ticket.request.k",
            ),
            (
                r#"{"service": "s", "request": {"k": [1, "a"]}}"#,
                "ticket.request.k",
            ),
            (
                r#"{"service": "s", "request": {"k": [1], "j": [1, 2]}}"#,
                "ticket.request",
            ),
            (
                r#"{"service": "s", "request": {"k": [1]}, "at_column": 3}"#,
                "ticket.at_column",
            ),
        ] {
            let v: serde_json::Value = serde_json::from_str(ticket).unwrap();
            let s = ticket_request(&v).unwrap_err();
            assert_eq!(field_of(&s), field, "{ticket}: {s:?}");
        }
    }

    #[test]
    fn replies_carry_numbers_strings_and_lists() {
        let list =
            arrow_array::ListArray::from_iter_primitive::<arrow_array::types::Float64Type, _, _>(
                vec![Some(vec![Some(1.0), Some(2.0)]), None],
            );
        let b = RecordBatch::try_from_iter([
            (
                "n",
                Arc::new(Int64Array::from(vec![Some(3), None])) as ArrayRef,
            ),
            ("s", Arc::new(StringArray::from(vec![Some("x"), None])) as _),
            ("l", Arc::new(list) as _),
            ("ok", Arc::new(BooleanArray::from(vec![true, false])) as _),
        ])
        .unwrap();
        let r = response(&b).unwrap();
        assert_eq!(r.rows, 2);
        assert_eq!(r.values[0], 3.0);
        assert_eq!(r.values[3], 1.0);
        assert_eq!(r.values[7], 0.0);
        assert_eq!(r.validity, vec![0b1000_1111]);
        assert_eq!(r.string_features, [1]);
        assert_eq!(r.strings[0].values, ["x", ""]);
        assert_eq!(
            (r.lists[0].offsets.clone(), r.lists[0].values.clone()),
            (vec![0, 2, 2], vec![1.0, 2.0])
        );
    }
}
