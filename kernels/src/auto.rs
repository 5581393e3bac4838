//! The `auto` backend: the CPU for small batches, the GPU for large ones.
//!
//! # Calibration
//! Once per process, [`Calibration::measure`] folds synthetic batches of growing size
//! (4 Ki to 1 Mi events over 64 Ki keys with a skewed, log-uniform key distribution)
//! on both backends and keeps the smallest size
//! from which the GPU is faster at every larger size measured: the crossover. It
//! stops early once a GPU fold takes longer than a quarter of a second, so it costs
//! about a second at start-up. A software adapter (Mesa's lavapipe, `device_type`
//! Cpu) runs on the same cores as the CPU backend and cannot win: it is not measured.
//!
//! # Where the state lives
//! A view's state sits on one side at a time, and moving it costs a copy of all of it
//! (see [`crate::PaneState`]). A batch at or above the crossover moves the state to the
//! GPU. Smaller batches are folded where the state is, with one exception borrowed
//! from the ski-rental problem: while the state is on the GPU, each small batch pays a
//! "rent" (the GPU's estimated time for it minus the CPU's), and once the rent since
//! the last large batch exceeds the estimated cost of copying the state back, the
//! state moves back to the host. That keeps the total within twice the best choice
//! made in hindsight, whatever the mix of batch sizes.
//!
//! # Fold logs
//! A batch folded on the host is folded by the CPU backend with its fold log
//! ([`Backend::fold_logged`]), so a served view's second replica replays it instead of
//! folding it again; a batch folded on the GPU leaves the log incomplete (the replica
//! folds it). A replay takes the same decision as the fold it replays, rent included:
//! the decision depends only on the batch size and the state's side and rent, which
//! the two replicas share.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::backend::{Backend, BackendKind};
use crate::error::KernelError;
use crate::gpu::Gpu;
use crate::state::{FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState};
use crate::{Agg, Cpu, FoldLog, LevelSpec, StateSpec};

/// Measured fold times of both backends by batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct Calibration {
    /// Batch sizes measured, ascending.
    pub sizes: Vec<usize>,
    /// Seconds per fold on the CPU backend, per size.
    pub cpu_s: Vec<f64>,
    /// Seconds per fold on the GPU backend, per size.
    pub gpu_s: Vec<f64>,
    /// Smallest batch sent to the GPU, or `None` when the GPU never won.
    pub crossover: Option<usize>,
    /// Host ↔ device copy speed of pane state, bytes per second.
    pub transfer_bytes_per_s: f64,
}

