//! A view compiled to its pane-state shape, and its mutable core (keys, state,
//! watermark, pending micro-batch, counters). The online engine and backfill drive the
//! same core.

use std::sync::Arc;
use std::time::Instant;

use arrow_array::RecordBatch;
use panes_kernels::{
    Backend, ColumnFields, FeatureMerge, FoldBatch, LevelSpec, MergeOutput, PaneState, ReadStatus,
    StateSpec,
};

use crate::error::{PanesError, Result};
use crate::histogram::Histogram;
use crate::ingest::{Decoded, PushReport, ViewCounters, ingest};
use crate::keys::KeyIndex;
use crate::spec::{ViewSpec, Window, format_duration};

/// A view with its state layout: one level per distinct hop.
#[derive(Clone, Debug)]
pub struct CompiledView {
    /// The definition.
    pub spec: ViewSpec,
    /// Distinct value columns, in order of first use.
    pub columns: Vec<String>,
    /// The pane-state shape.
    pub state: StateSpec,
    /// How to compute each feature of `spec.features` (same order).
    pub merges: Vec<FeatureMerge>,
}

impl CompiledView {
    /// Lays out the state of `spec` over `shards` key shards.
    ///
    /// Each level's ring holds the longest window of its hop, and at least
    /// `ceil(allowed_lateness / hop) + 1` panes so that every event the lateness rule
    /// accepts still finds its pane in the ring.
    pub fn new(spec: &ViewSpec, shards: usize) -> Self {
        let mut columns: Vec<String> = Vec::new();
        for f in &spec.features {
            if let Some(c) = &f.column
                && !columns.contains(c)
            {
                columns.push(c.clone());
            }
        }
        let mut hops: Vec<i64> = Vec::new();
        for f in &spec.features {
            if !hops.contains(&f.hop) {
                hops.push(f.hop);
            }
        }
        let mut levels: Vec<LevelSpec> = hops
            .iter()
            .map(|&hop| {
                let l = spec.allowed_lateness;
                let late_panes = l / hop + i64::from(l % hop != 0) + 1;
                LevelSpec {
                    hop,
                    ring: late_panes as usize,
                    columns: vec![ColumnFields::default(); columns.len()],
                    lifetime: false,
                }
            })
            .collect();
        let mut merges = Vec::new();
        for f in &spec.features {
            let level = hops.iter().position(|&h| h == f.hop).unwrap_or_default();
            let l = &mut levels[level];
            let column = f
                .column
                .as_ref()
                .and_then(|c| columns.iter().position(|x| x == c));
            if let Some(c) = column {
                l.columns[c] = l.columns[c].union(f.agg.fields());
            }
            let panes = match f.window {
                Window::Duration(ms) => {
                    let n = (ms / f.hop) as u64;
                    l.ring = l.ring.max(n as usize);
                    Some(n)
                }
                Window::Lifetime => {
                    l.lifetime = true;
                    None
                }
            };
            merges.push(FeatureMerge {
                level,
                agg: f.agg,
                column,
                panes,
            });
        }
        CompiledView {
            spec: spec.clone(),
            columns,
            state: StateSpec { levels, shards },
            merges,
        }
    }

    /// Index of the feature named `name`.
    pub fn feature_index(&self, name: &str) -> Result<usize> {
        self.spec
            .features
            .iter()
            .position(|f| f.name == name)
            .ok_or_else(|| PanesError::UnknownFeature {
                view: self.spec.name.clone(),
                name: name.to_string(),
                known: self
                    .spec
                    .features
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// State bytes per key.
    pub fn bytes_per_key(&self) -> usize {
        self.state
            .levels
            .iter()
            .map(LevelSpec::bytes_per_slot)
            .sum()
    }
}

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

    /// Decodes `batch` (at `offset` in the batch pushed) into the pending micro-batch.
    pub fn ingest(
        &mut self,
        view: &CompiledView,
        batch: &RecordBatch,
        offset: usize,
    ) -> Result<PushReport> {
        let report = ingest(
            view,
            batch,
            offset,
            &mut self.keys,
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

/// Turns non-exact read statuses into an error naming the first such key.
pub(crate) fn check_exact(
    view: &CompiledView,
    out: &MergeOutput,
    at: i64,
    key_of: impl Fn(usize) -> String,
) -> Result<()> {
    let Some(k) = out.status.iter().position(|s| *s != ReadStatus::Exact) else {
        return Ok(());
    };
    let reason = match out.status[k] {
        ReadStatus::PaneHoldsLaterEvents => "the pane containing that time also holds later events of this key, \
             so it cannot be split there; read at or after the key's latest event, or use backfill for past times"
            .to_string(),
        _ => {
            let hops: Vec<String> = view
                .state
                .levels
                .iter()
                .map(|l| format!("{} panes of {}", l.ring, format_duration(l.hop)))
                .collect();
            format!(
                "the window reaches panes that were already recycled (the view keeps {} per key); \
                 use backfill for past times",
                hops.join(", ")
            )
        }
    };
    Err(PanesError::InexactRead {
        view: view.spec.name.clone(),
        key: key_of(k),
        at,
        reason,
    })
}
