//! Pane state of one hop level: a ring of R cells per key, each cell the
//! partial-aggregate fields of one pane, side by side.
//!
//! About 760 lines outside tests, kept in one file: the cell layout, the per-event
//! fold, the accumulation of cells at read time and the key-major read copy all
//! depend on the private `Layout` and on invariants its unit tests check together.
//! The CPU fold redesign replaces this layout; it is split then, along its new lines.
//!
//! ```text
//!  ring buffer (one Vec<f64>), position-major: cell (slot, pos) at pos * slots + slot
//!  ┌──────────────────────────────────┬──────────────────────────────────┬─────
//!  │ pos 0: slot 0 │ slot 1 │ … │ S−1 │ pos 1: slot 0 │ slot 1 │ … │ S−1 │ …
//!  └──────────────────────────────────┴──────────────────────────────────┴─────
//!  cell: [tag, rows, max_ts | count, sum, K, Σ(x−K), Σ(x−K)², min, max, last, last_ts,
//!         pane id               first, first_ts, decay_ts, Σw, Σxw | …]
//!                             └──────── one group per value column ─────────┘
//!  base buffer: one cell per slot, the panes recycled out of the ring (`lifetime` only)
//! ```
//!
//! Pane `p` of a key lives at ring position `p mod R`. A cell is recycled when an
//! event of a newer pane maps to it; with `lifetime` features the recycled cell is
//! first merged into the slot's base cell, so the lifetime total stays exact while the
//! ring stays small. Integer fields (pane tag, times) are stored as the bits of an f64
//! word so that a cell is one plain `[f64]` slice, a layout a GPU storage buffer can
//! hold as is.
//!
//! # Design decisions, measured
//! The fold is a scatter: each event updates one cell per level of its key, at a
//! place that depends on the key. Two layouts were tried before this one, with the
//! kernel benchmark (`cargo bench --bench kernels -- fold`, 64 K events over 100 K
//! Zipf keys, three levels, every field):
//! - one buffer per field (structure of arrays, `slot * R + pos`): an event touched
//!   about 12 cache lines per level; 168 ns per event (scalar);
//! - cells side by side, key-major (`slot * R + pos`): one or two cache lines per level,
//!   but the cells being written (the newest pane of each key) lay a ring apart, so
//!   nearly every event missed the TLB; 86 ns;
//! - cells side by side, position-major (this layout): the newest panes of all keys
//!   are packed together; 54 ns.
//!
//! A read of one key then walks its R cells a position's block apart: one cache line
//! and one page each. So the `Cpu` backend also keeps a key-major `ReadCopy` of the
//! cells that stopped changing (the panes no longer open), and a read streams one run
//! of memory per level from it, taking only the open panes' cells from the ring.

use crate::agg::ColumnFields;
use crate::error::KernelError;
use crate::{hll, lastn, quantile, topk};

/// Tag of a ring cell that has never been written.
pub const EMPTY_PANE: i64 = i64::MIN;

/// What one hop level stores: its hop, its ring length and the fields of each value column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LevelSpec {
    /// Pane width in milliseconds (> 0).
    pub hop: i64,
    /// Panes kept per key (≥ 1): the longest window of the level in panes, or more to
    /// make room for late events.
    pub ring: usize,
    /// Fields stored for each value column of the view, indexed like the batch's values.
    pub columns: Vec<ColumnFields>,
    /// Whether recycled panes fold into a per-key base cell (needed by `lifetime` features).
    pub lifetime: bool,
}

impl LevelSpec {
    /// Checks the spec's invariants.
    ///
    /// # Errors
    /// [`KernelError::InvalidSpec`] for a non-positive hop or an empty ring.
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.hop <= 0 {
            return Err(KernelError::InvalidSpec(format!(
                "hop must be positive, got {}",
                self.hop
            )));
        }
        if self.ring == 0 {
            return Err(KernelError::InvalidSpec(
                "ring must hold at least one pane".into(),
            ));
        }
        if let Some(h) = self
            .columns
            .iter()
            .find_map(|c| c.decay.filter(|&h| h <= 0))
        {
            return Err(KernelError::InvalidSpec(format!(
                "half-life must be positive, got {h}"
            )));
        }
        if let Some(p) = self
            .columns
            .iter()
            .find_map(|c| c.hll.filter(|p| !crate::hll::PRECISIONS.contains(p)))
        {
            return Err(KernelError::InvalidSpec(format!(
                "HyperLogLog precision must be in {:?}, got {p}",
                crate::hll::PRECISIONS
            )));
        }
        let (lo, hi) = crate::quantile::ACCURACY;
        if let Some(a) = self
            .columns
            .iter()
            .find_map(|c| c.quantile.filter(|a| !(lo..=hi).contains(&a.get())))
        {
            return Err(KernelError::InvalidSpec(format!(
                "relative accuracy must be in [{lo}, {hi}], got {a:?}"
            )));
        }
        Ok(())
    }

    /// Bytes of state per key in this level once every ring position holds a buffer
    /// (the state allocates a position when a fold first writes it).
    pub fn bytes_per_slot(&self) -> usize {
        let cell = 8 * Layout::new(&self.columns).stride;
        cell * self.ring + if self.lifetime { cell } else { 0 }
    }
}

pub(crate) const TAG: usize = 0;
pub(crate) const ROWS: usize = 1;
const MAX_TS: usize = 2;

/// Word offsets of one value column's fields inside a cell (`usize::MAX` = absent).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ColLayout {
    pub count: usize,
    pub sum: usize,
    /// Shift `K`, then `Σ(x−K)`, then `Σ(x−K)²`.
    pub moments: usize,
    pub min: usize,
    pub max: usize,
    /// Last value, then its time.
    pub last: usize,
    /// First value, then its time.
    pub first: usize,
    /// Decayed sums: reference time `r` (the latest time added), `Σ 2^(−(r − ts)/h)`
    /// and `Σ x · 2^(−(r − ts)/h)`.
    pub decay: usize,
    /// The half-life `h` of the decayed sums, ms (0 without them).
    pub half_life: f64,
    /// The sketch and list groups, by [`Sketch::slot`] (`None`: absent).
    pub sketches: [Option<Group>; 4],
}

pub(crate) const ABSENT: usize = usize::MAX;

/// Slots of the sketch and list groups (see [`Sketch::slot`]).
const HLL: usize = 0;
const QUANTILE: usize = 1;
const LAST_N: usize = 2;
const TOP_K: usize = 3;

/// A sketch or list group of a column's cells: which one, with its parameter. Each
/// lives in a module of its own, which this dispatches to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Sketch {
    /// `approx_distinct`: a HyperLogLog sketch (`crate::hll`) of this precision.
    Hll(u8),
    /// `quantile`: a DDSketch (`crate::quantile`) of this relative accuracy.
    Quantile(f64),
    /// `last_n`: the newest values (`crate::lastn`), this many.
    LastN(u16),
    /// `top_k`: a frequent-values summary (`crate::topk`) of this capacity.
    TopK(u16),
}

