//! Batch pre-aggregation: the `Cpu` backend's fold.
//!
//! The per-event fold (`level::fold_into_levels`, the scalar reference) updates one
//! state cell per level for every event: a read-modify-write at a place that depends
//! on the key, in a state far larger than the caches. Here the events of a batch are
//! first added into batch-local cells, one per key and level (a *group*: some MiB for a
//! 64 Ki-event batch, against the state's hundreds); a group's cell goes into the
//! state once, when the key's next event falls in another pane of that level or when
//! the batch ends. The state then takes one
//! scattered update per (key, pane, level) of the batch instead of one per event and
//! level: under the benchmark's Zipf(1.1) keys a 64 Ki-event batch over 100 K keys
//! holds about 26 K distinct keys, so 2.5× fewer.
//!
//! # Exactness
//! A group cell holds consecutive events of one key and pane (in arrival order, since
//! the cell is flushed as soon as an event of another pane arrives), and it is merged
//! into the state with [`merge_after`], which is what adding its events one by one
//! does: rows, times, counts, min, max and `last` are bitwise the scalar reference's
//! (ties of min/max keep the earlier value, as `add` does; ties of `last` take the
//! later event); sums and moments differ by summation order only. The order in which
//! one key's groups reach a level is their arrival order, so a pane recycled, or an
//! event older than the ring, is decided as the per-event fold decides it.
//!
//! # Fold logs
//! A fold can also record its flushes, in order, with their cells: a [`FoldLog`].
//! Replaying the log into another state that was equal to this one before the fold
//! makes the same `fold_cell` calls with the same cells, so the two states come out
//! bitwise equal, at the cost of the flushes alone: the pass over the events, which
//! is most of a fold, runs once. A served view's second replica catches up this way.
//!
//! # Prefetching
//! At the end of a batch the groups are flushed in creation order; the state cells of
//! the group [`LOOKAHEAD`] places ahead are prefetched, so that several cache misses
//! are in flight at once instead of one per flush.

use std::cell::RefCell;

use crate::level::{EMPTY_PANE, Folded, LevelState, ROWS, TAG, add, bits, fold_into_levels};
use crate::state::{FoldBatch, FoldStats};

/// Groups ahead whose state cells a flush prefetches.
const LOOKAHEAD: usize = 8;

/// Events pre-aggregated before the groups are flushed: the groups' cells of a chunk
/// must stay in the caches. Without chunks, batches of 2^20 events over 100 K keys
/// ingested 1.4× slower than with the per-event fold (quick harness): the cells of
/// some 80 K groups no longer fit.
const CHUNK: usize = 64 * 1024;

/// Batches smaller than this are folded event by event, as the scalar reference
/// does: with few events per key the groups only add work (backfill folds a few
/// events per spine time).
pub(crate) const PREAGG_MIN: usize = 256;

/// Levels whose cells are wider than this many f64 words (sketches, long lists) are
/// folded event by event: a batch-local cell must be initialised, merged and (for the
/// fold log) copied whole, while an event touches a few words of its state cell. In
/// the peer sketch case (10 K keys, `quantile` cells of 1 383 words) pre-aggregation
/// spent most of the fold initialising and merging batch-local cells.
pub(crate) const PREAGG_MAX_STRIDE: usize = 64;

/// Whether a fold of `events` events into shards whose levels are `levels` goes
/// through batch-local groups (else event by event, and unlogged).
pub(crate) fn preaggregates(levels: &[LevelState], events: usize) -> bool {
    events >= PREAGG_MIN && levels.iter().all(|l| l.layout.stride <= PREAGG_MAX_STRIDE)
}

/// The open pane of one group at one level: its id, its ring position (computed once
/// per pane, not per flush and prefetch) and its time bounds `[lo, hi)`.
#[derive(Clone, Copy, Debug)]
struct Open {
    pane: i64,
    pos: usize,
    lo: i64,
    hi: i64,
}

impl Open {
    /// No pane yet: every time falls outside.
    const NONE: Open = Open {
        pane: EMPTY_PANE,
        pos: 0,
        lo: i64::MAX,
        hi: i64::MIN,
    };
}

/// Where a group's key lives.
#[derive(Clone, Copy, Debug)]
struct Key {
    id: u32,
    shard: u32,
    slot: u32,
}