impl Calibration {
    /// Measures `gpu` against `cpu` (see the module docs).
    ///
    /// # Errors
    /// A failure of either backend.
    pub fn measure(cpu: &Cpu, gpu: &Gpu) -> Result<Calibration, KernelError> {
        let spec = StateSpec {
            levels: vec![LevelSpec {
                hop: 1000,
                ring: 8,
                columns: vec![Agg::Var.fields().union(Agg::Sum.fields())],
                lifetime: false,
            }],
            shards: 64,
        };
        const KEYS: u32 = 1 << 16;
        let mut c = Calibration {
            sizes: Vec::new(),
            cpu_s: Vec::new(),
            gpu_s: Vec::new(),
            crossover: None,
            transfer_bytes_per_s: 0.0,
        };
        let mut on_cpu = PaneState::new(spec.clone())?;
        let mut on_gpu = PaneState::new(spec)?;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rand = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let all_keys: Vec<u32> = (0..KEYS).collect();
        let warm = FoldBatch {
            ids: &all_keys,
            ts: &vec![0; KEYS as usize],
            values: &[&vec![1.0; KEYS as usize]],
        };
        cpu.fold(&mut on_cpu, &warm)?;
        let started = Instant::now();
        gpu.fold(&mut on_gpu, &warm)?;
        let mut copy_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        on_gpu.to_host()?;
        copy_s += started.elapsed().as_secs_f64();
        c.transfer_bytes_per_s = 2.0 * on_cpu.cell_bytes() as f64 / copy_s.max(1e-9);
        let mut t0 = 1_000_000i64;
        for n in [1usize << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20] {
            // Skewed keys, as real entity streams are (log-uniform: a few keys take
            // much of the batch), so that the GPU's cost of hot keys is measured.
            let ids: Vec<u32> = (0..n)
                .map(|_| {
                    let u = (rand() >> 11) as f64 / (1u64 << 53) as f64;
                    (f64::from(KEYS).powf(u) as u32).saturating_sub(1)
                })
                .collect();
            let ts: Vec<i64> = (0..n as i64).map(|i| t0 + i / 64).collect();
            let v: Vec<f64> = (0..n).map(|i| i as f64).collect();
            t0 += n as i64;
            let values = [v.as_slice()];
            let batch = FoldBatch {
                ids: &ids,
                ts: &ts,
                values: &values,
            };
            let time = |b: &dyn Backend, s: &mut PaneState| -> Result<f64, KernelError> {
                let mut best = f64::INFINITY;
                for _ in 0..2 {
                    let started = Instant::now();
                    b.fold(s, &batch)?;
                    best = best.min(started.elapsed().as_secs_f64());
                }
                Ok(best)
            };
            c.sizes.push(n);
            c.cpu_s.push(time(cpu, &mut on_cpu)?);
            c.gpu_s.push(time(gpu, &mut on_gpu)?);
            if c.gpu_s.last().is_some_and(|&g| g > 0.25) {
                break;
            }
        }
        let wins: Vec<bool> = c.cpu_s.iter().zip(&c.gpu_s).map(|(c, g)| g < c).collect();
        c.crossover = (0..wins.len())
            .find(|&i| wins[i..].iter().all(|&w| w))
            .map(|i| c.sizes[i]);
        Ok(c)
    }

    /// Estimated seconds to fold `n` events, from `times` (piecewise linear in the
    /// measured sizes; the smallest size's time below it, proportional above).
    fn estimate(&self, times: &[f64], n: usize) -> f64 {
        let (Some(&first), Some(&last)) = (self.sizes.first(), self.sizes.last()) else {
            return 0.0;
        };
        if n <= first {
            return times[0];
        }
        if n >= last {
            return times[times.len() - 1] * n as f64 / last as f64;
        }
        let i = self.sizes.iter().position(|&s| s >= n).unwrap_or(0).max(1);
        let (a, b) = (self.sizes[i - 1] as f64, self.sizes[i] as f64);
        let w = (n as f64 - a) / (b - a);
        times[i - 1] * (1.0 - w) + times[i] * w
    }
}

/// The `auto` backend (see the module docs).
#[derive(Debug, Clone)]
pub struct Auto {
    cpu: Cpu,
    gpu: Gpu,
    calibration: Arc<Calibration>,
    crossover: usize,
}

impl Auto {
    /// An `auto` backend sending batches of at least `crossover` events to `gpu`.
    pub fn new(cpu: Cpu, gpu: Gpu, calibration: Arc<Calibration>, crossover: usize) -> Self {
        Auto {
            cpu,
            gpu,
            calibration,
            crossover,
        }
    }

    /// The calibration the policy uses.
    pub fn calibration(&self) -> &Calibration {
        &self.calibration
    }

    /// The smallest batch sent to the GPU.
    pub fn crossover(&self) -> usize {
        self.crossover
    }

    /// The backend `BackendKind::Auto` builds: `Auto` when the GPU wins from some
    /// batch size on, else the CPU backend (with one line on stderr saying why).
    pub fn choose() -> Arc<dyn Backend> {
        static CHOICE: OnceLock<Result<(Gpu, Arc<Calibration>), String>> = OnceLock::new();
        let choice = CHOICE.get_or_init(|| {
            let gpu = Gpu::new().map_err(|e| format!("no GPU backend ({e})"))?;
            if gpu.info().device_type == "Cpu" {
                return Err(format!(
                    "the GPU adapter {} is a software renderer on the same cores",
                    gpu.info()
                ));
            }
            let c = Calibration::measure(&Cpu::new(), &gpu)
                .map_err(|e| format!("calibrating the GPU failed ({e})"))?;
            match c.crossover {
                Some(n) => {
                    say(format!(
                        "panes: auto backend: batches of {n} events or more go to the GPU {}",
                        gpu.info()
                    ));
                    Ok((gpu, Arc::new(c)))
                }
                None => Err(format!(
                    "the GPU {} was slower than the CPU at every batch size measured (up to {})",
                    gpu.info(),
                    c.sizes.last().copied().unwrap_or(0)
                )),
            }
        });
        match choice {
            Ok((gpu, c)) => Arc::new(Auto::new(
                Cpu::new(),
                gpu.clone(),
                c.clone(),
                c.crossover.unwrap_or(usize::MAX),
            )),
            Err(why) => {
                static SAID: OnceLock<()> = OnceLock::new();
                SAID.get_or_init(|| {
                    say(format!("panes: auto backend uses the cpu backend: {why}"))
                });
                Arc::new(Cpu::new())
            }
        }
    }
}