impl Sketch {
    /// The groups `f` asks for, each at its [`Sketch::slot`]: the order of the groups
    /// in a cell.
    fn of(f: &ColumnFields) -> [Option<Sketch>; 4] {
        [
            f.hll.map(Sketch::Hll),
            f.quantile.map(|a| Sketch::Quantile(a.get())),
            f.last_n.map(Sketch::LastN),
            f.top_k.map(Sketch::TopK),
        ]
    }

    /// Where a group of this kind sits in [`ColLayout::sketches`] and [`Acc::sketches`].
    const fn slot(self) -> usize {
        match self {
            Sketch::Hll(_) => HLL,
            Sketch::Quantile(_) => QUANTILE,
            Sketch::LastN(_) => LAST_N,
            Sketch::TopK(_) => TOP_K,
        }
    }

    fn words(self) -> usize {
        match self {
            Sketch::Hll(p) => hll::words(p),
            Sketch::Quantile(a) => quantile::words(a),
            Sketch::LastN(n) => lastn::words(n),
            Sketch::TopK(c) => topk::words(c),
        }
    }

    /// Adds value `x` of time `ts` to group `g`.
    #[inline]
    fn add(self, g: &mut [f64], ts: i64, x: f64) {
        match self {
            Sketch::Hll(p) => hll::add(g, x, p),
            Sketch::Quantile(a) => quantile::add(g, x, a),
            Sketch::LastN(n) => lastn::add(g, ts, x, n),
            Sketch::TopK(c) => topk::add(g, x, c),
        }
    }

    /// Merges group `src` into `dst`.
    #[inline]
    fn merge(self, dst: &mut [f64], src: &[f64]) {
        match self {
            Sketch::Hll(p) => hll::merge(dst, src, p),
            Sketch::Quantile(a) => quantile::merge(dst, src, a),
            Sketch::LastN(n) => lastn::merge(dst, src, n),
            Sketch::TopK(c) => topk::merge(dst, src, c),
        }
    }

    /// Whether group `g`, read from a file, can be read without going out of its words.
    fn is_valid(self, g: &[f64]) -> bool {
        match self {
            Sketch::Hll(p) => hll::is_valid(g, p),
            Sketch::Quantile(a) => quantile::is_valid(g, a),
            Sketch::LastN(n) => lastn::is_valid(g, n),
            Sketch::TopK(c) => topk::is_valid(g, c),
        }
    }
}

/// A sketch or list group of a cell: its kind and its words.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Group {
    pub sketch: Sketch,
    pub at: usize,
    pub words: usize,
}

impl Group {
    #[inline]
    fn range(&self) -> std::ops::Range<usize> {
        self.at..self.at + self.words
    }
}

/// Where each field lives in a cell, and the identity cell.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    pub stride: usize,
    pub cols: Vec<ColLayout>,
    pub identity: Vec<f64>,
}

#[inline(always)]
pub(crate) fn bits(x: i64) -> f64 {
    f64::from_bits(x as u64)
}

#[inline(always)]
pub(crate) fn int(x: f64) -> i64 {
    x.to_bits() as i64
}

impl Layout {
    pub(crate) fn new(columns: &[ColumnFields]) -> Layout {
        let mut identity = vec![bits(EMPTY_PANE), 0.0, bits(EMPTY_PANE)];
        let mut cols = Vec::with_capacity(columns.len());
        for f in columns {
            let mut c = ColLayout {
                count: ABSENT,
                sum: ABSENT,
                moments: ABSENT,
                min: ABSENT,
                max: ABSENT,
                last: ABSENT,
                first: ABSENT,
                decay: ABSENT,
                half_life: f.decay.unwrap_or(0) as f64,
                sketches: [None; 4],
            };
            let mut field = |on: bool, init: &[f64]| {
                if !on {
                    return ABSENT;
                }
                let at = identity.len();
                identity.extend_from_slice(init);
                at
            };
            if f.count || !f.is_empty() {
                c.count = field(true, &[0.0]);
                c.sum = field(f.sum, &[0.0]);
                c.moments = field(f.moments, &[0.0, 0.0, 0.0]);
                c.min = field(f.min, &[f64::INFINITY]);
                c.max = field(f.max, &[f64::NEG_INFINITY]);
                c.last = field(f.last, &[f64::NAN, bits(EMPTY_PANE)]);
                c.first = field(f.first, &[f64::NAN, bits(i64::MAX)]);
                c.decay = field(f.decay.is_some(), &DECAY_IDENTITY);
                for sketch in Sketch::of(f).into_iter().flatten() {
                    let words = sketch.words();
                    let at = field(true, &vec![0.0; words]);
                    c.sketches[sketch.slot()] = Some(Group { sketch, at, words });
                }
            }
            cols.push(c);
        }
        Layout {
            stride: identity.len(),
            cols,
            identity,
        }
    }
}

impl Layout {
    /// Whether the sketches of every cell of `words` (whole cells) have headers that
    /// can be read without going out of their words.
    pub(crate) fn sketches_valid(&self, words: &[f64]) -> bool {
        let groups: Vec<Group> = self
            .cols
            .iter()
            .flat_map(|c| c.sketches.iter().flatten().copied())
            .collect();
        groups.is_empty()
            || words
                .chunks_exact(self.stride)
                .all(|cell| groups.iter().all(|g| g.sketch.is_valid(&cell[g.range()])))
    }
}

/// Whether `h`, a group's header read from a file, is a count of at most `max`.
pub(crate) fn count_within(h: f64, max: usize) -> bool {
    h >= 0.0 && h.fract() == 0.0 && h as usize <= max
}

/// A set of cells, each one partial aggregate over some events, in one flat buffer.
#[derive(Clone, Debug)]
pub(crate) struct Cells {
    pub data: Vec<f64>,
}

impl Cells {
    #[inline(always)]
    pub(crate) fn cell(&self, layout: &Layout, i: usize) -> &[f64] {
        &self.data[i * layout.stride..(i + 1) * layout.stride]
    }

    #[inline(always)]
    fn cell_mut(&mut self, layout: &Layout, i: usize) -> &mut [f64] {
        &mut self.data[i * layout.stride..(i + 1) * layout.stride]
    }

    /// Grows (never shrinks) to `cells` cells, the new ones identity cells. The fill
    /// doubles a copied run instead of copying one cell at a time.
    fn resize(&mut self, layout: &Layout, cells: usize) {
        let old = self.data.len();
        let new = cells * layout.stride;
        if new <= old {
            return;
        }
        self.data.reserve_exact(new - old);
        self.data.extend_from_slice(&layout.identity);
        while self.data.len() < new {
            let run = (self.data.len() - old).min(new - self.data.len());
            self.data.extend_from_within(old..old + run);
        }
    }
}

/// The address of a ring cell: its ring position and key slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct At {
    pub pos: usize,
    pub slot: usize,
}

