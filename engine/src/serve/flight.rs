//! Arrow Flight on the gRPC port: `DoPut` ingests record batches into the view named
//! by the descriptor's path; `DoGet` reads features for a ticket (JSON:
//! `{"view": "cards", "keys": [1, 2], "features": ["..."], "at_ms": 123}`; `features`
//! and `at_ms` optional) and returns one record batch: the keys, then the features.
//! A service ticket, `{"service": "fraud_v1", "request": {"card": [1, 2], "amount":
//! [9.5, null]}, "at_column": "ts"}`, returns the service's features then its on-demand
//! features, one row per request row.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_flight::decode::{DecodedPayload, FlightDataDecoder};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::auth::{Caller, Scope};
use super::grpc::check_at;
use super::server::Shared;
use super::status::{bad_request, status, stream_error};
use crate::error::{PanesError, catch_quietly};
use crate::ingest::keys::{KeyValue, key_array};

/// A future whose every poll runs under [`catch_quietly`]: a panic while polling
/// becomes `Err`, without a panic report.
struct CatchQuietly<F>(F);

impl<F: std::future::Future + Unpin> std::future::Future for CatchQuietly<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        match catch_quietly(|| Pin::new(&mut self.0).poll(cx)) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Debug)]
pub(crate) struct Flight {
    shared: Arc<Shared>,
}

impl Flight {
    pub fn new(shared: Arc<Shared>) -> Self {
        Flight { shared }
    }
}

fn flight_status(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => stream_error(*s),
        other => bad_request("flight_data", format!("malformed Flight data: {other}")),
    }
}

/// A parsed `DoGet` ticket.
pub(crate) struct TicketRead {
    pub view: String,
    pub keys: Vec<KeyValue>,
    pub features: Option<Vec<String>>,
    pub at: Option<i64>,
}

impl TicketRead {
    /// The keys as the reply's key column (see [`key_array`]).
    pub fn key_column(&self) -> ArrayRef {
        key_array(&self.keys)
    }
}

#[cfg(fuzzing)]
pub(crate) fn parse_ticket(bytes: &[u8]) -> Result<TicketRead, Status> {
    view_ticket(&ticket_json(bytes)?)
}

/// A ticket's JSON.
fn ticket_json(bytes: &[u8]) -> Result<serde_json::Value, Status> {
    serde_json::from_slice(bytes).map_err(|e| {
        bad_request(
            "ticket",
            format!("not JSON ({e}); expected {{\"view\": ..., \"keys\": [...]}}"),
        )
    })
}

/// A view read's ticket, from its JSON.
fn view_ticket(v: &serde_json::Value) -> Result<TicketRead, Status> {
    let view = v
        .get("view")
        .and_then(|x| x.as_str())
        .ok_or_else(|| bad_request("ticket.view", "missing or not a string"))?
        .to_string();
    let raw = v
        .get("keys")
        .and_then(|x| x.as_array())
        .ok_or_else(|| bad_request("ticket.keys", "missing or not an array"))?;
    // A key is a string or an integer, or for a view with a composite key an array of
    // them (one per key column, in the view's order).
    let single = |field: &dyn Fn() -> String, k: &serde_json::Value| match k {
        serde_json::Value::String(s) => Ok(KeyValue::Str(s.clone())),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(|n| KeyValue::Int(n.into()))
            .or_else(|| n.as_u64().map(|n| KeyValue::Int(n.into())))
            .ok_or_else(|| bad_request(&field(), "not an integer")),
        _ => Err(bad_request(
            &field(),
            "keys are strings or integers, or arrays of them for a composite key",
        )),
    };
    let keys = raw
        .iter()
        .enumerate()
        .map(|(i, k)| match k {
            serde_json::Value::Array(parts) => {
                if parts.is_empty() || parts.len() > crate::spec::MAX_KEY_PARTS {
                    return Err(bad_request(
                        &format!("ticket.keys[{i}]"),
                        format!(
                            "a composite key of {} parts; it has 1 to {}",
                            parts.len(),
                            crate::spec::MAX_KEY_PARTS
                        ),
                    ));
                }
                let parts = parts
                    .iter()
                    .enumerate()
                    .map(|(p, v)| single(&|| format!("ticket.keys[{i}][{p}]"), v))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(KeyValue::Tuple(parts))
            }
            k => single(&|| format!("ticket.keys[{i}]"), k),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let features = match v.get("features") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .map(|f| {
                    f.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad_request("ticket.features", "names are strings"))
                })
                .collect::<Result<_, _>>()?,
        ),
        Some(_) => return Err(bad_request("ticket.features", "not an array")),
    };
    let at = match v.get("at_ms") {
        None | Some(serde_json::Value::Null) => None,
        Some(x) => Some(
            x.as_i64()
                .ok_or_else(|| bad_request("ticket.at_ms", "not an integer"))?,
        ),
    };
    Ok(TicketRead {
        view,
        keys,
        features,
        at,
    })
}

