//! The `Cpu` backend: rayon across key shards for the fold and for large reads.
//!
//! # Fold
//! Key shards are split among the pool's threads (shard `s` to thread `s mod T`); each
//! thread scans the whole batch in arrival order and pre-aggregates the events of its
//! shards into batch-local cells, one per key and level, which go into the state once
//! per (key, pane) of the batch (see `preagg` for why this is exact). Shards own their
//! buffers, so no locks and no atomics are needed, per-key arrival order is kept, and
//! reads of the batch stay sequential.
//!
//! Measured with the ingest benchmark (`cargo run --release -p panes-bench --bin
//! ingest`, 10 M events over 100 K Zipf keys, 65 536-event batches, 2 threads): the
//! per-event scatter it replaced ingested 2.5 M events/s on this machine, the
//! pre-aggregating fold 3.1 M (both with the engine then replaying every push into its
//! second replica by decoding it again).
//!
//! What was measured and not kept (kernel bench, `fold`, 64 K and 1 M events over 100 K
//! Zipf keys): a counting sort of the events by shard (its scattered reads of the batch
//! made two threads slower than one); blocks of 256 events with branch-free,
//! auto-vectorised f64 pane arithmetic (packed SSE2 multiplies, compares and blends)
//! plus software prefetching of the next cells (15 % slower than this plain loop: the
//! fold is bound by memory latency, and the block bookkeeping cost more than the
//! divisions it saved). SIMD lanes pay where data is contiguous; a scatter is not.
//! Also measured and not kept: splitting each 64 K-event chunk into 16 partitions by
//! key (a stable counting sort of the event indices) and pre-aggregating and flushing
//! one partition at a time, so that a partition's groups stay in L2 (kernel bench,
//! 100 K keys: 64 K events on one thread 5.1 → 5.2 ms, on two 3.3 → 3.9 ms; 1 M events
//! unchanged). The stalls of the fold are in the state it flushes into (the prefetches
//! of its cells, TLB misses), not in the batch-local groups.
//!
//! # Merge
//! A read passes once over each level's ring of the key, adding the cells whose tag
//! falls in each window (the scalar backend instead walks each window pane by pane);
//! features over the same level, window and column share one accumulation. Reads of
//! many keys are split across rayon.
//!
//! # Design decision: a key-major read copy
//! The ring is position-major for the fold, so a read of a key scattered over a large
//! state misses the cache and the TLB once per ring cell: 41 cells over three levels
//! for the kernel bench's features. The fold therefore also keeps a key-major copy of
//! the cells that stopped changing (`level::ReadCopy`): after each fold it copies up to
//! a quarter of a cell per folded event, for positions no event wrote since the
//! previous fold; any write takes the cell back out of the copy. A read then takes each
//! cell from the copy when it is there (one run of memory per level) and from the ring
//! otherwise (the open panes), and prefetches the next key's cells while it merges the
//! current one. The copy is the same bytes, so reads are bitwise unchanged (a test
//! checks it after every fold of random streams with late events).
//!
//! Kernel bench (`merge/cpu-1t/nulls=0`, 100 K keys): 100 scattered keys with the
//! caches flushed before each read take 182 µs from the copy against 312 µs from the
//! ring alone (1.7×); 10 K neighbouring keys 4.6 against 7.3 ms. The price: memory
//! (the copy is as large as the ring), a copy of each cell once per pane that closes,
//! and reads of 100 neighbouring, cache-resident keys some 30 % slower than before
//! (34 against 26 µs: the prefetches and the choice of source per cell). In the
//! serving benchmark the server's time for a 100-key read went from 0.30 to 0.18 ms
//! at p50 and from 0.57 to 0.31 ms at p99.
//!
//! Measured and not kept, before the copy (same read): prefetching from the ring
//! alone took the read from about 390 µs to 310–380 µs but made cache-resident reads
//! 1.7× slower (it is kept now, cheaper, for the cells the copy lacks); huge pages for
//! the rings (`MADV_HUGEPAGE`, 60 % of the state in 2 MiB pages) from 317 to
//! 277–308 µs; loading every line of a few keys before merging them to 280 µs, with
//! cached reads 1.3× slower.
//!
//! Rejected alternative: sorting each batch by (key, pane) and reducing runs would
//! turn the fold into vectorisable segmented reductions, but with 10⁵ keys most runs
//! have length one and the sort costs more than the scatter it replaces.

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::level::{Acc, EMPTY_PANE, LevelState, finalize, int, list};
use crate::preagg::{FoldLog, LogPart, preaggregates};
use crate::state::{
    FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState, ReadStatus, check_features,
    write_empty,
};

