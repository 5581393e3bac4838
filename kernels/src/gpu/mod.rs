//! The `Gpu` backend: the fold and the window merge as WGSL compute shaders
//! (`panes-shaders`) through wgpu, on Vulkan, Metal or DX12.
//!
//! # State on the device
//! Once a state has been folded on the GPU it lives there: each hop level is one
//! storage buffer of cells in the layout of [`crate::level`] (cells side by side,
//! position-major), with one difference: cells are indexed by the global key id
//! (`pos * cap + id`, base cells after the ring at `ring * cap + id`) instead of by
//! shard and local slot, since the GPU has no use for shards. The host copy is freed
//! while the device holds the state; a fold by a host backend brings the state back
//! first ([`PaneState`] keeps exactly one authoritative copy). Reads copy back only the
//! `keys × features` values, validity and statuses they ask for.
//!
//! # Fold: sort, then one thread per key
//! A batch's key ids and arrival indices are sorted as pairs on the GPU (bitonic, the
//! narrow stages in workgroup memory), so each key's events form one run in arrival
//! order. A thread walks a run, event by event, with the same per-event step as the
//! scalar backend. Runs of different keys write disjoint cells, so no atomics touch the
//! cells and the result does not depend on thread scheduling: it is the scalar
//! backend's result up to summation order. Rejected: one thread per event with float
//! atomics (order-dependent sums, no atomic for pane recycling or `last`), and
//! fixed-point integer atomics (exact only within a range the data would have to
//! promise).
//!
//! Sketch and list groups (`approx_distinct`, `quantile`, `last_n`, `top_k`) are folded
//! the same way, by WGSL twins of the host's functions (`sketches.wgsl`), with the same
//! bits: a level with them gets a pipeline of its own and no blocks (a block's partial
//! would need room for every sketch). Reads of their features copy the keys' cells back
//! and merge them on the host with the CPU backend's code.
//!
//! A key with many events in one batch would make its walk long, so two things cut it
//! short: aligned blocks of 64 sorted events that share a key and a pane are reduced to
//! partial cells in parallel first, and the walk merges a block's partial in one step
//! (same decisions as its events one by one: they share the pane); and runs are cut
//! into segments of at most 64 Ki events (fewer on a software adapter, which ends an
//! invocation after 65 535 loop iterations), walked in rounds, in order.

//! # Precision
//! Everything is f64, as on the CPU: the backend needs `SHADER_F64` and
//! `SHADER_INT64` and refuses an adapter without them (Apple GPUs through Metal, most
//! mobile GPUs, WebGPU) rather than give f32 answers that would break the parity with
//! the CPU backends.
//!
//! # Buffers
//! One pipeline per kernel, built once per process with explicit bind-group layouts;
//! the per-dispatch parameters travel in one uniform buffer per submission, bound at
//! dynamic offsets. Batch uploads go straight from the batch's slices (`bytemuck`) into
//! device buffers that are reused and grown as needed, as is the read-back buffer.
//!
//! # Code
//! `context` holds the device, the pipelines and the helpers that upload, bind, run and
//! read back; `params` the structs and constants shared with the WGSL kernels (checked
//! against naga's layout of the kernels in a plain `cargo test`, no GPU needed);
//! `state` the device-resident state; `fold` and `merge` the host side of each kernel.

mod context;
mod fold;
mod merge;
mod params;
mod state;

use std::sync::Arc;
use std::time::Duration;

use crate::Agg;
use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::state::{FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState};

use context::{Context, shared};
use params::TILE;
pub(crate) use state::{DeviceState, host_copy, to_host};

/// What the adapter is, for logs and benchmark reports.
#[derive(Clone, Debug)]
pub struct GpuInfo {
    /// Adapter name, e.g. "NVIDIA H100" or "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// Graphics API: Vulkan, Metal, Dx12.
    pub backend: String,
    /// Driver name and version.
    pub driver: String,
    /// Discrete, integrated, virtual, CPU (software) or other.
    pub device_type: String,
    /// Whether compute passes can be timed on the device.
    pub timestamps: bool,
    /// Largest storage-buffer binding, in bytes: the largest state level and batch.
    pub max_binding: u64,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}, {}, driver {})",
            self.name, self.backend, self.device_type, self.driver
        )
    }
}

