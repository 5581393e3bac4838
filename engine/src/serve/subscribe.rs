//! `Subscribe`: a view's current vectors of some keys (or every key), then each change
//! after a publish, as a server stream.
//!
//! A subscription is a task that reads the keys it follows at most once per interval
//! (on the read threads, like any read) and sends the rows whose features differ from
//! what it sent last. It remembers a 64-bit hash of each key's last sent vector, not
//! the vector, and never queues changes: while the client has not taken the earlier
//! messages (the stream's channel holds at most [`QUEUED_MESSAGES`], each of at most
//! [`VALUES_PER_MESSAGE`] values), the task waits and counts the intervals that pass;
//! its next read then has each key's latest vector only. So a client that never reads
//! costs the server a bounded amount of memory (the hashes, the keys it named, the
//! queued messages and HTTP/2's send buffer) and no ingest time.
//!
//! A read of the published state changes only when the view publishes (or with time,
//! for a view read at the wall clock), so an interval without a publish reads nothing.
//! Reads of every key take `4 ×` their own duration of rest at least, which keeps a
//! subscription to a large view to a fifth of a read thread.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tonic::Status;

use super::auth::{Caller, Scope};
use super::grpc::{keys_of, reply};
use super::proto::{self, SubscribeRequest, SubscribeUpdate, subscribe_request};
use super::server::Shared;
use super::status::{bad_request, status};
use crate::ingest::keys::KeyValue;
use crate::online::ServedFrame;
use crate::online::changes::Changes;
use crate::spec::ReadTime;

/// Messages a subscription's stream may hold that the client has not taken.
pub(crate) const QUEUED_MESSAGES: usize = 2;

/// Most feature values (a list counts at its longest) in one message: a snapshot or a
/// change of many keys goes out in several messages.
pub(crate) const VALUES_PER_MESSAGE: usize = 65_536;

/// The interval when a request gives none, and the least one allowed.
const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// The subscriptions of a server: their number (capped) and counters, and the signal
/// that ends them at shutdown.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    /// Subscriptions open now.
    pub active: AtomicU64,
    /// Messages sent, and key rows in them.
    pub messages: AtomicU64,
    pub rows: AtomicU64,
    /// Intervals that passed while a subscriber's stream was full (their changes were
    /// merged into a later message).
    pub coalesced: AtomicU64,
    /// Bytes of messages in the subscriptions' streams that clients have not taken.
    pub queued_bytes: AtomicU64,
    /// Most queued bytes seen at once.
    pub queued_bytes_max: AtomicU64,
    /// Set at shutdown: every subscription ends.
    stop: watch::Sender<bool>,
}

impl Default for Subscriptions {
    fn default() -> Self {
        Subscriptions {
            active: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            queued_bytes_max: AtomicU64::new(0),
            stop: watch::Sender::new(false),
        }
    }
}

impl Subscriptions {
    /// Ends every subscription (the server is stopping).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn queued(&self, bytes: u64) {
        let now = self.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.queued_bytes_max.fetch_max(now, Ordering::Relaxed);
    }
}

/// The stream of one subscription's messages.
pub(crate) type UpdateStream =
    Pin<Box<dyn Stream<Item = Result<SubscribeUpdate, Status>> + Send + 'static>>;

/// What a subscription follows.
enum Follow {
    /// These keys, as the request named them (repeats included).
    Keys(Vec<KeyValue>),
    /// Every key of a view that no source feeds.
    All,
    /// The rows of a feature-service request.
    Service {
        name: String,
        request: arrow_array::RecordBatch,
        at_column: String,
        caller: Caller,
    },
}

/// One subscription's state: its request and the hash of each key's last sent vector.
struct Subscription {
    /// The view read (empty for a service).
    view: String,
    /// The views whose publishes change what is read.
    views: Vec<String>,
    follow: Follow,
    features: Vec<String>,
    interval: Duration,
    /// Read at the wall clock: vectors change with time, not only with publishes.
    wall_clock: bool,
    /// Whether a source feeds the view (its reads are routed to partitions).
    sourced: bool,
    /// Rows per message.
    rows_per_message: usize,
    /// The caller's token, carried by reads routed to other instances.
    token: Option<tonic::metadata::AsciiMetadataValue>,
    /// Per request position (keys) or key id (every key): what was sent last.
    sent: Changes,
}

