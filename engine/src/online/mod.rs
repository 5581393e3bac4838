//! The online engine: push batches, read feature vectors, as of now or of a time.
//!
//! - `engine`: the [`Engine`], its options, pushes, folds, publishes and checkpoints;
//! - `replicas`: each view's two replicas and the writer's protocol between them;
//! - `read`: reads of keys as of a time, merged from the published replica;
//! - `frame`: what reads return, and a view's counters.

pub(crate) mod changes;
mod engine;
mod frame;
mod read;
mod replicas;
pub mod service;

pub use engine::{Clock, Engine, EngineOptions};
pub use frame::{
    FeatureFrame, ServedFrame, Strings, ViewMetrics, feature_column, feature_field, list_column,
};
