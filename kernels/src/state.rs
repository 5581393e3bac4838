//! The pane state of one view: hop levels × key shards, and the batch and read types
//! the backends work on.

use crate::agg::Agg;
use crate::error::KernelError;
use crate::level::{LevelSpec, LevelState};

/// Shape of a view's pane state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSpec {
    /// One entry per distinct hop of the view's features.
    pub levels: Vec<LevelSpec>,
    /// Number of key shards, a power of two. Key id `k` lives in shard `k % shards`
    /// at local slot `k / shards`; shards are what the `Cpu` backend folds in parallel.
    pub shards: usize,
}

/// One hop level of one key shard as plain buffers: what a checkpoint stores.
#[derive(Clone, Debug, PartialEq)]
pub struct LevelImage {
    /// Key slots allocated.
    pub slots: usize,
    /// The ring cells, position-major.
    pub ring: Vec<f64>,
    /// The lifetime base cells (empty unless the level has lifetime features).
    pub base: Vec<f64>,
}

/// Pane state of a view: `shards` independent copies of every level.
///
/// With the `gpu` feature the state may live on a GPU instead (after a fold by the
/// `Gpu` backend); it then has no host copy, and a fold by a host backend moves it
/// back first. There is always exactly one authoritative copy.
#[derive(Debug)]
pub struct PaneState {
    pub(crate) spec: StateSpec,
    shift: u32,
    pub(crate) shards: Vec<Vec<LevelState>>,
    /// Whether the `Cpu` backend's folds keep key-major read copies of the rings.
    read_copy: bool,
    #[cfg(feature = "gpu")]
    pub(crate) device: Option<crate::gpu::DeviceState>,
}

impl PaneState {
    /// An empty state.
    ///
    /// # Errors
    /// [`KernelError::InvalidSpec`] when `shards` is not a power of two or a level is invalid.
    pub fn new(spec: StateSpec) -> Result<Self, KernelError> {
        if !spec.shards.is_power_of_two() {
            return Err(KernelError::InvalidSpec(format!(
                "shards must be a power of two, got {}",
                spec.shards
            )));
        }
        let shards = (0..spec.shards)
            .map(|_| spec.levels.iter().cloned().map(LevelState::new).collect())
            .collect::<Result<Vec<Vec<_>>, _>>()?;
        Ok(PaneState {
            shift: spec.shards.trailing_zeros(),
            spec,
            shards,
            read_copy: true,
            #[cfg(feature = "gpu")]
            device: None,
        })
    }

    /// The spec the state was built from.
    pub fn spec(&self) -> &StateSpec {
        &self.spec
    }

    /// `(shard, local slot)` of key id `id`.
    #[inline(always)]
    pub fn locate(&self, id: u32) -> (usize, usize) {
        let id = id as usize;
        (id & (self.spec.shards - 1), id >> self.shift)
    }

    /// The key id of `(shard, local slot)`.
    pub fn id_of(&self, shard: usize, local: usize) -> u32 {
        ((local << self.shift) | shard) as u32
    }

    /// `(shard, local slot)` of a key id the state holds (`None` for unknown keys and
    /// for ids never folded).
    #[inline]
    pub(crate) fn known(&self, id: Option<u32>) -> Option<(usize, usize)> {
        let (shard, slot) = self.locate(id?);
        self.shards[shard]
            .first()
            .is_some_and(|l| slot < l.slots)
            .then_some((shard, slot))
    }

    /// Whether the state lives on a GPU.
    pub fn on_device(&self) -> bool {
        #[cfg(feature = "gpu")]
        return self.device.is_some();
        #[cfg(not(feature = "gpu"))]
        false
    }

    /// The `auto` backend's rent while the state is on a GPU.
    #[cfg(feature = "gpu")]
    pub(crate) fn gpu_rent(&mut self) -> Option<&mut f64> {
        self.device.as_mut().map(|d| &mut d.rent)
    }

    /// Moves a state that lives on a GPU back to host memory (no-op otherwise).
    ///
    /// # Errors
    /// [`KernelError::Device`] when the copy from the device fails.
    pub fn to_host(&mut self) -> Result<(), KernelError> {
        #[cfg(feature = "gpu")]
        crate::gpu::to_host(self)?;
        Ok(())
    }

