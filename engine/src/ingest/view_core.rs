//! The mutable core of a view: its key index, pane state, watermark, pending
//! micro-batch and counters. The online engine and backfill drive the same core;
//! checkpoints write and restore it.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use panes_kernels::{Backend, FoldBatch, PaneState};

use super::keys::KeyIndex;
use super::{Decoded, KeyCap, PushReport, ViewCounters, ingest};
use crate::error::Result;
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
        })
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
        let values: Vec<&[f64]> = self.pending.values.iter().map(Vec::as_slice).collect();
        let batch = FoldBatch {
            ids: &self.pending.ids,
            ts: &self.pending.ts,
            values: &values,
        };
        let started = Instant::now();
        let stats = backend.fold(&mut self.state, &batch)?;
        if let Some(h) = &self.fold_time {
            h.record(started.elapsed());
        }
        self.counters.expired += stats.expired;
        self.folded += self.pending.len() as u64;
        self.folded_max_ts = self.folded_max_ts.max(self.max_ts);
        for (&id, &ts) in self.pending.ids.iter().zip(&self.pending.ts) {
            let id = id as usize;
            if id >= self.latest.len() {
                self.latest.resize((id + 1).next_power_of_two(), i64::MIN);
            }
            self.latest[id] = self.latest[id].max(ts);
        }
        self.pending.clear();
        self.pending_since = None;
        Ok(())
    }
}