/// A level's ring cells: one buffer per ring position, each holding that position's
/// cell of every key slot (position-major, see [`LevelState::index`]). One buffer per
/// position, not one for all, so that more slots grow each buffer in place: one flat
/// position-major buffer had to move every position's block on each growth (16 % of
/// the ingest benchmark's time with 1 M events over 100 K new keys).
///
/// A position's buffer is allocated when a fold first writes it; until then each of
/// its cells reads as the identity cell (an empty pane). Pane `p` lives at position
/// `p mod R` for every key, and the keys of a stream share its time, so the positions
/// in use are those of the panes the stream has reached: memory follows the panes in
/// use, not the ring's length. A 1 M-event run of the ingest benchmark (100 s of event
/// time against rings of up to a day) touches 4 of the 44 positions of its three
/// levels.
#[derive(Clone, Debug)]
pub(crate) struct Ring {
    pub positions: Vec<Cells>,
}

impl Ring {
    fn new(ring: usize) -> Ring {
        Ring {
            positions: (0..ring).map(|_| Cells { data: Vec::new() }).collect(),
        }
    }

    /// Whether position `pos` holds a buffer (was written).
    #[inline(always)]
    pub(crate) fn allocated(&self, pos: usize) -> bool {
        !self.positions[pos].data.is_empty()
    }

    /// Positions holding a buffer.
    pub(crate) fn allocated_count(&self) -> usize {
        (0..self.positions.len())
            .filter(|&p| self.allocated(p))
            .count()
    }

    /// The cell at `at`: the identity cell while its position holds no buffer.
    #[inline(always)]
    pub(crate) fn cell<'a>(&'a self, layout: &'a Layout, at: At) -> &'a [f64] {
        if self.allocated(at.pos) {
            self.positions[at.pos].cell(layout, at.slot)
        } else {
            &layout.identity
        }
    }

    /// The cell at `at` for writing, allocating its position's buffer (of `slots`
    /// identity cells) first when it has none. The caller guarantees `at.slot < slots`.
    #[inline(always)]
    pub(crate) fn cell_mut(&mut self, layout: &Layout, slots: usize, at: At) -> &mut [f64] {
        if !self.allocated(at.pos) {
            self.positions[at.pos].resize(layout, slots);
        }
        self.positions[at.pos].cell_mut(layout, at.slot)
    }

    /// Grows every allocated position to `slots` cells.
    fn resize(&mut self, layout: &Layout, slots: usize) {
        for cells in self.positions.iter_mut().filter(|c| !c.data.is_empty()) {
            cells.resize(layout, slots);
        }
    }

    /// Words in all positions.
    fn words(&self) -> usize {
        self.positions.iter().map(|c| c.data.len()).sum()
    }

    /// Every position's `slots` cells, position after position (identity cells for a
    /// position without a buffer): the flat position-major layout of checkpoints.
    pub(crate) fn flat(&self, layout: &Layout, slots: usize) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.positions.len() * slots * layout.stride);
        for c in &self.positions {
            if c.data.is_empty() {
                for _ in 0..slots {
                    out.extend_from_slice(&layout.identity);
                }
            } else {
                out.extend_from_slice(&c.data);
            }
        }
        out
    }

    /// The inverse of [`Ring::flat`] for `slots` slots of `stride` words. A position
    /// whose every cell holds no pane is left without a buffer: such cells are reset
    /// before a fold writes them and skipped by every read, so this is exact.
    pub(crate) fn from_flat(mut flat: Vec<f64>, ring: usize, slots: usize, stride: usize) -> Ring {
        let per = slots * stride;
        let mut positions = Vec::with_capacity(ring);
        for pos in (0..ring).rev() {
            let data = flat.split_off(pos * per);
            let empty = data.chunks_exact(stride).all(holds_no_pane);
            positions.push(Cells {
                data: if empty { Vec::new() } else { data },
            });
        }
        positions.reverse();
        Ring { positions }
    }
}

/// Whether ring cell `cell` holds no pane (was never written). Such a cell is reset
/// before a fold writes it and skipped by every read, so it may as well be the
/// identity cell of a position without a buffer.
#[inline(always)]
pub(crate) fn holds_no_pane(cell: &[f64]) -> bool {
    int(cell[TAG]) == EMPTY_PANE
}

/// A prefetch hint for the cache line holding `x`.
#[inline(always)]
fn prefetch(x: &f64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing into the program and cannot
    // fault, and `x` is a valid reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const f64).cast(),
        );
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// `a < b` in the order of `min`: IEEE 754-2019 `minimum`, where −0.0 is below +0.0,
/// so that a minimum over any grouping of the same values has the same bits (NaN
/// never reaches it: value aggregations skip NaN). The shaders' `below` is the same.
#[inline(always)]
pub(crate) fn below(a: f64, b: f64) -> bool {
    a < b || (a == b && (a.to_bits() as i64) < (b.to_bits() as i64))
}

/// `a > b` in the order of `max` (IEEE 754-2019 `maximum`: +0.0 is above −0.0).
#[inline(always)]
pub(crate) fn above(a: f64, b: f64) -> bool {
    a > b || (a == b && (a.to_bits() as i64) > (b.to_bits() as i64))
}

/// The decay group of a cell that holds no value: no reference time, zero sums.
pub(crate) const DECAY_IDENTITY: [f64; 3] = [f64::from_bits(EMPTY_PANE as u64), 0.0, 0.0];

/// `2^(−delta / half_life)`: the weight of a value `delta` ms older than the reference.
/// The shaders' `decay_weight` computes the same (to within an ulp or two).
#[inline]
pub(crate) fn decay_weight(delta: i64, half_life: f64) -> f64 {
    (-(delta as f64) / half_life).exp2()
}

/// Merges the decayed sums `(r, w, xw)` (reference time, `Σ weights`, `Σ x · weight`)
/// into the decay group `g`: both are rescaled to the later reference, so that every
/// weight stays at most 1 and nothing overflows. Adding one value `x` at time `t` is
/// merging `(t, 1, x)`.
#[inline]
pub(crate) fn decay_merge(g: &mut [f64], r: i64, w: f64, xw: f64, half_life: f64) {
    if r == EMPTY_PANE {
        return;
    }
    let gr = int(g[0]);
    if gr == EMPTY_PANE {
        g[..3].copy_from_slice(&[bits(r), w, xw]);
    } else if r > gr {
        let s = decay_weight(r - gr, half_life);
        g[0] = bits(r);
        g[1] = g[1] * s + w;
        g[2] = g[2] * s + xw;
    } else {
        let s = decay_weight(gr - r, half_life);
        g[1] += w * s;
        g[2] += xw * s;
    }
}

