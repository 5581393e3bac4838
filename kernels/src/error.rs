//! Errors of the kernels crate.

/// Who has to act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorDomain {
    /// The caller's input or configuration is wrong.
    User,
    /// Something outside Panes (a device, a driver) is missing or failed.
    External,
    /// A bug in Panes.
    Internal,
}

/// An error from a kernel or a backend. Kernels never panic on user data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A state or level spec violates an invariant.
    #[error("invalid pane-state spec: {0} (this is a bug in Panes)")]
    InvalidSpec(String),
    /// Buffers passed to a kernel have inconsistent shapes.
    #[error("kernel input shape mismatch: {0} (this is a bug in Panes)")]
    Shape(String),
    /// An event time outside ±[`crate::MAX_TIME_MS`].
    #[error("event time {0} ms is out of range (at most ±2^60 ms)")]
    TimeOutOfRange(i64),
    /// The requested backend cannot run here.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The GPU device failed (out of memory, lost, a driver error).
    #[error("GPU device error: {0}")]
    Device(String),
    /// An unknown backend name.
    #[error("unknown backend {0:?}; expected one of scalar, cpu, gpu, auto")]
    UnknownBackend(String),
}

impl KernelError {
    /// Who has to act on the error.
    pub fn domain(&self) -> ErrorDomain {
        match self {
            KernelError::InvalidSpec(_) | KernelError::Shape(_) => ErrorDomain::Internal,
            KernelError::Unavailable(_) | KernelError::Device(_) => ErrorDomain::External,
            KernelError::UnknownBackend(_) | KernelError::TimeOutOfRange(_) => ErrorDomain::User,
        }
    }
}
