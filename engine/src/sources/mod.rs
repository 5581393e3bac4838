//! Sources of events that Panes consumes itself (as opposed to events pushed to it),
//! and the synthetic event generator.
//!
//! A [`Source`] feeds one view from an external log split into partitions, each
//! partition owned by one instance of a group (Kafka today). The serving layer sees
//! sources only through this trait: it starts and stops them, reads the keys of
//! partitions owned here, asks who owns the others, and renders their counters. A
//! source never imports the serving layer; routing a read to another instance is the
//! server's job (`serve::route`).

pub mod decode;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod partitioner;
pub mod synth;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ndarray::Array2;
use panes_kernels::Backend;

use crate::error::Result;
use crate::ingest::keys::KeyValue;
use crate::online::{EngineOptions, FeatureFrame, ServedFrame, ViewMetrics};
use crate::spec::ViewSpec;

/// Where one partition of a source stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The partition.
    pub partition: i32,
    /// Offset of the next message to ingest.
    pub next_offset: i64,
    /// Offset one past the partition's last message (its high watermark), if known.
    pub end: Option<i64>,
}

impl Position {
    /// Messages between the partition's end and the next one to ingest, if the end is
    /// known.
    pub fn lag(&self) -> Option<i64> {
        self.end.map(|end| (end - self.next_offset).max(0))
    }
}

/// A view fed by a partitioned external source, as one instance of its group sees it.
pub trait Source: Send + Sync + fmt::Debug {
    /// The view's definition.
    fn spec(&self) -> &ViewSpec;

    /// The view's counters summed over the partitions owned now.
    ///
    /// # Errors
    /// A partition's engine fails to report (a bug).
    fn metrics(&self) -> Result<ViewMetrics>;

    /// Per feature: whether its values are strings, in any partition owned now (see
    /// [`Engine::text_features`](crate::Engine::text_features)).
    ///
    /// # Errors
    /// A partition's engine fails to report (a bug).
    fn text_features(&self) -> Result<Vec<bool>>;

    /// The kind of keys the partitions owned now hold: `"int"`, `"string"`, or `None`
    /// before any.
    ///
    /// # Errors
    /// A partition's engine fails to report (a bug).
    fn key_kind(&self) -> Result<Option<String>>;

    /// The source's own counters (messages, bad messages, checkpoints).
    fn stats(&self) -> &SourceStats;

    /// Partitions this instance owns now.
    fn owned(&self) -> Vec<i32>;

    /// Where each partition owned now stands: the next offset to ingest, and the
    /// partition's end as the client last saw it (unknown before its first statistics).
    fn positions(&self) -> Vec<Position>;

    /// The address of the instance that owns partition `p`, if known.
    fn owner_of(&self, p: i32) -> Option<String>;

    /// The address other instances reach this one at.
    fn advertise(&self) -> &str;

    /// Reads `keys` as of `at` from the partitions owned here. Keys of partitions
    /// owned elsewhere are listed in [`LocalRead::remote`]; when `forwarded` (another
    /// instance routed this read here) they are an error instead, so that a read takes
    /// at most one hop.
    ///
    /// # Errors
    /// [`Unavailable`](crate::PanesError::Unavailable) before the source started or when a forwarded
    /// read meets a partition that moved; engine errors of the read.
    fn read_local(
        &self,
        keys: &[KeyValue],
        at: Option<i64>,
        features: &[String],
        forwarded: bool,
    ) -> Result<LocalRead>;

    /// Starts consuming on a thread of its own.
    ///
    /// # Errors
    /// The source cannot be reached or set up.
    fn start(self: Arc<Self>) -> Result<SourceHandle>;
}

/// How the sources of a server run.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Root of the checkpoint location (a directory or an object-store prefix) shared
    /// by every instance of a group; a view's partitions are checkpointed under
    /// `<root>/<view>/p<N>/`.
    pub checkpoint_root: crate::checkpoint::CheckpointRoot,
    /// Time between checkpoints of a partition that took events.
    pub checkpoint_every: Duration,
    /// The address other instances reach this one at.
    pub advertise: String,
}

