//! The `Cpu` backend: rayon across key shards for the fold and for large reads.
//!
//! # Fold
//! The fold is a scatter (each event updates one cell per level of its key), so its
//! speed comes from cheap per-event work, few cache misses and parallelism, not from
//! SIMD lanes:
//! - pane ids and ring positions are computed per block of 256 events in branch-free
//!   f64 arithmetic that the compiler vectorises, with multiplies by the reciprocals of
//!   the hop and the ring instead of 64-bit divisions ([`pane_positions`]);
//! - a cell's fields sit side by side and the newest panes of all keys are packed
//!   together (see [`crate::level`]), so an event costs one or two cache lines per
//!   level, and the cells of the next events are prefetched while one is folded;
//! - key shards are split among the pool's threads (shard `s` to thread `s mod T`);
//!   each thread scans the whole batch in arrival order and folds the events of its
//!   shards. Shards own their buffers, so no locks and no atomics are needed, per-key
//!   arrival order is kept, and reads of the batch stay sequential. (A counting sort of
//!   the events by shard was measured first: its scattered reads of the batch made the
//!   two-thread fold slower than one thread.)
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
use crate::level::{Acc, EMPTY_PANE, Folded, LevelState, finalize, int};
use crate::state::{
    FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState, ReadStatus, check_features,
};

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

/// Events per block of the fold: the pane ids and ring positions of a block are
/// computed in one vectorised pass, then its events are folded.
const BLOCK: usize = 256;

/// Largest |time| (ms, ±35 000 years) the vectorised pane arithmetic handles; beyond,
/// `div_euclid`.
const EXACT_LIMIT: f64 = (1u64 << 50) as f64;

/// `floor(y)` for |y| < 2^51 without `f64::floor` (a libm call on baseline x86-64):
/// adding and subtracting 1.5 · 2^52 rounds to the nearest integer, then one step down
/// if that overshot. Branch-free, so it vectorises.
#[inline(always)]
fn floor_small(y: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    let r = (y + MAGIC) - MAGIC;
    r - if r > y { 1.0 } else { 0.0 }
}

/// `floor(x / d)` for integral `x`, `d ≥ 1` in f64 with |x| < 2^50 and `inv = 1 / d`: the
/// quotient estimate is within one of the truth, and the remainder `x − q·d` is exact
/// in f64 (integers below 2^53), so one branch-free step each way corrects it.
#[inline(always)]
fn floor_div_f64(x: f64, d: f64, inv: f64) -> f64 {
    let q = floor_small(x * inv);
    let r = x - q * d;
    q - if r < 0.0 { 1.0 } else { 0.0 } + if r >= d { 1.0 } else { 0.0 }
}

/// Pane ids `floor(ts / hop)` and ring positions `pane mod ring` of a block of times.
///
/// The loop is branch-free f64 arithmetic (multiplies by reciprocals instead of 64-bit
/// divisions, see [`floor_div_f64`]), which the compiler turns into packed SIMD
/// instructions (SSE2 on the x86-64 baseline, wider where the target allows). Blocks
/// holding a time beyond ±2^50 ms take an exact scalar path.
#[inline(never)]
pub fn pane_positions(ts: &[i64], hop: i64, ring: usize, panes: &mut [i64], pos: &mut [u32]) {
    let n = ts.len().min(panes.len()).min(pos.len());
    let (ts, panes, pos) = (&ts[..n], &mut panes[..n], &mut pos[..n]);
    if ts.iter().any(|&t| (t as f64).abs() >= EXACT_LIMIT) {
        for i in 0..n {
            panes[i] = ts[i].div_euclid(hop);
            pos[i] = panes[i].rem_euclid(ring as i64) as u32;
        }
        return;
    }
    let (d, inv_d) = (hop as f64, 1.0 / hop as f64);
    let (r, inv_r) = (ring as f64, 1.0 / ring as f64);
    for i in 0..n {
        let p = floor_div_f64(ts[i] as f64, d, inv_d);
        let q = p - floor_div_f64(p, r, inv_r) * r;
        // SAFETY: p and q are finite integers below 2^50 in magnitude (|ts| < 2^50 was
        // checked above, hop ≥ 1, 0 ≤ q < ring), so the conversions are exact.
        unsafe {
            panes[i] = p.to_int_unchecked::<i64>();
            pos[i] = q.to_int_unchecked::<u32>();
        }
    }
}

