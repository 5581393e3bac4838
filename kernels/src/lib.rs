//! Kernels of Panes: the pane-state layout and the two kernels that work on it.
//!
//! - **fold**: a micro-batch of accepted events `(key id, time, values…)` updates the
//!   partial aggregates of each event's pane, for every hop level of a view;
//! - **merge**: for a set of keys and a read time `t`, the panes of each feature's
//!   window are combined into one dense `keys × features` matrix of f64 plus validity.
//!
//! Kernels are pure functions over buffers: no I/O, no clocks, no async.
//!
//! # Layout
//! State is kept per view, per hop level and per key shard: a ring of cells per key,
//! each cell the partial-aggregate fields of one pane side by side, every cell of a
//! level in one flat `Vec<f64>` (see [`level`] for the layout and why it is not one
//! buffer per field, as first planned). The buffer is plain words, so the same layout
//! can live in a GPU storage buffer and a backend swap moves buffers, not logic.
//!
//! # Backends
//! [`Backend`] has three implementations: [`Scalar`], the reference (the oracle of
//! the test suite), [`Cpu`] (rayon across key shards for folds and large reads; see
//! its docs for the SIMD variants that were measured and not kept) and, behind the
//! `gpu` feature, `Gpu` (WGSL compute shaders through wgpu; see the `gpu` module for
//! how a scatter with per-key order becomes deterministic on a GPU). `Auto` sends each
//! batch to the CPU or the GPU from a measured crossover.
//!
//! # Design decision: pane partials, not per-event storage
//! Windows are answered from per-pane partial aggregates (count, sum, shifted moments,
//! min, max, last), so memory is `keys × panes × fields` whatever the event rate.
//! The rejected alternative, keeping raw events per key and recomputing (or
//! retracting) on read, answers any `t` exactly but costs memory proportional to the
//! event rate and makes reads O(events). With panes, a read at `t` is exact when the
//! pane containing `t` holds no event later than `t`, which is always true for reads at
//! the latest event time and for backfill (which replays in time order); other reads
//! are reported through [`ReadStatus`] instead of being silently approximated.
//!
//! Count windows (the newest N events) and session windows are the exception: they
//! have no fixed pane grid, so the `events` module keeps, beside the panes, a bounded
//! ring of each key's newest events and one partial aggregate per session.
//!
//! Variance uses, per cell, moments shifted by the cell's first value `K` (`Σ(x−K)`,
//! `Σ(x−K)²`): the fold updates them by plain addition (no division per event), and
//! they do not suffer the cancellation of raw `Σx²` when the mean is large against the
//! spread. Cells are combined with Chan et al.'s pairwise merge of (n, mean, M2).
//! A single shift per key was rejected: when a key's values drift away from its first
//! value, `Σ(x−K)²` cancels catastrophically (relative errors of 1e-7 seen in the
//! differential tests).
//!
//! # Example
//! ```
//! use panes_kernels::{Agg, Backend, FeatureMerge, FoldBatch, LevelSpec, MergeOutput,
//!                     PaneState, Scalar, StateSpec};
//!
//! // One level: 1 s panes, windows up to 5 panes, one value column with sum + count.
//! let spec = StateSpec {
//!     levels: vec![LevelSpec { hop: 1000, ring: 5, columns: vec![Agg::Sum.fields()], lifetime: false }],
//!     shards: 1,
//! };
//! let mut state = PaneState::new(spec).unwrap();
//! let values = [1.0, 2.0, 4.0];
//! let batch = FoldBatch { ids: &[0, 0, 1], ts: &[0, 1500, 2000], values: &[&values] };
//! Scalar.fold(&mut state, &batch).unwrap();
//!
//! let sum_3s = FeatureMerge { level: 0, agg: Agg::Sum, column: Some(0), panes: Some(3) };
//! let mut out = MergeOutput::default();
//! Scalar.merge(&state, &[sum_3s], &[Some(0), Some(1), None], 2000, &mut out).unwrap();
//! assert_eq!(out.values, vec![3.0, 4.0, 0.0]);
//! ```

#![warn(missing_docs)]

pub mod agg;
#[cfg(feature = "gpu")]
pub mod auto;
pub mod backend;
pub mod cpu;
pub mod error;
pub mod events;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod hll;
pub mod lastn;
pub mod level;
mod preagg;
pub mod quantile;
pub mod scalar;
pub mod state;
pub mod topk;

pub use agg::{Agg, AggParams, ColumnFields, Param};
#[cfg(feature = "gpu")]
pub use auto::{Auto, Calibration};
pub use backend::{Backend, BackendKind};
pub use cpu::Cpu;
pub use error::{ErrorDomain, KernelError};
pub use events::{EventMerge, EventSpec, EventState, EventWindow, Merge, SessionSpec, merge};
#[cfg(feature = "gpu")]
pub use gpu::{Gpu, GpuInfo, GpuTimings};
pub use level::{EMPTY_PANE, LevelSpec, LevelState};
pub use preagg::FoldLog;
pub use scalar::Scalar;
/// Largest |event time| the kernels accept, in ms (2^60, about 36 million years): far
/// beyond any real clock, and it keeps all pane arithmetic clear of overflow and of the
/// empty-pane marker.
pub const MAX_TIME_MS: u64 = 1 << 60;

pub use state::{
    FeatureMerge, FoldBatch, FoldStats, LevelImage, MergeOutput, PaneState, ReadStatus, StateSpec,
};
