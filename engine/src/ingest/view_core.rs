//! The mutable core of a view: its key index, pane state, watermark, pending
//! micro-batch and counters. The online engine and backfill drive the same core;
//! checkpoints write and restore it.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use panes_kernels::{Backend, EventState, FoldBatch, FoldLog, PaneState};

use super::keys::{KeyIndex, NewKey};
use super::strings::StringValues;
use super::{Decoded, KeyCap, PushReport, ViewCounters, ingest};
use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::spec::{CompiledView, state_values};

/// The mutable part of a view.
#[derive(Debug)]
pub(crate) struct ViewCore {
    pub keys: KeyIndex,
    /// The string values of the view's value columns.
    pub strings: StringValues,
    pub state: PaneState,
    /// The count and session windows' state (host memory, whatever the backend).
    pub events: EventState,
    pub max_ts: Option<i64>,
    pub counters: ViewCounters,
    pub pending: Decoded,
    pub pending_since: Option<Instant>,
    /// Latest folded event time per key id (`i64::MIN`: none), for serving metadata.
    pub latest: Vec<i64>,
    /// Events folded into `state`.
    pub folded: u64,
    /// Latest event time folded into `state` (equal to `max_ts` when nothing is pending).
    pub folded_max_ts: Option<i64>,
    /// Where fold durations are recorded, if anywhere.
    pub fold_time: Option<Arc<Histogram>>,
    /// Whether folded micro-batches and their fold logs are kept in `folded` (for
    /// another replica: see [`ViewCore::catch_up`]) instead of cleared.
    keep_folded: bool,
    /// The micro-batches folded since they were last taken, when kept.
    folded_batches: Vec<Folded>,
    /// Bytes held by the logs in `folded_batches`.
    logged_bytes: usize,
    /// Emptied buffers, reused for the next micro-batches.
    spare: Vec<Decoded>,
    /// Emptied fold logs, reused.
    spare_logs: Vec<FoldLog>,
    /// Micro-batches this replica caught up with by replaying a fold log, and by
    /// folding them again.
    pub caught_up: (u64, u64),
    /// The view's [`CompiledView::sources`]: the state columns of a decoded batch.
    sources: Vec<Option<usize>>,
    /// The column of ones of the state columns that count rows.
    ones: Vec<f64>,
}

/// A folded micro-batch and the log of its fold (incomplete when the backend does
/// not log, or logging was over [`LOG_BUDGET`]).
#[derive(Debug)]
pub(crate) struct Folded {
    pub batch: Decoded,
    pub log: FoldLog,
}

/// Most bytes of fold logs a replica keeps for the other one between two publishes.
/// A log takes about 150 B per distinct key, pane and level of a micro-batch, several
/// times the decoded events: a push of many micro-batches logs the first ones, up to
/// this, and the other replica folds the rest again, as it would without logs. (Unit
/// tests use a small budget, to take both ways.)
const LOG_BUDGET: usize = if cfg!(test) { 32 << 10 } else { 256 << 20 };

/// What one replica of a view took since the other one was last equal to it: the
/// keys it created and the micro-batches it folded, in order (the counters and
/// watermark are read from that replica itself; see [`ViewCore::catch_up`]).
#[derive(Debug, Default)]
pub(crate) struct Delta {
    pub keys: Vec<NewKey>,
    pub strings: Vec<Box<str>>,
    pub batches: Vec<Folded>,
}

impl ViewCore {
    pub fn new(view: &CompiledView) -> Result<Self> {
        Ok(ViewCore {
            keys: KeyIndex::new(view.state.shards),
            strings: StringValues::new(view.decoded.len()),
            state: PaneState::new(view.state.clone())?,
            events: EventState::new(view.events.clone())?,
            max_ts: None,
            counters: ViewCounters::default(),
            pending: Decoded::new(view.decoded.len()),
            pending_since: None,
            latest: Vec::new(),
            folded: 0,
            folded_max_ts: None,
            fold_time: None,
            keep_folded: false,
            folded_batches: Vec::new(),
            logged_bytes: 0,
            spare: Vec::new(),
            spare_logs: Vec::new(),
            caught_up: (0, 0),
            sources: view.sources.clone(),
            ones: Vec::new(),
        })
    }

    /// Makes this core one of two replicas: it records what it takes (keys and folded
    /// micro-batches) for [`ViewCore::take_delta`].
    pub fn keep_delta(&mut self) {
        self.keep_folded = true;
        self.keys.keep_journal(true);
        self.strings.keep_journal(true);
    }

    /// What this replica took since the last call (see [`ViewCore::keep_delta`]),
    /// moved into `delta`.
    pub fn take_delta(&mut self, delta: &mut Delta) {
        delta.keys.append(&mut self.keys.take_journal());
        delta.strings.append(&mut self.strings.take_journal());
        delta.batches.append(&mut self.folded_batches);
        self.logged_bytes = 0;
    }