/// Adds event `e` of the batch to `cell`.
#[inline(always)]
pub(crate) fn add(layout: &Layout, cell: &mut [f64], ts: i64, values: &[&[f64]], e: usize) {
    cell[ROWS] += 1.0;
    if ts > int(cell[MAX_TS]) {
        cell[MAX_TS] = bits(ts);
    }
    for (c, col) in layout.cols.iter().enumerate() {
        if col.count == ABSENT {
            continue;
        }
        let x = values[c][e];
        if x.is_nan() {
            continue;
        }
        if col.moments != ABSENT {
            // Moments shifted by the cell's first value: additive updates, and no
            // cancellation as long as the cell's values are near one another.
            let m = col.moments;
            if cell[col.count] == 0.0 {
                cell[m] = if x.is_finite() { x } else { 0.0 };
            }
            let d = x - cell[m];
            cell[m + 1] += d;
            cell[m + 2] += d * d;
        }
        cell[col.count] += 1.0;
        if col.sum != ABSENT {
            cell[col.sum] += x;
        }
        // Branches, not f64::min/max: a running extreme rarely changes, so the branch
        // predicts well, and min/max carry NaN handling (kernel bench: 20 % slower).
        if col.min != ABSENT && below(x, cell[col.min]) {
            cell[col.min] = x;
        }
        if col.max != ABSENT && above(x, cell[col.max]) {
            cell[col.max] = x;
        }
        if col.last != ABSENT && ts >= int(cell[col.last + 1]) {
            cell[col.last] = x;
            cell[col.last + 1] = bits(ts);
        }
        if col.first != ABSENT && ts < int(cell[col.first + 1]) {
            cell[col.first] = x;
            cell[col.first + 1] = bits(ts);
        }
        if col.decay != ABSENT {
            decay_merge(&mut cell[col.decay..], ts, 1.0, x, col.half_life);
        }
        for g in col.sketches.iter().flatten() {
            g.sketch.add(&mut cell[g.range()], ts, x);
        }
    }
}

/// Merges cell `src` into cell `dst` (same layout): a recycled ring cell into its
/// key's base cell. Moments are always stored centred (the shaders' `merge_into` does
/// the same).
#[inline]
fn merge_into(layout: &Layout, dst: &mut [f64], src: &[f64]) {
    merge_cells::<false>(layout, dst, src);
}

/// Merges cell `src` into cell `dst` (same layout) when every event of `src` arrived
/// after every event of `dst`: the result is what adding `src`'s events to `dst` one by
/// one with [`add`] gives, bitwise for rows, times, counts, min, max and last (ties of
/// `last` take the later event), and up to summation order for sums and moments. Into
/// an empty `dst` the moments are copied as they are, shift included, as `add` would
/// have made them. The pre-aggregating fold (`crate::preagg`) flushes its batch-local
/// cells with it.
#[inline]
pub(crate) fn merge_after(layout: &Layout, dst: &mut [f64], src: &[f64]) {
    merge_cells::<true>(layout, dst, src);
}

/// The merge of [`merge_into`] and [`merge_after`]; `KEEP_SHIFT` says whether moments
/// merged into an empty cell keep `src`'s shift or are stored centred.
#[inline(always)]
fn merge_cells<const KEEP_SHIFT: bool>(layout: &Layout, dst: &mut [f64], src: &[f64]) {
    dst[ROWS] += src[ROWS];
    dst[MAX_TS] = bits(int(dst[MAX_TS]).max(int(src[MAX_TS])));
    for col in &layout.cols {
        if col.count == ABSENT || src[col.count] == 0.0 {
            continue;
        }
        if col.moments != ABSENT {
            let m = col.moments;
            if KEEP_SHIFT && dst[col.count] == 0.0 {
                dst[m..m + 3].copy_from_slice(&src[m..m + 3]);
            } else {
                let mut acc = Moments::of_cell(col, dst);
                acc.merge(Moments::of_cell(col, src));
                // Stored centred: K = mean, Σ(x−K) = 0, Σ(x−K)² = M2.
                dst[m] = acc.mean;
                dst[m + 1] = 0.0;
                dst[m + 2] = acc.m2;
            }
        }
        dst[col.count] += src[col.count];
        if col.sum != ABSENT {
            dst[col.sum] += src[col.sum];
        }
        if col.min != ABSENT && below(src[col.min], dst[col.min]) {
            dst[col.min] = src[col.min];
        }
        if col.max != ABSENT && above(src[col.max], dst[col.max]) {
            dst[col.max] = src[col.max];
        }
        if col.last != ABSENT && int(src[col.last + 1]) >= int(dst[col.last + 1]) {
            dst[col.last] = src[col.last];
            dst[col.last + 1] = src[col.last + 1];
        }
        // Strictly earlier: on a tie the event that arrived first (in `dst`) stays.
        if col.first != ABSENT && int(src[col.first + 1]) < int(dst[col.first + 1]) {
            dst[col.first] = src[col.first];
            dst[col.first + 1] = src[col.first + 1];
        }
        if col.decay != ABSENT {
            let d = col.decay;
            decay_merge(
                &mut dst[d..],
                int(src[d]),
                src[d + 1],
                src[d + 2],
                col.half_life,
            );
        }
        for g in col.sketches.iter().flatten() {
            g.sketch.merge(&mut dst[g.range()], &src[g.range()]);
        }
    }
}

/// Where an event went when it was folded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Folded {
    /// Into its pane's ring cell.
    Ring,
    /// Its pane is older than every pane the ring holds for the key; it went into the
    /// lifetime base cell only.
    Base,
    /// Its pane is older than every pane the ring holds and the level has no lifetime
    /// features: it is outside every window still answerable.
    Expired,
}

/// State of one hop level for one shard of keys.
#[derive(Clone, Debug)]
pub struct LevelState {
    pub(crate) spec: LevelSpec,
    pub(crate) layout: Layout,
    pub(crate) slots: usize,
    /// `ring` positions of `slots` cells.
    pub(crate) ring: Ring,
    /// `slots` cells (empty unless `spec.lifetime`).
    pub(crate) base: Cells,
    /// Key-major copy of the ring, for reads.
    pub(crate) copy: ReadCopy,
}

/// A key-major copy of a level's ring cells, kept for reads.
///
/// The ring is position-major for the fold's sake, so a read of one key touches a
/// different page for each of its ring cells. The copy holds the same cells key-major
/// (cell `(slot, pos)` at `slot * width + column[pos]`, over the `width` ring positions
/// that hold a buffer): a key's cells of a level are one run of memory, which a read
/// streams and prefetches (see the `cpu` module docs for the measurements).
///
/// It is a cache with an exact validity rule: per ring position, the copy holds the
/// ring's cells of the slots below `copied[pos]`. A fold that writes cell `(slot, pos)`
/// lowers `copied[pos]` to `slot` and marks the position dirty; the `Cpu` backend's
/// fold extends the copy again, within a budget, for positions that took no write
/// since its previous fold. Cells of open panes, which every fold writes, so stay in
/// the ring alone. A read takes each cell from the copy where it is valid, from the ring
/// otherwise: the same bytes in the same order, so the values are bitwise the same.
///
/// When the ring allocates a position the copy does not cover, the next refresh lays
/// the copy out again over the allocated positions and starts it empty. That happens
/// at most once per ring position, while a stream first fills its rings; the copy so
/// stays as large as the ring's allocated part, not its full length.
#[derive(Clone, Debug)]
pub(crate) struct ReadCopy {
    /// `slots * width` cells once a refresh allocated them, key-major.
    cells: Vec<f64>,
    /// Positions covered.
    width: usize,
    /// Per ring position: its place among the covered positions (`usize::MAX`: not
    /// covered; then `copied[pos]` is 0).
    column: Vec<usize>,
    /// Per ring position: the copy is valid for slots below this.
    copied: Vec<usize>,
    /// Per ring position: written since the last refresh.
    dirty: Vec<bool>,
}

