//! The device-resident state: a [`PaneState`]'s hop levels as storage buffers (see the
//! module docs of `gpu`), and the moves between host and device.

use std::sync::Arc;

use wgpu::util::DeviceExt;

use super::context::{Context, device_err, groups};
use super::params::InitParams;
use crate::error::KernelError;
use crate::level::{ABSENT, Layout, LevelState, Sketch, holds_no_pane};
use crate::state::PaneState;

/// One hop level on the device.
#[derive(Debug)]
pub(super) struct DeviceLevel {
    pub(super) cells: wgpu::Buffer,
    pub(super) cols: wgpu::Buffer,
    pub(super) identity: wgpu::Buffer,
    pub(super) hop: i64,
    pub(super) ring: u32,
    pub(super) stride: u32,
    pub(super) columns: u32,
    pub(super) lifetime: bool,
    /// Whether the fold reduces blocks of events first (not with sketch groups).
    pub(super) blocks: bool,
    /// Most loop iterations the fold's walk spends on one event of this level (one
    /// step, a recycled cell's merge into the base cell included): what a software
    /// adapter's per-invocation budget is divided by.
    pub(super) cost: u64,
}

impl DeviceLevel {
    fn cells_per_key(&self) -> u64 {
        u64::from(self.ring) + u64::from(self.lifetime)
    }
}

/// A state's copy on the device (see the module docs); held by [`PaneState`].
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(super) ctx: Arc<Context>,
    /// Key capacity: ids below it have cells.
    pub(super) cap: u32,
    pub(super) levels: Vec<DeviceLevel>,
    /// The columns of quantile keys a fold uploads after the batch's value columns:
    /// (value column, relative accuracy) of each, in order.
    pub(super) quantile_keys: Vec<(usize, f64)>,
    /// The `auto` backend's rent: estimated seconds lost to small batches folded here
    /// since the last large one (see `crate::auto`).
    pub(crate) rent: f64,
}

impl DeviceState {
    /// Cells of one key, over every level.
    pub(super) fn cells_per_key(&self) -> u64 {
        self.levels.iter().map(DeviceLevel::cells_per_key).sum()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.levels.iter().map(|l| l.cells.size() as usize).sum()
    }

    /// Bytes a level needs for `cap` keys, checked against the device's limits.
    fn level_bytes(ctx: &Context, spec: &crate::LevelSpec, cap: u64) -> Result<u64, KernelError> {
        let stride = Layout::new(&spec.columns).stride as u64;
        let bytes = cap * (spec.ring as u64 + u64::from(spec.lifetime)) * stride * 8;
        if bytes > ctx.info.max_binding
            || cap * stride * (spec.ring as u64 + 1) >= u64::from(u32::MAX)
        {
            return Err(KernelError::Unavailable(format!(
                "a hop level of this view needs {} MiB on the GPU for {cap} keys, more than the \
                 largest storage buffer of {} ({} MiB); use the cpu backend",
                bytes >> 20,
                ctx.info.name,
                ctx.info.max_binding >> 20
            )));
        }
        Ok(bytes)
    }

    /// Most keys whose cells of every level fit one storage binding.
    fn fitting_keys(ctx: &Context, spec: &crate::StateSpec) -> u64 {
        let per_key = spec
            .levels
            .iter()
            .map(|l| {
                let cells = l.ring as u64 + u64::from(l.lifetime);
                cells * Layout::new(&l.columns).stride as u64 * 8
            })
            .max()
            .unwrap_or(8);
        ctx.info.max_binding / per_key.max(1)
    }

