//! The fold of one chunk of a batch on the device: the sort, then the per-key walk
//! (see the module docs of `gpu`).

use std::num::NonZeroU64;
use std::time::Instant;

use super::context::groups;
use super::params::{BLOCK, FoldParams, SortParams, TILE};
use super::state::{DeviceLevel, DeviceState, step_cost};
use super::{Gpu, GpuTimings};
use crate::error::KernelError;
use crate::level::Layout;
use crate::state::{FoldBatch, FoldStats};

/// Loop iterations one invocation of a software adapter may run (lavapipe stops at
/// 65 535), with a margin for the walk's own loops.
const SOFTWARE_BUDGET: u64 = 60_000;

impl Gpu {
    /// Most events one fold thread walks (see `fold.wgsl`): on a software adapter
    /// (lavapipe ends an invocation after 65 535 loop iterations, counting the inner
    /// loops over fields, columns and sketch words) what fits that budget; elsewhere
    /// 64 Ki. A multiple of the block length where every level reduces blocks.
    fn segment(&self, dev: &DeviceState) -> u32 {
        if self.ctx.info.device_type != "Cpu" {
            return 1 << 16;
        }
        let per_event = dev.levels.iter().map(|l| l.cost).max().unwrap_or(1);
        let seg = (SOFTWARE_BUDGET / per_event).max(1) as u32;
        if dev.levels.iter().all(|l| l.blocks) {
            (seg / BLOCK * BLOCK).max(BLOCK)
        } else {
            seg
        }
    }

    /// Why this adapter cannot fold states of `spec`, if it cannot: one event's step of
    /// a level past a software adapter's loop budget (large sketch parameters).
    pub(super) fn refuses_spec(&self, spec: &crate::StateSpec) -> Option<String> {
        if self.ctx.info.device_type != "Cpu" {
            return None;
        }
        let (l, cost) = spec
            .levels
            .iter()
            .map(|l| step_cost(&Layout::new(&l.columns)))
            .enumerate()
            .find(|&(_, cost)| cost > SOFTWARE_BUDGET)?;
        Some(format!(
            "hop level {l} keeps sketches whose fold takes up to {cost} loop iterations per \
             event, more than the software adapter {} runs in one invocation \
             ({SOFTWARE_BUDGET}); use the cpu or auto backend, or smaller sketch parameters",
            self.ctx.info.name
        ))
    }