impl ReadCopy {
    fn new(ring: usize) -> Self {
        ReadCopy {
            cells: Vec::new(),
            width: 0,
            column: vec![usize::MAX; ring],
            copied: vec![0; ring],
            dirty: vec![false; ring],
        }
    }

    /// Grows the cells to `len` words. The new part is zeroed memory fresh from the
    /// allocator, which the OS maps lazily: its pages are touched, one by one, by
    /// the refreshes that fill them, not all at once inside one fold. (Asking for
    /// huge pages made reads some 15 % faster in the kernel bench, but faulting them in
    /// can stall on memory compaction, and did stall other threads for tens of ms in
    /// the serving benchmark.)
    fn grow(&mut self, len: usize) {
        let mut cells = vec![0.0; len];
        cells[..self.cells.len()].copy_from_slice(&self.cells);
        self.cells = cells;
    }

    /// Lays the copy out again, empty, over the positions of `ring` that hold a buffer.
    fn cover(&mut self, ring: &Ring) {
        self.cells = Vec::new();
        self.width = 0;
        for (pos, column) in self.column.iter_mut().enumerate() {
            *column = if ring.allocated(pos) {
                self.width += 1;
                self.width - 1
            } else {
                usize::MAX
            };
        }
        self.copied.fill(0);
    }

    /// Records a write of cell `(slot, pos)` of the ring.
    #[inline(always)]
    fn invalidate(&mut self, slot: usize, pos: usize) {
        let copied = &mut self.copied[pos];
        if *copied > slot {
            *copied = slot;
        }
        self.dirty[pos] = true;
    }
}

impl LevelState {
    /// An empty state for `spec`.
    ///
    /// # Errors
    /// [`KernelError::InvalidSpec`] when the spec is invalid.
    pub fn new(spec: LevelSpec) -> Result<Self, KernelError> {
        spec.validate()?;
        Ok(LevelState {
            layout: Layout::new(&spec.columns),
            ring: Ring::new(spec.ring),
            base: Cells { data: Vec::new() },
            copy: ReadCopy::new(spec.ring),
            slots: 0,
            spec,
        })
    }

    /// The level's spec.
    pub fn spec(&self) -> &LevelSpec {
        &self.spec
    }

    /// Number of key slots allocated.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Grows the state to hold at least `slots` keys (amortised: +50 %).
    pub fn reserve_slots(&mut self, slots: usize) {
        if slots <= self.slots {
            return;
        }
        let new = slots.max(self.slots + self.slots / 2).max(16);
        self.ring.resize(&self.layout, new);
        if self.spec.lifetime {
            self.base.resize(&self.layout, new);
        }
        self.slots = new;
    }

    /// Index of the ring cell of key `slot` at ring position `pos`.
    ///
    /// Position-major (`pos * slots + slot`), not key-major: at any moment most events
    /// fall in the newest pane of their key, so the cells being written are those of
    /// one or two positions, packed together for every key. Key-major placed them a
    /// ring's length apart, and the fold spent its time in TLB misses (measured with
    /// the ingest benchmark; see the README).
    #[inline(always)]
    pub(crate) fn index(&self, slot: usize, pos: usize) -> At {
        At { pos, slot }
    }

    /// Index of the read copy's cell of key `slot` at ring position `pos`: key-major,
    /// the transpose of [`LevelState::index`] over the positions the copy covers. The
    /// caller guarantees that it covers `pos`.
    #[inline(always)]
    fn copy_index(&self, slot: usize, pos: usize) -> usize {
        slot * self.copy.width + self.copy.column[pos]
    }

    /// Frees the buffers (the state moved to a device).
    #[cfg(feature = "gpu")]
    pub(crate) fn release(&mut self) {
        self.ring = Ring::new(self.spec.ring);
        self.base.data = Vec::new();
        self.drop_copy();
        self.slots = 0;
    }

    /// Frees the read copy.
    pub(crate) fn drop_copy(&mut self) {
        self.copy = ReadCopy::new(self.spec.ring);
    }

    /// Bytes held by the buffers, the read copy included.
    pub fn memory_bytes(&self) -> usize {
        self.cell_bytes() + 8 * self.copy.cells.len()
    }

    /// Bytes of the ring and base cells: the state proper, without the read copy.
    pub fn cell_bytes(&self) -> usize {
        8 * (self.ring.words() + self.base.data.len())
    }

    /// The cell of key `slot` at ring position `pos`, from the read copy when it holds
    /// it, else from the ring (the same bytes).
    #[inline(always)]
    pub(crate) fn read_cell(&self, slot: usize, pos: usize) -> &[f64] {
        let stride = self.layout.stride;
        if slot < self.copy.copied[pos] {
            let i = self.copy_index(slot, pos) * stride;
            &self.copy.cells[i..i + stride]
        } else {
            self.ring.cell(&self.layout, self.index(slot, pos))
        }
    }

    /// Asks the CPU to start loading the cells a read of key `slot` will take: its run
    /// in the read copy and the ring cells the copy lacks. A hint only; no-op on
    /// targets without a prefetch instruction.
    #[inline]
    pub(crate) fn prefetch(&self, slot: usize) {
        let stride = self.layout.stride;
        let ring = self.spec.ring;
        if slot >= self.slots {
            return;
        }
        let mut in_copy = false;
        for pos in 0..ring {
            if slot < self.copy.copied[pos] {
                in_copy = true;
            } else {
                let cell = self.ring.cell(&self.layout, self.index(slot, pos));
                prefetch(&cell[0]);
                prefetch(&cell[stride - 1]);
            }
        }
        if in_copy {
            let width = self.copy.width;
            let run = slot * width * stride;
            let cells = &self.copy.cells[run..run + width * stride];
            for w in cells.iter().step_by(8) {
                prefetch(w);
            }
            prefetch(&cells[cells.len() - 1]);
        }
        if self.spec.lifetime {
            prefetch(&self.base.data[slot * stride]);
            prefetch(&self.base.data[(slot + 1) * stride - 1]);
        }
    }