/// Drops the count of open subscriptions when the task ends.
struct Open(Arc<Shared>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.subscriptions.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// Starts a subscription for `caller`.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` naming the field (no keys and no `all_keys`, both, an
    /// interval under 10 ms, unknown features); `NOT_FOUND` for an unknown view;
    /// `PERMISSION_DENIED`; `FAILED_PRECONDITION` for `all_keys` of a view a source
    /// feeds; `RESOURCE_EXHAUSTED` past `--max-keys`, `--max-features` or
    /// `--max-subscriptions`.
    pub(crate) fn subscribe(
        self: &Arc<Self>,
        caller: &Caller,
        token: Option<tonic::metadata::AsciiMetadataValue>,
        req: SubscribeRequest,
    ) -> Result<UpdateStream, Status> {
        let interval = match req.interval_ms {
            0 => DEFAULT_INTERVAL,
            ms => Duration::from_millis(ms.into()),
        };
        if interval < MIN_INTERVAL {
            return Err(bad_request(
                "interval_ms",
                format!(
                    "{} ms; the least interval is {} ms",
                    interval.as_millis(),
                    MIN_INTERVAL.as_millis()
                ),
            ));
        }
        let target = if req.service.is_empty() {
            self.follow_view(caller, req)?
        } else {
            self.follow_service(caller, req)?
        };
        let max = self.options.max_subscriptions as u64;
        let open = self.subscriptions.active.fetch_add(1, Ordering::Relaxed);
        let guard = Open(self.clone());
        if open >= max {
            return Err(Status::resource_exhausted(format!(
                "{max} subscriptions are open; the limit is {max} \
                 (ServeOptions::max_subscriptions, --max-subscriptions)"
            )));
        }
        let sub = Subscription {
            view: target.view,
            views: target.views,
            follow: target.follow,
            features: target.features,
            interval,
            wall_clock: target.wall_clock,
            sourced: target.sourced,
            rows_per_message: (VALUES_PER_MESSAGE / target.per_row.max(1)).max(1),
            token,
            sent: Changes::default(),
        };
        let (tx, rx) = mpsc::channel(QUEUED_MESSAGES);
        let stop = self.subscriptions.stop.subscribe();
        tokio::spawn(sub.run(self.clone(), tx, stop, guard));
        let shared = self.clone();
        let stream = futures::stream::unfold(rx, move |mut rx| {
            let shared = shared.clone();
            async move {
                let (bytes, item) = rx.recv().await?;
                shared
                    .subscriptions
                    .queued_bytes
                    .fetch_sub(bytes, Ordering::Relaxed);
                Some((item, rx))
            }
        });
        Ok(Box::pin(stream))
    }
}

/// What a subscription follows, checked.
struct Target {
    view: String,
    views: Vec<String>,
    follow: Follow,
    features: Vec<String>,
    wall_clock: bool,
    sourced: bool,
    /// Values per row of a message (a list at its longest).
    per_row: usize,
}

impl Shared {
    /// Keys, or every key, of a view.
    fn follow_view(&self, caller: &Caller, req: SubscribeRequest) -> Result<Target, Status> {
        if req.request.is_some() {
            return Err(bad_request(
                "request",
                "request rows go with a service; a view subscription takes keys",
            ));
        }
        caller.check(Scope::Read, &req.view)?;
        let compiled = self
            .engine
            .compiled(&req.view)
            .map_err(|e| status(e, "view"))?;
        let follow = match (req.keys, req.all_keys) {
            (Some(_), true) => {
                return Err(bad_request(
                    "all_keys",
                    "set either keys or all_keys, not both",
                ));
            }
            (None, false) => {
                return Err(bad_request(
                    "keys",
                    "no keys: set string_keys, int_keys or composite_keys, or all_keys",
                ));
            }
            (None, true) => Follow::All,
            (Some(keys), false) => Follow::Keys(keys_of(self, Some(request_keys(keys)))?),
        };
        let sourced = self.sources.contains_key(&req.view);
        if sourced && matches!(follow, Follow::All) {
            return Err(Status::failed_precondition(format!(
                "view {:?} takes its events from Kafka and its keys live on several \
                 instances: subscribe to named keys",
                req.view
            )));
        }
        self.check_features(req.features.len())
            .map_err(|e| status(e, "features"))?;
        for f in &req.features {
            compiled
                .feature_index(f)
                .map_err(|e| status(e, "features"))?;
        }
        Ok(Target {
            per_row: super::server::reply_values(compiled, 1, &req.features),
            wall_clock: compiled.spec.read_time == ReadTime::WallClock,
            views: vec![req.view.clone()],
            view: req.view,
            follow,
            features: req.features,
            sourced,
        })
    }