/// Batches smaller than this are folded on the calling thread. From the kernel bench
/// (`fold`): at 64 K events two threads fold 1.7× faster than one; a 4 K-event fold
/// takes about 0.2 ms in all, where splitting it is not worth a fork/join.
pub const PARALLEL_FOLD_MIN: usize = 16 * 1024;

/// Least number of cells a fold may add to the read copies (see [`fold_group`]), so
/// that a trickle of small batches still brings them up to date.
const REFRESH_MIN: usize = 1024;

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

/// Folds the events of `batch` whose shard this group owns into the group's shards,
/// recording its flushes in `log` if given.
///
/// `owned[s]` is the index in `shards` of shard `s`, or `usize::MAX` when another group
/// owns it. The group scans the whole batch in arrival order: reads of the batch stay
/// sequential, so no gather pass is needed, and each key's events keep their order.
fn fold_group(
    shards: &mut [&mut Vec<LevelState>],
    owned: &[usize],
    batch: &FoldBatch<'_>,
    shift: u32,
    read_copy: bool,
    log: Option<&mut LogPart>,
) -> FoldStats {
    let stats = crate::preagg::fold_owned(shards, owned, batch, shift, log);
    if read_copy {
        refresh_copies(shards, batch.len());
    }
    stats
}

/// The read copies' share of a fold of `events` events: a quarter of a cell copied
/// per event, so that catching up after a pane closes adds at most some tens of
/// percent to a fold (a copied cell costs about as much as a folded event: a
/// scattered write). Positions every fold writes are never copied; one that went quiet
/// is copied within a few folds.
fn refresh_copies(shards: &mut [&mut Vec<LevelState>], events: usize) {
    let mut budget = (events / 4).max(REFRESH_MIN);
    for level in shards.iter_mut().flat_map(|s| s.iter_mut()) {
        budget -= level.refresh_copy(budget);
    }
}

/// The shards of `state` dealt to `groups` threads: shard `s` to group `s % groups`.
/// Per group, its shards and, per shard of the state, the shard's index among them
/// (`usize::MAX`: another group's).
type Split<'a> = (Vec<Vec<&'a mut Vec<LevelState>>>, Vec<Vec<usize>>);

fn split(state: &mut PaneState, groups: usize) -> Split<'_> {
    let nshards = state.spec().shards;
    let mut members: Vec<Vec<&mut Vec<LevelState>>> = (0..groups).map(|_| Vec::new()).collect();
    let mut owned: Vec<Vec<usize>> = vec![vec![usize::MAX; nshards]; groups];
    for (s, shard) in state.shards.iter_mut().enumerate() {
        let g = s % groups;
        owned[g][s] = members[g].len();
        members[g].push(shard);
    }
    (members, owned)
}

fn add_stats(mut a: FoldStats, b: FoldStats) -> FoldStats {
    a.add(b);
    a
}

impl Cpu {
    /// The fold, logged into `log` when given (and the batch is large enough to be
    /// pre-aggregated; the log is left incomplete otherwise).
    fn fold_into(
        &self,
        state: &mut PaneState,
        batch: &FoldBatch<'_>,
        mut log: Option<&mut FoldLog>,
    ) -> Result<FoldStats, KernelError> {
        if let Some(log) = log.as_deref_mut() {
            log.clear();
        }
        let need = state.prepare(batch)?;
        if batch.is_empty() {
            return Ok(FoldStats::default());
        }
        let nshards = state.spec().shards;
        let shift = nshards.trailing_zeros();
        let read_copy = state.keeps_read_copy();
        let groups = if batch.len() >= PARALLEL_FOLD_MIN {
            self.threads().min(nshards)
        } else {
            1
        };
        let levels = state.shards.first().map_or(&[][..], Vec::as_slice);
        let pre = preaggregates(levels, batch.len());
        let (mut members, owned) = split(state, groups);
        let log = log.filter(|_| pre);
        let mut parts: Vec<Option<&mut LogPart>> = match log {
            Some(log) => {
                log.complete = true;
                log.events = batch.len();
                log.need = need;
                log.parts.resize_with(groups, LogPart::default);
                log.parts.iter_mut().map(Some).collect()
            }
            None => (0..groups).map(|_| None).collect(),
        };
        Ok(if groups == 1 {
            fold_group(
                &mut members[0],
                &owned[0],
                batch,
                shift,
                read_copy,
                parts[0].take(),
            )
        } else {
            self.install(|| {
                members
                    .par_iter_mut()
                    .zip(owned.par_iter())
                    .zip(parts.par_iter_mut())
                    .map(|((m, o), p)| fold_group(m, o, batch, shift, read_copy, p.take()))
                    .reduce(FoldStats::default, add_stats)
            })
        })
    }
}

