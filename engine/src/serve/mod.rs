//! `panes serve`: feature serving and ingest over gRPC (tonic) and Arrow Flight, with
//! gRPC health, server reflection and a Prometheus text endpoint (feature `serve`).
//!
//! ```text
//!  clients ──► tonic (tokio) ──► GetFeatures ─┬─ ≤ 128 keys: inline ──┬─► Engine::read_snapshot
//!                  │                            └─ more: read pool ──────┘   (front replica)
//!                  ├──────────► Ingest / DoPut ──► write pool ──► Engine::push_at
//!                  │                                         (back replica, then publish)
//!                  └─ health, reflection, Flight DoGet      timer ──► Engine::fold_due
//! ```
//!
//! # Design decision: no fold and no large read on tokio's threads
//! Writes (decode, fold, publish) run on threads of their own, and so do reads of
//! more than [`ServeOptions::inline_read_keys`] keys, each answering through a oneshot
//! channel: a long fold or a read of thousands of keys never holds up the network
//! I/O of other requests, and reads never queue behind folds (the engine's two
//! replicas make reads independent of folds; see [`Engine`]). The write threads run
//! at a lower scheduling priority ([`WritePriority`], `SCHED_IDLE` by default), so
//! that on shared cores a read preempts a fold rather than waiting for its time slice
//! to end; [`ReadPriority::Realtime`] (opt-in) goes further and puts the reads ahead
//! of every normal thread. The rejected alternative, `spawn_blocking` per request, has no bound on
//! threads and would let a burst of ingest starve reads of cores.
//!
//! Small reads run on the network thread that received them. A read never waits for
//! a lock held across a fold, so it only costs its own work: about 15 µs for one key
//! and 0.18 ms for 100 keys × 20 features under ingest (most of it cache misses). The
//! two hand-offs to a read thread and back cost more than that at the tail: timed
//! inside the server under the serving benchmark's 1 M events/s ingest, the server's
//! time for one key had a p99 of about 0.95 ms with the hand-offs (0.5–0.9 ms each) and
//! 32 µs without; for 100 keys, 1.7–2.6 ms against 0.8 ms.
//!
//! # Errors at the boundary
//! Engine errors become gRPC statuses here and only here: a caller's mistake is
//! `INVALID_ARGUMENT` with a `BadRequest` detail naming the field, a request over a
//! configured limit is `RESOURCE_EXHAUSTED`, a bug is `INTERNAL`.

pub mod auth;
mod codec;
mod conn;
pub(crate) mod flight;
pub(crate) mod grpc;
mod metrics;
mod options;
mod page;
mod read_log;
mod route;
mod server;
pub(crate) mod service;
mod status;
mod subscribe;
mod workers;

pub use options::{ReadPriority, ServeOptions, WritePriority};
pub use read_log::ReadLogOptions;
pub use server::{SERVER_TIME_HEADER, ServeReport, Server, shutdown_signal};

/// Generated protobuf messages and gRPC stubs of `proto/panes/v1/panes.proto`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("panes.v1");

    /// The encoded descriptor set of the API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/panes_descriptor.bin"));
}
