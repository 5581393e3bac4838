//! The offline driver: backfill (replay an event file through the same ingest and
//! kernels as the online engine, answer a spine point-in-time) and the file formats
//! it reads and writes (Parquet, CSV, Arrow IPC).

pub mod backfill;
pub mod io;
pub mod skew;