impl Backend for Cpu {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError> {
        self.fold_into(state, batch, None)
    }

    fn fold_logged(
        &self,
        state: &mut PaneState,
        batch: &FoldBatch<'_>,
        log: &mut FoldLog,
    ) -> Result<FoldStats, KernelError> {
        self.fold_into(state, batch, Some(log))
    }

    fn replay(&self, state: &mut PaneState, log: &FoldLog) -> Result<FoldStats, KernelError> {
        let nshards = state.spec().shards;
        if !log.complete || log.need.len() != nshards || log.parts.is_empty() {
            return Err(KernelError::Shape(format!(
                "a fold log of {} shards and {} threads ({}) cannot be replayed into a state of {nshards} shards",
                log.need.len(),
                log.parts.len(),
                if log.complete {
                    "complete"
                } else {
                    "incomplete"
                },
            )));
        }
        state.to_host()?;
        state.reserve(&log.need);
        let read_copy = state.keeps_read_copy();
        let (mut members, _) = split(state, log.parts.len());
        let replay = |m: &mut Vec<&mut Vec<LevelState>>, part: &LogPart| {
            let stats = crate::preagg::replay_part(m, part);
            if read_copy {
                refresh_copies(m, log.events);
            }
            stats
        };
        Ok(if members.len() == 1 {
            replay(&mut members[0], &log.parts[0])
        } else {
            self.install(|| {
                members
                    .par_iter_mut()
                    .zip(log.parts.par_iter())
                    .map(|(m, p)| replay(m, p))
                    .reduce(FoldStats::default, add_stats)
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
        out.reset_for(ids.len(), features);
        let nf = features.len();
        if nf == 0 {
            return Ok(());
        }
        let MergeOutput {
            values,
            valid,
            status,
            lists,
            ..
        } = out;
        let plan = ReadPlan::new(features);
        // `lists` is empty when no feature is a list.
        let rows = |ids: &[Option<u32>],
                    v: &mut [f64],
                    ok: &mut [bool],
                    st: &mut [ReadStatus],
                    lists: &mut [Vec<f64>]| {
            let mut accs = vec![(Acc::EMPTY, ReadStatus::Exact); plan.scans.len()];
            for (k, id) in ids.iter().enumerate() {
                if let Some(&next) = ids.get(k + 1) {
                    plan.prefetch(state, next);
                }
                let row = k * nf..(k + 1) * nf;
                let lists = lists.get_mut(row.clone()).unwrap_or_default();
                st[k] = plan.merge_key(
                    state,
                    *id,
                    at,
                    &mut accs,
                    (&mut v[row.clone()], &mut ok[row]),
                    lists,
                );
            }
        };
        if ids.len() < PARALLEL_MERGE_MIN || self.threads() < 2 {
            rows(ids, values, valid, status, lists);
        } else {
            const KEYS: usize = 256;
            let mut list_chunks: Vec<&mut [Vec<f64>]> = lists.chunks_mut(KEYS * nf).collect();
            list_chunks.resize_with(ids.len().div_ceil(KEYS), Default::default);
            self.install(|| {
                ids.par_chunks(KEYS)
                    .zip(values.par_chunks_mut(KEYS * nf))
                    .zip(valid.par_chunks_mut(KEYS * nf))
                    .zip(status.par_chunks_mut(KEYS))
                    .zip(list_chunks.into_par_iter())
                    .for_each(|((((i, v), ok), st), l)| rows(i, v, ok, st, l));
            });
        }
        Ok(())
    }
}

/// One accumulation over a level's ring: the panes of a window (or all, for
/// `lifetime`) for a column (or rows).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Scan {
    level: usize,
    column: Option<usize>,
    panes: Option<u64>,
}

/// How a read accumulates its features: features over the same level, window and
/// column share one accumulation, and all the accumulations of a level are made in
/// one pass over the key's ring, each adding its cells in ring order as a scan of its
/// own would (so values are bitwise the same).
#[derive(Debug)]
struct ReadPlan<'a> {
    features: &'a [FeatureMerge],
    scans: Vec<Scan>,
    /// Index in `scans` of each feature's accumulation.
    scan_of: Vec<usize>,
    /// Each level read, with the indices in `scans` of its accumulations.
    levels: Vec<(usize, Vec<usize>)>,
}

impl<'a> ReadPlan<'a> {
    fn new(features: &'a [FeatureMerge]) -> Self {
        let mut scans: Vec<Scan> = Vec::new();
        let scan_of = features
            .iter()
            .map(|f| {
                let scan = Scan {
                    level: f.level,
                    column: f.column,
                    panes: f.panes,
                };
                scans.iter().position(|s| *s == scan).unwrap_or_else(|| {
                    scans.push(scan);
                    scans.len() - 1
                })
            })
            .collect();
        let mut levels: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, s) in scans.iter().enumerate() {
            match levels.iter_mut().find(|(l, _)| *l == s.level) {
                Some((_, of_level)) => of_level.push(i),
                None => levels.push((s.level, vec![i])),
            }
        }
        ReadPlan {
            features,
            scans,
            scan_of,
            levels,
        }
    }

    /// Starts loading the cells a merge of key `id` will read.
    #[inline]
    fn prefetch(&self, state: &PaneState, id: Option<u32>) {
        if let Some((shard, slot)) = state.known(id) {
            for (l, _) in &self.levels {
                state.shards[shard][*l].prefetch(slot);
            }
        }
    }

    /// Merges the features of key `id` into `values`/`valid` (and the lists of
    /// list-valued features into `lists`, empty when there are none); `accs` is scratch
    /// with one entry per scan.
    fn merge_key(
        &self,
        state: &PaneState,
        id: Option<u32>,
        at: i64,
        accs: &mut [(Acc, ReadStatus)],
        (values, valid): (&mut [f64], &mut [bool]),
        lists: &mut [Vec<f64>],
    ) -> ReadStatus {
        let Some((shard, slot)) = state.known(id) else {
            write_empty(self.features, values, valid);
            return ReadStatus::Exact;
        };
        for (l, of_level) in &self.levels {
            scan_level(
                &state.shards[shard][*l],
                slot,
                &self.scans,
                of_level,
                at,
                accs,
            );
        }
        let mut status = ReadStatus::Exact;
        for (f, fm) in self.features.iter().enumerate() {
            let (acc, st) = &accs[self.scan_of[f]];
            status = status.worst(*st);
            let v = finalize(fm.agg, fm.column, acc, at);
            if fm.agg.is_list() {
                lists[f] = list(fm.agg, acc);
            }
            values[f] = v.unwrap_or(f64::NAN);
            valid[f] = v.is_some();
        }
        status
    }
}

/// Makes the accumulations `of_level` (indices in `scans`) of one level for `slot` as
/// of `at`, into `accs`, in one pass over the ring.
fn scan_level(
    level: &LevelState,
    slot: usize,
    scans: &[Scan],
    of_level: &[usize],
    at: i64,
    accs: &mut [(Acc, ReadStatus)],
) {
    let layout = &level.layout;
    let r = level.spec.ring;
    let p_t = at.div_euclid(level.spec.hop);
    for &i in of_level {
        let mut acc = Acc::EMPTY;
        let mut status = ReadStatus::Exact;
        if scans[i].panes.is_none() {
            if level.base_max_ts(slot) > at {
                status = ReadStatus::NotRetained;
            }
            acc.add_cell(layout, level.base.cell(layout, slot), scans[i].column);
        }
        accs[i] = (acc, status);
    }
    let lo = |s: &Scan| match s.panes {
        Some(n) => p_t.saturating_sub(n as i64 - 1),
        None => EMPTY_PANE + 1,
    };
    let mut head = EMPTY_PANE;
    for pos in 0..r {
        let cell = level.read_cell(slot, pos);
        let tag = int(cell[0]);
        head = head.max(tag);
        if tag > p_t {
            continue;
        }
        let later = tag == p_t && int(cell[2]) > at;
        for &i in of_level {
            if tag >= lo(&scans[i]) {
                let (acc, status) = &mut accs[i];
                acc.add_cell(layout, cell, scans[i].column);
                if later {
                    *status = status.worst(ReadStatus::PaneHoldsLaterEvents);
                }
            }
        }
    }
    for &i in of_level {
        if scans[i].panes.is_some() && head != EMPTY_PANE && lo(&scans[i]) <= head - r as i64 {
            accs[i].1 = accs[i].1.worst(ReadStatus::NotRetained);
        }
    }
}
