//! The `panes.v1.Features` service.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use tonic::{Request, Response, Status, Streaming};

use super::SERVER_TIME_HEADER;
use super::auth::{Caller, Scope};
use super::proto::features_server::Features;
use super::proto::{
    self, DescribeViewRequest, FeatureDescription, GetFeaturesRequest, GetFeaturesResponse,
    IngestRequest, IngestResponse, ListFeaturesRequest, ListFeaturesResponse, ViewDescription,
    get_features_request, ingest_request,
};
use super::server::Shared;
use super::status::{bad_request, status, stream_error};
use crate::error::PanesError;
use crate::ingest::PushReport;
use crate::ingest::keys::KeyValue;
use crate::online::{Engine, ServedFrame, Strings};
use crate::spec::{ReadTime, ViewSpec, Window};

/// Rejections returned by one `Ingest` call.
const MAX_REJECTIONS: usize = 10;

#[derive(Debug)]
pub(crate) struct FeaturesService {
    shared: Arc<Shared>,
}

impl FeaturesService {
    pub fn new(shared: Arc<Shared>) -> Self {
        FeaturesService { shared }
    }

    /// `GetFeatures` of a feature service: the request rows in, one row out per row.
    async fn get_service(
        &self,
        caller: &Caller,
        req: GetFeaturesRequest,
        started: Instant,
    ) -> Result<Response<GetFeaturesResponse>, Status> {
        let misplaced = [
            ("view", !req.view.is_empty()),
            ("keys", req.keys.is_some()),
            ("features", !req.features.is_empty()),
            ("at_ms", req.at_ms.is_some()),
        ];
        if let Some((field, _)) = misplaced.iter().find(|(_, set)| *set) {
            return Err(bad_request(
                field,
                "a service read takes its rows (and their times) from `request` only",
            ));
        }
        let (batch, at_column) = super::service::request_batch(req.request)?;
        let out = self
            .shared
            .read_service(caller, req.service, batch, at_column)
            .await?;
        let response = super::service::response(&out)?;
        let mut response = Response::new(response);
        let took = started.elapsed();
        response.metadata_mut().insert(
            SERVER_TIME_HEADER,
            tonic::metadata::MetadataValue::from(took.as_micros().min(u64::MAX as u128) as u64),
        );
        Ok(response)
    }
}

/// The keys of a read, checked against the limit.
pub(crate) fn keys_of(
    shared: &Shared,
    keys: Option<get_features_request::Keys>,
) -> Result<Vec<KeyValue>, Status> {
    let keys = match keys {
        Some(get_features_request::Keys::StringKeys(k)) => {
            shared
                .check_keys(k.keys.len())
                .map_err(|e| status(e, "keys"))?;
            k.keys.into_iter().map(KeyValue::Str).collect()
        }
        Some(get_features_request::Keys::IntKeys(k)) => {
            shared
                .check_keys(k.keys.len())
                .map_err(|e| status(e, "keys"))?;
            k.keys
                .into_iter()
                .map(|k| KeyValue::Int(k.into()))
                .collect()
        }
        Some(get_features_request::Keys::CompositeKeys(k)) => composite_keys(shared, k)?,
        None => {
            return Err(bad_request(
                "keys",
                "no keys: set string_keys, int_keys or composite_keys",
            ));
        }
    };
    Ok(keys)
}