    /// Extends the read copy by at most `budget` cells, over the positions not written
    /// since the previous call (whose dirty marks it clears). Returns the cells copied.
    pub(crate) fn refresh_copy(&mut self, budget: usize) -> usize {
        let ring = self.spec.ring;
        let stride = self.layout.stride;
        if self.ring.allocated_count() != self.copy.width {
            self.copy.cover(&self.ring);
        }
        let width = self.copy.width;
        let mut left = budget;
        for pos in 0..ring {
            if std::mem::take(&mut self.copy.dirty[pos]) || left == 0 || !self.ring.allocated(pos) {
                continue;
            }
            let from = self.copy.copied[pos];
            let to = self.slots.min(from.saturating_add(left));
            if to > from && self.copy.cells.len() < self.slots * width * stride {
                // Slots are only added, so the cells already copied keep their place.
                self.copy.grow(self.slots * width * stride);
            }
            for slot in from..to {
                let dst = self.copy_index(slot, pos) * stride;
                self.copy.cells[dst..dst + stride]
                    .copy_from_slice(self.ring.cell(&self.layout, At { pos, slot }));
            }
            self.copy.copied[pos] = to;
            left -= to - from;
        }
        budget - left
    }

    /// Copies every ring cell into the read copy, written or not since the last refresh.
    pub(crate) fn sync_copy(&mut self) {
        self.copy.dirty.fill(false);
        self.refresh_copy(usize::MAX);
    }

    /// Pane tag of ring cell `i`.
    #[inline(always)]
    pub(crate) fn tag(&self, i: At) -> i64 {
        int(self.ring.cell(&self.layout, i)[TAG])
    }

    /// Greatest event time in ring cell `i`.
    #[inline(always)]
    pub(crate) fn max_ts(&self, i: At) -> i64 {
        int(self.ring.cell(&self.layout, i)[MAX_TS])
    }

    /// Greatest event time in the base cell of `slot`.
    #[inline(always)]
    pub(crate) fn base_max_ts(&self, slot: usize) -> i64 {
        int(self.base.data[slot * self.layout.stride + MAX_TS])
    }

    /// Folds event `e` (time `ts`, pane `pane`, ring position `pos = pane mod ring`)
    /// into key `slot`. The caller guarantees `slot < self.slots` and `pos < ring`.
    #[inline(always)]
    pub(crate) fn fold_event(
        &mut self,
        slot: usize,
        pane: i64,
        pos: usize,
        ts: i64,
        values: &[&[f64]],
        e: usize,
    ) -> Folded {
        self.fold_into_pane(slot, pane, pos, |layout, cell| {
            add(layout, cell, ts, values, e)
        })
    }

    /// Finds the cell of key `slot` for pane `pane` (ring position `pos`) and applies
    /// `update` to it: the ring cell, recycled first when it holds an older pane (and
    /// merged into the base cell then, for `lifetime`); the base cell when the pane is
    /// older than the one the ring holds and the level keeps a base; nothing otherwise.
    /// The one place both folds (per event and per pre-aggregated cell) decide where
    /// events go.
    #[inline(always)]
    fn fold_into_pane(
        &mut self,
        slot: usize,
        pane: i64,
        pos: usize,
        update: impl FnOnce(&Layout, &mut [f64]),
    ) -> Folded {
        let layout = &self.layout;
        let idx = self.index(slot, pos);
        let cell = self.ring.cell_mut(layout, self.slots, idx);
        let tag = int(cell[TAG]);
        if tag != pane {
            if tag == EMPTY_PANE || tag < pane {
                if tag != EMPTY_PANE && self.spec.lifetime {
                    let base =
                        &mut self.base.data[slot * layout.stride..(slot + 1) * layout.stride];
                    merge_into(layout, base, cell);
                }
                cell.copy_from_slice(&layout.identity);
                cell[TAG] = bits(pane);
            } else if self.spec.lifetime {
                update(layout, self.base.cell_mut(layout, slot));
                return Folded::Base;
            } else {
                return Folded::Expired;
            }
        }
        update(layout, cell);
        self.copy.invalidate(slot, pos);
        Folded::Ring
    }
}

impl LevelState {
    /// Folds `src`, a cell of pane `pane` (ring position `pos`) holding events that
    /// arrived after every event the state holds, into key `slot`: what folding its
    /// events one by one with [`LevelState::fold_event`] does (see [`merge_after`]).
    /// The caller guarantees `slot < self.slots` and `pos < ring`.
    #[inline]
    pub(crate) fn fold_cell(&mut self, slot: usize, pane: i64, pos: usize, src: &[f64]) -> Folded {
        self.fold_into_pane(slot, pane, pos, |layout, cell| {
            merge_after(layout, cell, src)
        })
    }

    /// Asks the CPU to start loading ring cell `(slot, pos)` (a hint; see
    /// [`LevelState::prefetch`]).
    #[inline(always)]
    pub(crate) fn prefetch_cell(&self, slot: usize, pos: usize) {
        let stride = self.layout.stride;
        if let Some(cell) = self.ring.positions[pos]
            .data
            .get(slot * stride..(slot + 1) * stride)
        {
            prefetch(&cell[0]);
            prefetch(&cell[stride - 1]);
        }
    }
}

/// Folds event `e` of `batch` (key slot `slot` in this shard) into every level of a
/// shard, in order. The one per-event step both backends share: they differ in how
/// events reach it, not in what it does.
#[inline]
pub(crate) fn fold_into_levels(
    levels: &mut [LevelState],
    slot: usize,
    ts: i64,
    values: &[&[f64]],
    e: usize,
    stats: &mut crate::FoldStats,
) {
    for level in levels.iter_mut() {
        // Plain 64-bit divisions: a vectorised multiply-by-reciprocal variant computed per
        // block of events measured 15 % slower (kernel bench), the fold being bound by
        // memory latency, not arithmetic.
        let pane = ts.div_euclid(level.spec.hop);
        let pos = pane.rem_euclid(level.spec.ring as i64) as usize;
        match level.fold_event(slot, pane, pos, ts, values, e) {
            Folded::Ring => stats.folded += 1,
            Folded::Base => stats.into_base += 1,
            Folded::Expired => stats.expired += 1,
        }
    }
}

/// `M2 = Σ(x−K)² − (Σ(x−K))²/n` from a cell's shifted sums, following IEEE as numpy
/// and DuckDB do: NaN propagates (an infinite value makes `Σ(x−K)` infinite or NaN, and
/// the variance NaN), a `Σ(x−K)²` that overflowed to +inf while `Σ(x−K)` is finite is a
/// true overflow (+inf), and only rounding below a true zero is clamped to 0.
/// (`f64::max(NaN, 0.0)` is 0: clamping with it turned both cases into a valid 0.)
/// The shaders' `centred_m2` (common.wgsl) is the same function.
#[inline]
pub(crate) fn centred_m2(sum_sq: f64, m1: f64, n: f64) -> f64 {
    if sum_sq == f64::INFINITY && m1.is_finite() {
        return f64::INFINITY;
    }
    let m2 = sum_sq - m1 * m1 / n;
    if m2 < 0.0 { 0.0 } else { m2 }
}