    /// The rows of a feature-service request.
    fn follow_service(&self, caller: &Caller, req: SubscribeRequest) -> Result<Target, Status> {
        let misplaced = [
            ("view", !req.view.is_empty()),
            ("keys", req.keys.is_some()),
            ("all_keys", req.all_keys),
            ("features", !req.features.is_empty()),
        ];
        if let Some((field, _)) = misplaced.iter().find(|(_, set)| *set) {
            return Err(bad_request(
                field,
                "a service subscription takes its rows (and their times) from `request` only",
            ));
        }
        let file = self.engine.file();
        let s = file.service(&req.service).ok_or_else(|| {
            status(
                crate::online::service::unknown_service(file, &req.service),
                "service",
            )
        })?;
        let views = crate::online::service::service_views(file, s);
        let mut wall_clock = false;
        let mut per_row = s.on_demand.len();
        for (v, names) in &views {
            caller.check(Scope::Read, &v.name)?;
            if self.sources.contains_key(&v.name) {
                return Err(Status::failed_precondition(format!(
                    "service {:?} reads view {:?}, which a Kafka source feeds: services over \
                     Kafka-fed views are not served yet",
                    req.service, v.name
                )));
            }
            wall_clock |= v.read_time == ReadTime::WallClock;
            let compiled = self
                .engine
                .compiled(&v.name)
                .map_err(|e| status(e, "service"))?;
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            per_row += super::server::reply_values(compiled, 1, &names);
        }
        let (request, at_column) = super::service::request_batch(req.request)?;
        self.check_keys(request.num_rows())
            .map_err(|e| status(e, "request"))?;
        Ok(Target {
            view: String::new(),
            views: views.iter().map(|(v, _)| v.name.clone()).collect(),
            follow: Follow::Service {
                name: req.service,
                request,
                at_column,
                caller: caller.clone(),
            },
            features: Vec::new(),
            wall_clock,
            sourced: false,
            per_row,
        })
    }
}

