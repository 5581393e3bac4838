//! Kafka sources, per-partition checkpoints and scale-out on consumer groups (feature
//! `kafka`).
//!
//! ```text
//!  topic partitions ──► consumer thread ──► decode (JSON / Arrow IPC) ──► partition engine
//!  (group member)        │  rebalance: restore / checkpoint           (one per partition)
//!                        └─ timer: checkpoint, then commit offsets          ▲
//!  GetFeatures(keys) ──► murmur2(key) → partition ──► local engine ─────────┘
//!                                                └──► owner instance (gRPC, one hop)
//! ```
//!
//! # Design decision: one engine per partition
//! A Kafka view keeps one [`Engine`] per partition it owns, not one for all of them.
//! A partition is the unit Kafka orders, assigns and moves between instances, so it is
//! the unit of state too: its events arrive in one order on every replay, which makes
//! late-data decisions (each partition has its own watermark) and therefore recovery
//! deterministic; its checkpoint holds exactly the state a new owner needs; and moving
//! it is restoring one file. The rejected alternative, one state per instance split
//! by key at checkpoint time, interleaves partitions in an order no replay repeats.
//!
//! # Exactly once
//! A partition's checkpoint holds its state and the offset of the first message not in
//! that state, written atomically (see [`crate::checkpoint`]). On assignment the
//! consumer restores the newest valid checkpoint and seeks to its offset; offsets are
//! committed to the group only after the checkpoint that holds them is durable, for
//! monitoring — recovery never trusts them. A crash loses only state that the replay
//! from the checkpoint's offset rebuilds.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use ndarray::Array2;
use panes_kernels::Backend;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

