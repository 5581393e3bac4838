//! The engine's integration tests, in one binary: one link for all of them (each test
//! binary carries the whole engine, so fourteen of them cost fourteen links and their
//! disk). `cargo nextest run -p panes-engine --test it -- serve::` runs one module.

mod common;

mod backfill;
mod bad_input;
mod composite_keys;
mod differential;
#[cfg(all(feature = "serve", target_os = "linux"))]
mod event_windows;
mod exhaustion;
mod expressions;
mod first_screen;
#[cfg(feature = "kafka")]
mod kafka;
mod key_limits;
mod layers;
mod micro_batch;
#[cfg(feature = "serve")]
mod security;
#[cfg(feature = "serve")]
mod serve;
mod services;
mod sinks;
mod splits;
mod strings;
mod wall_clock;
