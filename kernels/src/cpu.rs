//! The `Cpu` backend: rayon across key shards for the fold, SIMD-friendly masked ring
//! scans for the window merge.
//!
//! # Fold
//! The fold is a scatter (each event updates the cells of its key), so its speed comes
//! from cheap per-event work and from parallelism, not from lanes:
//! - pane ids and ring positions are computed for the whole batch up front, with a
//!   multiply by the reciprocal of the hop instead of a 64-bit division (a vectorisable
//!   loop, [`pane_positions`]);
//! - events are bucketed by key shard with a counting sort, and rayon folds the shards
//!   in parallel. Each shard owns its buffers, so no locks and no atomics are needed,
//!   and per-key arrival order is kept.
//!
//! # Merge
//! A key's ring of one field is contiguous (`slot * ring .. slot * ring + ring`), so a
//! window merge is a masked reduction over that range: a lane mask from the pane tags,
//! then `LANES` independent accumulators per field ([`masked_sum`] and friends), which
//! LLVM turns into packed compares, blends and adds. Large reads split keys across rayon.
//!
//! Rejected alternative: sorting each batch by (key, pane) and reducing runs would make
//! the fold SIMD-friendly too, but with 10⁵ keys most runs have length one and the sort
//! costs more than the scatter it replaces.

use std::sync::Arc;

use rayon::prelude::*;

use crate::Agg;
use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::level::{Acc, EMPTY_PANE, Folded, LevelState, Moments, finalize, floor_div};
use crate::state::{
    FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState, ReadStatus, check_features,
};

/// Vector width (in f64 lanes) the masked reductions are written for: 8 lanes fill one
/// AVX-512 register or two AVX2 registers, and stay correct (just narrower) on SSE2.
pub const LANES: usize = 8;

/// Batches smaller than this are folded on the calling thread: below it, rayon's
/// fork/join costs more than it saves (measured with `cargo bench --bench kernels`).
pub const PARALLEL_FOLD_MIN: usize = 16 * 1024;

/// Reads of fewer keys than this run on the calling thread.
pub const PARALLEL_MERGE_MIN: usize = 512;

/// The SIMD + rayon CPU backend.
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

/// Pane id and ring position of every event for one level.
///
/// `panes[i] = floor(ts[i] / hop)` and `pos[i] = panes[i] mod ring`, computed with
/// multiplications by reciprocals (exact: see [`floor_div`]).
#[inline(never)]
pub fn pane_positions(ts: &[i64], hop: i64, ring: usize, panes: &mut [i64], pos: &mut [u32]) {
    let inv_hop = 1.0 / hop as f64;
    let r = ring as i64;
    let inv_ring = 1.0 / ring as f64;
    for ((t, p), q) in ts.iter().zip(panes.iter_mut()).zip(pos.iter_mut()) {
        let pane = floor_div(*t, hop, inv_hop);
        *p = pane;
        *q = (pane - floor_div(pane, r, inv_ring) * r) as u32;
    }
}

struct LevelPanes {
    panes: Vec<i64>,
    pos: Vec<u32>,
}

