//! The window merge of one chunk of keys on the device.

use std::num::NonZeroU64;
use std::time::Instant;

use bytemuck::Zeroable;

use super::context::groups;
use super::params::{FeatureDesc, MergeParams, agg_code};
use super::state::DeviceState;
use super::{Gpu, GpuTimings};
use crate::error::KernelError;
use crate::state::{FeatureMerge, ReadStatus};

impl Gpu {
    pub(super) fn merge_chunk(
        &self,
        dev: &DeviceState,
        features: &[FeatureMerge],
        ids: &[Option<u32>],
        at: i64,
        values: &mut [f64],
        valid: &mut [bool],
        status: &mut [ReadStatus],
    ) -> Result<(), KernelError> {
        let ctx = &*self.ctx;
        let keys = ids.len() as u64;
        let nf = features.len() as u64;
        let mut scratch = ctx.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if scratch.profiling {
            scratch.timings = Some(GpuTimings::default());
        }
        let started = Instant::now();
        let slots: Vec<u32> = ids.iter().map(|i| i.unwrap_or(u32::MAX)).collect();
        let ids_buf = scratch.ids.get(&ctx.device, keys * 4);
        ctx.queue
            .write_buffer(&ids_buf, 0, bytemuck::cast_slice(&slots));
        // Each level's features, in a section of the features buffer aligned for binding.
        let mut descs: Vec<FeatureDesc> = Vec::new();
        let mut sections = Vec::new(); // (level, byte offset, count)
        for l in 0..dev.levels.len() {
            let start = descs.len();
            for (f, fm) in features.iter().enumerate().filter(|(_, f)| f.level == l) {
                descs.push(FeatureDesc {
                    agg: agg_code(fm.agg),
                    column: fm.column.map_or(u32::MAX, |c| c as u32),
                    panes: fm.panes.map_or(0, |p| p as u32),
                    out: f as u32,
                });
            }
            let count = descs.len() - start;
            if count > 0 {
                sections.push((l, (start * 16) as u64, count as u32));
            }
            let per = (ctx.storage_align / 16).max(1) as usize;
            descs.resize(descs.len().next_multiple_of(per), FeatureDesc::zeroed());
        }
        let fbuf = scratch.features.get(&ctx.device, (descs.len() * 16) as u64);
        ctx.queue
            .write_buffer(&fbuf, 0, bytemuck::cast_slice(&descs));
        let out_values = scratch.out_values.get(&ctx.device, keys * nf * 8);
        let out_valid = scratch.out_valid.get(&ctx.device, keys * nf * 4);
        let out_status = scratch.out_status.get(&ctx.device, keys * 4);
        ctx.queue
            .write_buffer(&out_status, 0, &vec![0u8; (keys * 4) as usize]);
        let mut u = ctx.uniforms();
        let offsets: Vec<u32> = sections
            .iter()
            .map(|&(l, _, count)| {
                let level = &dev.levels[l];
                u.push(&MergeParams {
                    hop: level.hop,
                    at,
                    keys: keys as u32,
                    features: count,
                    row: nf as u32,
                    cap: dev.cap,
                    ring: level.ring,
                    stride: level.stride,
                    lifetime: u32::from(level.lifetime),
                    _pad: 0,
                })
            })
            .collect();
        let ubuf = ctx.upload_uniforms(&mut scratch, &u);
        let bgs: Vec<_> = sections
            .iter()
            .map(|&(l, offset, count)| {
                let level = &dev.levels[l];
                ctx.bind(
                    &ctx.merge_layout,
                    &ubuf,
                    &[
                        ids_buf.as_entire_binding(),
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &fbuf,
                            offset,
                            size: NonZeroU64::new(u64::from(count) * 16),
                        }),
                        level.cols.as_entire_binding(),
                        level.cells.as_entire_binding(),
                        out_values.as_entire_binding(),
                        out_valid.as_entire_binding(),
                        out_status.as_entire_binding(),
                    ],
                )
            })
            .collect();
        let out = ctx.run(
            &mut scratch,
            started,
            |pass| {
                pass.set_pipeline(&ctx.merge);
                for ((bg, offset), &(_, _, count)) in bgs.iter().zip(&offsets).zip(&sections) {
                    pass.set_bind_group(0, bg, &[*offset]);
                    let (x, y) = groups(keys * u64::from(count), 64);
                    pass.dispatch_workgroups(x, y, 1);
                }
            },
            &[
                (&out_values, 0, keys * nf * 8),
                (&out_valid, 0, keys * nf * 4),
                (&out_status, 0, keys * 4),
            ],
        )?;
        for (v, b) in values.iter_mut().zip(out[0].chunks_exact(8)) {
            *v = f64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        for (v, b) in valid.iter_mut().zip(out[1].chunks_exact(4)) {
            *v = b != [0; 4];
        }
        for (s, b) in status.iter_mut().zip(out[2].chunks_exact(4)) {
            *s = match u32::from_le_bytes(b.try_into().expect("4 bytes")) {
                0 => ReadStatus::Exact,
                1 => ReadStatus::PaneHoldsLaterEvents,
                _ => ReadStatus::NotRetained,
            };
        }
        Ok(())
    }
}