/// Tuples from one column of values per key part, checked against the limits.
fn composite_keys(shared: &Shared, k: proto::CompositeKeys) -> Result<Vec<KeyValue>, Status> {
    use proto::key_part_values::Values;
    let n_parts = k.parts.len();
    if n_parts == 0 || n_parts > crate::spec::MAX_KEY_PARTS {
        return Err(bad_request(
            "composite_keys.parts",
            format!(
                "{n_parts} key columns; a composite key has 1 to {}",
                crate::spec::MAX_KEY_PARTS
            ),
        ));
    }
    let len = |p: &proto::KeyPartValues| match &p.values {
        Some(Values::Strings(s)) => Some(s.keys.len()),
        Some(Values::Ints(i)) => Some(i.keys.len()),
        None => None,
    };
    let mut rows = None;
    for (i, p) in k.parts.iter().enumerate() {
        let field = format!("composite_keys.parts[{i}]");
        let n = len(p).ok_or_else(|| bad_request(&field, "no values: set strings or ints"))?;
        match rows {
            None => rows = Some(n),
            Some(r) if r != n => {
                return Err(bad_request(
                    &field,
                    format!(
                        "{n} values; key column 0 has {r}: every key column has one value per key"
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    let rows = rows.unwrap_or(0);
    shared.check_keys(rows).map_err(|e| status(e, "keys"))?;
    let mut tuples: Vec<Vec<KeyValue>> = (0..rows).map(|_| Vec::with_capacity(n_parts)).collect();
    for p in k.parts {
        match p.values {
            Some(Values::Strings(s)) => {
                for (t, v) in tuples.iter_mut().zip(s.keys) {
                    t.push(KeyValue::Str(v));
                }
            }
            Some(Values::Ints(i)) => {
                for (t, v) in tuples.iter_mut().zip(i.keys) {
                    t.push(KeyValue::Int(v.into()));
                }
            }
            // Every part was checked to hold values above.
            None => {}
        }
    }
    Ok(tuples.into_iter().map(KeyValue::Tuple).collect())
}

/// Checks a read time given by a client.
pub(crate) fn check_at(at: Option<i64>) -> Result<(), Status> {
    if let Some(at) = at
        && at.unsigned_abs() > panes_kernels::MAX_TIME_MS
    {
        return Err(bad_request(
            "at_ms",
            format!(
                "read time {at} ms is out of range: times must lie within ±2^60 ms of the epoch"
            ),
        ));
    }
    Ok(())
}

/// The description of a view as served.
///
/// The dtypes of string features and the key kind come from the view's state: the
/// engine's, or for a view fed by a partitioned source, its partitions owned here.
pub(crate) fn describe(shared: &Shared, spec: &ViewSpec) -> ViewDescription {
    let (text, key_kind) = match shared.sources.get(&spec.name) {
        Some(source) => (source.text_features(), source.key_kind()),
        None => (
            shared.engine.text_features(&spec.name),
            shared.engine.key_kind(&spec.name),
        ),
    };
    let text = text.unwrap_or_else(|_| vec![false; spec.features.len()]);
    ViewDescription {
        name: spec.name.clone(),
        key: spec.key.join(", "),
        key_columns: spec.key.clone(),
        key_kind: key_kind.ok().flatten().unwrap_or_default(),
        time: spec.time.clone(),
        allowed_lateness_ms: spec.allowed_lateness,
        read_time: match spec.read_time {
            ReadTime::EventTime => "event_time",
            ReadTime::WallClock => "wall_clock",
        }
        .to_string(),
        features: spec
            .features
            .iter()
            .enumerate()
            .map(|(i, f)| FeatureDescription {
                name: f.name.clone(),
                agg: f.agg.name().to_string(),
                column: f.column.clone().unwrap_or_default(),
                window_ms: match f.window {
                    Window::Duration(ms) => ms,
                    _ => 0,
                },
                window_events: match f.window {
                    Window::Events(n) => n,
                    _ => 0,
                },
                session_gap_ms: match f.window {
                    Window::Session(gap) => gap,
                    _ => 0,
                },
                hop_ms: f.hop,
                half_life_ms: f.agg.half_life().unwrap_or(0),
                precision: match f.agg {
                    panes_kernels::Agg::ApproxDistinct { precision } => u32::from(precision),
                    _ => 0,
                },
                q: match f.agg {
                    panes_kernels::Agg::Quantile { q, .. } => q.get(),
                    _ => 0.0,
                },
                relative_accuracy: match f.agg {
                    panes_kernels::Agg::Quantile {
                        relative_accuracy, ..
                    } => relative_accuracy.get(),
                    _ => 0.0,
                },
                dtype: if f.agg.is_list() && text[i] {
                    "list<string>"
                } else if f.agg.is_list() {
                    "list<float64>"
                } else if text[i] {
                    "string"
                } else if f.agg.integer_valued() {
                    "int64"
                } else {
                    "float64"
                }
                .to_string(),
                n: match f.agg {
                    panes_kernels::Agg::LastN { n } => u32::from(n),
                    _ => 0,
                },
                k: match f.agg {
                    panes_kernels::Agg::TopK { k, .. } => u32::from(k),
                    _ => 0,
                },
                capacity: match f.agg {
                    panes_kernels::Agg::TopK { capacity, .. } => u32::from(capacity),
                    _ => 0,
                },
                filter: f.filter.clone().unwrap_or_default(),
            })
            .collect(),
        filter: spec.filter.clone().unwrap_or_default(),
        columns: spec
            .columns
            .iter()
            .map(|c| proto::DerivedColumn {
                name: c.name.clone(),
                expr: c.expr.clone(),
            })
            .collect(),
    }
}

/// Record batches of one `Ingest` message.
pub(crate) fn batches_of(
    engine: &Engine,
    view: &str,
    payload: Option<ingest_request::Payload>,
) -> Result<Vec<RecordBatch>, Status> {
    match payload {
        Some(ingest_request::Payload::ArrowIpc(bytes)) => {
            crate::ingest::ipc::decode_stream(&bytes).map_err(|e| bad_request("arrow_ipc", e))
        }
        Some(ingest_request::Payload::Rows(rows)) => {
            let compiled = engine.compiled(view).map_err(|e| status(e, "view"))?;
            Ok(vec![rows_batch(
                &compiled.spec,
                &compiled.input_columns(),
                rows,
            )?])
        }
        None => Err(bad_request("payload", "no payload: set arrow_ipc or rows")),
    }
}

/// The typed-row form as a record batch: key, time (Int64 ms), one Float64 column
/// per value column. A row without a key gets a null key (rejected and counted).
fn rows_batch(
    spec: &ViewSpec,
    value_columns: &[String],
    rows: proto::Rows,
) -> Result<RecordBatch, Status> {
    use proto::row::Key;
    if spec.is_composite() {
        return rows_batch_with(spec, value_columns, tuple_columns(spec, &rows)?, rows);
    }
    let text = rows
        .rows
        .iter()
        .find_map(|r| r.key.as_ref())
        .map(|k| matches!(k, Key::StringKey(_)));
    let key: ArrayRef = if text == Some(true) {
        let keys = rows
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| match &r.key {
                Some(Key::StringKey(s)) => Ok(Some(s.as_str())),
                Some(Key::IntKey(_)) => Err(bad_request(
                    &format!("rows[{i}].int_key"),
                    "integer key in a message whose keys are strings",
                )),
                Some(Key::TupleKey(_)) => Err(tuple_for_single(i)),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Arc::new(StringArray::from(keys))
    } else {
        let keys = rows
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| match &r.key {
                Some(Key::IntKey(k)) => Ok(Some(*k)),
                Some(Key::StringKey(_)) => Err(bad_request(
                    &format!("rows[{i}].string_key"),
                    "string key in a message whose keys are integers",
                )),
                Some(Key::TupleKey(_)) => Err(tuple_for_single(i)),
                None => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Arc::new(Int64Array::from(keys))
    };
    rows_batch_with(spec, value_columns, vec![key], rows)
}

fn tuple_for_single(row: usize) -> Status {
    bad_request(
        &format!("rows[{row}].tuple_key"),
        "a composite key for a view with one key column",
    )
}

/// The key columns of rows of a view with a composite key: one per part, strings or
/// integers as the part's first value is.
fn tuple_columns(spec: &ViewSpec, rows: &proto::Rows) -> Result<Vec<ArrayRef>, Status> {
    use proto::key_part::Value;
    use proto::row::Key;
    let arity = spec.key.len();
    let mut parts: Vec<Vec<Option<&Value>>> = vec![Vec::with_capacity(rows.rows.len()); arity];
    for (i, r) in rows.rows.iter().enumerate() {
        match &r.key {
            Some(Key::TupleKey(t)) if t.parts.len() == arity => {
                for (p, v) in parts.iter_mut().zip(&t.parts) {
                    p.push(v.value.as_ref());
                }
            }
            Some(Key::TupleKey(t)) => {
                return Err(bad_request(
                    &format!("rows[{i}].tuple_key"),
                    format!(
                        "{} key parts; view {:?} has the composite key {}",
                        t.parts.len(),
                        spec.name,
                        spec.key_label()
                    ),
                ));
            }
            Some(Key::StringKey(_) | Key::IntKey(_)) => {
                return Err(bad_request(
                    &format!("rows[{i}].key"),
                    format!(
                        "a single key for view {:?}, whose key is composite ({}): set tuple_key",
                        spec.name,
                        spec.key_label()
                    ),
                ));
            }
            None => parts.iter_mut().for_each(|p| p.push(None)),
        }
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(p, values)| {
            let text = values
                .iter()
                .flatten()
                .next()
                .map(|v| matches!(v, Value::StringValue(_)));
            let wrong = |i: usize, kind: &str| {
                bad_request(
                    &format!("rows[{i}].tuple_key.parts[{p}]"),
                    format!(
                        "{kind} in a message whose key column {:?} holds the other kind",
                        spec.key[p]
                    ),
                )
            };
            let column: ArrayRef = if text == Some(true) {
                let v = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Some(Value::StringValue(s)) => Ok(Some(s.as_str())),
                        Some(Value::IntValue(_)) => Err(wrong(i, "an integer")),
                        None => Ok(None),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Arc::new(StringArray::from(v))
            } else {
                let v = values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| match v {
                        Some(Value::IntValue(k)) => Ok(Some(*k)),
                        Some(Value::StringValue(_)) => Err(wrong(i, "a string")),
                        None => Ok(None),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Arc::new(Int64Array::from(v))
            };
            Ok(column)
        })
        .collect()
}

/// A record batch of `rows` with the key columns `keys` (one per key column of the
/// view), the time and the value columns the view reads.
fn rows_batch_with(
    spec: &ViewSpec,
    value_columns: &[String],
    keys: Vec<ArrayRef>,
    rows: proto::Rows,
) -> Result<RecordBatch, Status> {
    let time = Int64Array::from_iter_values(rows.rows.iter().map(|r| r.time_ms));
    let mut fields: Vec<Field> = spec
        .key
        .iter()
        .zip(&keys)
        .map(|(name, k)| Field::new(name, k.data_type().clone(), true))
        .collect();
    fields.push(Field::new(&spec.time, DataType::Int64, false));
    let mut columns: Vec<ArrayRef> = keys;
    columns.push(Arc::new(time));
    // Linear in the message: a set for the names, and only the columns the view reads
    // are built (a message may name any number of others; they are checked, not built).
    let mut seen = HashSet::with_capacity(rows.columns.len());
    for (c, name) in rows.columns.iter().enumerate() {
        if spec.key.contains(name) || name == &spec.time || !seen.insert(name.as_str()) {
            return Err(bad_request(
                &format!("rows.columns[{c}]"),
                format!("column {name:?} is given twice or names the key or time column"),
            ));
        }
        if !value_columns.iter().any(|v| v == name) {
            continue;
        }
        let c = c as u32;
        let values: ArrayRef = if rows.rows.iter().any(|r| r.strings.contains_key(&c)) {
            Arc::new(StringArray::from_iter(rows.rows.iter().map(|r| {
                let null = r.null_columns.contains(&c);
                r.strings.get(&c).map(String::as_str).filter(|_| !null)
            })))
        } else {
            Arc::new(Float64Array::from_iter(rows.rows.iter().map(|r| {
                let null = r.null_columns.contains(&c);
                r.values.get(c as usize).copied().filter(|_| !null)
            })))
        };
        fields.push(Field::new(name, values.data_type().clone(), true));
        columns.push(values);
    }
    let width = rows.columns.len() as u32;
    for (i, r) in rows.rows.iter().enumerate() {
        if let Some(c) = r.strings.keys().find(|&&c| c >= width) {
            return Err(bad_request(
                &format!("rows[{i}].strings"),
                format!("a string for column {c}; the message has {width} columns"),
            ));
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| bad_request("rows", e.to_string()))
}

/// The `GetFeatures` reply holding rows `rows` of `served` (every row if `None`), in
/// that order.
pub(crate) fn reply(served: &ServedFrame, rows: Option<&[usize]>) -> GetFeaturesResponse {
    let frame = &served.frame;
    let all: Vec<usize>;
    let rows = match rows {
        Some(rows) => rows,
        None => {
            all = (0..frame.values.nrows()).collect();
            &all
        }
    };
    let nf = frame.names.len();
    // A string's value is NaN: its string is in `strings`.
    let string = |c: usize| frame.text.get(c) == Some(&true) && !frame.is_list[c];
    let mut values = Vec::with_capacity(rows.len() * nf);
    let mut valid = Vec::with_capacity(rows.len() * nf);
    for &r in rows {
        for c in 0..nf {
            let ok = frame.valid[[r, c]];
            valid.push(ok);
            values.push(if ok && !string(c) {
                frame.values[[r, c]]
            } else {
                f64::NAN
            });
        }
    }
    GetFeaturesResponse {
        lists: feature_lists(frame, rows),
        strings: feature_strings(frame, rows),
        string_features: (0..nf)
            .filter(|&c| frame.text.get(c) == Some(&true))
            .map(|c| c as u32)
            .collect(),
        rows: rows.len() as u32,
        validity: bitmap(valid.into_iter()),
        values,
        features: frame.names.clone(),
        latest_event_ms: pick(&served.latest_event_ms, rows),
        window_events: pick(&served.window_events, rows),
        at_ms: frame.at,
        state_version: served.version,
    }
}

/// `v[rows]`, or `v` itself when it is empty (a frame read without metadata).
fn pick<T: Copy>(v: &[T], rows: &[usize]) -> Vec<T> {
    if v.is_empty() {
        return Vec::new();
    }
    rows.iter().map(|&r| v[r]).collect()
}

/// The lists of the frame's list-valued features, for rows `rows` (empty ones too: a
/// client finds every list feature in `lists`).
fn feature_lists(
    frame: &crate::online::FeatureFrame,
    rows: &[usize],
) -> Vec<super::proto::FeatureList> {
    let nf = frame.values.ncols();
    (0..nf)
        .filter(|&c| frame.is_list.get(c) == Some(&true))
        .map(|c| {
            let text = frame.text.get(c).copied().unwrap_or(false);
            let mut offsets = vec![0u32];
            let (mut values, mut strings) = (Vec::new(), Vec::new());
            for &r in rows {
                let list = frame.list(r, c);
                if text {
                    strings.extend(list.iter().map(|&v| frame.strings.text(v).to_string()));
                } else {
                    values.extend_from_slice(list);
                }
                offsets.push((values.len() + strings.len()) as u32);
            }
            super::proto::FeatureList {
                feature: c as u32,
                offsets,
                values,
                strings,
            }
        })
        .collect()
}

/// The strings of the frame's string-valued features that are not lists, for rows
/// `rows`.
fn feature_strings(
    frame: &crate::online::FeatureFrame,
    rows: &[usize],
) -> Vec<super::proto::FeatureStrings> {
    let nf = frame.values.ncols();
    (0..nf)
        .filter(|&c| frame.text.get(c) == Some(&true) && frame.is_list.get(c) == Some(&false))
        .map(|c| super::proto::FeatureStrings {
            feature: c as u32,
            values: rows
                .iter()
                .map(|&r| match frame.valid[[r, c]] {
                    true => frame.strings.text(frame.values[[r, c]]).to_string(),
                    false => String::new(),
                })
                .collect(),
        })
        .collect()
}

/// Packs validity flags into a bitmap, least significant bit first.
pub(crate) fn bitmap(valid: impl Iterator<Item = bool>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, ok) in valid.enumerate() {
        if i % 8 == 0 {
            out.push(0);
        }
        if ok {
            *out.last_mut().expect("pushed above") |= 1 << (i % 8);
        }
    }
    out
}

#[tonic::async_trait]
impl Features for FeaturesService {
    type SubscribeStream = super::subscribe::UpdateStream;

    async fn subscribe(
        &self,
        request: Request<proto::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = Caller::of(&request)?;
        let token = request.metadata().get("authorization").cloned();
        let stream = self
            .shared
            .subscribe(&caller, token, request.into_inner())?;
        Ok(Response::new(stream))
    }

    async fn get_features(
        &self,
        request: Request<GetFeaturesRequest>,
    ) -> Result<Response<GetFeaturesResponse>, Status> {
        let started = Instant::now();
        let caller = Caller::of(&request)?;
        let forwarded = request.metadata().contains_key(super::route::FORWARDED);
        // A read routed to another instance carries the caller's token there.
        let token = request.metadata().get("authorization").cloned();
        let req = request.into_inner();
        if !req.service.is_empty() {
            return self.get_service(&caller, req, started).await;
        }
        if req.request.is_some() {
            return Err(bad_request(
                "request",
                "request rows go with a service; a view read takes keys",
            ));
        }
        caller.check(Scope::Read, &req.view)?;
        let keys = keys_of(&self.shared, req.keys)?;
        check_at(req.at_ms)?;
        let view = req.view;
        // One read in `--log-reads-every` goes to the served-feature log (a read routed
        // here by another instance is logged there).
        let logged = match &self.shared.read_log {
            Some(log) if !forwarded && log.sample() => Some(keys.clone()),
            _ => None,
        };
        let served = self
            .shared
            .read(
                view.clone(),
                keys,
                req.at_ms,
                req.features,
                forwarded,
                token,
            )
            .await?;
        let response = reply(&served, None);
        if let (Some(log), Some(keys)) = (&self.shared.read_log, logged) {
            log.log(view.clone(), keys, served);
        }
        let took = started.elapsed();
        if let Some(h) = self.shared.read_time.get(&view) {
            h.record(response.rows as usize, took);
        }
        let mut response = Response::new(response);
        response.metadata_mut().insert(
            SERVER_TIME_HEADER,
            tonic::metadata::MetadataValue::from(took.as_micros().min(u64::MAX as u128) as u64),
        );
        Ok(response)
    }

    async fn ingest(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<IngestResponse>, Status> {
        let caller = Caller::of(&request)?;
        let mut stream = request.into_inner();
        let mut out = IngestResponse::default();
        let mut touched = std::collections::BTreeSet::new();
        let accepted_so_far = |out: &IngestResponse| {
            format!(
                " ({} events of {} earlier messages were accepted and stay)",
                out.accepted, out.messages
            )
        };
        while let Some(msg) = stream.message().await.map_err(|s| {
            let s = stream_error(s);
            Status::new(
                s.code(),
                format!("{}{}", s.message(), accepted_so_far(&out)),
            )
        })? {
            let message = out.messages;
            let engine = self.shared.engine.clone();
            let view = msg.view;
            caller.check(Scope::Ingest, &view)?;
            engine.compiled(&view).map_err(|e| status(e, "view"))?;
            self.shared
                .check_pushable(&view)
                .map_err(|e| status(e, "view"))?;
            let view_name = view.clone();
            // Decoding runs on the write threads too: a large IPC message must not hold
            // up a tokio thread that reads are waiting for.
            let payload = msg.payload;
            let bytes = match &payload {
                Some(ingest_request::Payload::ArrowIpc(b)) => b.len(),
                Some(ingest_request::Payload::Rows(r)) => prost::Message::encoded_len(r),
                None => 0,
            };
            let results = self
                .shared
                .on_writes_of(bytes, move || {
                    let batches = batches_of(&engine, &view, payload)?;
                    let mut offset = 0;
                    let mut results = Vec::with_capacity(batches.len());
                    for b in &batches {
                        results.push(engine.push_at(&view, b, offset));
                        offset += b.num_rows();
                    }
                    Ok::<_, Status>(results)
                })
                .await?
                .map_err(|s| {
                    Status::with_details(
                        s.code(),
                        format!(
                            "message {message}: {}{}",
                            s.message(),
                            accepted_so_far(&out)
                        ),
                        s.details().to_vec().into(),
                    )
                })?;
            for r in results {
                match r {
                    Ok(report) => absorb(&mut out, message, &report),
                    // The whole batch was rejected and counted; say why and go on.
                    Err(PanesError::Schema {
                        column,
                        message: why,
                        ..
                    }) => {
                        out.rejected += 1;
                        if out.rejections.len() < MAX_REJECTIONS {
                            out.rejections.push(proto::Rejection {
                                message,
                                row: 0,
                                field: column,
                                reason: format!("the whole batch was rejected: {why}"),
                            });
                        }
                    }
                    Err(e) => return Err(status(e, "payload")),
                }
            }
            out.messages += 1;
            touched.insert(view_name);
        }
        // When the call returns, its events are visible to every read.
        let engine = self.shared.engine.clone();
        self.shared
            .on_writes(move || touched.iter().try_for_each(|v| engine.publish(v)))
            .await?
            .map_err(|e| status(e, "payload"))?;
        Ok(Response::new(out))
    }

    async fn list_features(
        &self,
        request: Request<ListFeaturesRequest>,
    ) -> Result<Response<ListFeaturesResponse>, Status> {
        let caller = Caller::of(&request)?;
        let engine = &self.shared.engine;
        // The views this caller may read.
        let views = engine
            .views()
            .filter(|v| caller.may(Scope::Read, &v.spec.name))
            .map(|v| describe(&self.shared, &v.spec))
            .collect();
        Ok(Response::new(ListFeaturesResponse { views }))
    }

    async fn describe_view(
        &self,
        request: Request<DescribeViewRequest>,
    ) -> Result<Response<ViewDescription>, Status> {
        let caller = Caller::of(&request)?;
        let name = request.into_inner().view;
        caller.check(Scope::Read, &name)?;
        let engine = &self.shared.engine;
        let compiled = engine.compiled(&name).map_err(|e| status(e, "view"))?;
        Ok(Response::new(describe(&self.shared, &compiled.spec)))
    }
}

fn absorb(out: &mut IngestResponse, message: u64, report: &PushReport) {
    out.accepted += report.accepted as u64;
    out.late += report.late as u64;
    out.rejected += report.rejected as u64;
    for r in &report.rejections {
        if out.rejections.len() < MAX_REJECTIONS {
            out.rejections.push(proto::Rejection {
                message,
                row: r.row as u64,
                field: field_of(&r.message),
                reason: r.message.clone(),
            });
        }
    }
}

/// The column a rejection message names (`column "x": ...`), if any.
fn field_of(message: &str) -> String {
    message
        .split_once("column \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(c, _)| c.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use arrow_array::Array;

    use super::*;
    use crate::FeatureFile;

    fn view() -> ViewSpec {
        let file = FeatureFile::parse(
            r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
[[views.features]]
name = "amount_sum_1m"
agg = "sum"
column = "amount"
window = "1m"
"#,
            "test",
        )
        .unwrap();
        file.views[0].clone()
    }

    fn row(values: Vec<f64>) -> proto::Row {
        proto::Row {
            key: Some(proto::row::Key::IntKey(7)),
            time_ms: 1_000,
            values,
            null_columns: vec![],
            strings: Default::default(),
        }
    }

    #[test]
    fn typed_rows_carry_strings_by_column() {
        let spec = view();
        let mut a = row(vec![f64::NAN, 1.0]);
        a.strings.insert(0, "books".into());
        let b = row(vec![f64::NAN, 2.0]); // no string: null
        let mut c = row(vec![f64::NAN, 3.0]);
        c.strings.insert(0, "toys".into());
        c.null_columns.push(0); // null wins
        let rows = proto::Rows {
            columns: vec!["category".into(), "amount".into()],
            rows: vec![a.clone(), b, c],
        };
        let batch = rows_batch(&spec, &["category".into(), "amount".into()], rows).unwrap();
        let category = batch.column_by_name("category").unwrap();
        let category = category.as_any().downcast_ref::<StringArray>().unwrap();
        assert_eq!(
            category.iter().collect::<Vec<_>>(),
            [Some("books"), None, None]
        );
        assert_eq!(
            batch.column_by_name("amount").unwrap().data_type(),
            &DataType::Float64
        );
        a.strings.insert(7, "stray".into());
        let rows = proto::Rows {
            columns: vec!["category".into(), "amount".into()],
            rows: vec![row(vec![0.0, 0.0]), a],
        };
        let e = rows_batch(&spec, &["category".into()], rows).unwrap_err();
        assert!(
            e.message().contains("rows[1].strings") && e.message().contains("column 7"),
            "{e:?}"
        );
    }

    #[test]
    fn r17_typed_rows_with_many_columns_build_only_the_view_s_and_catch_duplicates_late() {
        // 100 000 column names in one message: checked in one pass, and only the one
        // the view reads is built (the quadratic check took 13 s of CPU for 80 000).
        let n = 100_000;
        let mut columns: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        columns.push("amount".into());
        let mut values = vec![0.0; n];
        values.push(2.5);
        let spec = view();
        let rows = proto::Rows {
            columns: columns.clone(),
            rows: vec![row(values.clone())],
        };
        let batch = rows_batch(&spec, &["amount".into()], rows).unwrap();
        assert_eq!(batch.num_columns(), 3, "key, time and amount only");
        let amount = batch.column_by_name("amount").unwrap();
        assert_eq!(
            amount
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .value(0),
            2.5
        );

        // A duplicate at the very end is still found, and named by its position.
        columns.push("c0".into());
        let rows = proto::Rows {
            columns,
            rows: vec![row(values)],
        };
        let e = rows_batch(&spec, &["amount".into()], rows).unwrap_err();
        assert!(
            e.message().contains(&format!("rows.columns[{}]", n + 1)),
            "{e:?}"
        );
    }
}