/// Waits for room for a message in the stream, counting each interval that passes
/// after `due` while the client has not taken the earlier messages. `None` when the
/// client went away or the server is stopping.
async fn room<'a>(
    tx: &'a Sender,
    stop: &mut watch::Receiver<bool>,
    due: Instant,
    interval: Duration,
    coalesced: &mut u64,
    stats: &Subscriptions,
) -> Option<mpsc::Permit<'a, Item>> {
    loop {
        let wait = due.saturating_duration_since(Instant::now()).max(interval);
        tokio::select! {
            p = tx.reserve() => return p.ok(),
            () = tokio::time::sleep(wait) => {
                if Instant::now() > due {
                    *coalesced += 1;
                    stats.coalesced.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = stop.wait_for(|s| *s) => return None,
        }
    }
}

/// A subscription's keys in the form [`keys_of`] takes.
fn request_keys(k: subscribe_request::Keys) -> proto::get_features_request::Keys {
    use proto::get_features_request::Keys;
    match k {
        subscribe_request::Keys::StringKeys(k) => Keys::StringKeys(k),
        subscribe_request::Keys::IntKeys(k) => Keys::IntKeys(k),
        subscribe_request::Keys::CompositeKeys(k) => Keys::CompositeKeys(k),
    }
}

/// A message and its encoded size.
type Item = (u64, Result<SubscribeUpdate, Status>);
type Sender = mpsc::Sender<Item>;

impl Subscription {
    async fn run(
        mut self,
        shared: Arc<Shared>,
        tx: Sender,
        mut stop: watch::Receiver<bool>,
        _open: Open,
    ) {
        let stats = &shared.subscriptions;
        // A message with no rows now and then keeps a quiet subscription's connection
        // from being closed as idle.
        let heartbeat = (shared.options.idle_timeout / 3).max(MIN_INTERVAL);
        let mut last_sent = Instant::now();
        let mut next = Instant::now();
        let mut seen: Option<u64> = None;
        let mut coalesced = 0u64;
        let mut snapshot = true;
        loop {
            let Some(permit) =
                room(&tx, &mut stop, next, self.interval, &mut coalesced, stats).await
            else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
            }
            let started = Instant::now();
            // Nothing to read when nothing was published (reads at event time).
            let version = (!self.sourced)
                .then(|| {
                    self.views
                        .iter()
                        .map(|v| shared.engine.published(v).ok())
                        .sum::<Option<u64>>()
                })
                .flatten();
            let unchanged = !snapshot && !self.wall_clock && version.is_some() && version == seen;
            if unchanged {
                next = started + self.interval;
                if started.duration_since(last_sent) >= heartbeat {
                    let update = SubscribeUpdate::default();
                    let bytes = prost::Message::encoded_len(&update) as u64;
                    stats.queued(bytes);
                    permit.send((bytes, Ok(update)));
                    last_sent = Instant::now();
                }
                continue;
            }
            seen = version;
            let read = match self.read(&shared).await {
                Ok(read) => read,
                Err(e) => {
                    permit.send((0, Err(e)));
                    return;
                }
            };
            let took = started.elapsed();
            let rows = self.changed(&read);
            let mut chunks = rows.chunks(self.rows_per_message).peekable();
            let mut permit = Some(permit);
            // A snapshot of no key is one empty message.
            let empty: &[usize] = &[];
            let first = chunks.peek().is_none().then_some(empty);
            let mut sent_any = false;
            for chunk in first.into_iter().chain(chunks) {
                let (keys, features, request_rows) = match &read {
                    Read::Keys { keys, served, .. } => (
                        Some(update_keys(keys, chunk)),
                        reply(served, Some(chunk)),
                        Vec::new(),
                    ),
                    Read::Service(batch) => {
                        let idx = arrow_array::UInt32Array::from_iter_values(
                            chunk.iter().map(|&r| r as u32),
                        );
                        let rows = arrow_select::take::take_record_batch(batch, &idx)
                            .map_err(|e| Status::internal(e.to_string()));
                        match rows.and_then(|rows| super::service::response(&rows)) {
                            Ok(f) => (None, f, chunk.iter().map(|&r| r as u32).collect()),
                            Err(e) => {
                                let _ = tx.send((0, Err(e))).await;
                                return;
                            }
                        }
                    }
                };
                let update = SubscribeUpdate {
                    keys,
                    features: Some(features),
                    snapshot,
                    coalesced_intervals: std::mem::take(&mut coalesced),
                    request_rows,
                };
                let bytes = prost::Message::encoded_len(&update) as u64;
                stats.queued(bytes);
                stats.messages.fetch_add(1, Ordering::Relaxed);
                stats.rows.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let p = match permit.take() {
                    Some(p) => p,
                    None => {
                        let due = Instant::now();
                        match room(&tx, &mut stop, due, self.interval, &mut coalesced, stats).await
                        {
                            Some(p) => p,
                            None => return,
                        }
                    }
                };
                p.send((bytes, Ok(update)));
                sent_any = true;
            }
            if sent_any {
                last_sent = Instant::now();
            }
            snapshot = false;
            // Reads of many keys rest four times their duration.
            next = started + self.interval.max(took * 4);
        }
    }

    /// Reads the keys followed from the published state.
    async fn read(&self, shared: &Arc<Shared>) -> Result<Read, Status> {
        match &self.follow {
            Follow::Keys(keys) => {
                let served = shared
                    .read(
                        self.view.clone(),
                        keys.clone(),
                        None,
                        self.features.clone(),
                        false,
                        self.token.clone(),
                    )
                    .await?;
                Ok(Read::Keys {
                    keys: keys.clone(),
                    ids: None,
                    served,
                })
            }
            Follow::All => {
                let engine = shared.engine.clone();
                let (view, features) = (self.view.clone(), self.features.clone());
                let (keys, ids, served) = shared
                    .on_reads(move || {
                        let names: Vec<&str> = features.iter().map(String::as_str).collect();
                        let names = (!names.is_empty()).then_some(names.as_slice());
                        engine.read_all_published(&view, names)
                    })
                    .await?
                    .map_err(|e| status(e, "view"))?;
                Ok(Read::Keys {
                    keys,
                    ids: Some(ids),
                    served,
                })
            }
            Follow::Service {
                name,
                request,
                at_column,
                caller,
            } => {
                let out = shared
                    .read_service(caller, name.clone(), request.clone(), at_column.clone())
                    .await?;
                Ok(Read::Service(out))
            }
        }
    }

    /// Rows of `read` whose vector differs from the one last sent for the key (every
    /// row, the first time); remembers them as sent.
    fn changed(&mut self, read: &Read) -> Vec<usize> {
        let rows = match read {
            Read::Keys {
                ids: Some(ids),
                served,
                ..
            } => self.sent.changed(served, |r| ids[r] as usize),
            Read::Keys { served, .. } => self.sent.changed(served, |r| r),
            Read::Service(batch) => self.sent.changed_rows(batch),
        };
        self.sent.commit();
        rows
    }
}

