//! The `Cpu` backend: rayon across key shards for the fold and for large reads.
//!
//! # Fold
//! The fold is a scatter: each event updates one cell per level of its key. Key shards
//! are split among the pool's threads (shard `s` to thread `s mod T`); each thread scans
//! the whole batch in arrival order and folds the events of its shards with the same
//! per-event step as the scalar backend. Shards own their buffers, so no locks and no
//! atomics are needed, per-key arrival order is kept, and reads of the batch stay
//! sequential.
//!
//! What was measured and not kept (kernel bench, `fold`, 64 K and 1 M events over 100 K
//! Zipf keys): a counting sort of the events by shard (its scattered reads of the batch
//! made two threads slower than one); blocks of 256 events with branch-free,
//! auto-vectorised f64 pane arithmetic (packed SSE2 multiplies, compares and blends)
//! plus software prefetching of the next cells (15 % slower than this plain loop: the
//! fold is bound by memory latency, and the block bookkeeping cost more than the
//! divisions it saved). SIMD lanes pay where data is contiguous; a scatter is not.
//!
//! # Merge
//! A read scans the key's ring once per feature, adding the cells whose tag falls in the
//! window (the scalar backend instead walks the window pane by pane). Reads of many
//! keys are split across rayon.
//!
//! Rejected alternative: sorting each batch by (key, pane) and reducing runs would
//! turn the fold into vectorisable segmented reductions, but with 10⁵ keys most runs
//! have length one and the sort costs more than the scatter it replaces.

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::level::{Acc, EMPTY_PANE, LevelState, finalize, fold_into_levels, int};
use crate::state::{
    FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState, ReadStatus, check_features,
    write_empty,
};

/// Batches smaller than this are folded on the calling thread. From the kernel bench
/// (`fold`): at 64 K events two threads fold 1.7× faster than one; a 4 K-event fold
/// takes about 0.2 ms in all, where splitting it is not worth a fork/join.
pub const PARALLEL_FOLD_MIN: usize = 16 * 1024;

/// Reads of fewer keys than this run on the calling thread.
pub const PARALLEL_MERGE_MIN: usize = 512;

/// The CPU backend: rayon across key shards.
#[derive(Clone, Debug, Default)]
pub struct Cpu {
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl Cpu {
    /// A backend on rayon's global pool.
    pub fn new() -> Self {
        Cpu { pool: None }
    }

    /// A backend on a pool of its own with `threads` threads (benchmarks use 1 and 2).
    ///
    /// # Errors
    /// [`KernelError::Unavailable`] when the pool cannot be built.
    pub fn with_threads(threads: usize) -> Result<Self, KernelError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("panes-cpu-{i}"))
            .build()
            .map_err(|e| KernelError::Unavailable(format!("cannot build a rayon pool: {e}")))?;
        Ok(Cpu {
            pool: Some(Arc::new(pool)),
        })
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }

    fn threads(&self) -> usize {
        match &self.pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }
}

/// Folds the events of `batch` whose shard this group owns into the group's shards.
///
/// `owned[s]` is the index in `shards` of shard `s`, or `usize::MAX` when another group
/// owns it. The group scans the whole batch in arrival order: reads of the batch stay
/// sequential, so no gather pass is needed, and each key's events keep their order.
fn fold_group(
    shards: &mut [&mut Vec<LevelState>],
    owned: &[usize],
    batch: &FoldBatch<'_>,
    shift: u32,
) -> FoldStats {
    let mask = owned.len() - 1;
    let mut stats = FoldStats::default();
    for e in 0..batch.len() {
        let id = batch.ids[e] as usize;
        let g = owned[id & mask];
        if g != usize::MAX {
            fold_into_levels(
                shards[g],
                id >> shift,
                batch.ts[e],
                batch.values,
                e,
                &mut stats,
            );
        }
    }
    stats
}

