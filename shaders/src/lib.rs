//! WGSL compute shaders of Panes, exposed as `&'static str`.
//!
//! Each kernel mirrors a function of the scalar reference backend of `panes-kernels`
//! and is assembled from the files in `wgsl/` (WGSL has no includes, so shared code
//! is prepended):
//!
//! | kernel | entry points | files | mirrors |
//! |---|---|---|---|
//! | [`SORT`] | `sort_keys`, `sort_local`, `sort_global` | `sort.wgsl` | — (groups a batch by key, in arrival order) |
//! | [`FOLD`] | `fold` | `common`, `cells`, `sketches`, `fold` | `LevelState::fold_event` |
//! | [`MERGE`] | `merge` | `common`, `cells`, `merge` | the `Cpu` backend's window scan + `finalize` |
//! | [`INIT`] | `init` | `common`, `init` | the identity cell of a new or grown level |
//!
//! The kernels need f64 and i64 in shaders (`wgpu::Features::SHADER_F64` and
//! `SHADER_INT64`). Every kernel is parsed and validated by naga in a plain
//! `cargo test`, without a GPU.

#![warn(missing_docs)]

/// One compute kernel: its WGSL source and the files it is assembled from.
#[derive(Clone, Copy, Debug)]
pub struct Shader {
    /// Name, for labels and errors.
    pub name: &'static str,
    /// The complete WGSL module.
    pub source: &'static str,
    /// The files of `wgsl/` it is made of, in order.
    pub files: &'static [&'static str],
}

macro_rules! shader {
    ($name:literal: $($file:literal),+) => {
        Shader {
            name: $name,
            source: concat!($(include_str!(concat!("../wgsl/", $file))),+),
            files: &[$($file),+],
        }
    };
}

/// Bitonic sort of `(key id, arrival index)` pairs.
pub const SORT: Shader = shader!("sort": "sort.wgsl");
/// Fold of a sorted micro-batch into one hop level.
pub const FOLD: Shader = shader!("fold": "common.wgsl", "cells.wgsl", "sketches.wgsl", "fold.wgsl");
/// Window merge of one hop level's features for a set of keys.
pub const MERGE: Shader = shader!("merge": "common.wgsl", "cells.wgsl", "merge.wgsl");
/// Reset of a range of cells to the identity cell.
pub const INIT: Shader = shader!("init": "common.wgsl", "init.wgsl");

/// Every kernel.
pub const SHADERS: &[Shader] = &[SORT, FOLD, MERGE, INIT];