    /// Runs `f` on a host copy of the state: the state itself, or a copy downloaded
    /// from the device (for a host backend reading a device-resident state).
    pub(crate) fn with_host<R>(
        &self,
        f: impl FnOnce(&PaneState) -> Result<R, KernelError>,
    ) -> Result<R, KernelError> {
        #[cfg(feature = "gpu")]
        if self.device.is_some() {
            return f(&crate::gpu::host_copy(self)?);
        }
        f(self)
    }

    /// Host copies of every level of every shard (shard-major), for checkpoints. A
    /// state on a GPU is downloaded; the state itself is not changed.
    ///
    /// # Errors
    /// [`KernelError::Device`] when the download fails.
    pub fn export(&self) -> Result<Vec<LevelImage>, KernelError> {
        self.with_host(|s| {
            Ok(s.shards
                .iter()
                .flatten()
                .map(|l| LevelImage {
                    slots: l.slots,
                    ring: l.ring.flat(&l.layout, l.slots),
                    base: l.base.data.clone(),
                })
                .collect())
        })
    }

    /// Rebuilds a state from the images [`PaneState::export`] gave for the same spec.
    ///
    /// # Errors
    /// [`KernelError::Shape`] when the images do not fit `spec` (their number, or a
    /// buffer's length for its slot count).
    pub fn import(spec: StateSpec, images: Vec<LevelImage>) -> Result<Self, KernelError> {
        let mut state = PaneState::new(spec)?;
        let levels = state.spec.levels.len();
        if images.len() != levels * state.spec.shards {
            return Err(KernelError::Shape(format!(
                "{} level images for {} shards × {levels} levels",
                images.len(),
                state.spec.shards
            )));
        }
        for (i, image) in images.into_iter().enumerate() {
            let level = &mut state.shards[i / levels][i % levels];
            let stride = level.layout.stride;
            // Checked: the slot count comes from a file, and a product that wrapped
            // around could match the words present.
            let words = |per_slot: usize| image.slots.checked_mul(per_slot);
            let ring = words(level.spec.ring * stride);
            let base = if level.spec.lifetime {
                words(stride)
            } else {
                Some(0)
            };
            let (Some(ring), Some(base)) = (ring, base) else {
                return Err(KernelError::Shape(format!(
                    "level image {i}: {} slots is more than any state holds",
                    image.slots
                )));
            };
            if image.ring.len() != ring || image.base.len() != base {
                return Err(KernelError::Shape(format!(
                    "level image {i}: {} ring and {} base words for {} slots, expected {ring} and {base}",
                    image.ring.len(),
                    image.base.len(),
                    image.slots
                )));
            }
            if !level.layout.sketches_valid(&image.ring)
                || !level.layout.sketches_valid(&image.base)
            {
                return Err(KernelError::Shape(format!(
                    "level image {i}: a sketch's header is out of range"
                )));
            }
            level.slots = image.slots;
            level.ring =
                crate::level::Ring::from_flat(image.ring, level.spec.ring, image.slots, stride);
            level.base.data = image.base;
        }
        Ok(state)
    }

    /// Bytes held by all buffers (on the device when the state lives there), the
    /// read copies of the `Cpu` backend included.
    pub fn memory_bytes(&self) -> usize {
        self.bytes(LevelState::memory_bytes)
    }

    /// Bytes of the pane cells proper (what a move to a device copies): like
    /// [`PaneState::memory_bytes`] without the read copies.
    pub fn cell_bytes(&self) -> usize {
        self.bytes(LevelState::cell_bytes)
    }

    /// The device's bytes for a state on a GPU, else `of_level` summed over the levels.
    fn bytes(&self, of_level: fn(&LevelState) -> usize) -> usize {
        #[cfg(feature = "gpu")]
        if let Some(d) = &self.device {
            return d.memory_bytes();
        }
        self.shards.iter().flatten().map(of_level).sum()
    }

    /// Whether the `Cpu` backend's folds keep key-major read copies of the rings
    /// (on by default). A copy takes as much memory as the ring it copies and makes
    /// reads of keys scattered over a large state about twice as fast; a state that is
    /// read as often as it is folded, as in a backfill, has no use for it. Turning it
    /// off frees the copies.
    pub fn keep_read_copy(&mut self, keep: bool) {
        self.read_copy = keep;
        if !keep {
            self.shards
                .iter_mut()
                .flatten()
                .for_each(LevelState::drop_copy);
        }
    }

    /// Whether the `Cpu` backend's folds keep read copies (see [`PaneState::keep_read_copy`]).
    pub fn keeps_read_copy(&self) -> bool {
        self.read_copy
    }

