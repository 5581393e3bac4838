//! The scalar reference backend: the plainest loops that implement the semantics.
//! Every other backend is tested against it.

use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::level::{Acc, EMPTY_PANE, Folded, LevelState, finalize};
use crate::state::{
    FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState, ReadStatus, check_features,
};

/// The scalar reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Scalar;

impl Backend for Scalar {
    fn kind(&self) -> BackendKind {
        BackendKind::Scalar
    }

    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError> {
        state.prepare(batch)?;
        let mut stats = FoldStats::default();
        for e in 0..batch.len() {
            let (shard, slot) = state.locate(batch.ids[e]);
            let ts = batch.ts[e];
            for level in state.shards[shard].iter_mut() {
                let pane = ts.div_euclid(level.spec.hop);
                let pos = pane.rem_euclid(level.spec.ring as i64) as usize;
                match level.fold_event(slot, pane, pos, ts, batch.values, e) {
                    Folded::Ring => stats.folded += 1,
                    Folded::Base => stats.into_base += 1,
                    Folded::Expired => stats.expired += 1,
                }
            }
        }
        Ok(stats)
    }

    fn merge(
        &self,
        state: &PaneState,
        features: &[FeatureMerge],
        ids: &[Option<u32>],
        at: i64,
        out: &mut MergeOutput,
    ) -> Result<(), KernelError> {
        check_features(state, features)?;
        out.reset(ids.len(), features.len());
        for (k, id) in ids.iter().enumerate() {
            let known = id.map(|id| state.locate(id)).filter(|&(shard, slot)| {
                state.shards[shard].first().is_some_and(|l| slot < l.slots)
            });
            let Some((shard, slot)) = known else {
                out.write_empty(k, features);
                continue;
            };
            for (f, fm) in features.iter().enumerate() {
                let level = &state.shards[shard][fm.level];
                let (acc, status) = window(level, slot, fm, at);
                let v = finalize(fm.agg, fm.column, &acc);
                let i = k * features.len() + f;
                out.values[i] = v.unwrap_or(f64::NAN);
                out.valid[i] = v.is_some();
                out.status[k] = out.status[k].worst(status);
            }
        }
        Ok(())
    }
}

/// Accumulates the cells of `slot` that the window of `fm` covers at `at`, pane by pane.
fn window(level: &LevelState, slot: usize, fm: &FeatureMerge, at: i64) -> (Acc, ReadStatus) {
    let ring = level.spec.ring as i64;
    let p_t = at.div_euclid(level.spec.hop);
    let base = slot * level.spec.ring;
    let tags = &level.tag[base..base + level.spec.ring];
    let head = tags.iter().copied().max().unwrap_or(EMPTY_PANE);
    let mut acc = Acc::EMPTY;
    let mut status = ReadStatus::Exact;

    let first_retained = if head == EMPTY_PANE {
        i64::MAX
    } else {
        head - ring + 1
    };
    match fm.panes {
        Some(n) => {
            let lo = p_t.saturating_sub(n as i64 - 1);
            if head != EMPTY_PANE && lo < first_retained {
                status = ReadStatus::NotRetained;
            }
            // Pane by pane through the window (at most `n` panes).
            if head != EMPTY_PANE {
                for p in lo..=p_t.min(head) {
                    let pos = p.rem_euclid(ring) as usize;
                    if tags[pos] == p {
                        acc.add_cell(&level.ring, base + pos, fm.column);
                    }
                }
            }
        }
        None => {
            if level.base.max_ts[slot] > at {
                status = ReadStatus::NotRetained;
            }
            // The base holds every recycled pane; the ring cells hold the rest, some of
            // them older than `first_retained` when no newer pane has reused them.
            acc.add_cell(&level.base, slot, fm.column);
            for (pos, &tag) in tags.iter().enumerate() {
                if tag != EMPTY_PANE && tag <= p_t {
                    acc.add_cell(&level.ring, base + pos, fm.column);
                }
            }
        }
    }
    let pos_t = p_t.rem_euclid(ring) as usize;
    if tags[pos_t] == p_t && level.ring.max_ts[base + pos_t] > at {
        status = status.worst(ReadStatus::PaneHoldsLaterEvents);
    }
    (acc, status)
}
