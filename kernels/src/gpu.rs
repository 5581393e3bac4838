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

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::level::{ABSENT, Layout, LevelState};
use crate::state::{FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState, ReadStatus};

/// Events per block of `fold.wgsl` (reduced in parallel before the per-key walk).
const BLOCK: u32 = 64;
/// Sort tile of `sort.wgsl` (pairs sorted in workgroup memory).
const TILE: u64 = 512;
/// Most workgroups per dispatch dimension used (wgpu's minimum limit is 65 535).
const MAX_GROUPS_X: u32 = 32_768;

fn device_err(what: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Device(format!("{what}: {e}"))
}

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

/// The process-wide device and pipelines: built once, shared by every `Gpu`.
struct Context {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: GpuInfo,
    uniform_align: u64,
    storage_align: u64,
    sort: [wgpu::ComputePipeline; 3],
    sort_layout: wgpu::BindGroupLayout,
    fold: wgpu::ComputePipeline,
    fold_plan: wgpu::ComputePipeline,
    fold_blocks: wgpu::ComputePipeline,
    fold_layout: wgpu::BindGroupLayout,
    merge: wgpu::ComputePipeline,
    merge_layout: wgpu::BindGroupLayout,
    init: wgpu::ComputePipeline,
    init_layout: wgpu::BindGroupLayout,
    /// Errors the device reported outside an error scope (validation, loss).
    uncaptured: Arc<Mutex<Option<String>>>,
    scratch: Mutex<Scratch>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("info", &self.info).finish()
    }
}

/// A device buffer reused across calls and grown (to a power of two) when too small.
struct Reused {
    usage: wgpu::BufferUsages,
    label: &'static str,
    buffer: Option<wgpu::Buffer>,
}

impl Reused {
    fn new(label: &'static str, usage: wgpu::BufferUsages) -> Self {
        Reused {
            usage,
            label,
            buffer: None,
        }
    }