    /// Brings every level's key-major read copy up to date at once (the `Cpu`
    /// backend's folds otherwise do it a budget at a time, for panes no longer
    /// written). For a state that will only be read from now on, such as a benchmark's.
    pub fn sync_read_copy(&mut self) {
        self.shards
            .iter_mut()
            .flatten()
            .for_each(LevelState::sync_copy);
    }

    /// Brings the state to the host, checks a batch's shape and grows every shard to
    /// hold the ids it names: the first step of a host backend's fold.
    /// Returns the slots each shard was asked to hold (0: none), for
    /// [`PaneState::reserve`].
    pub(crate) fn prepare(&mut self, batch: &FoldBatch<'_>) -> Result<Vec<usize>, KernelError> {
        self.check(batch)?;
        self.to_host()?;
        let mut need = vec![0usize; self.spec.shards];
        for &id in batch.ids {
            let (s, l) = self.locate(id);
            need[s] = need[s].max(l + 1);
        }
        self.reserve(&need);
        Ok(need)
    }

    /// Grows shard `s` to hold `need[s]` slots where that is above 0.
    pub(crate) fn reserve(&mut self, need: &[usize]) {
        for (shard, &need) in self.shards.iter_mut().zip(need) {
            if need > 0 {
                for level in shard.iter_mut() {
                    level.reserve_slots(need);
                }
            }
        }
    }

    /// Checks a batch's shape and times.
    pub(crate) fn check(&self, batch: &FoldBatch<'_>) -> Result<(), KernelError> {
        let n = batch.ids.len();
        if batch.ts.len() != n {
            return Err(KernelError::Shape(format!(
                "{n} key ids but {} timestamps",
                batch.ts.len()
            )));
        }
        let columns = self.spec.levels.first().map_or(0, |l| l.columns.len());
        if batch.values.len() != columns {
            return Err(KernelError::Shape(format!(
                "state has {columns} value columns, batch has {}",
                batch.values.len()
            )));
        }
        if let Some(c) = batch.values.iter().position(|v| v.len() != n) {
            return Err(KernelError::Shape(format!(
                "value column {c} has {} rows, expected {n}",
                batch.values[c].len()
            )));
        }
        if let Some(&t) = batch
            .ts
            .iter()
            .find(|t| t.unsigned_abs() > crate::MAX_TIME_MS)
        {
            return Err(KernelError::TimeOutOfRange(t));
        }
        Ok(())
    }
}

/// A micro-batch of accepted events, in arrival order, ready to fold.
#[derive(Clone, Copy, Debug)]
pub struct FoldBatch<'a> {
    /// Key id of each event (from the engine's key index).
    pub ids: &'a [u32],
    /// Event time of each event, epoch milliseconds, within ±[`crate::MAX_TIME_MS`].
    pub ts: &'a [i64],
    /// One slice per value column of the view; NaN marks a null or NaN value (skipped).
    pub values: &'a [&'a [f64]],
}

impl FoldBatch<'_> {
    /// Number of events.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch has no events.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What a fold did with the batch's events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoldStats {
    /// Event × level pairs folded into a ring pane.
    pub folded: u64,
    /// Event × level pairs whose pane was older than the key's ring and that only
    /// reached the lifetime base cell.
    pub into_base: u64,
    /// Event × level pairs whose pane was older than the key's ring in a level without
    /// lifetime features (outside every answerable window).
    pub expired: u64,
}

impl FoldStats {
    pub(crate) fn add(&mut self, o: FoldStats) {
        self.folded += o.folded;
        self.into_base += o.into_base;
        self.expired += o.expired;
    }
}

/// One feature to compute in a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureMerge {
    /// Index of the level (hop) holding the feature's panes.
    pub level: usize,
    /// The aggregation.
    pub agg: Agg,
    /// Value column, or `None` for `count` of rows.
    pub column: Option<usize>,
    /// Window length in panes of the level, or `None` for `lifetime`.
    pub panes: Option<u64>,
}

/// Whether a read could be answered exactly for a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadStatus {
    /// The values are exact.
    #[default]
    Exact,
    /// The pane containing `at` also holds events later than `at`, so that pane cannot
    /// be split at `at`.
    PaneHoldsLaterEvents,
    /// Panes the window needs were already recycled (the read is too far in the past).
    NotRetained,
}