    /// Brings this replica level with `other`, the replica that took `delta` while
    /// this one held what `other` held before: the same keys are created with the same
    /// ids, and each micro-batch's fold log is replayed (or, where the log is
    /// incomplete, the micro-batch folded by the same backend), so the pane state comes
    /// out bitwise equal without decoding anything again, and mostly without folding
    /// again. The counters and watermark are `other`'s. The buffers are kept for reuse.
    ///
    /// # Errors
    /// When the key journal does not fit this index, or a fold fails: the replicas
    /// may differ then.
    pub fn catch_up(
        &mut self,
        other: &ViewCore,
        delta: &mut Delta,
        backend: &dyn Backend,
    ) -> Result<()> {
        debug_assert!(self.pending.is_empty(), "a replica catches up when settled");
        self.keys.replay(&delta.keys)?;
        delta.keys.clear();
        // Its own journal of those keys: the other replica has them already.
        self.keys.take_journal();
        if self.keys.len() != other.keys.len() {
            return Err(PanesError::Internal(format!(
                "replicas hold {} and {} keys after a key journal",
                self.keys.len(),
                other.keys.len()
            )));
        }
        self.strings
            .replay(&delta.strings, other.strings.kinds())
            .map_err(PanesError::Internal)?;
        delta.strings.clear();
        self.strings.take_journal();
        for Folded { batch, log } in std::mem::take(&mut delta.batches) {
            if log.is_complete() {
                let started = Instant::now();
                backend.replay(&mut self.state, &log)?;
                let values =
                    state_values(&self.sources, &batch.values, 0..batch.len(), &mut self.ones);
                self.events.fold(&FoldBatch {
                    ids: &batch.ids,
                    ts: &batch.ts,
                    values: &values,
                })?;
                self.record_fold(&batch, started);
                self.caught_up.0 += 1;
            } else {
                self.fold(backend, &batch, None)?;
                self.caught_up.1 += 1;
            }
            self.recycle(batch);
            if self.spare_logs.len() < 2 {
                self.spare_logs.push(log);
            }
        }
        // After the folds, which count expired events again.
        self.counters = other.counters.clone();
        self.max_ts = other.max_ts;
        self.folded_max_ts = other.folded_max_ts;
        Ok(())
    }

    fn recycle(&mut self, mut batch: Decoded) {
        // Two buffers cover a push and its fold; more would only hold memory.
        if self.spare.len() < 2 {
            batch.clear();
            self.spare.push(batch);
        }
    }

    /// Decodes `batch` (at `offset` in the batch pushed) into the pending micro-batch;
    /// new keys are created as far as `cap` allows.
    pub fn ingest(
        &mut self,
        view: &CompiledView,
        batch: &RecordBatch,
        offset: usize,
        cap: &mut KeyCap<'_>,
    ) -> Result<PushReport> {
        let report = ingest(
            view,
            batch,
            offset,
            &mut self.keys,
            cap,
            &mut self.strings,
            &mut self.max_ts,
            &mut self.pending,
            &mut self.counters,
        )?;
        if !self.pending.is_empty() && self.pending_since.is_none() {
            self.pending_since = Some(Instant::now());
        }
        Ok(report)
    }

    /// Folds the pending micro-batch into the state, as one unit.
    pub fn fold_pending(&mut self, backend: &dyn Backend) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let fresh = self
            .spare
            .pop()
            .unwrap_or_else(|| Decoded::new(self.pending.values.len()));
        let batch = std::mem::replace(&mut self.pending, fresh);
        let folded = if self.keep_folded {
            let mut log = self.spare_logs.pop().unwrap_or_default();
            let folded = if self.logged_bytes < LOG_BUDGET {
                self.fold(backend, &batch, Some(&mut log))
            } else {
                log.clear();
                self.fold(backend, &batch, None)
            };
            if folded.is_ok() {
                self.logged_bytes += log.bytes();
                self.folded_batches.push(Folded { batch, log });
            }
            folded
        } else {
            let folded = self.fold(backend, &batch, None);
            self.recycle(batch);
            folded
        };
        self.folded_max_ts = self.folded_max_ts.max(self.max_ts);
        self.pending_since = None;
        folded
    }

    /// Folds `batch` into the state, logging the fold into `log` if given.
    fn fold(
        &mut self,
        backend: &dyn Backend,
        batch: &Decoded,
        log: Option<&mut FoldLog>,
    ) -> Result<()> {
        let values = state_values(&self.sources, &batch.values, 0..batch.len(), &mut self.ones);
        let fold = FoldBatch {
            ids: &batch.ids,
            ts: &batch.ts,
            values: &values,
        };
        let started = Instant::now();
        // A view of count and session windows only has no panes to fold.
        let stats = match log {
            _ if self.state.spec().levels.is_empty() => Default::default(),
            Some(log) => backend.fold_logged(&mut self.state, &fold, log)?,
            None => backend.fold(&mut self.state, &fold)?,
        };
        self.events.fold(&fold)?;
        self.counters.expired += stats.expired;
        self.record_fold(batch, started);
        Ok(())
    }

    /// Records a fold of `batch` begun at `started`: its time, events and the keys'
    /// latest times.
    fn record_fold(&mut self, batch: &Decoded, started: Instant) {
        if let Some(h) = &self.fold_time {
            h.record(started.elapsed());
        }
        self.folded += batch.len() as u64;
        for (&id, &ts) in batch.ids.iter().zip(&batch.ts) {
            let id = id as usize;
            if id >= self.latest.len() {
                self.latest.resize((id + 1).next_power_of_two(), i64::MIN);
            }
            self.latest[id] = self.latest[id].max(ts);
        }
    }
}
