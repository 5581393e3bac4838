//! The scalar reference backend: the plainest loops that implement the semantics.
//! Every other backend is tested against it.

use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::level::{Acc, EMPTY_PANE, LevelState, fold_into_levels, write_window};
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
            fold_into_levels(
                &mut state.shards[shard],
                slot,
                batch.ts[e],
                batch.values,
                e,
                &mut stats,
            );
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
        if state.on_device() {
            return state.with_host(|host| self.merge(host, features, ids, at, out));
        }
        check_features(state, features)?;
        out.reset_for(ids.len(), features);
        for (k, id) in ids.iter().enumerate() {
            let Some((shard, slot)) = state.known(*id) else {
                out.write_empty(k, features);
                continue;
            };
            for (f, fm) in features.iter().enumerate() {
                let level = &state.shards[shard][fm.level];
                let (acc, status) = window(level, slot, fm, at);
                write_window(out, k, f, fm.agg, fm.column, &acc, at, status);
            }
        }
        Ok(())
    }
}

/// Accumulates the cells of `slot` that the window of `fm` covers at `at`, pane by pane.
fn window(level: &LevelState, slot: usize, fm: &FeatureMerge, at: i64) -> (Acc, ReadStatus) {
    let layout = &level.layout;
    let r = level.spec.ring;
    let ring = r as i64;
    let p_t = at.div_euclid(level.spec.hop);
    let cell = |pos: usize| level.index(slot, pos);
    let head = (0..r)
        .map(|pos| level.tag(cell(pos)))
        .max()
        .unwrap_or(EMPTY_PANE);
    let mut acc = Acc::EMPTY;
    let mut status = ReadStatus::Exact;
    match fm.panes {
        Some(n) => {
            let lo = p_t.saturating_sub(n as i64 - 1);
            // Panes before head − ring + 1 may have been overwritten by newer ones.
            if head != EMPTY_PANE && lo <= head - ring {
                status = ReadStatus::NotRetained;
            }
            if head != EMPTY_PANE {
                for p in lo..=p_t.min(head) {
                    let i = cell(p.rem_euclid(ring) as usize);
                    if level.tag(i) == p {
                        acc.add_cell(layout, level.ring.cell(layout, i), fm.column);
                    }
                }
            }
        }
        None => {
            if level.base_max_ts(slot) > at {
                status = ReadStatus::NotRetained;
            }
            // The base holds every recycled pane; the ring holds the rest, some of it
            // older than head − ring + 1 when no newer pane has reused the cell.
            acc.add_cell(layout, level.base.cell(layout, slot), fm.column);
            for i in (0..r).map(cell) {
                let tag = level.tag(i);
                if tag != EMPTY_PANE && tag <= p_t {
                    acc.add_cell(layout, level.ring.cell(layout, i), fm.column);
                }
            }
        }
    }
    let i_t = cell(p_t.rem_euclid(ring) as usize);
    if level.tag(i_t) == p_t && level.max_ts(i_t) > at {
        status = status.worst(ReadStatus::PaneHoldsLaterEvents);
    }
    (acc, status)
}