    fn get(&mut self, device: &wgpu::Device, size: u64) -> wgpu::Buffer {
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

struct Scratch {
    ids: Reused,
    ts: Reused,
    values: Reused,
    sorted: Reused,
    uniforms: Reused,
    features: Reused,
    stats: Reused,
    partials: Reused,
    out_values: Reused,
    out_valid: Reused,
    out_status: Reused,
    readback: Reused,
    queries: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    profiling: bool,
    timings: Option<GpuTimings>,
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
struct Uniforms {
    bytes: Vec<u8>,
    align: u64,
}

impl Uniforms {
    /// Bytes bound per entry: every parameter struct fits.
    const ENTRY: u64 = 64;

    fn push<T: Pod>(&mut self, v: &T) -> u32 {
        let at = self.bytes.len();
        self.bytes.extend_from_slice(bytemuck::bytes_of(v));
        let end = (self.bytes.len() as u64).next_multiple_of(self.align) as usize;
        self.bytes.resize(end.max(at + Self::ENTRY as usize), 0);
        at as u32
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct SortParams {
    k: u32,
    j: u32,
    n: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FoldParams {
    hop: i64,
    n: u32,
    cap: u32,
    ring: u32,
    stride: u32,
    columns: u32,
    lifetime: u32,
    round: u32,
    seg: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MergeParams {
    hop: i64,
    at: i64,
    keys: u32,
    features: u32,
    row: u32,
    cap: u32,
    ring: u32,
    stride: u32,
    lifetime: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct InitParams {
    first: u32,
    count: u32,
    stride: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FeatureDesc {
    agg: u32,
    column: u32,
    panes: u32,
    out: u32,
}

fn agg_code(a: crate::Agg) -> u32 {
    crate::Agg::ALL.iter().position(|x| *x == a).unwrap_or(0) as u32
}

/// Workgroups `(x, y)` covering `threads` threads of `size` per group.
fn groups(threads: u64, size: u64) -> (u32, u32) {
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
        let pipeline = |m: &wgpu::ShaderModule, bgl: &wgpu::BindGroupLayout, entry: &str| {
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
                compilation_options: Default::default(),
                cache: None,
            })
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

    fn uniforms(&self) -> Uniforms {
        Uniforms {
            bytes: Vec::new(),
            align: self.uniform_align.max(Uniforms::ENTRY),
        }
    }

    /// Uploads `u` into a reused uniform buffer.
    fn upload_uniforms(&self, scratch: &mut Scratch, u: &Uniforms) -> wgpu::Buffer {
        let buf = scratch.uniforms.get(&self.device, u.bytes.len() as u64);
        self.queue.write_buffer(&buf, 0, &u.bytes);
        buf
    }

    fn bind(
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
    fn wait(&self) -> Result<(), KernelError> {
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
    fn download(
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
    fn run(
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

fn shared() -> Result<Arc<Context>, KernelError> {
    static CONTEXT: OnceLock<Result<Arc<Context>, String>> = OnceLock::new();
    CONTEXT
        .get_or_init(|| Context::create().map(Arc::new).map_err(|e| e.to_string()))
        .clone()
        .map_err(KernelError::Unavailable)
}

/// One hop level on the device.
#[derive(Debug)]
struct DeviceLevel {
    cells: wgpu::Buffer,
    cols: wgpu::Buffer,
    identity: wgpu::Buffer,
    hop: i64,
    ring: u32,
    stride: u32,
    columns: u32,
    lifetime: bool,
}

impl DeviceLevel {
    fn cells_per_key(&self) -> u64 {
        u64::from(self.ring) + u64::from(self.lifetime)
    }
}

/// A state's copy on the device (see the module docs); held by [`PaneState`].
#[derive(Debug)]
pub(crate) struct DeviceState {
    ctx: Arc<Context>,
    /// Key capacity: ids below it have cells.
    cap: u32,
    levels: Vec<DeviceLevel>,
    /// The `auto` backend's rent: estimated seconds lost to small batches folded here
    /// since the last large one (see `crate::auto`).
    pub(crate) rent: f64,
}

impl DeviceState {
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

    /// Moves the host state of `state` to the device, with room for `need` keys.
    fn upload(ctx: &Arc<Context>, state: &mut PaneState, need: u64) -> Result<(), KernelError> {
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
        let cap = need.max(host_keys).max(1024);
        for spec in &state.spec().levels {
            Self::level_bytes(ctx, spec, cap)?;
        }
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
            levels.push(Self::level(ctx, spec, &layout, cells));
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
            rent: 0.0,
        });
        Ok(())
    }

    fn level(
        ctx: &Context,
        spec: &crate::LevelSpec,
        layout: &Layout,
        cells: wgpu::Buffer,
    ) -> DeviceLevel {
        let mut cols: Vec<u32> = Vec::with_capacity(layout.cols.len() * 6);
        for c in &layout.cols {
            for f in [c.count, c.sum, c.moments, c.min, c.max, c.last] {
                cols.push(if f == ABSENT { u32::MAX } else { f as u32 });
            }
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
        }
    }

    /// Grows every level to hold at least `need` keys (+50 %, amortised).
    fn grow(&mut self, state_spec: &crate::StateSpec, need: u64) -> Result<(), KernelError> {
        if need <= u64::from(self.cap) {
            return Ok(());
        }
        let ctx = self.ctx.clone();
        let cap = need.max(u64::from(self.cap) * 3 / 2);
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
            let words: Vec<f64> = raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            for s in 0..shards.min(cap) {
                let slots = (cap - s).div_ceil(shards);
                let ids: Vec<usize> = (0..slots)
                    .map(|slot| state.id_of(s, slot) as usize)
                    .collect();
                let level: &mut LevelState = &mut state.shards[s][l];
                level.reserve_slots(slots);
                let stride = level.layout.stride;
                let ring = level.spec.ring;
                for (slot, &id) in ids.iter().enumerate() {
                    for pos in 0..ring {
                        let from = (pos * cap + id) * stride;
                        let to = level.index(slot, pos) * stride;
                        level.ring.data[to..to + stride]
                            .copy_from_slice(&words[from..from + stride]);
                    }
                    if level.spec.lifetime {
                        let from = (ring * cap + id) * stride;
                        level.base.data[slot * stride..(slot + 1) * stride]
                            .copy_from_slice(&words[from..from + stride]);
                    }
                }
            }
        }
        Ok(())
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

    /// Most events one fold thread walks (see `fold.wgsl`): on a software adapter
    /// (lavapipe ends an invocation after 65 535 loop iterations, counting the inner
    /// loops over fields and columns) what fits that budget; elsewhere 64 Ki.
    fn segment(&self, dev: &DeviceState) -> u32 {
        if self.ctx.info.device_type != "Cpu" {
            return 1 << 16;
        }
        let per_event = dev
            .levels
            .iter()
            .map(|l| 4 + l.stride + 4 * l.columns)
            .max()
            .unwrap_or(1);
        (60_000 / per_event / BLOCK * BLOCK).max(BLOCK)
    }

    fn fold_chunk(
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
        let values = scratch
            .values
            .get(&ctx.device, n * 8 * batch.values.len() as u64);
        for (c, v) in batch.values.iter().enumerate() {
            ctx.queue
                .write_buffer(&values, c as u64 * n * 8, bytemuck::cast_slice(v));
        }
        let sorted = scratch.sorted.get(&ctx.device, n_pad * 8);
        let stats = scratch.stats.get(&ctx.device, 16);
        ctx.queue.write_buffer(&stats, 0, &[0; 16]);
        let blocks = n / u64::from(BLOCK);
        let max_stride = dev
            .levels
            .iter()
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
        let fold_level =
            |pass: &mut wgpu::ComputePass<'_>, bg: &wgpu::BindGroup, offsets: &[u32]| {
                if blocks > 0 {
                    pass.set_pipeline(&ctx.fold_blocks);
                    pass.set_bind_group(0, bg, &[offsets[0]]);
                    let (x, y) = groups(blocks, 256);
                    pass.dispatch_workgroups(x, y, 1);
                }
                pass.set_pipeline(&ctx.fold);
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
                    for (bg, offset) in bgs.iter().zip(&round0) {
                        fold_level(pass, bg, &[*offset]);
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
                    for (bg, offsets) in bgs.iter().zip(&offsets) {
                        fold_level(pass, bg, offsets);
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

    fn merge_chunk(
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

impl Backend for Gpu {
    fn kind(&self) -> BackendKind {
        BackendKind::Gpu
    }

    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError> {
        state.check(batch)?;
        let need = batch.ids.iter().max().map_or(0, |&m| u64::from(m) + 1);
        match &mut state.device {
            Some(d) => d.grow(&state.spec, need)?,
            None => DeviceState::upload(&self.ctx, state, need)?,
        }
        let dev = state.device.as_ref().expect("uploaded above");
        let mut stats = FoldStats::default();
        let chunk = self.max_chunk(batch.values.len());
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
