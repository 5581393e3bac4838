//! Pane state of one hop level: structure-of-arrays buffers in a per-key ring.
//!
//! ```text
//!              slot 0                 slot 1
//!         ┌──────────────────────┬──────────────────────┐
//!  tag    │ p0  p1  p2 … p(R-1)  │ p0  p1  …            │   pane id held by each cell (EMPTY = never written)
//!  rows   │ ..                   │                      │   events in the cell
//!  max_ts │ ..                   │                      │   greatest event time in the cell
//!  count  │ ..  (per column)     │                      │
//!  sum    │ ..                   │                      │   one flat Vec per field,
//!  k,m1,m2│ ..                   │                      │   indexed slot * ring + pane mod ring
//!  min    │ ..                   │                      │
//!  …      │                      │                      │
//!         └──────────────────────┴──────────────────────┘
//!  base   │ one cell per slot: panes recycled out of the ring (only for `lifetime`)
//! ```
//!
//! A cell is recycled when an event of a newer pane maps to it; with `lifetime`
//! features the recycled cell is first merged into the slot's base cell, so the
//! lifetime total stays exact while the ring stays small.

use crate::agg::ColumnFields;
use crate::error::KernelError;

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
        Ok(())
    }

    /// Bytes of state per key in this level.
    pub fn bytes_per_slot(&self) -> usize {
        let per_cell: usize = 16
            + self
                .columns
                .iter()
                .map(|c| c.bytes_per_pane())
                .sum::<usize>();
        let ring = (per_cell + 8) * self.ring;
        let base = if self.lifetime { per_cell } else { 0 };
        ring + base
    }
}

/// Per-column field buffers of a set of cells. Absent fields are empty `Vec`s.
#[derive(Clone, Debug, Default)]
pub(crate) struct ColCells {
    pub count: Vec<f64>,
    pub sum: Vec<f64>,
    /// Per-cell shift `K` of the moments (the cell's first value).
    pub shift: Vec<f64>,
    /// `Σ(x − K)` over the cell.
    pub m1: Vec<f64>,
    /// `Σ(x − K)²` over the cell.
    pub m2: Vec<f64>,
    pub min: Vec<f64>,
    pub max: Vec<f64>,
    pub last: Vec<f64>,
    pub last_ts: Vec<i64>,
}

/// A set of cells, each one partial aggregate over some events.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cells {
    pub rows: Vec<f64>,
    pub max_ts: Vec<i64>,
    pub cols: Vec<ColCells>,
}

impl Cells {
    fn new(columns: &[ColumnFields]) -> Self {
        Cells {
            rows: Vec::new(),
            max_ts: Vec::new(),
            cols: columns.iter().map(|_| ColCells::default()).collect(),
        }
    }

    fn resize(&mut self, len: usize, columns: &[ColumnFields]) {
        self.rows.resize(len, 0.0);
        self.max_ts.resize(len, EMPTY_PANE);
        for (c, f) in self.cols.iter_mut().zip(columns) {
            if f.count {
                c.count.resize(len, 0.0);
            }
            if f.sum {
                c.sum.resize(len, 0.0);
            }
            if f.moments {
                c.shift.resize(len, 0.0);
                c.m1.resize(len, 0.0);
                c.m2.resize(len, 0.0);
            }
            if f.min {
                c.min.resize(len, f64::INFINITY);
            }
            if f.max {
                c.max.resize(len, f64::NEG_INFINITY);
            }
            if f.last {
                c.last.resize(len, f64::NAN);
                c.last_ts.resize(len, EMPTY_PANE);
            }
        }
    }

    #[inline(always)]
    fn reset(&mut self, i: usize) {
        self.rows[i] = 0.0;
        self.max_ts[i] = EMPTY_PANE;
        for c in &mut self.cols {
            if !c.count.is_empty() {
                c.count[i] = 0.0;
            }
            if !c.sum.is_empty() {
                c.sum[i] = 0.0;
            }
            if !c.m1.is_empty() {
                c.shift[i] = 0.0;
                c.m1[i] = 0.0;
                c.m2[i] = 0.0;
            }
            if !c.min.is_empty() {
                c.min[i] = f64::INFINITY;
            }
            if !c.max.is_empty() {
                c.max[i] = f64::NEG_INFINITY;
            }
            if !c.last.is_empty() {
                c.last[i] = f64::NAN;
                c.last_ts[i] = EMPTY_PANE;
            }
        }
    }