/// Time spent in each phase of the last fold or read, when profiling is on.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuTimings {
    /// Host → device copies of the batch (or the key ids of a read), wall time.
    pub upload: Duration,
    /// The compute submission, wall time from submit to completion.
    pub compute: Duration,
    /// The compute passes as timed on the device (timestamp queries), when supported.
    pub compute_device: Option<Duration>,
    /// Device → host copy of the results, wall time.
    pub download: Duration,
}

/// The GPU backend.
#[derive(Clone, Debug)]
pub struct Gpu {
    ctx: Arc<Context>,
}

impl Gpu {
    /// The backend on the process's GPU (the adapter is opened once per process).
    ///
    /// # Errors
    /// [`KernelError::Unavailable`] when there is no adapter, or it lacks f64 / i64
    /// shader support; [`KernelError::Device`] when the device fails to open.
    pub fn new() -> Result<Self, KernelError> {
        Ok(Gpu { ctx: shared()? })
    }

    /// The adapter in use.
    pub fn info(&self) -> &GpuInfo {
        &self.ctx.info
    }

    /// Turns per-phase timing on or off (benchmarks): it adds a wait after each phase.
    pub fn set_profiling(&self, on: bool) {
        let mut s = self.ctx.scratch.lock().unwrap_or_else(|p| p.into_inner());
        s.profiling = on;
        s.timings = None;
    }

    /// Per-phase timings of the last fold or read, with profiling on.
    pub fn last_timings(&self) -> Option<GpuTimings> {
        self.ctx
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .timings
    }

    /// Largest batch one submission folds: the sorted pairs and each value column must
    /// fit one storage binding.
    fn max_chunk(&self, columns: usize) -> usize {
        let by_pairs = self.ctx.info.max_binding / 8 / 2;
        let by_values = self.ctx.info.max_binding / 8 / columns.max(1) as u64;
        (by_pairs.min(by_values).min(1 << 26) as usize).max(TILE as usize)
    }
}

impl Backend for Gpu {
    fn kind(&self) -> BackendKind {
        BackendKind::Gpu
    }