/// Reused buffers of one thread's folds.
#[derive(Debug, Default)]
struct Scratch {
    /// Per key id: 1 + its group's index in the current fold, or 0.
    group_of: Vec<u32>,
    /// Per group: the key's id, its shard's index among the thread's shards and its
    /// local slot.
    keys: Vec<Key>,
    /// Per level, per group: the open pane.
    open: Vec<Vec<Open>>,
    /// Per level: the groups' cells, one after another.
    cells: Vec<Vec<f64>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Folds the events of `batch` whose shard this thread owns into the thread's shards.
///
/// `owned[s]` is the index in `shards` of shard `s`, or `usize::MAX` when another
/// thread owns it; `shift` is log₂ of the number of shards.
/// With `log`, the flushes are recorded there (the batch must then have at least
/// [`PREAGG_MIN`] events: smaller ones are folded event by event, without groups).
pub(crate) fn fold_owned(
    shards: &mut [&mut Vec<LevelState>],
    owned: &[usize],
    batch: &FoldBatch<'_>,
    shift: u32,
    mut log: Option<&mut LogPart>,
) -> FoldStats {
    let levels = shards.first().map_or(&[][..], |s| s.as_slice());
    if !preaggregates(levels, batch.len()) {
        debug_assert!(log.is_none(), "folds event by event are not logged");
        return fold_each(shards, owned, batch, shift);
    }
    SCRATCH.with_borrow_mut(|s| {
        let mut stats = FoldStats::default();
        let mut start = 0;
        while start < batch.len() {
            let end = batch.len().min(start + CHUNK);
            stats.add(fold_with(
                s,
                shards,
                owned,
                batch,
                shift,
                start..end,
                log.as_deref_mut(),
            ));
            start = end;
        }
        stats
    })
}

/// The per-event fold of the scalar reference, for the events this thread owns.
fn fold_each(
    shards: &mut [&mut Vec<LevelState>],
    owned: &[usize],
    batch: &FoldBatch<'_>,
    shift: u32,
) -> FoldStats {
    let mask = owned.len() - 1;
    let mut stats = FoldStats::default();
    for e in 0..batch.len() {
        let id = batch.ids[e] as usize;
        let shard = owned[id & mask];
        if shard != usize::MAX {
            fold_into_levels(
                shards[shard],
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

fn fold_with(
    s: &mut Scratch,
    shards: &mut [&mut Vec<LevelState>],
    owned: &[usize],
    batch: &FoldBatch<'_>,
    shift: u32,
    events: std::ops::Range<usize>,
    mut log: Option<&mut LogPart>,
) -> FoldStats {
    let mut stats = FoldStats::default();
    let Some(first) = shards.first() else {
        return stats;
    };
    let nlevels = first.len();
    s.open.resize_with(nlevels, Vec::new);
    s.cells.resize_with(nlevels, Vec::new);
    let mask = owned.len() - 1;
    for e in events {
        let id = batch.ids[e] as usize;
        let shard = owned[id & mask];
        if shard == usize::MAX {
            continue;
        }
        if id >= s.group_of.len() {
            s.group_of.resize((id + 1).next_power_of_two(), 0);
        }
        let g = match s.group_of[id] {
            0 => {
                s.keys.push(Key {
                    id: id as u32,
                    shard: shard as u32,
                    slot: (id >> shift) as u32,
                });
                s.group_of[id] = s.keys.len() as u32;
                for (l, level) in shards[0].iter().enumerate() {
                    s.open[l].push(Open::NONE);
                    s.cells[l].extend_from_slice(&level.layout.identity);
                }
                s.keys.len() - 1
            }
            g => g as usize - 1,
        };
        let ts = batch.ts[e];
        let slot = id >> shift;
        for l in 0..nlevels {
            let level = &mut shards[shard][l];
            let stride = level.layout.stride;
            let cell = &mut s.cells[l][g * stride..(g + 1) * stride];
            let open = &mut s.open[l][g];
            if ts < open.lo || ts >= open.hi {
                if open.pane != EMPTY_PANE {
                    if let Some(log) = log.as_deref_mut() {
                        log.record(shard, l, slot, open, cell);
                    }
                    flush(level, slot, open.pane, open.pos, cell, &mut stats);
                    cell.copy_from_slice(&level.layout.identity);
                }
                let hop = level.spec.hop;
                let pane = ts.div_euclid(hop);
                let lo = pane * hop;
                *open = Open {
                    pane,
                    pos: pane.rem_euclid(level.spec.ring as i64) as usize,
                    lo,
                    hi: lo.saturating_add(hop),
                };
                cell[TAG] = bits(pane);
            }
            add(&shards[shard][l].layout, cell, ts, batch.values, e);
        }
    }
    // The groups still open, in creation order, prefetching ahead.
    let groups = s.keys.len();
    for l in 0..nlevels {
        let stride = shards[0][l].layout.stride;
        for g in 0..groups.min(LOOKAHEAD) {
            prefetch_target(shards, s, l, g);
        }
        for g in 0..groups {
            if g + LOOKAHEAD < groups {
                prefetch_target(shards, s, l, g + LOOKAHEAD);
            }
            let key = s.keys[g];
            let cell = &s.cells[l][g * stride..(g + 1) * stride];
            if let Some(log) = log.as_deref_mut() {
                log.record(
                    key.shard as usize,
                    l,
                    key.slot as usize,
                    &s.open[l][g],
                    cell,
                );
            }
            let open = &s.open[l][g];
            flush(
                &mut shards[key.shard as usize][l],
                key.slot as usize,
                open.pane,
                open.pos,
                cell,
                &mut stats,
            );
        }
    }
    // Reset for the next fold, keeping the allocations.
    for key in &s.keys {
        s.group_of[key.id as usize] = 0;
    }
    s.keys.clear();
    s.open.iter_mut().for_each(Vec::clear);
    s.cells.iter_mut().for_each(Vec::clear);
    stats
}

/// Prefetches the state cell group `g`'s level-`l` cell will be flushed into.
#[inline]
fn prefetch_target(shards: &[&mut Vec<LevelState>], s: &Scratch, l: usize, g: usize) {
    let key = s.keys[g];
    let level = &shards[key.shard as usize][l];
    level.prefetch_cell(key.slot as usize, s.open[l][g].pos);
}

/// The flushes of one thread's part of a fold, in order (see [`FoldLog`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct LogPart {
    flushes: Vec<Flush>,
    /// The flushed cells, one after another (each as long as its level's stride).
    cells: Vec<f64>,
}

/// One flush: group cell of pane `pane` (ring position `pos`) into key `slot` of level
/// `level` of the thread's shard `shard`.
#[derive(Clone, Copy, Debug)]
struct Flush {
    shard: u32,
    level: u32,
    slot: u32,
    pos: u32,
    pane: i64,
}

impl LogPart {
    #[inline]
    fn record(&mut self, shard: usize, level: usize, slot: usize, open: &Open, cell: &[f64]) {
        self.flushes.push(Flush {
            shard: shard as u32,
            level: level as u32,
            slot: slot as u32,
            pos: open.pos as u32,
            pane: open.pane,
        });
        self.cells.extend_from_slice(cell);
    }

    fn clear(&mut self) {
        self.flushes.clear();
        self.cells.clear();
    }

    fn bytes(&self) -> usize {
        self.flushes.capacity() * std::mem::size_of::<Flush>() + self.cells.capacity() * 8
    }
}

/// Makes the flushes of `part` into `shards` (the same shards, in the same order, as
/// the fold that recorded them), prefetching ahead as the fold's final flush does.
pub(crate) fn replay_part(shards: &mut [&mut Vec<LevelState>], part: &LogPart) -> FoldStats {
    let mut stats = FoldStats::default();
    let mut ahead = part.flushes.iter();
    for f in ahead.by_ref().take(LOOKAHEAD) {
        shards[f.shard as usize][f.level as usize].prefetch_cell(f.slot as usize, f.pos as usize);
    }
    let mut at = 0;
    for f in &part.flushes {
        if let Some(n) = ahead.next() {
            shards[n.shard as usize][n.level as usize]
                .prefetch_cell(n.slot as usize, n.pos as usize);
        }
        let level = &mut shards[f.shard as usize][f.level as usize];
        let stride = level.layout.stride;
        let cell = &part.cells[at..at + stride];
        flush(
            level,
            f.slot as usize,
            f.pane,
            f.pos as usize,
            cell,
            &mut stats,
        );
        at += stride;
    }
    stats
}

/// What a `Cpu` fold did to a state, for another state equal to it before the fold
/// (see the module docs): the slots it reserved, and per thread its flushes in order.
/// Filled by [`crate::Backend::fold_logged`], applied by [`crate::Backend::replay`].
#[derive(Clone, Debug, Default)]
pub struct FoldLog {
    pub(crate) complete: bool,
    /// The events of the batch (the read copies' budget depends on it).
    pub(crate) events: usize,
    /// Per shard: the slots the fold reserved (0: none).
    pub(crate) need: Vec<usize>,
    /// Per thread of the fold, in the fold's order of threads.
    pub(crate) parts: Vec<LogPart>,
}

impl FoldLog {
    /// An empty log.
    pub fn new() -> Self {
        FoldLog::default()
    }

    /// Whether the log holds a whole fold. A backend that does not log, or a batch too
    /// small to be worth it, leaves it incomplete: the batch must be folded instead.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Empties the log, keeping its buffers.
    pub fn clear(&mut self) {
        self.complete = false;
        self.events = 0;
        self.need.clear();
        self.parts.iter_mut().for_each(LogPart::clear);
    }

    /// Bytes the log's buffers hold.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(LogPart::bytes).sum::<usize>() + self.need.capacity() * 8
    }
}

/// Folds group cell `cell` of pane `pane` (at ring position `pos`) into key `slot` of
/// `level`, counting its rows.
#[inline]
fn flush(
    level: &mut LevelState,
    slot: usize,
    pane: i64,
    pos: usize,
    cell: &[f64],
    stats: &mut FoldStats,
) {
    let rows = cell[ROWS] as u64;
    match level.fold_cell(slot, pane, pos, cell) {
        Folded::Ring => stats.folded += rows,
        Folded::Base => stats.into_base += rows,
        Folded::Expired => stats.expired += rows,
    }
}