impl Backend for Cpu {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError> {
        state.prepare(batch)?;
        if batch.is_empty() {
            return Ok(FoldStats::default());
        }
        let nshards = state.spec().shards;
        let shift = nshards.trailing_zeros();
        let groups = if batch.len() >= PARALLEL_FOLD_MIN {
            self.threads().min(nshards)
        } else {
            1
        };
        // Shard s belongs to group s % groups.
        let mut members: Vec<Vec<&mut Vec<LevelState>>> = (0..groups).map(|_| Vec::new()).collect();
        let mut owned: Vec<Vec<usize>> = vec![vec![usize::MAX; nshards]; groups];
        for (s, shard) in state.shards.iter_mut().enumerate() {
            let g = s % groups;
            owned[g][s] = members[g].len();
            members[g].push(shard);
        }
        let add = |mut a: FoldStats, b: FoldStats| {
            a.add(b);
            a
        };
        Ok(if groups == 1 {
            fold_group(&mut members[0], &owned[0], batch, shift)
        } else {
            self.install(|| {
                members
                    .par_iter_mut()
                    .zip(owned.par_iter())
                    .map(|(m, o)| fold_group(m, o, batch, shift))
                    .reduce(FoldStats::default, add)
            })
        })
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
        out.reset(ids.len(), features.len());
        let nf = features.len();
        if nf == 0 {
            return Ok(());
        }
        let MergeOutput {
            values,
            valid,
            status,
            ..
        } = out;
        let rows = |ids: &[Option<u32>], v: &mut [f64], ok: &mut [bool], st: &mut [ReadStatus]| {
            for (k, id) in ids.iter().enumerate() {
                let row = k * nf..(k + 1) * nf;
                st[k] = merge_key(state, features, *id, at, &mut v[row.clone()], &mut ok[row]);
            }
        };
        if ids.len() < PARALLEL_MERGE_MIN || self.threads() < 2 {
            rows(ids, values, valid, status);
        } else {
            const KEYS: usize = 256;
            self.install(|| {
                ids.par_chunks(KEYS)
                    .zip(values.par_chunks_mut(KEYS * nf))
                    .zip(valid.par_chunks_mut(KEYS * nf))
                    .zip(status.par_chunks_mut(KEYS))
                    .for_each(|(((i, v), ok), st)| rows(i, v, ok, st));
            });
        }
        Ok(())
    }
}

fn merge_key(
    state: &PaneState,
    features: &[FeatureMerge],
    id: Option<u32>,
    at: i64,
    values: &mut [f64],
    valid: &mut [bool],
) -> ReadStatus {
    let Some((shard, slot)) = state.known(id) else {
        write_empty(features, values, valid);
        return ReadStatus::Exact;
    };
    let mut status = ReadStatus::Exact;
    for (f, fm) in features.iter().enumerate() {
        let level = &state.shards[shard][fm.level];
        let (acc, st) = scan_window(level, slot, fm, at);
        status = status.worst(st);
        let v = finalize(fm.agg, fm.column, &acc);
        values[f] = v.unwrap_or(f64::NAN);
        valid[f] = v.is_some();
    }
    status
}

/// The windows of `features` for `slot` at `at`, in one pass over the key's ring per
/// feature: every cell whose tag lies in the window is added.
fn scan_window(level: &LevelState, slot: usize, fm: &FeatureMerge, at: i64) -> (Acc, ReadStatus) {
    let layout = &level.layout;
    let r = level.spec.ring;
    let p_t = at.div_euclid(level.spec.hop);
    let mut status = ReadStatus::Exact;
    let mut acc = Acc::EMPTY;
    let mut head = EMPTY_PANE;
    let lo = match fm.panes {
        Some(n) => p_t.saturating_sub(n as i64 - 1),
        None => {
            if level.base_max_ts(slot) > at {
                status = ReadStatus::NotRetained;
            }
            acc.add_cell(layout, level.base.cell(layout, slot), fm.column);
            EMPTY_PANE + 1
        }
    };
    for pos in 0..r {
        let cell = level.ring.cell(layout, level.index(slot, pos));
        let tag = int(cell[0]);
        head = head.max(tag);
        if tag >= lo && tag <= p_t {
            acc.add_cell(layout, cell, fm.column);
            if tag == p_t && int(cell[2]) > at {
                status = status.worst(ReadStatus::PaneHoldsLaterEvents);
            }
        }
    }
    if fm.panes.is_some() && head != EMPTY_PANE && lo <= head - r as i64 {
        status = status.worst(ReadStatus::NotRetained);
    }
    (acc, status)
}
