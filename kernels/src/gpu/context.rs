//! The process-wide device and pipelines ([`Context`]), the reused scratch buffers, the
//! per-dispatch uniforms and the helpers that bind, run, wait and read back.

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytemuck::Pod;

use super::{GpuInfo, GpuTimings};
use crate::error::KernelError;

/// Most workgroups per dispatch dimension used (wgpu's minimum limit is 65 535).
const MAX_GROUPS_X: u32 = 32_768;

pub(super) fn device_err(what: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Device(format!("{what}: {e}"))
}

/// The process-wide device and pipelines: built once, shared by every `Gpu`.
pub(super) struct Context {
    pub(super) device: wgpu::Device,
    pub(super) queue: wgpu::Queue,
    pub(super) info: GpuInfo,
    uniform_align: u64,
    pub(super) storage_align: u64,
    pub(super) sort: [wgpu::ComputePipeline; 3],
    pub(super) sort_layout: wgpu::BindGroupLayout,
    pub(super) fold: wgpu::ComputePipeline,
    /// The fold of levels with sketch groups (`SKETCHES` of fold.wgsl set).
    pub(super) fold_sketches: wgpu::ComputePipeline,
    pub(super) fold_plan: wgpu::ComputePipeline,
    pub(super) fold_blocks: wgpu::ComputePipeline,
    pub(super) fold_layout: wgpu::BindGroupLayout,
    pub(super) merge: wgpu::ComputePipeline,
    pub(super) merge_layout: wgpu::BindGroupLayout,
    pub(super) init: wgpu::ComputePipeline,
    pub(super) init_layout: wgpu::BindGroupLayout,
    /// Errors the device reported outside an error scope (validation, loss).
    uncaptured: Arc<Mutex<Option<String>>>,
    pub(super) scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("info", &self.info).finish()
    }
}

/// A device buffer reused across calls and grown (to a power of two) when too small.
pub(super) struct Reused {
    usage: wgpu::BufferUsages,
    label: &'static str,
    pub(super) buffer: Option<wgpu::Buffer>,
}

impl Reused {
    fn new(label: &'static str, usage: wgpu::BufferUsages) -> Self {
        Reused {
            usage,
            label,
            buffer: None,
        }
    }

    pub(super) fn get(&mut self, device: &wgpu::Device, size: u64) -> wgpu::Buffer {
        let size = size.max(256);
        if self.buffer.as_ref().is_none_or(|b| b.size() < size) {
            // Rounded up to a power of two, but never past the device's largest
            // buffer when the request itself fits (callers chunk to that limit).
            let limit = device.limits().max_buffer_size.max(size);
            self.buffer = Some(device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(self.label),
                size: size.next_power_of_two().min(limit).next_multiple_of(8),
                usage: self.usage,
                mapped_at_creation: false,
            }));
        }
        self.buffer.clone().expect("allocated above")
    }
}

pub(super) struct Scratch {
    pub(super) ids: Reused,
    pub(super) ts: Reused,
    pub(super) values: Reused,
    pub(super) sorted: Reused,
    uniforms: Reused,
    pub(super) features: Reused,
    pub(super) stats: Reused,
    pub(super) partials: Reused,
    pub(super) out_values: Reused,
    pub(super) out_valid: Reused,
    pub(super) out_status: Reused,
    readback: Reused,
    queries: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    pub(super) profiling: bool,
    pub(super) timings: Option<GpuTimings>,
}