/// The source of a view that has a `[views.source]` table, its engines on `backend`.
///
/// # Errors
/// A source setting that cannot work, or a source kind this build does not include.
pub fn open(
    spec: &ViewSpec,
    engine: EngineOptions,
    backend: Arc<dyn Backend>,
    options: &SourceOptions,
) -> Result<Arc<dyn Source>> {
    #[cfg(feature = "kafka")]
    {
        Ok(Arc::new(kafka::KafkaView::new(
            spec, engine, backend, options,
        )?))
    }
    #[cfg(not(feature = "kafka"))]
    {
        let _ = (engine, backend, options);
        Err(crate::error::PanesError::Invalid(format!(
            "view {:?} takes its events from Kafka, and this build of Panes has no `kafka` feature",
            spec.name
        )))
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

/// Counters of a source, over the partitions this instance owned.
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
    /// Checkpoint writes refused because another instance took the partition since
    /// (a higher ownership generation); the partition was given up.
    pub checkpoint_fenced: AtomicU64,
    /// Partitions restored from a checkpoint.
    pub restored: AtomicU64,
    /// Checkpoint files skipped as corrupt or unusable.
    pub skipped: AtomicU64,
    /// Messages below a partition's checkpointed offset, dropped as already counted.
    pub duplicates: AtomicU64,
    /// Rebalances seen.
    pub rebalances: AtomicU64,
}

impl SourceStats {
    /// Counts `n` bad messages (or rows) for reason `why`.
    pub fn bad(&self, why: BadMessage, n: u64) {
        self.bad[why as usize].fetch_add(n, Ordering::Relaxed);
    }
}

/// A read answered from the partitions owned here.
#[derive(Debug)]
pub struct LocalRead {
    /// Every requested key's row; those of `remote` keys are still empty.
    pub rows: PartialFrame,
    /// Partition → indices of the requested keys it holds, for partitions owned
    /// elsewhere.
    pub remote: BTreeMap<i32, Vec<usize>>,
}

/// The feature values of some keys, assembled row by row from several partitions
/// (and instances), then turned into one [`ServedFrame`].
#[derive(Debug)]
pub struct PartialFrame {
    /// Features per row.
    pub features: usize,
    /// Per feature: whether it is list-valued.
    pub is_list: Vec<bool>,
    /// Row-major values (`NaN` where invalid).
    pub values: Vec<f64>,
    /// Row-major validity.
    pub valid: Vec<bool>,
    /// Row-major lists of list-valued features (empty until a part has some).
    pub lists: Vec<Vec<f64>>,
    /// Per feature: whether a part gave it string values (indices into `strings`).
    pub text: Vec<bool>,
    /// The strings of string-valued features.
    pub strings: Vec<String>,
    /// Latest folded event time per row (`i64::MIN`: none).
    pub latest: Vec<i64>,
    /// Events in each row's widest window.
    pub window_events: Vec<u64>,
    /// The latest read time of the parts.
    pub at: Option<i64>,
    /// Sum of the parts' state versions.
    pub version: u64,
}

impl PartialFrame {
    /// `keys` empty rows of features whose list-valuedness `is_list` gives.
    pub fn new(keys: usize, is_list: Vec<bool>) -> Self {
        let features = is_list.len();
        PartialFrame {
            features,
            is_list,
            values: vec![f64::NAN; keys * features],
            valid: vec![false; keys * features],
            lists: Vec::new(),
            text: vec![false; features],
            strings: Vec::new(),
            latest: vec![i64::MIN; keys],
            window_events: vec![0; keys],
            at: None,
            version: 0,
        }
    }

    /// Fills rows `idx` from `s`, whose row `r` is the key of row `idx[r]`.
    pub fn absorb(&mut self, idx: &[usize], s: &ServedFrame) {
        let f = self.features;
        if !s.frame.lists.is_empty() && self.lists.is_empty() {
            self.lists.resize(self.values.len(), Vec::new());
        }
        let base = self.strings.len() as f64;
        self.strings.extend_from_slice(&s.frame.strings);
        let text = |c: usize| s.frame.text.get(c).copied().unwrap_or(false);
        for c in (0..f).filter(|&c| text(c)) {
            self.text[c] = true;
        }
        for (r, &i) in idx.iter().enumerate() {
            for c in 0..f {
                let rebase = |v: f64| if text(c) { v + base } else { v };
                self.values[i * f + c] = if !self.is_list[c] && s.frame.valid[[r, c]] {
                    rebase(s.frame.values[[r, c]])
                } else {
                    s.frame.values[[r, c]]
                };
                self.valid[i * f + c] = s.frame.valid[[r, c]];
                if !s.frame.lists.is_empty() {
                    self.lists[i * f + c] = s.frame.list(r, c).iter().map(|&v| rebase(v)).collect();
                }
            }
            self.latest[i] = s.latest_event_ms[r];
            self.window_events[i] = s.window_events[r];
        }
        self.at = self.at.max(Some(s.frame.at));
        self.version += s.version;
    }

    /// The assembled frame, its columns named `names`.
    pub fn into_served(self, names: Vec<String>) -> ServedFrame {
        let (f, keys) = (self.features, self.latest.len());
        ServedFrame {
            frame: FeatureFrame {
                names,
                values: Array2::from_shape_vec((keys, f), self.values).expect("keys × features"),
                valid: Array2::from_shape_vec((keys, f), self.valid).expect("keys × features"),
                lists: self.lists,
                at: self.at.unwrap_or(0),
                text: self.text,
                strings: self.strings,
                is_list: self.is_list,
            },
            latest_event_ms: self.latest,
            window_events: self.window_events,
            version: self.version,
        }
    }
}

/// A running source: stop it with [`SourceHandle::stop`].
#[derive(Debug)]
pub struct SourceHandle {
    stop: Arc<AtomicBool>,
    done: std::sync::mpsc::Receiver<()>,
}

impl SourceHandle {
    /// A handle over a source thread that watches `stop` and sends on `done` twice:
    /// once its final checkpoint is written, once it has left its group.
    pub fn new(stop: Arc<AtomicBool>, done: std::sync::mpsc::Receiver<()>) -> Self {
        SourceHandle { stop, done }
    }

    /// Stops consuming, writes a final checkpoint of every owned partition, commits
    /// its offsets and leaves the group; waits at most `timeout` for each of the
    /// checkpoint and the leave. Returns whether the final checkpoint finished in time.
    pub fn stop(self, timeout: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        let done = self.done.recv_timeout(timeout).is_ok();
        // Then the consumer leaves its group. A process that exits before the leave
        // is sent keeps its partitions until its session times out.
        if done && self.done.recv_timeout(timeout).is_err() {
            tracing::warn!(
                ?timeout,
                "a source did not leave its group in time; its partitions move when its \
                 session times out"
            );
        }
        done
    }
}
