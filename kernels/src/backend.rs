//! The `Backend` trait and backend selection.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::KernelError;
use crate::preagg::FoldLog;
use crate::state::{FeatureMerge, FoldBatch, FoldStats, MergeOutput, PaneState};

/// A way to run the two kernels of Panes: fold a micro-batch into pane state, and merge
/// the panes of a window into feature values.
///
/// Every backend gives the same answers (the `Scalar` backend is the oracle):
/// count / min / max / last identically, sums and moments up to floating-point
/// summation order.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Why this backend cannot fold states of `spec`, if it cannot (checked when a view
    /// is loaded, so that the refusal names the view before any event arrives). Only
    /// the `Gpu` backend on a software adapter refuses some: sketches whose per-event
    /// work passes the adapter's loop budget; `auto` folds those on the CPU.
    fn refuses(&self, spec: &crate::StateSpec) -> Option<String> {
        let _ = spec;
        None
    }

    /// Folds `batch` (accepted events in arrival order) into `state`.
    ///
    /// Events of one key are folded in arrival order, so `last` ties go to the event
    /// ingested last.
    ///
    /// # Errors
    /// [`KernelError::Shape`] when the batch's buffers disagree in length or do not
    /// match the state's columns.
    fn fold(&self, state: &mut PaneState, batch: &FoldBatch<'_>) -> Result<FoldStats, KernelError>;

    /// Like [`Backend::fold`], and records in `log` what [`Backend::replay`] needs to
    /// bring another state, equal to `state` before this fold, bitwise equal to it
    /// after, without folding the batch again. A backend that cannot (the default),
    /// or a batch too small to be worth it, leaves the log incomplete
    /// ([`FoldLog::is_complete`]): the batch must then be folded into the other state.
    ///
    /// # Errors
    /// As [`Backend::fold`].
    fn fold_logged(
        &self,
        state: &mut PaneState,
        batch: &FoldBatch<'_>,
        log: &mut FoldLog,
    ) -> Result<FoldStats, KernelError> {
        log.clear();
        self.fold(state, batch)
    }

    /// Applies a complete log of [`Backend::fold_logged`] (by this kind of backend) to
    /// `state`, which must equal the state that fold started from: `state` then equals
    /// the folded one, bitwise. Returns the logged fold's statistics.
    ///
    /// # Errors
    /// [`KernelError::Shape`] when the log is incomplete or does not fit the state;
    /// [`KernelError::Unavailable`] for a backend that does not log (the default).
    fn replay(&self, state: &mut PaneState, log: &FoldLog) -> Result<FoldStats, KernelError> {
        let _ = (state, log);
        Err(KernelError::Unavailable(format!(
            "the {} backend does not replay fold logs",
            self.kind()
        )))
    }

    /// Computes `features` for each key id in `ids` (`None` = unknown key) as of time
    /// `at` (epoch ms) into `out` (`ids.len() × features.len()`, row-major).
    ///
    /// # Nulls
    /// Unknown keys and empty windows give 0 for `count`/`sum` and null otherwise.
    /// `out.status` tells, per key, whether the answer is exact (see [`crate::ReadStatus`]).
    ///
    /// # Errors
    /// [`KernelError::Shape`] when a feature names a level, column or window the state
    /// does not hold.
    fn merge(
        &self,
        state: &PaneState,
        features: &[FeatureMerge],
        ids: &[Option<u32>],
        at: i64,
        out: &mut MergeOutput,
    ) -> Result<(), KernelError>;
}

/// The backends Panes knows, as named in `PANES_BACKEND`, configs and the CLI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// The scalar reference: simple loops, the oracle of every other backend.
    Scalar,
    /// Rayon across key shards (see `panes_kernels::cpu`).
    Cpu,
    /// WGSL compute shaders through wgpu.
    Gpu,
    /// Chosen per batch size from a calibration.
    Auto,
}

impl BackendKind {
    /// The name used in `PANES_BACKEND` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Scalar => "scalar",
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
            BackendKind::Auto => "auto",
        }
    }

    /// The kind named by `PANES_BACKEND`, or `None` when it is unset or empty.
    ///
    /// # Errors
    /// [`KernelError::UnknownBackend`] for a value that names no backend.
    pub fn from_env() -> Result<Option<BackendKind>, KernelError> {
        match std::env::var("PANES_BACKEND") {
            Ok(v) if !v.trim().is_empty() => v.trim().parse().map(Some),
            _ => Ok(None),
        }
    }

    /// Builds the backend.
    ///
    /// `Auto` is the `Auto` backend when a GPU beats the CPU from some batch size on,
    /// else `Cpu` (one line on stderr says why); without the `gpu` feature it is `Cpu`.
    ///
    /// # Errors
    /// [`KernelError::Unavailable`] for `Gpu` when this build or machine has no usable
    /// GPU adapter; [`KernelError::Device`] when the device fails to open.
    pub fn create(self) -> Result<Arc<dyn Backend>, KernelError> {
        match self {
            BackendKind::Scalar => Ok(Arc::new(crate::Scalar)),
            BackendKind::Cpu => Ok(Arc::new(crate::Cpu::new())),
            #[cfg(feature = "gpu")]
            BackendKind::Auto => Ok(crate::Auto::choose()),
            #[cfg(not(feature = "gpu"))]
            BackendKind::Auto => Ok(Arc::new(crate::Cpu::new())),
            #[cfg(feature = "gpu")]
            BackendKind::Gpu => Ok(Arc::new(crate::Gpu::new().map_err(|e| match e {
                KernelError::Unavailable(why) => KernelError::Unavailable(format!(
                    "{why}; use the cpu backend (PANES_BACKEND=cpu, --backend cpu)"
                )),
                e => e,
            })?)),
            #[cfg(not(feature = "gpu"))]
            BackendKind::Gpu => Err(KernelError::Unavailable(
                "this build of Panes has no GPU backend (built without the `gpu` feature); \
                 use the cpu backend (PANES_BACKEND=cpu, --backend cpu)"
                    .into(),
            )),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = KernelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "scalar" => Ok(BackendKind::Scalar),
            "cpu" => Ok(BackendKind::Cpu),
            "gpu" => Ok(BackendKind::Gpu),
            "auto" => Ok(BackendKind::Auto),
            _ => Err(KernelError::UnknownBackend(s.to_string())),
        }
    }
}
