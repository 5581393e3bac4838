//! WGSL compute shaders of Panes, exposed as `&'static str`.
//!
//! The GPU backend (behind the `gpu` feature of `panes-kernels`) will load its kernels
//! from here: one `.wgsl` file per kernel, each mirroring a function of the scalar
//! reference backend, and validated by naga in a plain `cargo test` without a GPU.
//! No shader exists yet: the list below is empty until the GPU backend lands.

#![warn(missing_docs)]

/// Every shader as `(file name, WGSL source)`.
pub const SHADERS: &[(&str, &str)] = &[];
