//! The engine's error type, classified by who must act.

use std::fmt;
use std::path::PathBuf;

pub use panes_kernels::ErrorDomain;

/// Result alias of the engine.
pub type Result<T, E = PanesError> = std::result::Result<T, E>;

/// One problem found in a feature file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecIssue {
    /// Where in the file: `view "flights"`, `view "flights" feature "delay_3h"`, or empty.
    pub location: String,
    /// The field at fault (`window`, `agg`, …), or empty for the whole entry.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for SpecIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.location.is_empty(), self.field.is_empty()) {
            (true, true) => write!(f, "{}", self.message),
            (true, false) => write!(f, "field `{}`: {}", self.field, self.message),
            (false, true) => write!(f, "{}: {}", self.location, self.message),
            (false, false) => write!(
                f,
                "{}, field `{}`: {}",
                self.location, self.field, self.message
            ),
        }
    }
}

/// Every problem found in one feature file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    /// The file (or `<string>`) the definitions came from.
    pub origin: String,
    /// The problems, in file order.
    pub issues: Vec<SpecIssue>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.issues.as_slice() {
            [one] => write!(f, "{}: {one}", self.origin),
            many => {
                write!(f, "{}: {} problems", self.origin, many.len())?;
                for i in many {
                    write!(f, "\n  - {i}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for SpecError {}

/// An error of the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PanesError {
    /// The feature definitions are invalid.
    #[error("invalid feature definitions in {0}")]
    Spec(#[from] SpecError),
    /// A batch does not have the columns or types a view needs. No row of it was aggregated.
    #[error("view {view:?}: column {column:?}: {message}")]
    Schema {
        /// The view.
        view: String,
        /// The column at fault.
        column: String,
        /// What was found and what was expected.
        message: String,
    },
    /// A request names a view that does not exist.
    #[error("unknown view {name:?}; the views are: {known}")]
    UnknownView {
        /// The name asked for.
        name: String,
        /// The views that exist, comma-separated.
        known: String,
    },
    /// A request names a feature that does not exist in the view.
    #[error("view {view:?} has no feature {name:?}; its features are: {known}")]
    UnknownFeature {
        /// The view.
        view: String,
        /// The name asked for.
        name: String,
        /// The view's features, comma-separated.
        known: String,
    },
    /// A read cannot be answered exactly from the panes held.
    #[error("view {view:?}: cannot read key {key} exactly as of {at} ms: {reason}")]
    InexactRead {
        /// The view.
        view: String,
        /// The key, formatted.
        key: String,
        /// The read time.
        at: i64,
        /// Why, and what to do instead.
        reason: String,
    },
    /// Invalid arguments to an engine call or a command.
    #[error("{0}")]
    Invalid(String),
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A request asks for more than a configured limit allows; the message names the
    /// limit and how to change it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The operation does not apply to the thing in its current configuration (a push
    /// into a view that takes its events from a source).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The service cannot answer now; the same call may succeed later (a source that
    /// has not started, a partition moving between instances, a server shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// A checkpoint location was claimed by a newer owner (a higher generation): this
    /// instance's write was refused, and it gives the location up.
    #[error("fenced: {0}")]
    Fenced(String),
    /// An Arrow kernel failed.
    #[error(transparent)]
    Arrow(#[from] arrow_schema::ArrowError),
    /// A kernel or backend failed.
    #[error(transparent)]
    Kernel(#[from] panes_kernels::KernelError),
    /// A bug in Panes.
    #[error("internal error: {0} (this is a bug in Panes)")]
    Internal(String),
}

impl PanesError {
    /// Who has to act on the error.
    pub fn domain(&self) -> ErrorDomain {
        match self {
            PanesError::Spec(_)
            | PanesError::Schema { .. }
            | PanesError::UnknownView { .. }
            | PanesError::UnknownFeature { .. }
            | PanesError::InexactRead { .. }
            | PanesError::Invalid(_)
            | PanesError::ResourceExhausted(_)
            | PanesError::FailedPrecondition(_) => ErrorDomain::User,
            PanesError::File { .. } | PanesError::Unavailable(_) | PanesError::Fenced(_) => {
                ErrorDomain::External
            }
            PanesError::Arrow(_) | PanesError::Internal(_) => ErrorDomain::Internal,
            PanesError::Kernel(k) => k.domain(),
        }
    }

    /// Whether retrying the same call may succeed.
    pub fn retryable(&self) -> bool {
        self.domain() == ErrorDomain::External
    }

    pub(crate) fn file(path: impl Into<PathBuf>, message: impl fmt::Display) -> Self {
        PanesError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

/// Returns early with a [`PanesError::Invalid`] when `cond` is false.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::error::PanesError::Invalid(format!($($arg)+)));
        }
    };
}
pub(crate) use ensure;

/// Runs `f`, turning a panic into `Err` without the panic hook's report: for decoders
/// of hostile bytes (arrow-ipc) whose panics the engine handles as errors. A client
/// sending such bytes in a loop would otherwise fill the log with panic messages. Other
/// panics are reported by the hook as before (it wraps the one installed first).
pub(crate) fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    use std::cell::Cell;
    use std::panic::{AssertUnwindSafe, catch_unwind, set_hook, take_hook};
    use std::sync::Once;

    thread_local! {
        static EXPECTED: Cell<u32> = const { Cell::new(0) };
    }
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = take_hook();
        set_hook(Box::new(move |info| {
            if EXPECTED.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
    EXPECTED.with(|e| e.set(e.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    EXPECTED.with(|e| e.set(e.get() - 1));
    result
}