    /// Adds event `e` of the batch to cell `i`.
    #[inline(always)]
    fn add(&mut self, i: usize, ts: i64, values: &[&[f64]], e: usize) {
        self.rows[i] += 1.0;
        if ts > self.max_ts[i] {
            self.max_ts[i] = ts;
        }
        for (c, col) in self.cols.iter_mut().enumerate() {
            if col.count.is_empty() {
                continue;
            }
            let x = values[c][e];
            if x.is_nan() {
                continue;
            }
            if !col.m1.is_empty() {
                // Moments shifted by the cell's first value: additive updates, and no
                // cancellation as long as the cell's values are near one another.
                if col.count[i] == 0.0 {
                    col.shift[i] = if x.is_finite() { x } else { 0.0 };
                }
                let d = x - col.shift[i];
                col.m1[i] += d;
                col.m2[i] += d * d;
            }
            col.count[i] += 1.0;
            if !col.sum.is_empty() {
                col.sum[i] += x;
            }
            if !col.min.is_empty() && x < col.min[i] {
                col.min[i] = x;
            }
            if !col.max.is_empty() && x > col.max[i] {
                col.max[i] = x;
            }
            if !col.last.is_empty() && ts >= col.last_ts[i] {
                col.last_ts[i] = ts;
                col.last[i] = x;
            }
        }
    }

    /// Merges cell `j` of `src` into cell `i` of `self` (same column layout).
    #[inline]
    fn merge_from(&mut self, i: usize, src: &Cells, j: usize) {
        self.rows[i] += src.rows[j];
        self.max_ts[i] = self.max_ts[i].max(src.max_ts[j]);
        for (d, s) in self.cols.iter_mut().zip(&src.cols) {
            if d.count.is_empty() {
                continue;
            }
            if !d.m1.is_empty() && s.count[j] > 0.0 {
                let mut m = Moments::of_cell(d, i);
                m.merge(Moments::of_cell(s, j));
                // Store the merged moments centred: K = mean, Σ(x−K) = 0, Σ(x−K)² = M2.
                d.shift[i] = m.mean;
                d.m1[i] = 0.0;
                d.m2[i] = m.m2;
            }
            d.count[i] += s.count[j];
            if !d.sum.is_empty() {
                d.sum[i] += s.sum[j];
            }
            if !d.min.is_empty() {
                d.min[i] = d.min[i].min(s.min[j]);
            }
            if !d.max.is_empty() {
                d.max[i] = d.max[i].max(s.max[j]);
            }
            if !d.last.is_empty() && s.last_ts[j] >= d.last_ts[i] && s.count[j] > 0.0 {
                d.last_ts[i] = s.last_ts[j];
                d.last[i] = s.last[j];
            }
        }
    }