    /// Moves the host state of `state` to the device, with room for `need` keys.
    pub(super) fn upload(
        ctx: &Arc<Context>,
        state: &mut PaneState,
        need: u64,
    ) -> Result<(), KernelError> {
        let host_keys = state
            .shards
            .iter()
            .enumerate()
            .map(|(s, levels)| {
                levels.first().map_or(0, |l| {
                    if l.slots == 0 {
                        0
                    } else {
                        state.id_of(s, l.slots - 1) as u64 + 1
                    }
                })
            })
            .max()
            .unwrap_or(0);
        // At least 1024 keys, as many as fit (cells of large sketches fill a binding
        // with fewer).
        let cap = need
            .max(host_keys)
            .max(1024.min(Self::fitting_keys(ctx, state.spec())));
        for spec in &state.spec().levels {
            Self::level_bytes(ctx, spec, cap)?;
        }
        let quantile_keys = quantile_keys(state.spec());
        let batch_columns = state.spec().levels.first().map_or(0, |l| l.columns.len());
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mut levels = Vec::new();
        for (l, spec) in state.spec().levels.iter().enumerate() {
            let layout = Layout::new(&spec.columns);
            let stride = layout.stride;
            let per_key = spec.ring + usize::from(spec.lifetime);
            let mut image: Vec<f64> = Vec::with_capacity(cap as usize * per_key * stride);
            for _ in 0..cap as usize * per_key {
                image.extend_from_slice(&layout.identity);
            }
            for (s, shard) in state.shards.iter().enumerate() {
                let level = &shard[l];
                for slot in 0..level.slots {
                    let id = state.id_of(s, slot) as usize;
                    for pos in 0..spec.ring {
                        let to = (pos * cap as usize + id) * stride;
                        image[to..to + stride].copy_from_slice(
                            level.ring.cell(&level.layout, level.index(slot, pos)),
                        );
                    }
                    if spec.lifetime {
                        let to = (spec.ring * cap as usize + id) * stride;
                        image[to..to + stride]
                            .copy_from_slice(level.base.cell(&level.layout, slot));
                    }
                }
            }
            let cells = ctx
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("panes level cells"),
                    contents: bytemuck::cast_slice(&image),
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                });
            levels.push(Self::level(
                ctx,
                spec,
                &layout,
                cells,
                (batch_columns, &quantile_keys),
            ));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err("the GPU has no room for the view state", e));
        }
        for shard in &mut state.shards {
            for level in shard {
                level.release();
            }
        }
        state.device = Some(DeviceState {
            ctx: ctx.clone(),
            cap: cap as u32,
            levels,
            quantile_keys,
            rent: 0.0,
        });
        Ok(())
    }

    /// A level's device description; `keys` is the number of value columns of a batch
    /// and the quantile key columns that follow them.
    fn level(
        ctx: &Context,
        spec: &crate::LevelSpec,
        layout: &Layout,
        cells: wgpu::Buffer,
        (batch_columns, keys): (usize, &[(usize, f64)]),
    ) -> DeviceLevel {
        // COL_FIELDS words per column (cells.wgsl): the fields' word offsets, the
        // half-life in ms as two u32 halves, then each sketch group's offset and
        // parameter (the quantile sketch's also its key column), one unused word.
        let word = |f: usize| if f == ABSENT { u32::MAX } else { f as u32 };
        let mut cols: Vec<u32> = Vec::with_capacity(layout.cols.len() * COL_FIELDS);
        let mut sketches = false;
        for (c, col) in layout.cols.iter().enumerate() {
            let fields = [
                col.count,
                col.sum,
                col.moments,
                col.min,
                col.max,
                col.last,
                col.first,
                col.decay,
            ];
            cols.extend(fields.map(word));
            let h = col.half_life as u64;
            cols.extend([h as u32, (h >> 32) as u32]);
            let mut groups = [u32::MAX, 0, u32::MAX, 0, 0, u32::MAX, 0, u32::MAX, 0, 0];
            for g in col.sketches.iter().flatten() {
                sketches = true;
                let at = g.at as u32;
                match g.sketch {
                    Sketch::Hll(p) => groups[0..2].copy_from_slice(&[at, u32::from(p)]),
                    Sketch::Quantile(a) => {
                        let key = keys
                            .iter()
                            .position(|&k| k == (c, a))
                            .expect("every quantile sketch has a key column");
                        groups[2..5].copy_from_slice(&[
                            at,
                            crate::quantile::capacity(a) as u32,
                            (batch_columns + key) as u32,
                        ]);
                    }
                    Sketch::LastN(n) => groups[5..7].copy_from_slice(&[at, u32::from(n)]),
                    Sketch::TopK(cap) => groups[7..9].copy_from_slice(&[at, u32::from(cap)]),
                }
            }
            cols.extend(groups);
        }
        cols.push(0); // never an empty buffer
        let init = |label, contents: &[u8]| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents,
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        DeviceLevel {
            cols: init("panes cols", bytemuck::cast_slice(&cols)),
            identity: init("panes identity", bytemuck::cast_slice(&layout.identity)),
            cells,
            hop: spec.hop,
            ring: spec.ring as u32,
            stride: layout.stride as u32,
            columns: layout.cols.len() as u32,
            lifetime: spec.lifetime,
            blocks: !sketches,
            cost: step_cost(layout),
        }
    }

    /// Grows every level to hold at least `need` keys (+50 %, amortised).
    pub(super) fn grow(
        &mut self,
        state_spec: &crate::StateSpec,
        need: u64,
    ) -> Result<(), KernelError> {
        if need <= u64::from(self.cap) {
            return Ok(());
        }
        let ctx = self.ctx.clone();
        let fit = Self::fitting_keys(&ctx, state_spec);
        let cap = need.max((u64::from(self.cap) * 3 / 2).min(fit));
        for spec in &state_spec.levels {
            Self::level_bytes(&ctx, spec, cap)?;
        }
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let mut u = ctx.uniforms();
        let mut new_buffers = Vec::new();
        for level in &self.levels {
            let cells = cap * level.cells_per_key();
            let buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("panes level cells"),
                size: cells * u64::from(level.stride) * 8,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let offset = u.push(&InitParams {
                first: 0,
                count: cells as u32,
                stride: level.stride,
                _pad: 0,
            });
            new_buffers.push((buf, offset, cells));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err("the GPU has no room to grow the view state", e));
        }
        let mut scratch = ctx.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let ubuf = ctx.upload_uniforms(&mut scratch, &u);
        drop(scratch);
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&ctx.init);
            for (level, (buf, offset, cells)) in self.levels.iter().zip(&new_buffers) {
                let bg = ctx.bind(
                    &ctx.init_layout,
                    &ubuf,
                    &[level.identity.as_entire_binding(), buf.as_entire_binding()],
                );
                pass.set_bind_group(0, &bg, &[*offset]);
                let (x, y) = groups(*cells, 256);
                pass.dispatch_workgroups(x, y, 1);
            }
        }
        let old_cap = u64::from(self.cap);
        for (level, (buf, _, _)) in self.levels.iter().zip(&new_buffers) {
            let block = old_cap * u64::from(level.stride) * 8;
            for pos in 0..level.cells_per_key() {
                encoder.copy_buffer_to_buffer(
                    &level.cells,
                    pos * block,
                    buf,
                    pos * cap * u64::from(level.stride) * 8,
                    block,
                );
            }
        }
        ctx.queue.submit([encoder.finish()]);
        ctx.wait()?;
        for (level, (buf, _, _)) in self.levels.iter_mut().zip(new_buffers) {
            level.cells = buf;
        }
        self.cap = cap as u32;
        Ok(())
    }

    /// Copies the state into `state`'s host levels (which are empty).
    fn download_into(&self, state: &mut PaneState) -> Result<(), KernelError> {
        let ctx = self.ctx.clone();
        let cap = self.cap as usize;
        let shards = state.spec().shards;
        let sources: Vec<_> = self
            .levels
            .iter()
            .map(|l| (&l.cells, 0, l.cells.size()))
            .collect();
        let mut scratch = ctx.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let bytes = ctx.download(&mut scratch, encoder, &sources)?;
        drop(scratch);
        for (l, raw) in bytes.iter().enumerate() {
            let words = as_words(raw);
            for s in 0..shards.min(cap) {
                let slots = (cap - s).div_ceil(shards);
                let ids: Vec<usize> = (0..slots)
                    .map(|slot| state.id_of(s, slot) as usize)
                    .collect();
                let level: &mut LevelState = &mut state.shards[s][l];
                level.reserve_slots(slots);
                let stride = level.layout.stride;
                for (slot, &id) in ids.iter().enumerate() {
                    put_key(level, slot, |pos| {
                        let from = (pos * cap + id) * stride;
                        &words[from..from + stride]
                    });
                }
            }
        }
        Ok(())
    }

    /// A host state (one shard) holding the cells of keys `ids` (below the key
    /// capacity), key `ids[k]`'s at id `k`: what a read of sketch features merges on the
    /// host. Only those keys' cells are copied back.
    pub(super) fn gather(
        &self,
        spec: &crate::StateSpec,
        ids: &[u32],
    ) -> Result<PaneState, KernelError> {
        let mut host = PaneState::new(crate::StateSpec {
            levels: spec.levels.clone(),
            shards: 1,
        })?;
        let ctx = self.ctx.clone();
        let cap = u64::from(self.cap);
        let mut sources = Vec::new();
        for l in &self.levels {
            let bytes = u64::from(l.stride) * 8;
            for &id in ids {
                for pos in 0..l.cells_per_key() {
                    sources.push((&l.cells, (pos * cap + u64::from(id)) * bytes, bytes));
                }
            }
        }
        let mut scratch = ctx.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let cells = ctx.download(&mut scratch, encoder, &sources)?;
        drop(scratch);
        let mut next = cells.iter().map(|c| as_words(c));
        for l in 0..self.levels.len() {
            let level: &mut LevelState = &mut host.shards[0][l];
            level.reserve_slots(ids.len());
            for slot in 0..ids.len() {
                let key: Vec<Vec<f64>> = (0..self.levels[l].cells_per_key())
                    .map(|_| next.next().expect("one source per cell"))
                    .collect();
                put_key(level, slot, |pos| &key[pos]);
            }
        }
        Ok(host)
    }
}