/// Count, mean and centred second moment `M2 = Σ(x − mean)²` of some values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Moments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// The moments of a cell's column (shift `K`, `Σ(x−K)`, `Σ(x−K)²`).
    #[inline]
    pub(crate) fn of_cell(col: &ColLayout, cell: &[f64]) -> Moments {
        let n = cell[col.count];
        if n == 0.0 {
            return Moments::default();
        }
        let m1 = cell[col.moments + 1];
        Moments {
            n,
            mean: cell[col.moments] + m1 / n,
            m2: centred_m2(cell[col.moments + 2], m1, n),
        }
    }

    /// Chan et al.'s pairwise merge: stable whatever the two means.
    #[inline]
    pub(crate) fn merge(&mut self, o: Moments) {
        if o.n == 0.0 {
            return;
        }
        if self.n == 0.0 {
            *self = o;
            return;
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        self.mean += delta * (o.n / n);
        self.m2 += o.m2 + delta * delta * (self.n * o.n / n);
        self.n = n;
    }
}

/// Accumulated partial aggregate of one column (or of rows) over a set of cells.
#[derive(Clone, Debug)]
pub(crate) struct Acc {
    pub rows: f64,
    pub count: f64,
    pub sum: f64,
    pub moments: Moments,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    pub last_ts: i64,
    pub first: f64,
    pub first_ts: i64,
    /// A decay group (`decay_merge`).
    pub decay: [f64; 3],
    /// The union of the cells' sketch and list groups, by [`Sketch::slot`] (each
    /// empty until a cell has one).
    pub sketches: [Vec<f64>; 4],
}

impl Acc {
    pub const EMPTY: Acc = Acc {
        rows: 0.0,
        count: 0.0,
        sum: 0.0,
        moments: Moments {
            n: 0.0,
            mean: 0.0,
            m2: 0.0,
        },
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        last: f64::NAN,
        last_ts: EMPTY_PANE,
        first: f64::NAN,
        first_ts: i64::MAX,
        decay: DECAY_IDENTITY,
        sketches: [Vec::new(), Vec::new(), Vec::new(), Vec::new()],
    };

    /// Adds a cell, for column `column` (or rows only).
    #[inline]
    pub(crate) fn add_cell(&mut self, layout: &Layout, cell: &[f64], column: Option<usize>) {
        self.rows += cell[ROWS];
        let Some(c) = column else { return };
        let col = &layout.cols[c];
        let n = cell[col.count];
        if n == 0.0 {
            return;
        }
        self.count += n;
        if col.sum != ABSENT {
            self.sum += cell[col.sum];
        }
        if col.moments != ABSENT {
            self.moments.merge(Moments::of_cell(col, cell));
        }
        if col.min != ABSENT && below(cell[col.min], self.min) {
            self.min = cell[col.min];
        }
        if col.max != ABSENT && above(cell[col.max], self.max) {
            self.max = cell[col.max];
        }
        if col.last != ABSENT && int(cell[col.last + 1]) >= self.last_ts {
            self.last_ts = int(cell[col.last + 1]);
            self.last = cell[col.last];
        }
        if col.first != ABSENT && int(cell[col.first + 1]) < self.first_ts {
            self.first_ts = int(cell[col.first + 1]);
            self.first = cell[col.first];
        }
        if col.decay != ABSENT {
            let d = col.decay;
            let (r, w, xw) = (int(cell[d]), cell[d + 1], cell[d + 2]);
            decay_merge(&mut self.decay, r, w, xw, col.half_life);
        }
        // Each group joins the union of the cells read so far (the first is copied).
        for g in col.sketches.iter().flatten() {
            let union = &mut self.sketches[g.sketch.slot()];
            if union.is_empty() {
                union.extend_from_slice(&cell[g.range()]);
            } else {
                g.sketch.merge(union, &cell[g.range()]);
            }
        }
    }
}

/// The value of `agg` over an accumulated window read at `at`, or `None` for null.
#[inline]
pub(crate) fn finalize(agg: crate::Agg, column: Option<usize>, a: &Acc, at: i64) -> Option<f64> {
    use crate::Agg::*;
    let n = a.count;
    let decayed = |i: usize, half_life: i64| {
        let r = int(a.decay[0]);
        if r == EMPTY_PANE {
            0.0
        } else {
            a.decay[i] * decay_weight(at.saturating_sub(r), half_life as f64)
        }
    };
    match agg {
        Count => Some(if column.is_some() { n } else { a.rows }),
        Sum => Some(a.sum),
        Mean => (n > 0.0).then(|| a.sum / n),
        Min => (n > 0.0).then_some(a.min),
        Max => (n > 0.0).then_some(a.max),
        Var | Std => (n >= 2.0).then(|| {
            let var = a.moments.m2 / (n - 1.0);
            if agg == Std { var.sqrt() } else { var }
        }),
        Last => (n > 0.0).then_some(a.last),
        First => (n > 0.0).then_some(a.first),
        DecayedSum { half_life } => Some(decayed(2, half_life)),
        DecayedCount { half_life } => Some(decayed(1, half_life)),
        ApproxDistinct { precision } => Some(match &a.sketches[HLL] {
            s if s.is_empty() => 0.0,
            s => hll::estimate(s, precision),
        }),
        Quantile {
            q,
            relative_accuracy,
        } => {
            let s = &a.sketches[QUANTILE];
            (!s.is_empty())
                .then(|| quantile::quantile(s, q.get(), relative_accuracy.get()))
                .flatten()
        }
        // The length; `list` gives the values.
        LastN { .. } => Some(a.sketches[LAST_N].first().copied().unwrap_or(0.0)),
        TopK { k, .. } => Some(
            a.sketches[TOP_K]
                .first()
                .map_or(0.0, |&m| m.min(f64::from(k))),
        ),
    }
}

/// Writes the value of `agg` over the accumulated window `acc` read at `at` into cell
/// `(k, f)` of `out` (its list too, for a list-valued `agg`), and `status` into key
/// `k`'s status.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_window(
    out: &mut crate::state::MergeOutput,
    k: usize,
    f: usize,
    agg: crate::Agg,
    column: Option<usize>,
    acc: &Acc,
    at: i64,
    status: crate::state::ReadStatus,
) {
    let v = finalize(agg, column, acc, at);
    let i = k * out.features + f;
    if agg.is_list() {
        out.lists[i] = list(agg, acc);
    }
    out.values[i] = v.unwrap_or(f64::NAN);
    out.valid[i] = v.is_some();
    out.status[k] = out.status[k].worst(status);
}

