//! The mutable core of a view: its key index, pane state, watermark, pending
//! micro-batch and counters. The online engine and backfill drive the same core;
//! checkpoints write and restore it.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use panes_kernels::{Backend, FoldBatch, PaneState};

use super::keys::{KeyIndex, NewKey};
use super::{Decoded, KeyCap, PushReport, ViewCounters, ingest};
use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::spec::CompiledView;

/// The mutable part of a view.
#[derive(Debug)]
pub(crate) struct ViewCore {
    pub keys: KeyIndex,
    pub state: PaneState,
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
    /// Whether folded micro-batches are kept in `folded_batches` (for another replica
    /// to fold: see [`ViewCore::catch_up`]) instead of cleared.
    keep_folded: bool,
    /// The micro-batches folded since they were last taken, when kept.
    pub folded_batches: Vec<Decoded>,
    /// Emptied buffers, reused for the next micro-batches.
    spare: Vec<Decoded>,
}

/// What one replica of a view took since the other one was last equal to it: the
/// keys it created and the micro-batches it folded, in order (the counters and
/// watermark are read from that replica itself; see [`ViewCore::catch_up`]).
#[derive(Debug, Default)]
pub(crate) struct Delta {
    pub keys: Vec<NewKey>,
    pub batches: Vec<Decoded>,
}

impl ViewCore {
    pub fn new(view: &CompiledView) -> Result<Self> {
        Ok(ViewCore {
            keys: KeyIndex::new(view.state.shards),
            state: PaneState::new(view.state.clone())?,
            max_ts: None,
            counters: ViewCounters::default(),
            pending: Decoded::new(view.columns.len()),
            pending_since: None,
            latest: Vec::new(),
            folded: 0,
            folded_max_ts: None,
            fold_time: None,
            keep_folded: false,
            folded_batches: Vec::new(),
            spare: Vec::new(),
        })
    }

    /// Makes this core one of two replicas: it records what it takes (keys and folded
    /// micro-batches) for [`ViewCore::take_delta`].
    pub fn keep_delta(&mut self) {
        self.keep_folded = true;
        self.keys.keep_journal(true);
    }

    /// What this replica took since the last call (see [`ViewCore::keep_delta`]),
    /// moved into `delta`.
    pub fn take_delta(&mut self, delta: &mut Delta) {
        delta.keys.append(&mut self.keys.take_journal());
        delta.batches.append(&mut self.folded_batches);
    }

    /// Brings this replica level with `other`, the replica that took `delta` while
    /// this one held what `other` held before: the same keys are created with the same
    /// ids and the same micro-batches folded by the same backend, so the pane state
    /// comes out bitwise equal, without decoding anything again. The counters and
    /// watermark are `other`'s. The batches' buffers are kept for reuse.
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
        for batch in std::mem::take(&mut delta.batches) {
            self.fold(backend, &batch)?;
            self.recycle(batch);
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
        let folded = self.fold(backend, &batch);
        self.folded_max_ts = self.folded_max_ts.max(self.max_ts);
        self.pending_since = None;
        if self.keep_folded && folded.is_ok() {
            self.folded_batches.push(batch);
        } else {
            self.recycle(batch);
        }
        folded
    }

    /// Folds `batch` into the state.
    fn fold(&mut self, backend: &dyn Backend, batch: &Decoded) -> Result<()> {
        let values: Vec<&[f64]> = batch.values.iter().map(Vec::as_slice).collect();
        let fold = FoldBatch {
            ids: &batch.ids,
            ts: &batch.ts,
            values: &values,
        };
        let started = Instant::now();
        let stats = backend.fold(&mut self.state, &fold)?;
        if let Some(h) = &self.fold_time {
            h.record(started.elapsed());
        }
        self.counters.expired += stats.expired;
        self.folded += batch.len() as u64;
        for (&id, &ts) in batch.ids.iter().zip(&batch.ts) {
            let id = id as usize;
            if id >= self.latest.len() {
                self.latest.resize((id + 1).next_power_of_two(), i64::MIN);
            }
            self.latest[id] = self.latest[id].max(ts);
        }
        Ok(())
    }
}