impl Auto {
    /// Where a batch of `n` events is folded, charging the rent of a state on the GPU
    /// (see the module docs).
    fn side(&self, state: &mut PaneState, n: usize) -> Side {
        if n >= self.crossover {
            if let Some(rent) = state.gpu_rent() {
                *rent = 0.0;
            }
            return Side::Gpu;
        }
        let c = &self.calibration;
        let copy_back = state.cell_bytes() as f64 / c.transfer_bytes_per_s.max(1.0);
        if let Some(rent) = state.gpu_rent() {
            *rent += (c.estimate(&c.gpu_s, n) - c.estimate(&c.cpu_s, n)).max(0.0);
            if *rent < copy_back {
                return Side::Gpu;
            }
        }
        Side::Host
    }

    /// Folds on the GPU; a batch too large for the device while the state is on the
    /// host stays on the host.
    fn fold_on_gpu(
        &self,
        state: &mut PaneState,
        batch: &FoldBatch<'_>,
    ) -> Result<FoldStats, KernelError> {
        match self.gpu.fold(state, batch) {
            Err(KernelError::Unavailable(_)) if !state.on_device() => self.cpu.fold(state, batch),
            r => r,
        }
    }
}

/// Where [`Auto`] folds a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Host,
    Gpu,
}

impl Backend for Auto {
    fn kind(&self) -> BackendKind {
        BackendKind::Auto
    }

    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError> {
        match self.side(state, batch.len()) {
            Side::Gpu => self.fold_on_gpu(state, batch),
            Side::Host => self.cpu.fold(state, batch),
        }
    }

    fn fold_logged(
        &self,
        state: &mut PaneState,
        batch: &FoldBatch<'_>,
        log: &mut FoldLog,
    ) -> Result<FoldStats, KernelError> {
        match self.side(state, batch.len()) {
            Side::Gpu => {
                log.clear();
                self.fold_on_gpu(state, batch)
            }
            Side::Host => self.cpu.fold_logged(state, batch, log),
        }
    }

    fn replay(&self, state: &mut PaneState, log: &FoldLog) -> Result<FoldStats, KernelError> {
        if !log.is_complete() {
            // Refused, with the CPU backend's message.
            return self.cpu.replay(state, log);
        }
        match self.side(state, log.events) {
            Side::Host => self.cpu.replay(state, log),
            Side::Gpu => Err(KernelError::Shape(format!(
                "a fold log of {} events folded on the host cannot be replayed into a state on which the auto backend folds them on the GPU",
                log.events
            ))),
        }
    }

    fn merge(
        &self,
        state: &PaneState,
        features: &[FeatureMerge],
        ids: &[Option<u32>],
        at: i64,
        out: &mut MergeOutput,
    ) -> Result<(), KernelError> {
        if state.on_device() {
            self.gpu.merge(state, features, ids, at, out)
        } else {
            self.cpu.merge(state, features, ids, at, out)
        }
    }
}

/// Says which backend `auto` chose, once per process: as a log event where the program
/// has a `tracing` subscriber (the `panes` command, whose `--log-format json` keeps
/// stderr one JSON object per line), else on stderr (Python, a program of a user's).
fn say(line: String) {
    if tracing::dispatcher::has_been_set() {
        tracing::info!("{line}");
    } else {
        eprintln!("{line}");
    }
}