/// A read's `INVALID_ARGUMENT` with its field as part of the ticket, as Flight clients
/// see it.
fn in_ticket(s: Status) -> Status {
    if s.code() == tonic::Code::InvalidArgument {
        Status::new(s.code(), format!("ticket.{}", s.message()))
    } else {
        s
    }
}

/// A `DoGet` reply of one record batch.
fn one_batch(batch: RecordBatch) -> Response<BoxStream<FlightData>> {
    let stream = FlightDataEncoderBuilder::new()
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(|e| Status::internal(e.to_string()));
    Response::new(Box::pin(stream))
}

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!(
        "Panes' Flight service has DoPut and DoGet only ({what} is not offered)"
    )))
}

#[tonic::async_trait]
impl FlightService for Flight {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;
    type DoExchangeStream = BoxStream<FlightData>;

    async fn handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("Handshake")
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("ListFlights")
    }

    async fn get_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        unimplemented("GetFlightInfo")
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        unimplemented("PollFlightInfo")
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        unimplemented("GetSchema")
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let started = Instant::now();
        let caller = Caller::of(&request)?;
        let token = request.metadata().get("authorization").cloned();
        let ticket = ticket_json(&request.into_inner().ticket)?;
        if ticket.get("service").is_some() {
            let (service, rows, at_column) = super::service::ticket_request(&ticket)?;
            let batch = self
                .shared
                .read_service(&caller, service, rows, at_column)
                .await
                .map_err(in_ticket)?;
            return Ok(one_batch(batch));
        }
        let t = view_ticket(&ticket)?;
        caller.check(Scope::Read, &t.view)?;
        self.shared
            .check_keys(t.keys.len())
            .map_err(|e| status(e, "ticket.keys"))?;
        check_at(t.at)?;
        let engine = self.shared.engine.clone();
        let view = t.view.clone();
        let served = self
            .shared
            .read(
                t.view.clone(),
                t.keys.clone(),
                t.at,
                t.features.clone().unwrap_or_default(),
                false,
                token,
            )
            .await
            .map_err(in_ticket)?;
        let batch = self
            .shared
            .on_reads_for(t.keys.len(), move || -> Result<RecordBatch, PanesError> {
                engine.frame_batch(&t.view, &t.key_column(), &served.frame)
            })
            .await?
            .map_err(|e| status(e, "ticket.keys"))?;
        if let Some(h) = self.shared.read_time.get(&view) {
            h.record(batch.num_rows(), started.elapsed());
        }
        Ok(one_batch(batch))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        let caller = Caller::of(&request)?;
        let mut input = request.into_inner();
        let first = input
            .message()
            .await
            .map_err(stream_error)?
            .ok_or_else(|| bad_request("flight_descriptor", "empty DoPut stream"))?;
        let view = match &first.flight_descriptor {
            Some(d) if d.path.len() == 1 => d.path[0].clone(),
            _ => {
                return Err(bad_request(
                    "flight_descriptor.path",
                    "DoPut needs a path descriptor with one element: the view name",
                ));
            }
        };
        caller.check(Scope::Ingest, &view)?;
        let engine = self.shared.engine.clone();
        engine
            .compiled(&view)
            .map_err(|e| status(e, "flight_descriptor.path"))?;
        self.shared
            .check_pushable(&view)
            .map_err(|e| status(e, "flight_descriptor.path"))?;
        let data = futures::stream::once(async move { Ok(first) })
            .chain(input)
            .map_err(FlightError::from);
        let mut messages = FlightDataDecoder::new(data);
        let shared = self.shared.clone();
        // Batches are pushed as they arrive, in order; each gets a PutResult whose
        // app_metadata holds the JSON counts of that batch.
        let out = async_stream(move |tx| async move {
            let mut offset = 0usize;
            let mut schemas = 0usize;
            for index in 0usize.. {
                // arrow-ipc can panic on hostile data (buffer offsets past the body):
                // the client is told its stream was refused, and the thread lives on.
                let next = CatchQuietly(messages.next()).await;
                let refuse = |why: String| {
                    let e = format!("message {index}: {why}; the stream was refused from here");
                    bad_request("flight_data", e)
                };
                let decoded = match next {
                    Ok(None) => break,
                    Ok(Some(Ok(d))) => d,
                    Ok(Some(Err(e))) => {
                        let _ = tx.send(Err(flight_status(e))).await;
                        return;
                    }
                    Err(_) => {
                        let e = refuse("the Arrow IPC decoder failed on it".into());
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                // Every message that carries data must yield a batch: one that does not
                // (its IPC header names no message type, or a second schema) would
                // otherwise be dropped while the client is told OK.
                let bytes =
                    (decoded.inner.data_header.len() + decoded.inner.data_body.len()) as u64;
                let batch = match decoded.payload {
                    DecodedPayload::RecordBatch(b) => {
                        if let Err(e) = crate::ingest::ipc::check_rows(&b, bytes) {
                            let _ = tx.send(Err(refuse(e))).await;
                            return;
                        }
                        b
                    }
                    DecodedPayload::Schema(_) if schemas == 0 => {
                        schemas += 1;
                        continue;
                    }
                    DecodedPayload::Schema(_) => {
                        let e = refuse("a second schema message (a DoPut stream has one)".into());
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                    DecodedPayload::None if decoded.inner.data_body.is_empty() => continue,
                    DecodedPayload::None => {
                        let e = refuse(format!(
                            "{} bytes of data under an IPC header that is no record batch",
                            decoded.inner.data_body.len()
                        ));
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let engine = shared.engine.clone();
                let view = view.clone();
                let rows = batch.num_rows();
                let first_row = offset;
                let result = shared
                    .on_writes_of(batch.get_array_memory_size(), move || {
                        engine.push_at(&view, &batch, first_row)
                    })
                    .await;
                offset += rows;
                let meta = match result {
                    Ok(Ok(r)) => serde_json::json!({
                        "accepted": r.accepted, "late": r.late, "rejected": r.rejected,
                        "rejections": r.rejections.iter().map(|x| serde_json::json!({
                            "row": x.row, "reason": x.message})).collect::<Vec<_>>(),
                    }),
                    Ok(Err(PanesError::Schema {
                        column, message, ..
                    })) => serde_json::json!({
                        "accepted": 0, "late": 0, "rejected": rows,
                        "rejections": [{"row": first_row, "column": column,
                            "reason": format!("the whole batch was rejected: {message}")}],
                    }),
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(status(e, "flight_data"))).await;
                        return;
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                let put = PutResult {
                    app_metadata: meta.to_string().into_bytes().into(),
                };
                if tx.send(Ok(put)).await.is_err() {
                    return;
                }
            }
            // When the stream ends, its batches are visible to every read.
            let engine = shared.engine.clone();
            match shared.on_writes(move || engine.publish(&view)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = tx.send(Err(status(e, "flight_data"))).await;
                }
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("DoExchange")
    }

    async fn do_action(
        &self,
        _request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        unimplemented("DoAction")
    }

    async fn list_actions(
        &self,
        _request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        unimplemented("ListActions")
    }
}

/// A response stream fed by a task through a bounded channel (tonic's streaming shape).
fn async_stream<T, F, Fut>(f: F) -> BoxStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