impl Scratch {
    fn new() -> Self {
        use wgpu::BufferUsages as U;
        let storage_in = U::STORAGE | U::COPY_DST;
        let storage_out = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        Scratch {
            ids: Reused::new("panes ids", storage_in),
            ts: Reused::new("panes ts", storage_in),
            values: Reused::new("panes values", storage_in),
            sorted: Reused::new("panes sorted", U::STORAGE | U::COPY_SRC),
            uniforms: Reused::new("panes uniforms", U::UNIFORM | U::COPY_DST),
            features: Reused::new("panes features", storage_in),
            stats: Reused::new("panes fold stats", storage_out),
            partials: Reused::new("panes fold partials", U::STORAGE),
            out_values: Reused::new("panes out values", storage_out),
            out_valid: Reused::new("panes out valid", storage_out),
            out_status: Reused::new("panes out status", storage_out),
            readback: Reused::new("panes readback", U::MAP_READ | U::COPY_DST),
            queries: None,
            profiling: false,
            timings: None,
        }
    }
}

/// Per-dispatch parameters, packed at aligned offsets into one uniform buffer.
pub(super) struct Uniforms {
    bytes: Vec<u8>,
    align: u64,
}

impl Uniforms {
    /// Bytes bound per entry: every parameter struct fits.
    const ENTRY: u64 = 64;

    pub(super) fn push<T: Pod>(&mut self, v: &T) -> u32 {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(bytemuck::bytes_of(v));
        let end = (self.bytes.len() as u64).next_multiple_of(self.align) as usize;
        self.bytes.resize(end.max(at + Self::ENTRY as usize), 0);
        at as u32
    }
}

/// Workgroups `(x, y)` covering `threads` threads of `size` per group.
pub(super) fn groups(threads: u64, size: u64) -> (u32, u32) {
    let g = threads.div_ceil(size).max(1);
    let x = g.min(MAX_GROUPS_X as u64);
    (x as u32, g.div_ceil(x) as u32)
}

fn layout_entries(kinds: &[Option<bool>]) -> Vec<wgpu::BindGroupLayoutEntry> {
    // None = the uniform parameters (dynamic offset); Some(read_only) = storage.
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: match k {
                None => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                Some(read_only) => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: *read_only,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
            },
            count: None,
        })
        .collect()
}