fn as_words(raw: &[u8]) -> Vec<f64> {
    raw.chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect()
}

/// Puts one key's cells (`cell(pos)`: ring position `pos`, then the base cell at
/// `ring`) into slot `slot` of host level `level`.
fn put_key<'a>(level: &mut LevelState, slot: usize, cell: impl Fn(usize) -> &'a [f64]) {
    let ring = level.spec.ring;
    let slots = level.slots;
    for pos in 0..ring {
        let c = cell(pos);
        // Its position need not be allocated for it.
        if holds_no_pane(c) {
            continue;
        }
        let at = level.index(slot, pos);
        level
            .ring
            .cell_mut(&level.layout, slots, at)
            .copy_from_slice(c);
    }
    if level.spec.lifetime {
        let stride = level.layout.stride;
        level.base.data[slot * stride..(slot + 1) * stride].copy_from_slice(cell(ring));
    }
}

/// Words per column in the `cols` buffer (`COL_FIELDS` of common.wgsl).
pub(super) const COL_FIELDS: usize = 20;

/// The (value column, accuracy) of every quantile sketch of `spec`, once each: the key
/// columns a fold uploads.
fn quantile_keys(spec: &crate::StateSpec) -> Vec<(usize, f64)> {
    let mut keys = Vec::new();
    for level in &spec.levels {
        for (c, f) in level.columns.iter().enumerate() {
            if let Some(a) = f.quantile
                && !keys.contains(&(c, a.get()))
            {
                keys.push((c, a.get()));
            }
        }
    }
    keys
}