    fn refuses(&self, spec: &crate::StateSpec) -> Option<String> {
        self.refuses_spec(spec)
    }

    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError> {
        state.check(batch)?;
        let need = batch.ids.iter().max().map_or(0, |&m| u64::from(m) + 1);
        match &mut state.device {
            Some(d) => d.grow(&state.spec, need)?,
            None => {
                if let Some(why) = self.refuses_spec(&state.spec) {
                    return Err(KernelError::Unavailable(why));
                }
                DeviceState::upload(&self.ctx, state, need)?;
            }
        }
        let dev = state.device.as_ref().expect("uploaded above");
        let mut stats = FoldStats::default();
        let chunk = self.max_chunk(batch.values.len() + dev.quantile_keys.len());
        let mut start = 0;
        while start < batch.len() {
            let end = (start + chunk).min(batch.len());
            let vals: Vec<&[f64]> = batch.values.iter().map(|v| &v[start..end]).collect();
            let part = FoldBatch {
                ids: &batch.ids[start..end],
                ts: &batch.ts[start..end],
                values: &vals,
            };
            stats.add(self.fold_chunk(dev, &part)?);
            start = end;
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
        crate::state::check_features(state, features)?;
        let Some(dev) = &state.device else {
            // Nothing was ever folded on the GPU: the state is on the host.
            return crate::Cpu::new().merge(state, features, ids, at, out);
        };
        if features.iter().any(|f| reads_sketch(f.agg)) {
            return self.merge_on_host(state, dev, features, ids, at, out);
        }
        out.reset(ids.len(), features.len());
        let nf = features.len();
        if nf == 0 || ids.is_empty() {
            return Ok(());
        }
        let max_keys = (self.ctx.info.max_binding / 8 / nf as u64).clamp(1, 1 << 24) as usize;
        let mut k = 0;
        while k < ids.len() {
            let end = (k + max_keys).min(ids.len());
            self.merge_chunk(
                dev,
                features,
                &ids[k..end],
                at,
                &mut out.values[k * nf..end * nf],
                &mut out.valid[k * nf..end * nf],
                &mut out.status[k..end],
            )?;
            k = end;
        }
        Ok(())
    }
}

/// Most cells a read of sketch features copies back one by one; a read of more copies
/// the whole state back instead.
const MAX_GATHER_CELLS: u64 = 1 << 16;

/// Whether `agg` is read from sketch or list groups (merged on the host).
fn reads_sketch(agg: Agg) -> bool {
    matches!(
        agg,
        Agg::ApproxDistinct { .. } | Agg::Quantile { .. } | Agg::LastN { .. } | Agg::TopK { .. }
    )
}

impl Gpu {
    /// A read with sketch or list features: the keys' cells are copied back (only
    /// theirs) and merged by the CPU backend, so these reads give the CPU's bits. The
    /// window merges of sketches (sorted merges of variable-length groups, HyperLogLog
    /// estimates, lists of any length) stay on the host; the fold, where the events
    /// are, runs on the GPU.
    fn merge_on_host(
        &self,
        state: &PaneState,
        dev: &DeviceState,
        features: &[FeatureMerge],
        ids: &[Option<u32>],
        at: i64,
        out: &mut MergeOutput,
    ) -> Result<(), KernelError> {
        // Each distinct known key once, in order of first appearance.
        let mut keys: Vec<u32> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let local: Vec<Option<u32>> = ids
            .iter()
            .map(|id| {
                let id = id.filter(|&i| i < dev.cap)?;
                Some(*index.entry(id).or_insert_with(|| {
                    keys.push(id);
                    keys.len() as u32 - 1
                }))
            })
            .collect();
        let cells = keys.len() as u64 * dev.cells_per_key();
        if cells > MAX_GATHER_CELLS {
            // Many keys: one copy of every level beats a copy per cell.
            return crate::Cpu::new().merge(&host_copy(state)?, features, ids, at, out);
        }
        let host = dev.gather(state.spec(), &keys)?;
        crate::Cpu::new().merge(&host, features, &local, at, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_groups_keys_in_arrival_order() {
        let gpu = match Gpu::new() {
            Ok(g) => g,
            Err(e) if std::env::var("PANES_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
                panic!("PANES_REQUIRE_GPU=1 but the GPU backend is unavailable: {e}")
            }
            Err(_) => return,
        };
        for n in [1usize, 511, 512, 513, 5000, 13418, 40000] {
            let ids: Vec<u32> = (0..n as u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 7) % 97)
                .collect();
            let spec = crate::StateSpec {
                levels: vec![crate::LevelSpec {
                    hop: 1,
                    ring: 1,
                    columns: vec![],
                    lifetime: false,
                }],
                shards: 1,
            };
            let mut state = PaneState::new(spec).unwrap();
            let ts = vec![0i64; n];
            gpu.fold(
                &mut state,
                &FoldBatch {
                    ids: &ids,
                    ts: &ts,
                    values: &[],
                },
            )
            .unwrap();
            let ctx = &gpu.ctx;
            let mut scratch = ctx.scratch.lock().unwrap();
            let sorted = scratch.sorted.buffer.clone().unwrap();
            let n_pad = (n as u64).next_power_of_two().max(TILE);
            let enc = ctx.device.create_command_encoder(&Default::default());
            let got = ctx
                .download(&mut scratch, enc, &[(&sorted, 0, n_pad * 8)])
                .unwrap();
            let got: Vec<(u32, u32)> = got[0]
                .chunks_exact(8)
                .map(|b| {
                    (
                        u32::from_le_bytes(b[0..4].try_into().unwrap()),
                        u32::from_le_bytes(b[4..8].try_into().unwrap()),
                    )
                })
                .collect();
            let mut want: Vec<(u32, u32)> = ids
                .iter()
                .enumerate()
                .map(|(i, &k)| (k, i as u32))
                .collect();
            want.sort();
            want.resize(n_pad as usize, (u32::MAX, u32::MAX));
            let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(first_bad, None, "n={n}");
        }
    }
}
