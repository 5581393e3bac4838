//! Panes engine: feature definitions, ingest and micro-batching, the key index, pane
//! state, point-in-time reads and backfill, on top of the kernels of `panes-kernels`.
//!
//! ```text
//!  RecordBatch ──► ingest ──► key index ──► pending ──► Backend::fold ──► pane state
//!  (push / file)   validate,   key → id      micro-      (Scalar, Cpu)       │
//!                  lateness                  batch                           ▼
//!                                                          read(keys, at) ◄── Backend::merge
//! ```
//!
//! # Design decision: one core, two drivers
//! [`Engine`] (online: push, read) and [`backfill()`] (offline: replay a file, answer a
//! spine) drive the same view core: the same ingest decides lateness per event in
//! arrival order, the same fold and merge kernels compute values. Backfill only changes
//! the order in which accepted events are folded (by time) so that each spine row's
//! read is exact. The rejected alternative, a separate batch engine (e.g. SQL over
//! the event file), would make online/offline skew a matter of testing rather than
//! construction.
//!
//! # Layers
//! A folder per layer, in the order data flows; a lower layer never imports a higher
//! one (the `layers` integration test reads the sources and checks it):
//!
//! | layer | owns |
//! |---|---|
//! | [`spec`] | feature files, and a view compiled to its state layout |
//! | [`ingest`] | decoding and lateness, the key index, the one Arrow IPC decoder, a view's core and its micro-batch |
//! | [`checkpoint`] | the file format of a view's core, and the directory store |
//! | [`online`] | the [`Engine`]: replicas, pushes, folds, reads |
//! | [`offline`] | backfill and file I/O |
//! | [`sources`] | the [`Source`](sources::Source) trait, Kafka, the synthetic stream |
//! | `serve` | gRPC, Flight, metrics; reaches sources through their trait and routes reads between instances |
//!
//! `error` and `histogram` sit below all of them. The rejected alternative, one flat
//! folder of files that import each other as needed, had grown circles (a source that
//! imported the server that imported it back) that made every new source or sink
//! touch the server.
//!
//! # Reads are exact or refused
//! Pane partials answer a read at `t` exactly when the pane containing `t` holds no
//! event later than `t` and the window's panes are still in the ring. That holds for
//! every read at or after a key's latest event, and for backfill; any other read fails
//! with [`PanesError::InexactRead`] rather than returning an approximation.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use arrow_array::{Float64Array, Int64Array, RecordBatch};
//! use panes_engine::{Engine, EngineOptions, FeatureFile};
//!
//! let file = FeatureFile::parse(r#"
//!     [[views]]
//!     name = "cards"
//!     key = "card"
//!     time = "ts"
//!     [[views.features]]
//!     name = "amount_sum_1m"
//!     agg = "sum"
//!     column = "amount"
//!     window = "1m"
//! "#, "example").unwrap();
//! let engine = Engine::new(&file, EngineOptions::default()).unwrap();
//! let batch = RecordBatch::try_from_iter([
//!     ("card", Arc::new(Int64Array::from(vec![1, 1, 2])) as _),
//!     ("ts", Arc::new(Int64Array::from(vec![1_000, 2_000, 3_000])) as _),
//!     ("amount", Arc::new(Float64Array::from(vec![10.0, 5.0, 7.0])) as _),
//! ]).unwrap();
//! let report = engine.push("cards", &batch).unwrap();
//! assert_eq!(report.accepted, 3);
//! let frame = engine.read("cards", &Int64Array::from(vec![1, 2, 3]), None, None).unwrap();
//! assert_eq!(frame.values.column(0).to_vec(), vec![15.0, 7.0, 0.0]);
//! ```

#![warn(missing_docs)]

pub mod checkpoint;
pub mod error;
pub mod expr;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz;
pub mod histogram;
pub mod ingest;
pub mod offline;
pub mod online;
#[cfg(feature = "serve")]
pub mod serve;
pub mod sinks;
pub mod sources;
pub mod spec;

pub use checkpoint::{CheckpointDir, CheckpointInfo, CheckpointRoot, SourcePosition};
pub use error::{PanesError, Result};
pub use ingest::keys::KeyValue;
pub use ingest::{PushReport, RejectReason, Rejection, StateBudget, ViewCounters};
pub use offline::backfill::{BackfillOptions, BackfillReport, backfill, backfill_service};
pub use online::{
    Clock, Engine, EngineOptions, FeatureFrame, ServedFrame, ViewMetrics, feature_column,
    feature_field,
};
pub use panes_kernels::{Agg, BackendKind};
pub use spec::{
    CompiledView, FeatureFile, FeatureSpec, PayloadFormat, ReadTime, ServiceSpec, SinkKind,
    SinkSpec, SourceSpec, ViewSpec, Window,
};

/// The feature file `panes demo` runs by default.
pub const DEMO_FEATURES: &str = include_str!("../features/demo.toml");