/// Most loop iterations the fold's walk spends on one event of a level of this layout
/// (fold.wgsl): the step over its fields and columns, and with sketch groups, every
/// loop of sketches.wgsl's code for each column (a SIMD software adapter enters each
/// loop of a branch even where no lane takes it) plus the trips of each group's own.
pub(super) fn step_cost(layout: &Layout) -> u64 {
    let base = 4 + layout.stride as u64 + 4 * layout.cols.len() as u64;
    let groups: Vec<Sketch> = layout
        .cols
        .iter()
        .flat_map(|c| c.sketches.iter().flatten().map(|g| g.sketch))
        .collect();
    if groups.is_empty() {
        return base;
    }
    base + SKETCH_LOOPS * layout.cols.len() as u64
        + groups.into_iter().map(sketch_cost).sum::<u64>()
}

/// Loops of sketches.wgsl one column's add and merge go through (about 75, each
/// entered once at least), with a margin.
const SKETCH_LOOPS: u64 = 120;

/// Most loop iterations one event's step spends on sketch group `s` (sketches.wgsl, its
/// loops over words unrolled by four): an add, and a merge of a recycled cell into the
/// base cell.
fn sketch_cost(s: Sketch) -> u64 {
    match s {
        Sketch::Hll(p) => {
            let cap = crate::hll::sparse_capacity(p) as u64;
            10 * cap + crate::hll::words(p) as u64 / 2 + 16
        }
        Sketch::Quantile(a) => 7 * crate::quantile::capacity(a) as u64 + 16,
        Sketch::LastN(n) => 5 * u64::from(n) + 16,
        // The merge past capacity bisects for the cut: up to 54 passes over both.
        Sketch::TopK(c) => 120 * u64::from(c) + 16,
    }
}

/// Moves a device-resident state back to the host (a no-op for a host state).
pub(crate) fn to_host(state: &mut PaneState) -> Result<(), KernelError> {
    match state.device.take() {
        Some(d) => d.download_into(state),
        None => Ok(()),
    }
}

/// A host copy of a device-resident state, for a host backend reading it.
pub(crate) fn host_copy(state: &PaneState) -> Result<PaneState, KernelError> {
    let mut copy = PaneState::new(state.spec().clone())?;
    if let Some(d) = &state.device {
        d.download_into(&mut copy)?;
    }
    Ok(copy)
}