    fn bytes(&self) -> usize {
        let c: usize = self
            .cols
            .iter()
            .map(|c| {
                8 * (c.count.len()
                    + c.sum.len()
                    + c.shift.len()
                    + c.m1.len()
                    + c.m2.len()
                    + c.min.len()
                    + c.max.len()
                    + c.last.len()
                    + c.last_ts.len())
            })
            .sum();
        c + 8 * (self.rows.len() + self.max_ts.len())
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
    pub(crate) slots: usize,
    /// `slots * ring` pane ids.
    pub(crate) tag: Vec<i64>,
    /// `slots * ring` cells.
    pub(crate) ring: Cells,
    /// `slots` cells (empty unless `spec.lifetime`).
    pub(crate) base: Cells,
}

impl LevelState {
    /// An empty state for `spec`.
    ///
    /// # Errors
    /// [`KernelError::InvalidSpec`] when the spec is invalid.
    pub fn new(spec: LevelSpec) -> Result<Self, KernelError> {
        spec.validate()?;
        Ok(LevelState {
            ring: Cells::new(&spec.columns),
            base: Cells::new(&spec.columns),
            tag: Vec::new(),
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

    /// Grows the state to hold at least `slots` keys (amortised doubling).
    pub fn reserve_slots(&mut self, slots: usize) {
        if slots <= self.slots {
            return;
        }
        let slots = slots.max(self.slots * 2).max(16);
        let cells = slots * self.spec.ring;
        self.tag.resize(cells, EMPTY_PANE);
        self.ring.resize(cells, &self.spec.columns);
        if self.spec.lifetime {
            self.base.resize(slots, &self.spec.columns);
        }
        self.slots = slots;
    }

    /// Bytes held by the buffers.
    pub fn memory_bytes(&self) -> usize {
        8 * self.tag.len() + self.ring.bytes() + self.base.bytes()
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
        let idx = slot * self.spec.ring + pos;
        let tag = self.tag[idx];
        if tag != pane {
            if tag == EMPTY_PANE || tag < pane {
                if tag != EMPTY_PANE && self.spec.lifetime {
                    self.base.merge_from(slot, &self.ring, idx);
                }
                self.ring.reset(idx);
                self.tag[idx] = pane;
            } else if self.spec.lifetime {
                self.base.add(slot, ts, values, e);
                return Folded::Base;
            } else {
                return Folded::Expired;
            }
        }
        self.ring.add(idx, ts, values, e);
        Folded::Ring
    }
}

/// Count, mean and centred second moment `M2 = Σ(x − mean)²` of some values.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Moments {
    pub n: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// The moments of cell `i` (shift `K`, `Σ(x−K)`, `Σ(x−K)²`).
    #[inline]
    pub(crate) fn of_cell(c: &ColCells, i: usize) -> Moments {
        let n = c.count[i];
        if n == 0.0 {
            return Moments::default();
        }
        let m1 = c.m1[i];
        Moments {
            n,
            mean: c.shift[i] + m1 / n,
            m2: (c.m2[i] - m1 * m1 / n).max(0.0),
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
#[derive(Clone, Copy, Debug)]
pub(crate) struct Acc {
    pub rows: f64,
    pub count: f64,
    pub sum: f64,
    pub moments: Moments,
    pub min: f64,
    pub max: f64,
    pub last: f64,
    pub last_ts: i64,
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
    };

    /// Adds cell `i` of `cells` for column `column` (or rows only).
    #[inline]
    pub(crate) fn add_cell(&mut self, cells: &Cells, i: usize, column: Option<usize>) {
        self.rows += cells.rows[i];
        let Some(c) = column else { return };
        let col = &cells.cols[c];
        let n = col.count[i];
        if n == 0.0 {
            return;
        }
        self.count += n;
        if !col.sum.is_empty() {
            self.sum += col.sum[i];
        }
        if !col.m1.is_empty() {
            self.moments.merge(Moments::of_cell(col, i));
        }
        if !col.min.is_empty() {
            self.min = self.min.min(col.min[i]);
        }
        if !col.max.is_empty() {
            self.max = self.max.max(col.max[i]);
        }
        if !col.last.is_empty() && col.last_ts[i] >= self.last_ts {
            self.last_ts = col.last_ts[i];
            self.last = col.last[i];
        }
    }
}

/// The value of `agg` over an accumulated window, or `None` for null.
#[inline]
pub(crate) fn finalize(agg: crate::Agg, column: Option<usize>, a: &Acc) -> Option<f64> {
    use crate::Agg::*;
    let n = a.count;
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
    }
}

/// `floor(x / d)` for `d > 0` with a multiply instead of a 64-bit division.
///
/// `inv` must be `1.0 / d as f64`. The estimate is exact to ±1 for |x| < 2^52 and is
/// corrected; larger |x| fall back to `div_euclid`.
#[inline(always)]
pub fn floor_div(x: i64, d: i64, inv: f64) -> i64 {
    if x.unsigned_abs() >= 1 << 52 {
        return x.div_euclid(d);
    }
    let mut q = (x as f64 * inv).floor() as i64;
    let r = x - q * d;
    if r < 0 {
        q -= 1;
    } else if r >= d {
        q += 1;
    }
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_div_matches_div_euclid() {
        let ds = [1i64, 2, 3, 7, 1000, 60_000, 3_600_000, 86_400_000, 999_983];
        let xs = [
            0i64,
            1,
            -1,
            59_999,
            60_000,
            -60_000,
            -60_001,
            1_700_000_000_000,
            1_700_000_000_001,
            -1_700_000_000_001,
            (1 << 52) - 1,
            -(1 << 52) + 1,
            i64::MAX,
            i64::MIN,
            i64::MIN + 1,
        ];
        for &d in &ds {
            let inv = 1.0 / d as f64;
            for &x in &xs {
                for dx in -3..=3i64 {
                    let x = x.saturating_add(dx);
                    assert_eq!(floor_div(x, d, inv), x.div_euclid(d), "x={x} d={d}");
                }
            }
        }
    }

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
        assert_eq!(s.memory_bytes(), 16 * spec.bytes_per_slot());
    }
}