/// The values of a list-valued `agg` over an accumulated window (empty for the
/// others).
pub(crate) fn list(agg: crate::Agg, a: &Acc) -> Vec<f64> {
    let last_n = &a.sketches[LAST_N];
    let top_k = &a.sketches[TOP_K];
    match agg {
        crate::Agg::LastN { .. } if !last_n.is_empty() => lastn::newest_first(last_n).collect(),
        // Pairs with the ties of the k-th (see `topk::ranked`); readers pick the k.
        crate::Agg::TopK { k, .. } if !top_k.is_empty() => topk::ranked(top_k, k),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_per_slot_counts_every_field() {
        let spec = LevelSpec {
            hop: 1000,
            ring: 4,
            columns: vec![crate::Agg::Var.fields().union(crate::Agg::Last.fields())],
            lifetime: true,
        };
        let mut s = LevelState::new(spec.clone()).unwrap();
        s.reserve_slots(16);
        let cell = 8 * s.layout.stride;
        assert_eq!(
            s.memory_bytes(),
            16 * cell,
            "only the base cells until a fold writes a ring position"
        );
        fold(&mut s, 3, 2500, 1.0);
        assert_eq!(s.memory_bytes(), 16 * 2 * cell, "position 2 allocated");
        for t in [0, 1000, 3000] {
            fold(&mut s, 0, t, 1.0);
        }
        assert_eq!(s.memory_bytes(), 16 * spec.bytes_per_slot());
        s.sync_copy();
        assert_eq!(s.cell_bytes(), 16 * spec.bytes_per_slot());
        assert_eq!(
            s.memory_bytes(),
            s.cell_bytes() + 16 * 4 * 8 * s.layout.stride
        );
    }

    /// A level of four 10 ms panes storing `fields`, with 8 or more slots.
    fn four_positions(fields: ColumnFields) -> LevelState {
        let spec = LevelSpec {
            hop: 10,
            ring: 4,
            columns: vec![fields],
            lifetime: false,
        };
        let mut s = LevelState::new(spec).unwrap();
        s.reserve_slots(8);
        s
    }

    /// Whether every cell reads as the ring holds it, through the copy or not.
    fn same_as_ring(s: &LevelState) -> bool {
        (0..s.slots()).all(|slot| {
            (0..s.spec.ring).all(|pos| {
                cell_bits(s.read_cell(slot, pos))
                    == cell_bits(s.ring.cell(&s.layout, s.index(slot, pos)))
            })
        })
    }

    /// A ring position is allocated when first written; the read copy covers the
    /// allocated positions and is laid out again, empty, when the ring allocates
    /// another, and reads stay the ring's bytes throughout.
    #[test]
    fn r18_the_read_copy_covers_the_allocated_positions() {
        let mut s = four_positions(crate::Agg::Mean.fields());
        let n = s.slots();
        assert!(
            same_as_ring(&s),
            "unwritten positions read as identity cells"
        );
        assert_eq!(s.ring.allocated_count(), 0);
        for slot in 0..n {
            fold(&mut s, slot, 15, slot as f64);
        }
        assert_eq!(s.ring.allocated_count(), 1);
        assert_eq!(s.refresh_copy(usize::MAX), 0, "position 1 was just written");
        assert_eq!(s.refresh_copy(usize::MAX), n);
        assert_eq!((s.copy.width, s.copy.copied.clone()), (1, vec![0, n, 0, 0]));
        assert_eq!(s.memory_bytes(), 2 * n * 8 * s.layout.stride);
        assert!(same_as_ring(&s));

        // Pane 3 of one key allocates position 3 for every key.
        fold(&mut s, 6, 31, -1.0);
        assert_eq!(s.ring.allocated_count(), 2);
        assert!(same_as_ring(&s));
        assert_eq!(
            s.refresh_copy(usize::MAX),
            n,
            "position 1 again, laid out anew"
        );
        assert_eq!((s.copy.width, s.copy.copied.clone()), (2, vec![0, n, 0, 0]));
        assert!(same_as_ring(&s));
        assert_eq!(s.refresh_copy(usize::MAX), n, "then position 3");
        assert_eq!(s.copy.copied, [0, n, 0, n]);
        assert!(same_as_ring(&s));
        assert_eq!(s.memory_bytes(), 4 * n * 8 * s.layout.stride);

        // A checkpoint image keeps the layout: identity cells for the positions
        // never written, which come back without a buffer.
        let flat = s.ring.flat(&s.layout, n);
        assert_eq!(flat.len(), 4 * n * s.layout.stride);
        let back = Ring::from_flat(flat, 4, n, s.layout.stride);
        assert_eq!(back.allocated_count(), 2);
        for slot in 0..n {
            for pos in 0..4 {
                let at = s.index(slot, pos);
                assert_eq!(
                    cell_bits(back.cell(&s.layout, at)),
                    cell_bits(s.ring.cell(&s.layout, at))
                );
            }
        }
    }

    /// Folds one event of `value` at time `ts` into `slot`.
    fn fold(s: &mut LevelState, slot: usize, ts: i64, value: f64) {
        let pane = ts.div_euclid(s.spec.hop);
        let pos = pane.rem_euclid(s.spec.ring as i64) as usize;
        s.fold_event(slot, pane, pos, ts, &[&[value]], 0);
    }

    fn cell_bits(cell: &[f64]) -> Vec<u64> {
        cell.iter().map(|x| x.to_bits()).collect()
    }

    /// The read copy's validity rule: a write lowers the position's copied prefix
    /// to the slot written, and the position waits one refresh before it is copied
    /// again.
    #[test]
    fn read_copy_follows_every_write() {
        let mut s = four_positions(crate::Agg::Sum.fields());
        let n = s.slots();
        for slot in 0..n {
            for t in [0, 10, 20, 30] {
                fold(&mut s, slot, t + slot as i64 % 10, slot as f64);
            }
        }
        assert_eq!(s.copy.copied, [0; 4]);
        // Every position was written since the (implicit) last refresh: nothing copied.
        assert_eq!(s.refresh_copy(1000), 0);
        assert_eq!(s.refresh_copy(5), 5, "the budget bounds the copy");
        assert_eq!(s.copy.copied, [5, 0, 0, 0]);
        assert_eq!(s.refresh_copy(1000), 4 * n - 5);
        assert_eq!(s.copy.copied, [n; 4]);
        assert!(same_as_ring(&s));

        // A late event in pane 1 (position 1) of slot 5.
        fold(&mut s, 5, 11, 100.0);
        assert_eq!(s.copy.copied, [n, 5, n, n]);
        assert!(same_as_ring(&s), "slot 5 reads position 1 from the ring");
        assert_eq!(
            s.refresh_copy(1000),
            0,
            "a position written since the last refresh waits"
        );
        assert_eq!(s.refresh_copy(1000), n - 5);
        assert_eq!(s.copy.copied, [n; 4]);
        assert!(same_as_ring(&s));

        // A newer pane recycles position 0 of slot 2.
        fold(&mut s, 2, 40, 7.0);
        assert_eq!(s.copy.copied, [2, n, n, n]);
        assert!(same_as_ring(&s));

        // More slots: the copy keeps what it has and copies the new ones.
        s.reserve_slots(n + 1);
        assert!(s.slots() > n);
        assert_eq!(s.copy.copied, [2, n, n, n]);
        assert!(
            same_as_ring(&s),
            "a regrown ring reads the same through the copy"
        );
        s.sync_copy();
        assert!(s.copy.copied.iter().all(|&c| c == s.slots()));
        assert!(same_as_ring(&s));
    }
}
