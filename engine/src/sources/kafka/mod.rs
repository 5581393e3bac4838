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

mod consumer;
mod ownership;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use panes_kernels::Backend;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{DefaultProducerContext, ThreadedProducer};

pub use crate::sources::partitioner::{key_bytes, murmur2, partition_for};

use crate::checkpoint::{CheckpointDir, CheckpointRoot};
use crate::error::{PanesError, Result};
use crate::ingest::keys::KeyValue;
use crate::online::{EngineOptions, ViewMetrics};
use crate::sources::{
    LocalRead, PartialFrame, Position, Source, SourceHandle, SourceOptions, SourceStats, decode,
};
use crate::spec::{CompiledView, FeatureFile, SourceSpec, ViewSpec};
use ownership::Partition;

/// How long a looked-up owner of another instance's partition is trusted: routing to
/// a stale owner is refused there (UNAVAILABLE, retry), so this bounds retries, not
/// correctness.
const OWNER_TTL: Duration = Duration::from_secs(1);

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
    root: CheckpointRoot,
    advertise: String,
    /// Owners of partitions not held here, as last looked up, and when.
    owners: std::sync::Mutex<BTreeMap<i32, (std::time::Instant, Option<String>)>>,
    checkpoint_every: Duration,
    partitions: AtomicI32,
    owned: RwLock<BTreeMap<i32, Arc<Partition>>>,
    /// Each partition's end (high watermark) from the client's last statistics.
    ends: std::sync::Mutex<BTreeMap<i32, i64>>,
    epoch: AtomicU64,
    /// Counters.
    pub stats: SourceStats,
    dead_letters: Option<DeadLetters>,
}

/// The dead-letter producer.
struct DeadLetters(ThreadedProducer<DefaultProducerContext>);

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeadLetters")
    }
}

impl KafkaView {
    /// What decoding this view's messages needs.
    fn decoder(&self) -> decode::Decoder<'_> {
        decode::Decoder {
            spec: &self.spec,
            columns: &self.columns,
            key_from_message: self.source.key_column.is_some(),
            stats: &self.stats,
        }
    }

    /// A Kafka view for `spec` (which must have a source), its engines on `backend`.
    ///
    /// # Errors
    /// A source setting that cannot work; the dead-letter producer cannot be built.
    pub fn new(
        spec: &ViewSpec,
        options: EngineOptions,
        backend: Arc<dyn Backend>,
        kafka: &SourceOptions,
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
                services: Vec::new(),
                sinks: Vec::new(),
            },
            columns: CompiledView::new(&own, options.shards).input_columns(),
            spec: own,
            source,
            options,
            backend,
            root: kafka.checkpoint_root.join(&spec.name),
            advertise: kafka.advertise.clone(),
            owners: std::sync::Mutex::default(),
            checkpoint_every: kafka.checkpoint_every,
            partitions: AtomicI32::new(0),
            owned: RwLock::new(BTreeMap::new()),
            ends: std::sync::Mutex::default(),
            epoch: AtomicU64::new(0),
            stats: SourceStats::default(),
            dead_letters,
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

    fn owned_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<i32, Arc<Partition>>> {
        self.owned.read().unwrap_or_else(|p| p.into_inner())
    }

    fn partition_dir(&self, p: i32) -> CheckpointRoot {
        self.root.join(&format!("p{p}"))
    }
}

impl Source for KafkaView {
    fn spec(&self) -> &ViewSpec {
        &self.spec
    }

    fn metrics(&self) -> Result<ViewMetrics> {
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
            t.filtered += c.filtered;
            t.expr_errors += c.expr_errors;
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

    fn text_features(&self) -> Result<Vec<bool>> {
        let mut text = vec![false; self.spec.features.len()];
        for part in self.owned_map().values() {
            let t = part.engine.text_features(&self.spec.name)?;
            for (a, b) in text.iter_mut().zip(t) {
                *a |= b;
            }
        }
        Ok(text)
    }

    fn key_kind(&self) -> Result<Option<String>> {
        for part in self.owned_map().values() {
            if let Some(kind) = part.engine.key_kind(&self.spec.name)? {
                return Ok(Some(kind));
            }
        }
        Ok(None)
    }

    fn stats(&self) -> &SourceStats {
        &self.stats
    }

    fn owned(&self) -> Vec<i32> {
        self.owned_map().keys().copied().collect()
    }

    fn positions(&self) -> Vec<Position> {
        let ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        self.owned_map()
            .iter()
            .map(|(&partition, part)| Position {
                partition,
                next_offset: part.next_offset.load(Ordering::Acquire),
                end: ends.get(&partition).copied(),
            })
            .collect()
    }

    /// The address of the instance that last took partition `p` (its ownership record
    /// in the shared checkpoint location), looked up at most once a second.
    fn owner_of(&self, p: i32) -> Option<String> {
        let now = std::time::Instant::now();
        let mut cache = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, owner)) = cache.get(&p)
            && now.duration_since(*at) < OWNER_TTL
        {
            return owner.clone();
        }
        let owner = CheckpointDir::new(self.partition_dir(p), 3)
            .owner()
            .ok()
            .flatten()
            .map(|(_, owner)| owner)
            .filter(|s| !s.is_empty());
        cache.insert(p, (now, owner.clone()));
        owner
    }

    fn advertise(&self) -> &str {
        &self.advertise
    }

    fn read_local(
        &self,
        keys: &[KeyValue],
        at: Option<i64>,
        names: &[String],
        forwarded: bool,
    ) -> Result<LocalRead> {
        let n = self.partition_count();
        if n == 0 {
            return Err(PanesError::Unavailable(format!(
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
        let mut out = LocalRead {
            rows: PartialFrame::new(
                keys.len(),
                names
                    .iter()
                    .map(|n| {
                        let f = self.spec.features.iter().find(|f| &f.name == n);
                        f.is_some_and(|f| f.agg.is_list())
                    })
                    .collect(),
            ),
            remote: BTreeMap::new(),
        };
        let features: Vec<&str> = names.iter().map(String::as_str).collect();
        for (p, idx) in groups {
            let Some(part) = owned.get(&p) else {
                if forwarded {
                    return Err(PanesError::Unavailable(format!(
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
                .read_snapshot(&self.spec.name, &sub, at, Some(&features))?;
            out.rows.absorb(&idx, &served);
        }
        Ok(out)
    }

    fn start(self: Arc<Self>) -> Result<SourceHandle> {
        consumer::start(self)
    }
}