impl Context {
    fn create() -> Result<Context, KernelError> {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| {
            KernelError::Unavailable(format!(
                "no GPU adapter ({e}); on Linux this needs a Vulkan driver and loader \
                 (Debian: mesa-vulkan-drivers libvulkan1, or the vendor's driver)"
            ))
        })?;
        let a = adapter.get_info();
        let need = wgpu::Features::SHADER_F64 | wgpu::Features::SHADER_INT64;
        let missing = need - adapter.features();
        if !missing.is_empty() {
            return Err(KernelError::Unavailable(format!(
                "GPU adapter {} ({:?}) lacks {missing:?}; the GPU backend computes in f64 like \
                 the CPU and does not run without it",
                a.name, a.backend
            )));
        }
        let timestamps = adapter.features().contains(wgpu::Features::TIMESTAMP_QUERY);
        let features = need
            | if timestamps {
                wgpu::Features::TIMESTAMP_QUERY
            } else {
                wgpu::Features::empty()
            };
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("panes"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| device_err("cannot open the GPU device", e))?;
        let uncaptured = Arc::new(Mutex::new(None::<String>));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.get_or_insert_with(|| e.to_string());
        }));
        let info = GpuInfo {
            name: a.name.clone(),
            backend: format!("{:?}", a.backend),
            driver: format!("{} {}", a.driver, a.driver_info).trim().to_string(),
            device_type: format!("{:?}", a.device_type),
            timestamps,
            max_binding: limits
                .max_storage_buffer_binding_size
                .min(limits.max_buffer_size),
        };

        let module = |s: &panes_shaders::Shader| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(s.name),
                source: wgpu::ShaderSource::Wgsl(s.source.into()),
            })
        };
        let layout = |name: &str, kinds: &[Option<bool>]| {
            device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(name),
                entries: &layout_entries(kinds),
            })
        };
        let pipeline_with = |m: &wgpu::ShaderModule,
                             bgl: &wgpu::BindGroupLayout,
                             entry: &str,
                             constants: &[(&str, f64)]| {
            let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(entry),
                bind_group_layouts: &[Some(bgl)],
                immediate_size: 0,
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: Some(&pl),
                module: m,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            })
        };
        let pipeline = |m: &wgpu::ShaderModule, bgl: &wgpu::BindGroupLayout, entry: &str| {
            pipeline_with(m, bgl, entry, &[])
        };
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let ro = Some(true);
        let rw = Some(false);
        let sort_layout = layout("sort", &[None, ro, rw]);
        let fold_layout = layout("fold", &[None, ro, ro, ro, ro, ro, rw, rw, rw]);
        let merge_layout = layout("merge", &[None, ro, ro, ro, ro, rw, rw, rw]);
        let init_layout = layout("init", &[None, ro, rw]);
        let sort_m = module(&panes_shaders::SORT);
        let fold_m = module(&panes_shaders::FOLD);
        let merge_m = module(&panes_shaders::MERGE);
        let init_m = module(&panes_shaders::INIT);
        let sort = [
            pipeline(&sort_m, &sort_layout, "sort_keys"),
            pipeline(&sort_m, &sort_layout, "sort_local"),
            pipeline(&sort_m, &sort_layout, "sort_global"),
        ];
        let fold = pipeline(&fold_m, &fold_layout, "fold");
        let fold_sketches = pipeline_with(&fold_m, &fold_layout, "fold", &[("SKETCHES", 1.0)]);
        let fold_plan = pipeline(&fold_m, &fold_layout, "fold_plan");
        let fold_blocks = pipeline(&fold_m, &fold_layout, "fold_blocks");
        let merge = pipeline(&merge_m, &merge_layout, "merge");
        let init = pipeline(&init_m, &init_layout, "init");
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err("building the GPU pipelines failed", e));
        }
        Ok(Context {
            uniform_align: u64::from(limits.min_uniform_buffer_offset_alignment),
            storage_align: u64::from(limits.min_storage_buffer_offset_alignment),
            device,
            queue,
            info,
            sort,
            sort_layout,
            fold,
            fold_sketches,
            fold_plan,
            fold_blocks,
            fold_layout,
            merge,
            merge_layout,
            init,
            init_layout,
            uncaptured,
            scratch: Mutex::new(Scratch::new()),
        })
    }

    pub(super) fn uniforms(&self) -> Uniforms {
        Uniforms {
            bytes: Vec::new(),
            align: self.uniform_align.max(Uniforms::ENTRY),
        }
    }

    /// Uploads `u` into a reused uniform buffer.
    pub(super) fn upload_uniforms(&self, scratch: &mut Scratch, u: &Uniforms) -> wgpu::Buffer {
        let buf = scratch.uniforms.get(&self.device, u.bytes.len() as u64);
        self.queue.write_buffer(&buf, 0, &u.bytes);
        buf
    }

    pub(super) fn bind(
        &self,
        layout: &wgpu::BindGroupLayout,
        uniforms: &wgpu::Buffer,
        buffers: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: uniforms,
                offset: 0,
                size: NonZeroU64::new(Uniforms::ENTRY),
            }),
        }];
        entries.extend(
            buffers
                .iter()
                .enumerate()
                .map(|(i, r)| wgpu::BindGroupEntry {
                    binding: i as u32 + 1,
                    resource: r.clone(),
                }),
        );
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout,
            entries: &entries,
        })
    }

    /// Waits for the queue and reports any error the device raised meanwhile.
    pub(super) fn wait(&self) -> Result<(), KernelError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| device_err("waiting for the GPU failed", e))?;
        self.check()
    }

    fn check(&self) -> Result<(), KernelError> {
        let mut u = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        match u.take() {
            Some(e) => Err(KernelError::Device(e)),
            None => Ok(()),
        }
    }

    /// Copies `len` bytes of each `(buffer, offset)` source back to the host.
    pub(super) fn download(
        &self,
        scratch: &mut Scratch,
        mut encoder: wgpu::CommandEncoder,
        sources: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Vec<Vec<u8>>, KernelError> {
        let total: u64 = sources.iter().map(|s| s.2.next_multiple_of(8)).sum();
        let staging = scratch.readback.get(&self.device, total);
        let mut at = 0;
        let mut spans = Vec::new();
        for &(buf, offset, len) in sources {
            if len > 0 {
                encoder.copy_buffer_to_buffer(buf, offset, &staging, at, len);
            }
            spans.push((at, len));
            at += len.next_multiple_of(8);
        }
        self.queue.submit([encoder.finish()]);
        let slice = staging.slice(..total.max(8));
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait()?;
        rx.recv()
            .map_err(|e| device_err("mapping the read-back buffer failed", e))?
            .map_err(|e| device_err("mapping the read-back buffer failed", e))?;
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| device_err("reading the read-back buffer failed", e))?;
            spans
                .iter()
                .map(|&(a, l)| view[a as usize..(a + l) as usize].to_vec())
                .collect()
        };
        staging.unmap();
        Ok(out)
    }

    /// A zeroed timestamp query set and its resolve buffer, when profiling on a device
    /// that can time passes.
    fn timestamp_writes<'a>(
        &self,
        scratch: &'a mut Scratch,
    ) -> Option<wgpu::ComputePassTimestampWrites<'a>> {
        if !(scratch.profiling && self.info.timestamps) {
            return None;
        }
        let (set, _) = scratch.queries.get_or_insert_with(|| {
            let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("panes timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("panes timestamps"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            (set, buf)
        });
        Some(wgpu::ComputePassTimestampWrites {
            query_set: set,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        })
    }

    /// Runs `record` in one compute pass and submits it. With profiling on, uploads,
    /// compute and download are separate submissions, each waited for and timed.
    /// Returns the bytes of each download source.
    pub(super) fn run(
        &self,
        scratch: &mut Scratch,
        upload_started: Instant,
        record: impl FnOnce(&mut wgpu::ComputePass<'_>),
        sources: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<Vec<Vec<u8>>, KernelError> {
        let profiling = scratch.profiling;
        let mut timings = scratch.timings.unwrap_or_default();
        if profiling {
            self.queue.submit([]);
            self.wait()?;
            timings.upload += upload_started.elapsed();
        }
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let timed = {
            let writes = self.timestamp_writes(scratch);
            let timed = writes.is_some();
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: writes,
            });
            record(&mut pass);
            timed
        };
        if !profiling {
            return self.download(scratch, encoder, sources);
        }
        if timed && let Some((set, buf)) = &scratch.queries {
            encoder.resolve_query_set(set, 0..2, buf, 0);
        }
        let started = Instant::now();
        self.queue.submit([encoder.finish()]);
        self.wait()?;
        timings.compute += started.elapsed();
        let started = Instant::now();
        let encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        let mut out = self.download(scratch, encoder, sources)?;
        timings.download += started.elapsed();
        if timed && let Some((_, buf)) = &scratch.queries {
            let buf = buf.clone();
            let encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let ticks = self.download(scratch, encoder, &[(&buf, 0, 16)])?;
            let t = &ticks[0];
            let begin = u64::from_le_bytes(t[0..8].try_into().expect("8 bytes"));
            let end = u64::from_le_bytes(t[8..16].try_into().expect("8 bytes"));
            let ns =
                end.saturating_sub(begin) as f64 * f64::from(self.queue.get_timestamp_period());
            let device = timings.compute_device.unwrap_or_default();
            timings.compute_device = Some(device + Duration::from_nanos(ns as u64));
        }
        scratch.timings = Some(timings);
        out.shrink_to_fit();
        Ok(out)
    }
}

pub(super) fn shared() -> Result<Arc<Context>, KernelError> {
    static CONTEXT: OnceLock<Result<Arc<Context>, String>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| Context::create().map(Arc::new).map_err(|e| e.to_string()))
        .clone()
        .map_err(KernelError::Unavailable)
}