    pub(super) fn fold_chunk(
        &self,
        dev: &DeviceState,
        batch: &FoldBatch<'_>,
    ) -> Result<FoldStats, KernelError> {
        let ctx = &*self.ctx;
        let n = batch.len() as u64;
        let n_pad = n.next_power_of_two().max(TILE);
        let seg = self.segment(dev);
        let mut scratch = ctx.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if scratch.profiling {
            scratch.timings = Some(GpuTimings::default());
        }
        let started = Instant::now();
        let ids = scratch.ids.get(&ctx.device, n * 4);
        ctx.queue
            .write_buffer(&ids, 0, bytemuck::cast_slice(batch.ids));
        let ts = scratch.ts.get(&ctx.device, n * 8);
        ctx.queue
            .write_buffer(&ts, 0, bytemuck::cast_slice(batch.ts));
        // The batch's value columns, then the quantile sketches' keys.
        let columns = (batch.values.len() + dev.quantile_keys.len()) as u64;
        let values = scratch.values.get(&ctx.device, n * 8 * columns);
        for (c, v) in batch.values.iter().enumerate() {
            ctx.queue
                .write_buffer(&values, c as u64 * n * 8, bytemuck::cast_slice(v));
        }
        for (k, &(c, alpha)) in dev.quantile_keys.iter().enumerate() {
            let keys = crate::quantile::keys(batch.values[c], alpha);
            let at = (batch.values.len() + k) as u64 * n * 8;
            ctx.queue
                .write_buffer(&values, at, bytemuck::cast_slice(&keys));
        }
        let sorted = scratch.sorted.get(&ctx.device, n_pad * 8);
        let stats = scratch.stats.get(&ctx.device, 16);
        ctx.queue.write_buffer(&stats, 0, &[0; 16]);
        let blocks = n / u64::from(BLOCK);
        let max_stride = dev
            .levels
            .iter()
            .filter(|l| l.blocks)
            .map(|l| u64::from(l.stride))
            .max()
            .unwrap_or(1);
        let partials = scratch
            .partials
            .get(&ctx.device, blocks.max(1) * max_stride * 8);

        // The sort: fill, sort each tile, then the bitonic merges.
        let mut u = ctx.uniforms();
        let mut sort_plan: Vec<(usize, u32, u64)> = Vec::new(); // (pipeline, offset, threads)
        let sort = |k: u64, j: u64| SortParams {
            k: k as u32,
            j: j as u32,
            n: n as u32,
            _pad: 0,
        };
        sort_plan.push((0, u.push(&sort(0, 0)), n_pad));
        sort_plan.push((1, u.push(&sort(0, 0)), n_pad / 2));
        let mut k = TILE * 2;
        while k <= n_pad {
            let mut j = k / 2;
            while j >= TILE {
                sort_plan.push((2, u.push(&sort(k, j)), n_pad / 2));
                j /= 2;
            }
            sort_plan.push((1, u.push(&sort(k, 0)), n_pad / 2));
            k *= 2;
        }
        let fold_params = |l: &DeviceLevel, round: u32| FoldParams {
            hop: l.hop,
            n: n as u32,
            cap: dev.cap,
            ring: l.ring,
            stride: l.stride,
            columns: l.columns,
            lifetime: u32::from(l.lifetime),
            round,
            seg,
            blocks: u32::from(l.blocks),
            _pad: 0,
        };
        let round0: Vec<u32> = dev
            .levels
            .iter()
            .map(|l| u.push(&fold_params(l, 0)))
            .collect();
        let ubuf = ctx.upload_uniforms(&mut scratch, &u);
        let sorted_binding = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &sorted,
            offset: 0,
            size: NonZeroU64::new(n_pad * 8),
        });
        let sort_bg = ctx.bind(
            &ctx.sort_layout,
            &ubuf,
            &[ids.as_entire_binding(), sorted_binding.clone()],
        );
        let fold_bg = |l: &DeviceLevel, ubuf: &wgpu::Buffer| {
            ctx.bind(
                &ctx.fold_layout,
                ubuf,
                &[
                    sorted_binding.clone(),
                    ts.as_entire_binding(),
                    values.as_entire_binding(),
                    l.cols.as_entire_binding(),
                    l.identity.as_entire_binding(),
                    l.cells.as_entire_binding(),
                    stats.as_entire_binding(),
                    partials.as_entire_binding(),
                ],
            )
        };
        let bgs: Vec<_> = dev.levels.iter().map(|l| fold_bg(l, &ubuf)).collect();
        // Multiples of the segment length inside the batch: the later rounds' starts.
        let multiples = n.saturating_sub(1) / u64::from(seg);
        // One level: its blocks, then its rounds in order (`offsets[r]`: round r's
        // parameters). The partials buffer is shared, so levels go one after another.
        let fold_level = |pass: &mut wgpu::ComputePass<'_>,
                          l: &DeviceLevel,
                          bg: &wgpu::BindGroup,
                          offsets: &[u32]| {
            if blocks > 0 && l.blocks {
                pass.set_pipeline(&ctx.fold_blocks);
                pass.set_bind_group(0, bg, &[offsets[0]]);
                let (x, y) = groups(blocks, 256);
                pass.dispatch_workgroups(x, y, 1);
            }
            pass.set_pipeline(if l.blocks {
                &ctx.fold
            } else {
                &ctx.fold_sketches
            });
            for (r, offset) in offsets.iter().enumerate() {
                pass.set_bind_group(0, bg, &[*offset]);
                let (x, y) = groups(if r == 0 { n } else { multiples }, 256);
                pass.dispatch_workgroups(x, y, 1);
            }
        };
        // First submission: the sort, then either the whole fold (no run can span two
        // segments) or the plan (how many rounds the longest run needs).
        let first = ctx.run(
            &mut scratch,
            started,
            |pass| {
                for &(pipeline, offset, threads) in &sort_plan {
                    pass.set_pipeline(&ctx.sort[pipeline]);
                    pass.set_bind_group(0, &sort_bg, &[offset]);
                    let (x, y) = groups(threads, 256);
                    pass.dispatch_workgroups(x, y, 1);
                }
                if multiples == 0 {
                    for ((l, bg), offset) in dev.levels.iter().zip(&bgs).zip(&round0) {
                        fold_level(pass, l, bg, &[*offset]);
                    }
                } else {
                    pass.set_pipeline(&ctx.fold_plan);
                    pass.set_bind_group(0, &bgs[0], &[round0[0]]);
                    let (x, y) = groups(multiples, 256);
                    pass.dispatch_workgroups(x, y, 1);
                }
            },
            &[(&stats, 0, 16)],
        )?;
        let out = if multiples == 0 {
            first
        } else {
            // Second submission: every round, each over every level.
            let rounds = 1 + u32::from_le_bytes(first[0][12..16].try_into().expect("4 bytes"));
            let mut u = ctx.uniforms();
            let offsets: Vec<Vec<u32>> = dev
                .levels
                .iter()
                .map(|l| (0..rounds).map(|r| u.push(&fold_params(l, r))).collect())
                .collect();
            let ubuf = ctx.upload_uniforms(&mut scratch, &u);
            let bgs: Vec<_> = dev.levels.iter().map(|l| fold_bg(l, &ubuf)).collect();
            ctx.run(
                &mut scratch,
                Instant::now(),
                |pass| {
                    for ((l, bg), offsets) in dev.levels.iter().zip(&bgs).zip(&offsets) {
                        fold_level(pass, l, bg, offsets);
                    }
                },
                &[(&stats, 0, 16)],
            )?
        };
        let s = &out[0];
        let word = |i: usize| {
            u64::from(u32::from_le_bytes(
                s[4 * i..4 * i + 4].try_into().expect("4 bytes"),
            ))
        };
        Ok(FoldStats {
            folded: word(0),
            into_base: word(1),
            expired: word(2),
        })
    }
}