impl ReadStatus {
    /// The more severe of two statuses: `NotRetained` > `PaneHoldsLaterEvents` > `Exact`.
    #[inline]
    pub(crate) fn worst(self, o: ReadStatus) -> ReadStatus {
        let rank = |s: ReadStatus| match s {
            ReadStatus::Exact => 0,
            ReadStatus::PaneHoldsLaterEvents => 1,
            ReadStatus::NotRetained => 2,
        };
        if rank(o) > rank(self) { o } else { self }
    }
}

/// Dense output of a read: `keys × features`, row-major.
#[derive(Clone, Debug, Default)]
pub struct MergeOutput {
    /// Feature values; NaN where `valid` is false.
    pub values: Vec<f64>,
    /// Validity of each value.
    pub valid: Vec<bool>,
    /// Per key: whether its values are exact.
    pub status: Vec<ReadStatus>,
    /// Number of features (the row length).
    pub features: usize,
    /// The values of list-valued features (`Agg::is_list`), indexed like `values`
    /// (whose entry is then the list's length); empty when a read has none. A
    /// `top_k` list is [`crate::topk::ranked`]'s pairs: [`crate::topk::top_of`] gives
    /// its values.
    pub lists: Vec<Vec<f64>>,
}

impl MergeOutput {
    pub(crate) fn reset(&mut self, keys: usize, features: usize) {
        self.values.clear();
        self.values.resize(keys * features, f64::NAN);
        self.valid.clear();
        self.valid.resize(keys * features, false);
        self.status.clear();
        self.status.resize(keys, ReadStatus::Exact);
        self.features = features;
        self.lists.clear();
    }

    /// [`MergeOutput::reset`], with room for the lists when `features` has list-valued
    /// ones.
    pub(crate) fn reset_for(&mut self, keys: usize, features: &[FeatureMerge]) {
        self.reset(keys, features.len());
        if features.iter().any(|f| f.agg.is_list()) {
            self.lists.resize(keys * features.len(), Vec::new());
        }
    }

    /// Writes the empty-window values of every feature in row `k`.
    pub(crate) fn write_empty(&mut self, k: usize, features: &[FeatureMerge]) {
        let row = k * self.features..(k + 1) * self.features;
        write_empty(
            features,
            &mut self.values[row.clone()],
            &mut self.valid[row],
        );
    }
}

/// Writes the empty-window value of each feature: 0 for `count` and `sum`, else null.
pub(crate) fn write_empty(features: &[FeatureMerge], values: &mut [f64], valid: &mut [bool]) {
    for (f, fm) in features.iter().enumerate() {
        let zero = fm.agg.zero_when_empty();
        values[f] = if zero { 0.0 } else { f64::NAN };
        valid[f] = zero;
    }
}

/// Checks a read's feature list against the state.
pub(crate) fn check_features(
    state: &PaneState,
    features: &[FeatureMerge],
) -> Result<(), KernelError> {
    for (i, f) in features.iter().enumerate() {
        let Some(level) = state.spec.levels.get(f.level) else {
            return Err(KernelError::Shape(format!(
                "feature {i}: no level {}",
                f.level
            )));
        };
        match f.column {
            None if f.agg != Agg::Count => {
                return Err(KernelError::Shape(format!(
                    "feature {i}: {} needs a column",
                    f.agg
                )));
            }
            Some(c) => {
                let stored = level.columns.get(c).copied().unwrap_or_default();
                let wanted = f.agg.fields();
                let wrong_param = (wanted.decay.is_some() && wanted.decay != stored.decay)
                    || (wanted.hll.is_some() && wanted.hll != stored.hll)
                    || (wanted.quantile.is_some() && wanted.quantile != stored.quantile)
                    || (wanted.last_n.is_some() && wanted.last_n != stored.last_n)
                    || (wanted.top_k.is_some() && wanted.top_k != stored.top_k);
                if stored.union(wanted) != stored || wrong_param {
                    return Err(KernelError::Shape(format!(
                        "feature {i}: level {} does not store the fields of {} for column {c}",
                        f.level, f.agg
                    )));
                }
            }
            None => {}
        }
        match f.panes {
            Some(0) => return Err(KernelError::Shape(format!("feature {i}: empty window"))),
            Some(n) if n as usize > level.ring => {
                return Err(KernelError::Shape(format!(
                    "feature {i}: window of {n} panes exceeds the ring of {}",
                    level.ring
                )));
            }
            None if !level.lifetime => {
                return Err(KernelError::Shape(format!(
                    "feature {i}: lifetime feature on a level without a base"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}