use crate::checkpoint::{CheckpointDir, SourcePosition, write_atomic};
use crate::engine::{Engine, EngineOptions, FeatureFrame, ServedFrame, ViewMetrics};
use crate::error::{PanesError, Result};
use crate::keys::{KeyColumn, KeyValue};
use crate::spec::{FeatureFile, PayloadFormat, SourceSpec, ViewSpec};
use crate::view::CompiledView;

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`), which its default
/// partitioner and librdkafka's `murmur2_random` use.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The partition Kafka's default partitioner puts a message with key bytes `key` in.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// The message-key bytes of an entity key: a string's UTF-8, an integer's decimal text.
pub fn key_bytes(key: &KeyValue) -> Vec<u8> {
    match key {
        KeyValue::Str(s) => s.as_bytes().to_vec(),
        KeyValue::Int(i) => i.to_string().into_bytes(),
    }
}

/// Why a message (or a row of one) was not ingested.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadMessage {
    /// The payload is not a JSON object or not an Arrow IPC stream.
    Undecodable,
    /// No entity key (missing or null field, or no message key where one is mapped).
    MissingKey,
    /// No usable event time.
    MissingTime,
    /// A value of the wrong type.
    WrongType,
    /// The key belongs in another partition (the producer did not key by entity
    /// with the default partitioner); reading it here would give wrong answers.
    Misrouted,
}

impl BadMessage {
    /// Every reason, in metric order.
    pub const ALL: [BadMessage; 5] = [
        BadMessage::Undecodable,
        BadMessage::MissingKey,
        BadMessage::MissingTime,
        BadMessage::WrongType,
        BadMessage::Misrouted,
    ];

    /// The reason's name in metrics and dead-letter headers.
    pub fn name(self) -> &'static str {
        match self {
            BadMessage::Undecodable => "undecodable",
            BadMessage::MissingKey => "missing_key",
            BadMessage::MissingTime => "missing_time",
            BadMessage::WrongType => "wrong_type",
            BadMessage::Misrouted => "misrouted",
        }
    }
}

/// Counters of a Kafka view, over the partitions this instance owned.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Messages consumed.
    pub messages: AtomicU64,
    /// Bad messages (or rows of Arrow messages), by [`BadMessage::ALL`] index.
    pub bad: [AtomicU64; 5],
    /// Messages sent to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Checkpoints written.
    pub checkpoints: AtomicU64,
    /// Checkpoints that failed to be written (the previous one stays in force).
    pub checkpoint_failures: AtomicU64,
    /// Partitions restored from a checkpoint.
    pub restored: AtomicU64,
    /// Checkpoint files skipped as corrupt or unusable.
    pub skipped: AtomicU64,
    /// Messages below a partition's checkpointed offset, dropped as already counted.
    pub duplicates: AtomicU64,
    /// Rebalances seen.
    pub rebalances: AtomicU64,
}

/// One owned partition: its engine and where its source stands.
#[derive(Debug)]
struct Partition {
    engine: Engine,
    dir: CheckpointDir,
    /// Offset of the next message to ingest.
    next_offset: AtomicI64,
    /// `next_offset` of the newest durable checkpoint.
    checkpointed: AtomicI64,
    /// Assignment this partition belongs to; buffered rows of older ones are dropped.
    epoch: u64,
}

/// A view whose events come from a Kafka topic, as served by one instance of its
/// consumer group.
#[derive(Debug)]
pub struct KafkaView {
    spec: ViewSpec,
    /// The value columns the features read ([`CompiledView::columns`]).
    columns: Vec<String>,
    source: SourceSpec,
    file: FeatureFile,
    options: EngineOptions,
    backend: Arc<dyn Backend>,
    root: PathBuf,
    advertise: String,
    checkpoint_every: Duration,
    partitions: AtomicI32,
    owned: RwLock<BTreeMap<i32, Arc<Partition>>>,
    epoch: AtomicU64,
    /// Counters.
    pub stats: SourceStats,
    dead_letters: Option<DeadLetters>,
    clients: Mutex<HashMap<String, FeaturesClient>>,
}

/// The dead-letter producer.
struct DeadLetters(ThreadedProducer<DefaultProducerContext>);

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadLetters")
    }
}

type FeaturesClient =
    crate::serve::proto::features_client::FeaturesClient<tonic::transport::Channel>;

/// How a Kafka view runs.
#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// Root of the checkpoint directory shared by every instance of the group; the
    /// view's partitions are checkpointed under `<root>/<view>/p<N>/`.
    pub checkpoint_root: PathBuf,
    /// Time between checkpoints of a partition that took events.
    pub checkpoint_every: Duration,
    /// The gRPC address other instances reach this one at.
    pub advertise: String,
}

/// The message key of the header names used in dead-letter messages.
const DLQ_HEADERS: [&str; 5] = [
    "panes.reason",
    "panes.error",
    "panes.topic",
    "panes.partition",
    "panes.offset",
];

impl KafkaView {
    /// A Kafka view for `spec` (which must have a source), its engines on `backend`.
    ///
    /// # Errors
    /// A source setting that cannot work; the dead-letter producer cannot be built.
    pub fn new(
        spec: &ViewSpec,
        options: EngineOptions,
        backend: Arc<dyn Backend>,
        kafka: &KafkaOptions,
    ) -> Result<Self> {
        let source = spec.source.clone().ok_or_else(|| {
            PanesError::Invalid(format!("view {:?} has no [views.source]", spec.name))
        })?;
        if let Some(k) = &source.key_column
            && k != &spec.key
        {
            return Err(PanesError::Invalid(format!(
                "view {:?}: source key_column {k:?} must name the view's key column {:?}",
                spec.name, spec.key
            )));
        }
        let dead_letters = match &source.dead_letter_topic {
            Some(_) => {
                let mut c = ClientConfig::new();
                c.set("bootstrap.servers", &source.brokers);
                for (k, v) in &source.properties {
                    c.set(k, v);
                }
                Some(DeadLetters(c.create().map_err(|e| {
                    PanesError::Invalid(format!("view {:?}: dead-letter producer: {e}", spec.name))
                })?))
            }
            None => None,
        };
        let mut own = spec.clone();
        own.source = None;
        Ok(KafkaView {
            file: FeatureFile {
                views: vec![own.clone()],
            },
            columns: CompiledView::new(&own, options.shards).columns,
            spec: own,
            source,
            options,
            backend,
            root: kafka.checkpoint_root.join(&spec.name),
            advertise: kafka.advertise.clone(),
            checkpoint_every: kafka.checkpoint_every,
            partitions: AtomicI32::new(0),
            owned: RwLock::new(BTreeMap::new()),
            epoch: AtomicU64::new(0),
            stats: SourceStats::default(),
            dead_letters,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The view's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The topic's partition count (0 until the consumer started).
    pub fn partition_count(&self) -> i32 {
        self.partitions.load(Ordering::Acquire)
    }

    /// Partitions this instance owns now.
    pub fn owned(&self) -> Vec<i32> {
        self.owned_map().keys().copied().collect()
    }

    fn owned_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, Arc<Partition>>> {
        self.owned.read().unwrap_or_else(|p| p.into_inner())
    }

    fn partition_dir(&self, p: i32) -> PathBuf {
        self.root.join(format!("p{p}"))
    }

    /// The address of the instance that last took partition `p` (from the shared
    /// checkpoint directory).
    fn owner_of(&self, p: i32) -> Option<String> {
        std::fs::read_to_string(self.partition_dir(p).join("owner"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    }

    fn bad(&self, why: BadMessage, n: u64) {
        self.stats.bad[why as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// The view's counters summed over the partitions owned now.
    pub fn metrics(&self) -> Result<ViewMetrics> {
        let mut total = ViewMetrics {
            view: self.spec.name.clone(),
            counters: Default::default(),
            keys: 0,
            state_bytes: 0,
            max_event_time: None,
            watermark: None,
            pending: 0,
            backend: self.backend.kind().name(),
            folded: 0,
            version: 0,
        };
        for part in self.owned_map().values() {
            let m = part.engine.metrics(&self.spec.name)?;
            let (c, t) = (&m.counters, &mut total.counters);
            t.accepted += c.accepted;
            t.late += c.late;
            for (a, b) in t.rejected.iter_mut().zip(c.rejected) {
                *a += b;
            }
            t.null_values += c.null_values;
            t.nan_values += c.nan_values;
            t.expired += c.expired;
            total.keys += m.keys;
            total.state_bytes += m.state_bytes;
            total.max_event_time = total.max_event_time.max(m.max_event_time);
            total.watermark = total.watermark.max(m.watermark);
            total.pending += m.pending;
            total.folded += m.folded;
            total.version += m.version;
        }
        Ok(total)
    }

    /// Takes partition `p`: restores its newest valid checkpoint (skipping corrupt
    /// ones, each reported) and returns the offset to consume from.
    fn assign(&self, p: i32) -> Result<Offset> {
        let engine = Engine::with_backend(&self.file, self.options.clone(), self.backend.clone())?;
        let dir = CheckpointDir::new(self.partition_dir(p), 3);
        let view = self.spec.name.clone();
        let restored = dir.restore_newest(
            |bytes| engine.restore(&view, bytes).map_err(|e| e.to_string()),
            |path, why| {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "panes: view {view:?} partition {p}: skipping checkpoint {}: {why}",
                    path.display()
                );
            },
        )?;
        let next = match &restored {
            Some((info, path)) => {
                self.stats.restored.fetch_add(1, Ordering::Relaxed);
                let next = info
                    .positions
                    .iter()
                    .find(|s| s.partition == p)
                    .map_or(0, |s| s.next_offset);
                eprintln!(
                    "panes: view {view:?} partition {p}: restored {} ({} events), resuming at offset {next}",
                    path.display(),
                    info.folded
                );
                next
            }
            None => 0,
        };
        write_atomic(&dir.path().join("owner"), self.advertise.as_bytes())?;
        let part = Partition {
            engine,
            dir,
            next_offset: AtomicI64::new(next),
            checkpointed: AtomicI64::new(if restored.is_some() { next } else { -1 }),
            epoch: self.epoch.load(Ordering::Acquire),
        };
        self.owned
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(p, Arc::new(part));
        Ok(if restored.is_some() {
            Offset::Offset(next)
        } else {
            Offset::Beginning
        })
    }

    /// Writes a checkpoint of partition `p` if it took events since the last one
    /// (or `force`), then returns its position for the offset commit.
    fn checkpoint(&self, p: i32, part: &Partition, force: bool) -> Option<SourcePosition> {
        let next = part.next_offset.load(Ordering::Acquire);
        if !force && next == part.checkpointed.load(Ordering::Acquire) {
            return None;
        }
        if let Some(producer) = &self.dead_letters {
            // Dead letters of the events before `next` are out before their offsets commit.
            let _ = producer.0.flush(Duration::from_secs(10));
        }
        let position = SourcePosition {
            partition: p,
            next_offset: next,
        };
        let written = part
            .engine
            .checkpoint(&self.spec.name, &[position])
            .and_then(|bytes| part.dir.write(&bytes));
        match written {
            Ok(_) => {
                part.checkpointed.store(next, Ordering::Release);
                self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                Some(position)
            }
            Err(e) => {
                self.stats
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "panes: view {:?} partition {p}: checkpoint failed (the previous one stays in force): {e}",
                    self.spec.name
                );
                None
            }
        }
    }

    /// Checkpoints the partitions that took events, then commits their offsets.
    fn checkpoint_all(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        mode: CommitMode,
        force: bool,
    ) {
        let owned: Vec<_> = self
            .owned_map()
            .iter()
            .map(|(&p, part)| (p, part.clone()))
            .collect();
        let done: Vec<_> = owned
            .iter()
            .filter_map(|(p, part)| self.checkpoint(*p, part, force))
            .collect();
        self.commit(consumer, &done, mode);
    }

    fn commit(
        &self,
        consumer: &BaseConsumer<SourceContext>,
        positions: &[SourcePosition],
        mode: CommitMode,
    ) {
        if positions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for s in positions {
            let _ = tpl.add_partition_offset(
                &self.source.topic,
                s.partition,
                Offset::Offset(s.next_offset),
            );
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            // Only monitoring reads committed offsets; recovery uses the checkpoints.
            eprintln!(
                "panes: view {:?}: offset commit failed: {e}",
                self.spec.name
            );
        }
    }

    /// Gives up the partitions in `tpl`: a final checkpoint each, then their offsets.
    fn revoke(&self, consumer: &BaseConsumer<SourceContext>, tpl: &TopicPartitionList) {
        let mut done = Vec::new();
        for e in tpl.elements() {
            let part = self
                .owned
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&e.partition());
            if let Some(part) = part
                && let Some(pos) = self.checkpoint(e.partition(), &part, false)
            {
                done.push(pos);
            }
        }
        self.commit(consumer, &done, CommitMode::Sync);
    }

    fn dead_letter(&self, m: &BorrowedMessage<'_>, why: BadMessage, error: &str) {
        let Some(producer) = &self.dead_letters else {
            return;
        };
        let Some(topic) = &self.source.dead_letter_topic else {
            return;
        };
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let values = [why.name(), error, m.topic(), &partition, &offset];
        let headers =
            DLQ_HEADERS
                .iter()
                .zip(values)
                .fold(OwnedHeaders::new(), |h, (key, value)| {
                    h.insert(Header {
                        key,
                        value: Some(value),
                    })
                });
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        match producer.0.send(record) {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => eprintln!(
                "panes: view {:?}: dead-letter send failed: {e}",
                self.spec.name
            ),
        }
    }

    /// Reads `keys` as of `at` from the partitions owned here; `None` rows are keys
    /// of partitions owned elsewhere.
    fn read_local(
        &self,
        keys: &[KeyValue],
        at: Option<i64>,
        names: &[String],
        forwarded: bool,
    ) -> std::result::Result<Local, tonic::Status> {
        let n = self.partition_count();
        if n == 0 {
            return Err(tonic::Status::unavailable(format!(
                "view {:?}: the Kafka source has not started yet",
                self.spec.name
            )));
        }
        let owned = self.owned_map();
        let mut groups: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
        for (i, k) in keys.iter().enumerate() {
            groups
                .entry(partition_for(&key_bytes(k), n))
                .or_default()
                .push(i);
        }
        let f = names.len();
        let mut out = Local {
            rows: Rows::new(keys.len(), f),
            remote: BTreeMap::new(),
        };
        let features: Vec<&str> = names.iter().map(String::as_str).collect();
        for (p, idx) in groups {
            let Some(part) = owned.get(&p) else {
                if forwarded {
                    return Err(tonic::Status::unavailable(format!(
                        "view {:?}: partition {p} is not owned by this instance (it moved; retry)",
                        self.spec.name
                    )));
                }
                out.remote.insert(p, idx);
                continue;
            };
            let sub: Vec<KeyValue> = idx.iter().map(|&i| keys[i].clone()).collect();
            let served = part
                .engine
                .read_snapshot(&self.spec.name, &sub, at, Some(&features))
                .map_err(|e| crate::serve::status(e, "keys"))?;
            out.rows.absorb(&idx, &served);
        }
        Ok(out)
    }

    fn client(&self, addr: &str) -> std::result::Result<FeaturesClient, tonic::Status> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::internal(format!("owner address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .connect_lazy();
        let c = FeaturesClient::new(channel).max_decoding_message_size(usize::MAX);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

/// Values of some keys being assembled from several partitions and instances.
#[derive(Debug)]
struct Rows {
    f: usize,
    values: Vec<f64>,
    valid: Vec<bool>,
    latest: Vec<i64>,
    window_events: Vec<u64>,
    at: Option<i64>,
    version: u64,
}

impl Rows {
    fn new(keys: usize, f: usize) -> Self {
        Rows {
            f,
            values: vec![f64::NAN; keys * f],
            valid: vec![false; keys * f],
            latest: vec![i64::MIN; keys],
            window_events: vec![0; keys],
            at: None,
            version: 0,
        }
    }

    fn absorb(&mut self, idx: &[usize], s: &ServedFrame) {
        for (r, &i) in idx.iter().enumerate() {
            for c in 0..self.f {
                self.values[i * self.f + c] = s.frame.values[[r, c]];
                self.valid[i * self.f + c] = s.frame.valid[[r, c]];
            }
            self.latest[i] = s.latest_event_ms[r];
            self.window_events[i] = s.window_events[r];
        }
        self.at = self.at.max(Some(s.frame.at));
        self.version += s.version;
    }

    fn absorb_reply(
        &mut self,
        idx: &[usize],
        r: &crate::serve::proto::GetFeaturesResponse,
    ) -> std::result::Result<(), String> {
        if r.rows as usize != idx.len() || r.values.len() != idx.len() * self.f {
            return Err(format!(
                "{} rows × {} values for {} keys × {} features",
                r.rows,
                r.values.len(),
                idx.len(),
                self.f
            ));
        }
        for (row, &i) in idx.iter().enumerate() {
            for c in 0..self.f {
                let j = row * self.f + c;
                let ok = r
                    .validity
                    .get(j / 8)
                    .is_some_and(|b| b & (1 << (j % 8)) != 0);
                self.values[i * self.f + c] = if ok { r.values[j] } else { f64::NAN };
                self.valid[i * self.f + c] = ok;
            }
            self.latest[i] = r.latest_event_ms.get(row).copied().unwrap_or(i64::MIN);
            self.window_events[i] = r.window_events.get(row).copied().unwrap_or(0);
        }
        self.at = self.at.max(Some(r.at_ms));
        self.version += r.state_version;
        Ok(())
    }

    fn into_served(self, names: Vec<String>, keys: usize) -> ServedFrame {
        let f = self.f;
        ServedFrame {
            frame: FeatureFrame {
                names,
                values: Array2::from_shape_vec((keys, f), self.values).expect("keys × features"),
                valid: Array2::from_shape_vec((keys, f), self.valid).expect("keys × features"),
                at: self.at.unwrap_or(0),
            },
            latest_event_ms: self.latest,
            window_events: self.window_events,
            version: self.version,
        }
    }
}

#[derive(Debug)]
struct Local {
    rows: Rows,
    /// Partition → indices of the keys it holds, for partitions owned elsewhere.
    remote: BTreeMap<i32, Vec<usize>>,
}

/// Reads `keys` of a Kafka view from whichever instances own their partitions: the
/// local engines for partitions owned here, one forwarded `GetFeatures` per other
/// owner. `forwarded` requests are answered from local partitions only (one hop).
pub(crate) async fn read(
    shared: &Arc<crate::serve::Shared>,
    view: &Arc<KafkaView>,
    keys: Vec<KeyValue>,
    at: Option<i64>,
    features: Vec<String>,
    forwarded: bool,
) -> std::result::Result<ServedFrame, tonic::Status> {
    let names: Vec<String> = if features.is_empty() {
        view.spec.features.iter().map(|f| f.name.clone()).collect()
    } else {
        for f in &features {
            if !view.spec.features.iter().any(|s| &s.name == f) {
                return Err(crate::serve::status(
                    PanesError::UnknownFeature {
                        view: view.spec.name.clone(),
                        name: f.clone(),
                        known: view
                            .spec
                            .features
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    },
                    "features",
                ));
            }
        }
        features
    };
    let n = keys.len();
    let local = {
        let (view, keys, names) = (view.clone(), keys.clone(), names.clone());
        shared
            .on_reads_for(n, move || view.read_local(&keys, at, &names, forwarded))
            .await??
    };
    let mut rows = local.rows;
    let mut by_owner: BTreeMap<String, (Vec<i32>, Vec<usize>)> = BTreeMap::new();
    for (p, idx) in local.remote {
        let owner = view
            .owner_of(p)
            .filter(|o| o != &view.advertise)
            .ok_or_else(|| {
                tonic::Status::unavailable(format!(
                    "view {:?}: partition {p} has no live owner yet (rebalancing); retry",
                    view.spec.name
                ))
            })?;
        let e = by_owner.entry(owner).or_default();
        e.0.push(p);
        e.1.extend(idx);
    }
    for (owner, (parts, idx)) in by_owner {
        use crate::serve::proto::get_features_request::Keys;
        use crate::serve::proto::{GetFeaturesRequest, IntKeys, StringKeys};
        let sub = if matches!(keys.first(), Some(KeyValue::Str(_))) {
            Keys::StringKeys(StringKeys {
                keys: idx
                    .iter()
                    .map(|&i| match &keys[i] {
                        KeyValue::Str(s) => s.clone(),
                        KeyValue::Int(v) => v.to_string(),
                    })
                    .collect(),
            })
        } else {
            Keys::IntKeys(IntKeys {
                keys: idx
                    .iter()
                    .map(|&i| match &keys[i] {
                        KeyValue::Int(v) => i64::try_from(*v).unwrap_or(i64::MAX),
                        KeyValue::Str(_) => 0,
                    })
                    .collect(),
            })
        };
        let mut request = tonic::Request::new(GetFeaturesRequest {
            view: view.spec.name.clone(),
            keys: Some(sub),
            features: names.clone(),
            at_ms: at,
        });
        request.metadata_mut().insert(
            crate::serve::FORWARDED,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let reply = view
            .client(&owner)?
            .get_features(request)
            .await
            .map_err(|s| {
                let code = match s.code() {
                    tonic::Code::InvalidArgument => tonic::Code::InvalidArgument,
                    _ => tonic::Code::Unavailable,
                };
                tonic::Status::new(
                    code,
                    format!(
                        "view {:?}: partitions {parts:?} are owned by {owner}, which answered: {}",
                        view.spec.name,
                        s.message()
                    ),
                )
            })?
            .into_inner();
        rows.absorb_reply(&idx, &reply).map_err(|e| {
            tonic::Status::internal(format!("reply of {owner} does not fit the request: {e}"))
        })?;
    }
    Ok(rows.into_served(names, n))
}

/// The consumer's context: restores partitions on assignment and checkpoints them on
/// revocation, inside the consumer's own poll (so never concurrently with ingest).
#[derive(Debug)]
pub struct SourceContext {
    view: Arc<KafkaView>,
}

impl ClientContext for SourceContext {}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let view = &self.view;
        view.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        view.epoch.fetch_add(1, Ordering::AcqRel);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let topic = view.source.topic.clone();
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for p in parts {
                    let offset = view.assign(p).unwrap_or_else(|e| {
                        eprintln!(
                            "panes: view {:?} partition {p}: cannot restore ({e}); replaying it from the start",
                            view.spec.name
                        );
                        Offset::Beginning
                    });
                    let _ = tpl.set_partition_offset(&topic, p, offset);
                }
                eprintln!(
                    "panes: view {:?}: assigned partitions {:?}",
                    view.spec.name,
                    view.owned()
                );
                if let Err(e) = consumer.assign(tpl) {
                    eprintln!("panes: view {:?}: assign failed: {e}", view.spec.name);
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                view.revoke(consumer, tpl);
                let _ = consumer.unassign();
            }
            e => {
                eprintln!("panes: view {:?}: rebalance error {e:?}", view.spec.name);
                let all = {
                    let mut t = TopicPartitionList::new();
                    for p in view.owned() {
                        t.add_partition(&view.source.topic, p);
                    }
                    t
                };
                view.revoke(consumer, &all);
                let _ = consumer.unassign();
            }
        }
    }
}

/// Rows of one partition decoded from JSON messages, waiting to be pushed.
#[derive(Debug, Default)]
struct JsonRows {
    str_keys: Vec<Option<String>>,
    int_keys: Vec<Option<i64>>,
    /// Whether each row's key is a string (runs of one kind are pushed together).
    text: Vec<bool>,
    ts: Vec<i64>,
    values: Vec<Vec<Option<f64>>>,
}

/// What the consumer thread holds for one partition between pushes.
#[derive(Debug)]
struct Buffer {
    epoch: u64,
    json: JsonRows,
    batches: Vec<RecordBatch>,
    /// Offset after the last message taken.
    next_offset: i64,
}

/// A running Kafka source: stop it with [`SourceHandle::stop`].
#[derive(Debug)]
pub struct SourceHandle {
    stop: Arc<AtomicBool>,
    done: std::sync::mpsc::Receiver<()>,
}

impl SourceHandle {
    /// Stops consuming, writes a final checkpoint of every owned partition, commits
    /// its offsets and leaves the group; waits at most `timeout` for each of the
    /// checkpoint and the leave. Returns whether the final checkpoint finished in time.
    pub fn stop(self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        let done = self.done.recv_timeout(timeout).is_ok();
        // Then the consumer leaves its group. A process that exits before the leave
        // is sent keeps its partitions until its session times out.
        if done && self.done.recv_timeout(timeout).is_err() {
            eprintln!(
                "panes: a Kafka consumer did not leave its group within {timeout:?}; \
                 its partitions move when its session times out"
            );
        }
        done
    }
}

/// Starts consuming `view`'s topic on a thread of its own.
///
/// # Errors
/// The consumer cannot be built, the topic's metadata cannot be fetched or the
/// subscription fails.
pub fn start(view: Arc<KafkaView>) -> Result<SourceHandle> {
    let s = &view.source;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("group.id", &s.group)
        .set("client.id", &view.advertise)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        // Bounded prefetch: with folds behind, the consumer stops fetching.
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    // Never auto-commit (offsets follow checkpoints) and assign eagerly (the rebalance
    // handler restores whole partitions).
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "range");
    let err = |what: &str, e: rdkafka::error::KafkaError| {
        PanesError::Invalid(format!("view {:?}: Kafka {what}: {e}", view.spec.name))
    };
    let consumer: BaseConsumer<SourceContext> = c
        .create_with_context(SourceContext { view: view.clone() })
        .map_err(|e| err("consumer", e))?;
    let metadata = consumer
        .fetch_metadata(Some(&s.topic), Duration::from_secs(30))
        .map_err(|e| err("metadata", e))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == s.topic)
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32);
    if partitions == 0 {
        return Err(PanesError::Invalid(format!(
            "view {:?}: topic {:?} does not exist or has no partitions on {}",
            view.spec.name, s.topic, s.brokers
        )));
    }
    view.partitions.store(partitions, Ordering::Release);
    consumer
        .subscribe(&[&s.topic])
        .map_err(|e| err("subscribe", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, done) = std::sync::mpsc::channel();
    let stopping = stop.clone();
    std::thread::Builder::new()
        .name(format!("panes-kafka-{}", view.spec.name))
        .spawn(move || {
            consume(&view, &consumer, &stopping);
            let _ = tx.send(());
            // Leave the group so that the others take the partitions now rather than
            // after the session times out: revoke (served by polls), then close.
            // Closing can hang in librdkafka, so the caller waits for it only so long.
            consumer.unsubscribe();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !view.owned().is_empty() && Instant::now() < deadline {
                let _ = consumer.poll(Duration::from_millis(50));
            }
            drop(consumer);
            let _ = tx.send(());
        })
        .map_err(|e| PanesError::Internal(format!("cannot start the Kafka thread: {e}")))?;
    Ok(SourceHandle { stop, done })
}

/// Messages taken between two pushes, at most.
const DRAIN: usize = 8192;

fn consume(view: &KafkaView, consumer: &BaseConsumer<SourceContext>, stop: &AtomicBool) {
    let mut buffers: BTreeMap<i32, Buffer> = BTreeMap::new();
    let mut last_checkpoint = Instant::now();
    let mut last_error: Option<Instant> = None;
    while !stop.load(Ordering::Acquire) {
        let mut taken = 0;
        while taken < DRAIN {
            let wait = if taken == 0 {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            };
            match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        eprintln!("panes: view {:?}: Kafka: {e}", view.spec.name);
                        last_error = Some(Instant::now());
                    }
                    break;
                }
                Some(Ok(m)) => {
                    take(view, &m, &mut buffers);
                    taken += 1;
                }
            }
        }
        push_buffers(view, &mut buffers);
        for part in view.owned_map().values() {
            if let Err(e) = part.engine.fold_due() {
                eprintln!("panes: view {:?}: fold failed: {e}", view.spec.name);
            }
        }
        if last_checkpoint.elapsed() >= view.checkpoint_every {
            view.checkpoint_all(consumer, CommitMode::Async, false);
            last_checkpoint = Instant::now();
        }
    }
    push_buffers(view, &mut buffers);
    view.checkpoint_all(consumer, CommitMode::Sync, false);
}

/// Decodes message `m` into its partition's buffer, or counts (and dead-letters) it.
fn take(view: &KafkaView, m: &BorrowedMessage<'_>, buffers: &mut BTreeMap<i32, Buffer>) {
    view.stats.messages.fetch_add(1, Ordering::Relaxed);
    let p = m.partition();
    let Some(part) = view.owned_map().get(&p).cloned() else {
        return;
    };
    let fresh = || Buffer {
        epoch: part.epoch,
        json: JsonRows::default(),
        batches: Vec::new(),
        next_offset: part.next_offset.load(Ordering::Acquire),
    };
    let buf = buffers.entry(p).or_insert_with(fresh);
    if buf.epoch != part.epoch {
        // Left from an earlier assignment of the partition: the new one replays it.
        *buf = fresh();
    }
    if m.offset() < buf.next_offset {
        view.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    buf.next_offset = m.offset() + 1;
    let n = view.partition_count();
    let result = match view.source.format {
        PayloadFormat::Json => decode_json(view, m, n, &mut buf.json),
        PayloadFormat::ArrowIpc => decode_ipc(view, m, n, &mut buf.batches),
    };
    if let Err((why, error)) = result {
        view.bad(why, 1);
        view.dead_letter(m, why, &error);
    }
}

fn decode_json(
    view: &KafkaView,
    m: &BorrowedMessage<'_>,
    partitions: i32,
    rows: &mut JsonRows,
) -> std::result::Result<(), (BadMessage, String)> {
    let spec = &view.spec;
    let payload = m.payload().unwrap_or_default();
    let object: serde_json::Map<String, Value> = serde_json::from_slice(payload).map_err(|e| {
        (
            BadMessage::Undecodable,
            format!("payload is not a JSON object: {e}"),
        )
    })?;
    let key = if view.source.key_column.is_some() {
        let k = m
            .key()
            .ok_or((BadMessage::MissingKey, "the message has no key".to_string()))?;
        let k = std::str::from_utf8(k).map_err(|_| {
            (
                BadMessage::MissingKey,
                "the message key is not UTF-8".to_string(),
            )
        })?;
        KeyValue::Str(k.to_string())
    } else {
        match object.get(&spec.key) {
            Some(Value::String(s)) => KeyValue::Str(s.clone()),
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                KeyValue::Int(n.as_i64().expect("checked").into())
            }
            None | Some(Value::Null) => {
                return Err((
                    BadMessage::MissingKey,
                    format!("field {:?} (the key) is missing or null", spec.key),
                ));
            }
            Some(other) => {
                return Err((
                    BadMessage::WrongType,
                    format!(
                        "field {:?} (the key): expected a string or an integer, got {other}",
                        spec.key
                    ),
                ));
            }
        }
    };
    let ts = match object.get(&spec.time) {
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().expect("checked"),
        Some(Value::String(s)) => arrow_cast::parse::string_to_timestamp_nanos(s)
            .map(|ns| ns.div_euclid(1_000_000))
            .map_err(|e| {
                (
                    BadMessage::MissingTime,
                    format!("field {:?} (the time): {e}", spec.time),
                )
            })?,
        None | Some(Value::Null) => {
            return Err((
                BadMessage::MissingTime,
                format!("field {:?} (the time) is missing or null", spec.time),
            ));
        }
        Some(other) => {
            return Err((
                BadMessage::MissingTime,
                format!(
                    "field {:?} (the time): expected integer epoch ms or an RFC 3339 string, got {other}",
                    spec.time
                ),
            ));
        }
    };
    let columns = &view.columns;
    let mut values = Vec::with_capacity(columns.len());
    for c in columns {
        values.push(match object.get(c) {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_f64(),
            Some(other) => {
                return Err((
                    BadMessage::WrongType,
                    format!("field {c:?}: expected a number, got {other}"),
                ));
            }
        });
    }
    let home = partition_for(&key_bytes(&key), partitions);
    if home != m.partition() {
        return Err((
            BadMessage::Misrouted,
            format!(
                "key {key} belongs in partition {home} (murmur2), the message is in partition {}",
                m.partition()
            ),
        ));
    }
    if rows.values.is_empty() {
        rows.values = vec![Vec::new(); columns.len()];
    }
    match key {
        KeyValue::Str(s) => {
            rows.str_keys.push(Some(s));
            rows.int_keys.push(None);
            rows.text.push(true);
        }
        KeyValue::Int(v) => {
            rows.str_keys.push(None);
            rows.int_keys.push(Some(v as i64));
            rows.text.push(false);
        }
    }
    rows.ts.push(ts);
    for (col, v) in rows.values.iter_mut().zip(values) {
        col.push(v);
    }
    Ok(())
}

fn decode_ipc(
    view: &KafkaView,
    m: &BorrowedMessage<'_>,
    partitions: i32,
    out: &mut Vec<RecordBatch>,
) -> std::result::Result<(), (BadMessage, String)> {
    let payload = m.payload().unwrap_or_default();
    let undecodable = |e: arrow_schema::ArrowError| {
        (
            BadMessage::Undecodable,
            format!("payload is not an Arrow IPC stream: {e}"),
        )
    };
    let reader = arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(payload), None)
        .map_err(undecodable)?;
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(undecodable)?;
    for batch in batches {
        // Rows whose key belongs in another partition are dropped and counted.
        let keep = match batch.column_by_name(&view.spec.key) {
            Some(col) => match KeyColumn::new(col.as_ref()) {
                Ok(keys) => (0..batch.num_rows())
                    .map(|i| {
                        keys.value(i).is_none_or(|k| {
                            partition_for(&key_bytes(&k), partitions) == m.partition()
                        })
                    })
                    .collect::<Vec<bool>>(),
                // A key column of the wrong type: the engine rejects the batch and says why.
                Err(_) => vec![true; batch.num_rows()],
            },
            None => vec![true; batch.num_rows()],
        };
        let misrouted = keep.iter().filter(|k| !**k).count();
        if misrouted > 0 {
            view.bad(BadMessage::Misrouted, misrouted as u64);
            let mask = arrow_array::BooleanArray::from(keep);
            let kept = arrow_select::filter::filter_record_batch(&batch, &mask)
                .map_err(|e| (BadMessage::Undecodable, e.to_string()))?;
            out.push(kept);
        } else {
            out.push(batch);
        }
    }
    Ok(())
}

/// Pushes every partition's buffered rows into its engine, in message order.
fn push_buffers(view: &KafkaView, buffers: &mut BTreeMap<i32, Buffer>) {
    let owned = view.owned_map().clone();
    for (p, buf) in std::mem::take(buffers) {
        let Some(part) = owned.get(&p) else { continue };
        if part.epoch != buf.epoch {
            // Taken under an earlier assignment: the current one replays them.
            continue;
        }
        let name = &view.spec.name;
        let push = |batch: &RecordBatch| match part.engine.push(name, batch) {
            Ok(_) | Err(PanesError::Schema { .. }) => {}
            Err(e) => eprintln!("panes: view {name:?} partition {p}: push failed: {e}"),
        };
        for batch in &buf.batches {
            push(batch);
        }
        for batch in json_batches(&view.spec, &view.columns, buf.json) {
            push(&batch);
        }
        part.next_offset.store(buf.next_offset, Ordering::Release);
    }
}

/// Record batches of decoded JSON rows: one per run of keys of one kind.
fn json_batches(spec: &ViewSpec, columns: &[String], rows: JsonRows) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.ts.len() {
        let text = rows.text[start];
        let end = (start..rows.ts.len())
            .find(|&i| rows.text[i] != text)
            .unwrap_or(rows.ts.len());
        let key: ArrayRef = if text {
            Arc::new(StringArray::from_iter(
                rows.str_keys[start..end].iter().map(Option::as_deref),
            ))
        } else {
            Arc::new(Int64Array::from(rows.int_keys[start..end].to_vec()))
        };
        let mut fields = vec![
            Field::new(&spec.key, key.data_type().clone(), true),
            Field::new(&spec.time, DataType::Int64, false),
        ];
        let mut arrays: Vec<ArrayRef> = vec![
            key,
            Arc::new(Int64Array::from(rows.ts[start..end].to_vec())),
        ];
        for (c, name) in columns.iter().enumerate() {
            fields.push(Field::new(name, DataType::Float64, true));
            arrays.push(Arc::new(Float64Array::from(
                rows.values[c][start..end].to_vec(),
            )));
        }
        out.push(
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .expect("columns built to the schema"),
        );
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Expected values from Kafka's own `UtilsTest.testMurmur2`.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, want) in cases {
            assert_eq!(
                murmur2(data) as i32,
                want,
                "{:?}",
                std::str::from_utf8(data)
            );
        }
    }

    #[test]
    fn partitions_are_in_range() {
        for i in 0..1000 {
            let p = partition_for(format!("card-{i}").as_bytes(), 6);
            assert!((0..6).contains(&p));
        }
        assert_eq!(key_bytes(&KeyValue::Int(-42)), b"-42");
    }
}