/// Events to look ahead when prefetching cells: enough to cover a memory latency with
/// the work of the events in between (8 and 16 measured alike with the kernel bench).
const PREFETCH_AHEAD: usize = 8;

/// Asks the CPU to start loading the cache line at `p`.
#[inline(always)]
fn prefetch(p: *const f64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults and never reads into the program,
    // whatever the address (SSE, part of the x86-64 baseline).
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Folds the events of `batch` whose shard this group owns into the group's shards.
///
/// `owned[s]` is the index in `shards` of shard `s`, or `usize::MAX` when another group
/// owns it. The group scans the whole batch in arrival order (sequential reads, so no
/// gather pass is needed), block by block and level by level (levels are independent),
/// and prefetches the cell of the owned event `PREFETCH_AHEAD` places ahead.
fn fold_group(
    shards: &mut [&mut Vec<LevelState>],
    owned: &[usize],
    batch: &FoldBatch<'_>,
    shift: u32,
) -> FoldStats {
    let mask = owned.len() - 1;
    let mut stats = FoldStats::default();
    let levels = shards.first().map_or(0, |s| s.len());
    let mut panes = [0i64; BLOCK];
    let mut pos = [0u32; BLOCK];
    let mut times = [0i64; BLOCK];
    let mut mine = [(0usize, 0usize); BLOCK];
    for start in (0..batch.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(batch.len());
        // The owned events of the block: (event, index of its shard in the group).
        let mut count = 0;
        for e in start..end {
            let g = owned[batch.ids[e] as usize & mask];
            if g != usize::MAX {
                mine[count] = (e, g);
                times[count] = batch.ts[e];
                count += 1;
            }
        }
        for l in 0..levels {
            let (hop, ring) = (shards[0][l].spec.hop, shards[0][l].spec.ring);
            pane_positions(&times[..count], hop, ring, &mut panes, &mut pos);
            for k in 0..count {
                if k + PREFETCH_AHEAD < count {
                    let (f, g) = mine[k + PREFETCH_AHEAD];
                    let level = &shards[g][l];
                    let stride = level.layout.stride;
                    let slot = (batch.ids[f] >> shift) as usize;
                    let cell = level.index(slot, pos[k + PREFETCH_AHEAD] as usize) * stride;
                    let p = level.ring.data.as_ptr().wrapping_add(cell);
                    prefetch(p);
                    prefetch(p.wrapping_add(stride - 1));
                }
                let (e, g) = mine[k];
                let slot = (batch.ids[e] >> shift) as usize;
                match shards[g][l].fold_event(
                    slot,
                    panes[k],
                    pos[k] as usize,
                    times[k],
                    batch.values,
                    e,
                ) {
                    Folded::Ring => stats.folded += 1,
                    Folded::Base => stats.into_base += 1,
                    Folded::Expired => stats.expired += 1,
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pane_positions_match_euclid() {
        let mut ts: Vec<i64> = (-50..50).map(|i| i * 37_001 + 1_700_000_000_000).collect();
        ts.extend(-50..50);
        ts.extend([
            (1 << 50) - 1,
            -(1 << 50) + 1,
            (1 << 52) - 1,
            -86_400_000 * 365,
        ]);
        for (hop, ring) in [
            (1000i64, 7usize),
            (60_000, 1),
            (1, 3),
            (3_600_000, 24),
            (7, 100_000),
        ] {
            for chunk in ts.chunks(7) {
                let mut p = vec![0; chunk.len()];
                let mut q = vec![0; chunk.len()];
                pane_positions(chunk, hop, ring, &mut p, &mut q);
                for i in 0..chunk.len() {
                    assert_eq!(p[i], chunk[i].div_euclid(hop), "ts {} hop {hop}", chunk[i]);
                    assert_eq!(
                        q[i] as i64,
                        p[i].rem_euclid(ring as i64),
                        "ts {} ring {ring}",
                        chunk[i]
                    );
                }
            }
        }
        // Beyond ±2^50 ms: the exact scalar path.
        let big = [i64::MAX, i64::MIN, 1 << 60];
        let (mut p, mut q) = ([0; 3], [0; 3]);
        pane_positions(&big, 1000, 5, &mut p, &mut q);
        for i in 0..3 {
            assert_eq!(p[i], big[i].div_euclid(1000));
            assert_eq!(q[i] as i64, p[i].rem_euclid(5));
        }
    }
}