/// One read of a subscription: the keys, their ids (every key), and the vectors; or
/// the rows of a service read. (Built once per interval: its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Read {
    Keys {
        keys: Vec<KeyValue>,
        ids: Option<Vec<u32>>,
        served: ServedFrame,
    },
    Service(arrow_array::RecordBatch),
}

/// The keys of rows `rows`, typed as the request's keys (see `SubscribeUpdate.keys`).
fn update_keys(keys: &[KeyValue], rows: &[usize]) -> proto::subscribe_update::Keys {
    use proto::subscribe_update::Keys;
    let picked: Vec<&KeyValue> = rows.iter().map(|&r| &keys[r]).collect();
    match picked.first() {
        Some(KeyValue::Tuple(first)) => {
            let parts = (0..first.len())
                .map(|j| {
                    let column: Vec<&KeyValue> = picked
                        .iter()
                        .map(|k| match k {
                            KeyValue::Tuple(parts) => &parts[j],
                            other => other,
                        })
                        .collect();
                    proto::KeyPartValues {
                        values: Some(match key_column(&column) {
                            Column::Ints(ints) => proto::key_part_values::Values::Ints(ints),
                            Column::Strings(s) => proto::key_part_values::Values::Strings(s),
                        }),
                    }
                })
                .collect();
            Keys::CompositeKeys(proto::CompositeKeys { parts })
        }
        Some(KeyValue::Str(_)) | Some(KeyValue::Int(_)) | None => {
            match (picked.first(), key_column(&picked)) {
                (Some(KeyValue::Int(_)), Column::Strings(s)) => Keys::DecimalKeys(s),
                (_, Column::Strings(s)) => Keys::StringKeys(s),
                (_, Column::Ints(i)) => Keys::IntKeys(i),
            }
        }
    }
}

enum Column {
    Ints(proto::IntKeys),
    Strings(proto::StringKeys),
}

/// One column of key values: integers while every one fits an `i64`, else strings
/// (integers as decimal digits).
fn key_column(values: &[&KeyValue]) -> Column {
    let ints: Option<Vec<i64>> = values
        .iter()
        .map(|k| match k {
            KeyValue::Int(v) => i64::try_from(*v).ok(),
            _ => None,
        })
        .collect();
    match ints {
        Some(keys) => Column::Ints(proto::IntKeys { keys }),
        None => Column::Strings(proto::StringKeys {
            keys: values
                .iter()
                .map(|k| match k {
                    KeyValue::Str(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::subscribe_update::Keys;

    #[test]
    fn keys_travel_as_the_request_s_and_big_integers_as_decimals() {
        let ints = [KeyValue::Int(-3), KeyValue::Int(7)];
        match update_keys(&ints, &[1, 0]) {
            Keys::IntKeys(k) => assert_eq!(k.keys, vec![7, -3]),
            other => panic!("{other:?}"),
        }
        let big = [KeyValue::Int(1), KeyValue::Int(u64::MAX.into())];
        match update_keys(&big, &[0, 1]) {
            Keys::DecimalKeys(k) => assert_eq!(k.keys, vec!["1", "18446744073709551615"]),
            other => panic!("{other:?}"),
        }
        let strs = [KeyValue::Str("a".into()), KeyValue::Str("b\"".into())];
        match update_keys(&strs, &[1]) {
            Keys::StringKeys(k) => assert_eq!(k.keys, vec!["b\""]),
            other => panic!("{other:?}"),
        }
        let tuples = [
            KeyValue::Tuple(vec![KeyValue::Str("x".into()), KeyValue::Int(5)]),
            KeyValue::Tuple(vec![
                KeyValue::Str("y".into()),
                KeyValue::Int(u64::MAX.into()),
            ]),
        ];
        match update_keys(&tuples, &[0, 1]) {
            Keys::CompositeKeys(c) => {
                use proto::key_part_values::Values;
                assert_eq!(c.parts.len(), 2);
                match &c.parts[0].values {
                    Some(Values::Strings(s)) => assert_eq!(s.keys, vec!["x", "y"]),
                    other => panic!("{other:?}"),
                }
                // A part holding an integer above i64::MAX travels as decimal strings.
                match &c.parts[1].values {
                    Some(Values::Strings(s)) => {
                        assert_eq!(s.keys, vec!["5", "18446744073709551615"]);
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        // No rows: an empty list.
        match update_keys(&ints, &[]) {
            Keys::IntKeys(k) => assert!(k.keys.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