fn fold_events(
    levels: &mut [LevelState],
    lp: &[LevelPanes],
    events: impl Iterator<Item = usize> + Clone,
    batch: &FoldBatch<'_>,
    shift: u32,
) -> FoldStats {
    let mut stats = FoldStats::default();
    for (level, lp) in levels.iter_mut().zip(lp) {
        for e in events.clone() {
            let slot = (batch.ids[e] >> shift) as usize;
            match level.fold_event(
                slot,
                lp.panes[e],
                lp.pos[e] as usize,
                batch.ts[e],
                batch.values,
                e,
            ) {
                Folded::Ring => stats.folded += 1,
                Folded::Base => stats.into_base += 1,
                Folded::Expired => stats.expired += 1,
            }
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
        let n = batch.len();
        if n == 0 {
            return Ok(FoldStats::default());
        }
        let nshards = state.spec().shards;
        let shift = nshards.trailing_zeros();
        let parallel = n >= PARALLEL_FOLD_MIN && nshards > 1 && self.threads() > 1;
        let specs: Vec<_> = state
            .spec()
            .levels
            .iter()
            .map(|l| (l.hop, l.ring))
            .collect();
        Ok(self.install(|| {
            let lp: Vec<LevelPanes> = specs
                .iter()
                .map(|&(hop, ring)| {
                    let mut panes = vec![0i64; n];
                    let mut pos = vec![0u32; n];
                    const CHUNK: usize = 64 * 1024;
                    if parallel {
                        panes
                            .par_chunks_mut(CHUNK)
                            .zip(pos.par_chunks_mut(CHUNK))
                            .zip(batch.ts.par_chunks(CHUNK))
                            .for_each(|((p, q), t)| pane_positions(t, hop, ring, p, q));
                    } else {
                        pane_positions(batch.ts, hop, ring, &mut panes, &mut pos);
                    }
                    LevelPanes { panes, pos }
                })
                .collect();

            if !parallel {
                let mut stats = FoldStats::default();
                // Per event, all levels of its shard: keeps per-key arrival order.
                for e in 0..n {
                    let shard = batch.ids[e] as usize & (nshards - 1);
                    stats.add(fold_events(
                        &mut state.shards[shard],
                        &lp,
                        e..e + 1,
                        batch,
                        shift,
                    ));
                }
                return stats;
            }

            // Counting sort of event indices by shard (stable: arrival order per shard).
            let mut offsets = vec![0usize; nshards + 1];
            for &id in batch.ids {
                offsets[(id as usize & (nshards - 1)) + 1] += 1;
            }
            for s in 0..nshards {
                offsets[s + 1] += offsets[s];
            }
            let mut cursor = offsets.clone();
            let mut order = vec![0u32; n];
            for (e, &id) in batch.ids.iter().enumerate() {
                let s = id as usize & (nshards - 1);
                order[cursor[s]] = e as u32;
                cursor[s] += 1;
            }
            state
                .shards
                .par_iter_mut()
                .enumerate()
                .map(|(s, levels)| {
                    let events = order[offsets[s]..offsets[s + 1]]
                        .iter()
                        .map(|&e| e as usize);
                    fold_events(levels, &lp, events, batch, shift)
                })
                .reduce(FoldStats::default, |mut a, b| {
                    a.add(b);
                    a
                })
        }))
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
            let mut mask = Vec::new();
            for (k, id) in ids.iter().enumerate() {
                st[k] = merge_key(
                    state,
                    features,
                    *id,
                    at,
                    &mut v[k * nf..(k + 1) * nf],
                    &mut ok[k * nf..(k + 1) * nf],
                    &mut mask,
                );
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
    mask: &mut Vec<bool>,
) -> ReadStatus {
    let known = id
        .map(|id| state.locate(id))
        .filter(|&(shard, slot)| state.shards[shard].first().is_some_and(|l| slot < l.slots));
    let Some((shard, slot)) = known else {
        for (f, fm) in features.iter().enumerate() {
            let zero = fm.agg.zero_when_empty();
            values[f] = if zero { 0.0 } else { f64::NAN };
            valid[f] = zero;
        }
        return ReadStatus::Exact;
    };
    let mut status = ReadStatus::Exact;
    for (f, fm) in features.iter().enumerate() {
        let level = &state.shards[shard][fm.level];
        let (acc, st) = masked_window(level, slot, fm, at, mask);
        status = status.worst(st);
        let v = finalize(fm.agg, fm.column, &acc);
        values[f] = v.unwrap_or(f64::NAN);
        valid[f] = v.is_some();
    }
    status
}

/// The window of `fm` for `slot` at `at`, as masked reductions over the key's ring.
fn masked_window(
    level: &LevelState,
    slot: usize,
    fm: &FeatureMerge,
    at: i64,
    mask: &mut Vec<bool>,
) -> (Acc, ReadStatus) {
    let r = level.spec.ring;
    let p_t = at.div_euclid(level.spec.hop);
    let cells = slot * r..slot * r + r;
    let tags = &level.tag[cells.clone()];
    let head = max_i64(tags);
    let mut status = ReadStatus::Exact;
    let mut acc = Acc::EMPTY;
    let lo = match fm.panes {
        Some(n) => {
            let lo = p_t.saturating_sub(n as i64 - 1);
            if head != EMPTY_PANE && lo <= head - r as i64 {
                status = ReadStatus::NotRetained;
            }
            lo
        }
        None => {
            if level.base.max_ts[slot] > at {
                status = ReadStatus::NotRetained;
            }
            acc.add_cell(&level.base, slot, fm.column);
            EMPTY_PANE + 1
        }
    };
    if head == EMPTY_PANE || lo > head {
        return (acc, status);
    }
    let pos_t = p_t.rem_euclid(r as i64) as usize;
    if tags[pos_t] == p_t && level.ring.max_ts[cells.start + pos_t] > at {
        status = status.worst(ReadStatus::PaneHoldsLaterEvents);
    }
    mask.clear();
    mask.extend(tags.iter().map(|&t| t >= lo && t <= p_t));

    let ring = &level.ring;
    let Some(c) = fm.column else {
        acc.rows += masked_sum(&ring.rows[cells], mask);
        return (acc, status);
    };
    let col = &ring.cols[c];
    acc.count += masked_sum(&col.count[cells.clone()], mask);
    match fm.agg {
        Agg::Count => {}
        Agg::Sum | Agg::Mean => acc.sum += masked_sum(&col.sum[cells], mask),
        Agg::Var | Agg::Std => {
            let (n, mean, m2) = masked_moments(
                &col.count[cells.clone()],
                &col.shift[cells.clone()],
                &col.m1[cells.clone()],
                &col.m2[cells],
                mask,
            );
            acc.moments.merge(Moments { n, mean, m2 });
        }
        Agg::Min => acc.min = acc.min.min(masked_min(&col.min[cells], mask)),
        Agg::Max => acc.max = acc.max.max(masked_max(&col.max[cells], mask)),
        Agg::Last => {
            if let Some(j) = masked_argmax_i64(&col.last_ts[cells.clone()], mask) {
                let ts = col.last_ts[cells.start + j];
                if ts >= acc.last_ts && col.count[cells.start + j] > 0.0 {
                    acc.last_ts = ts;
                    acc.last = col.last[cells.start + j];
                }
            }
        }
    }
    (acc, status)
}

/// Largest value of `v` (`EMPTY_PANE` for an empty slice).
#[inline(never)]
pub fn max_i64(v: &[i64]) -> i64 {
    let mut acc = [EMPTY_PANE; LANES];
    let (chunks, tail) = v.as_chunks::<LANES>();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    let mut m = acc.into_iter().max().unwrap_or(EMPTY_PANE);
    for &x in tail {
        m = m.max(x);
    }
    m
}

macro_rules! masked_reduce {
    ($(#[$doc:meta])* $name:ident, $identity:expr, $op:expr) => {
        $(#[$doc])*
        #[inline(never)]
        pub fn $name(v: &[f64], mask: &[bool]) -> f64 {
            let op = $op;
            let mut acc = [$identity; LANES];
            let (vc, vt) = v.as_chunks::<LANES>();
            let (mc, mt) = mask[..v.len()].as_chunks::<LANES>();
            for (x, m) in vc.iter().zip(mc) {
                for l in 0..LANES {
                    acc[l] = op(acc[l], if m[l] { x[l] } else { $identity });
                }
            }
            // Tree reduction of the lanes.
            let mut width = LANES;
            while width > 1 {
                width /= 2;
                for l in 0..width {
                    acc[l] = op(acc[l], acc[l + width]);
                }
            }
            let mut r = acc[0];
            for (x, m) in vt.iter().zip(mt) {
                r = op(r, if *m { *x } else { $identity });
            }
            r
        }
    };
}

masked_reduce!(
    /// Sum of `v[i]` where `mask[i]`.
    masked_sum, 0.0f64, |a: f64, b: f64| a + b
);
masked_reduce!(
    /// Minimum of `v[i]` where `mask[i]` (+∞ when none).
    masked_min, f64::INFINITY, |a: f64, b: f64| a.min(b)
);
masked_reduce!(
    /// Maximum of `v[i]` where `mask[i]` (−∞ when none).
    masked_max, f64::NEG_INFINITY, |a: f64, b: f64| a.max(b)
);

/// `(n, mean, M2)` of the cells selected by `mask`, each cell given as count `c`,
/// shift `k`, `Σ(x−k)` and `Σ(x−k)²`.
///
/// Two masked passes: the overall mean first, then `M2 = Σ M2ᵢ + cᵢ (meanᵢ − mean)²`,
/// which is as stable as pairwise merging and vectorises.
#[inline(never)]
pub fn masked_moments(
    c: &[f64],
    k: &[f64],
    m1: &[f64],
    m2: &[f64],
    mask: &[bool],
) -> (f64, f64, f64) {
    let len = c.len();
    let (c, k, m1, m2, mask) = (&c[..len], &k[..len], &m1[..len], &m2[..len], &mask[..len]);
    let mut n = [0.0f64; LANES];
    let mut s = [0.0f64; LANES];
    for (i, _) in c.iter().enumerate() {
        let l = i % LANES;
        let on = mask[i] && c[i] > 0.0;
        n[l] += if on { c[i] } else { 0.0 };
        s[l] += if on { c[i] * k[i] + m1[i] } else { 0.0 };
    }
    let n: f64 = n.iter().sum();
    if n == 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let mean = s.iter().sum::<f64>() / n;
    let mut q = [0.0f64; LANES];
    for (i, _) in c.iter().enumerate() {
        let l = i % LANES;
        let on = mask[i] && c[i] > 0.0;
        let ci = if on { c[i] } else { 1.0 };
        let mi = k[i] + m1[i] / ci;
        let own = (m2[i] - m1[i] * m1[i] / ci).max(0.0);
        let d = mi - mean;
        q[l] += if on { own + ci * d * d } else { 0.0 };
    }
    (n, mean, q.iter().sum())
}

/// Index of the greatest `v[i]` where `mask[i]` (the last one on ties), if any.
#[inline(never)]
pub fn masked_argmax_i64(v: &[i64], mask: &[bool]) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut best_v = i64::MIN;
    for (i, (&x, &m)) in v.iter().zip(mask).enumerate() {
        if m && (best.is_none() || x >= best_v) {
            best = Some(i);
            best_v = x;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_reductions_match_naive() {
        for len in [0usize, 1, 5, 8, 9, 17, 64, 100] {
            let v: Vec<f64> = (0..len).map(|i| (i as f64 * 7.3) % 11.0 - 5.0).collect();
            let m: Vec<bool> = (0..len).map(|i| i % 3 != 1).collect();
            let sel = v.iter().zip(&m).filter(|(_, m)| **m).map(|(x, _)| *x);
            let sum: f64 = sel.clone().sum();
            assert!((masked_sum(&v, &m) - sum).abs() < 1e-9);
            assert_eq!(
                masked_min(&v, &m),
                sel.clone().fold(f64::INFINITY, f64::min)
            );
            assert_eq!(masked_max(&v, &m), sel.fold(f64::NEG_INFINITY, f64::max));
        }
    }

    #[test]
    fn masked_moments_match_two_pass() {
        // Three cells: {1e9+1, 1e9+3}, {1e9+2}, {5 (masked out)}.
        let c = [2.0, 1.0, 1.0];
        let k = [1e9 + 1.0, 1e9 + 2.0, 5.0];
        let m1 = [2.0, 0.0, 0.0];
        let m2 = [4.0, 0.0, 0.0];
        let (n, mean, q) = masked_moments(&c, &k, &m1, &m2, &[true, true, false]);
        assert_eq!((n, mean), (3.0, 1e9 + 2.0));
        assert!((q - 2.0).abs() < 1e-6, "{q}");
    }

    #[test]
    fn argmax_prefers_last_on_ties() {
        assert_eq!(
            masked_argmax_i64(&[3, 5, 5, 1], &[true, true, true, true]),
            Some(2)
        );
        assert_eq!(
            masked_argmax_i64(&[3, 5, 5, 1], &[true, false, false, true]),
            Some(0)
        );
        assert_eq!(masked_argmax_i64(&[3, 5], &[false, false]), None);
    }

    #[test]
    fn pane_positions_match_euclid() {
        let ts: Vec<i64> = (-50..50).map(|i| i * 37_001 + 1_700_000_000_000).collect();
        for (hop, ring) in [(1000, 7), (60_000, 1), (1, 3), (3_600_000, 24)] {
            let mut p = vec![0; ts.len()];
            let mut q = vec![0; ts.len()];
            pane_positions(&ts, hop, ring, &mut p, &mut q);
            for i in 0..ts.len() {
                assert_eq!(p[i], ts[i].div_euclid(hop));
                assert_eq!(q[i] as i64, p[i].rem_euclid(ring as i64));
            }
        }
    }
}
