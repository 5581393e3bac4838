//! What the host shares with the WGSL kernels: the `#[repr(C)]` structs that mirror
//! the kernels' parameter and feature structs, the aggregation codes and the sizes the
//! host plans dispatches with.

use bytemuck::{Pod, Zeroable};

/// Events per block of `fold.wgsl` (reduced in parallel before the per-key walk).
pub(super) const BLOCK: u32 = 64;
/// Sort tile of `sort.wgsl` (pairs sorted in workgroup memory).
pub(super) const TILE: u64 = 512;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct SortParams {
    pub(super) k: u32,
    pub(super) j: u32,
    pub(super) n: u32,
    pub(super) _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct FoldParams {
    pub(super) hop: i64,
    pub(super) n: u32,
    pub(super) cap: u32,
    pub(super) ring: u32,
    pub(super) stride: u32,
    pub(super) columns: u32,
    pub(super) lifetime: u32,
    pub(super) round: u32,
    pub(super) seg: u32,
    pub(super) blocks: u32,
    pub(super) _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct MergeParams {
    pub(super) hop: i64,
    pub(super) at: i64,
    pub(super) keys: u32,
    pub(super) features: u32,
    pub(super) row: u32,
    pub(super) cap: u32,
    pub(super) ring: u32,
    pub(super) stride: u32,
    pub(super) lifetime: u32,
    pub(super) _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct InitParams {
    pub(super) first: u32,
    pub(super) count: u32,
    pub(super) stride: u32,
    pub(super) _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct FeatureDesc {
    pub(super) agg: u32,
    pub(super) column: u32,
    pub(super) panes: u32,
    pub(super) out: u32,
}

pub(super) fn agg_code(a: crate::Agg) -> u32 {
    a.code()
}

#[cfg(test)]
mod tests {
    //! The host's view of the shared structs and constants against the kernels as the
    //! backend compiles them: each kernel's whole source (`common.wgsl` and the others
    //! prepended, see `panes-shaders`) parsed by naga, the front end wgpu uses, and laid
    //! out by naga's layouter. No GPU needed.

    use std::collections::BTreeSet;
    use std::mem::{offset_of, size_of};

    use naga::proc::Layouter;
    use naga::{AddressSpace, Expression, Literal, Module, Scalar, TypeInner};
    use panes_shaders::Shader;

    use super::*;

    /// A Rust field type and the WGSL scalar it stands for.
    trait WgslScalar {
        const SCALAR: Scalar;
    }
    impl WgslScalar for u32 {
        const SCALAR: Scalar = Scalar::U32;
    }
    impl WgslScalar for i64 {
        const SCALAR: Scalar = Scalar::I64;
    }

    fn scalar_of<T, F: WgslScalar>(_: fn(&T) -> &F) -> (usize, Scalar) {
        (size_of::<F>(), F::SCALAR)
    }

    /// One field of a Rust struct.
    struct Field {
        name: &'static str,
        offset: usize,
        size: usize,
        scalar: Scalar,
    }

    /// A Rust struct and the WGSL struct of the same role in one kernel.
    struct Twin {
        shader: Shader,
        wgsl: &'static str,
        rust: &'static str,
        size: usize,
        fields: Vec<Field>,
    }

    /// `twin!(KERNEL, "WgslName", RustName, [every field])`. The struct pattern has no
    /// `..`, so a field added to the Rust struct and not listed here does not compile.
    macro_rules! twin {
        ($shader:expr, $wgsl:literal, $ty:ident, [$($field:ident),+ $(,)?]) => {{
            let $ty { $($field: _),+ } = <$ty as Zeroable>::zeroed();
            Twin {
                shader: $shader,
                wgsl: $wgsl,
                rust: stringify!($ty),
                size: size_of::<$ty>(),
                fields: vec![$({
                    let (size, scalar) = scalar_of(|s: &$ty| &s.$field);
                    Field { name: stringify!($field), offset: offset_of!($ty, $field), size, scalar }
                }),+],
            }
        }};
    }

    fn twins() -> Vec<Twin> {
        use panes_shaders::{FOLD, INIT, MERGE, SORT};
        vec![
            twin!(SORT, "SortParams", SortParams, [k, j, n, _pad]),
            twin!(
                FOLD,
                "FoldParams",
                FoldParams,
                [
                    hop, n, cap, ring, stride, columns, lifetime, round, seg, blocks, _pad
                ]
            ),
            twin!(
                MERGE,
                "MergeParams",
                MergeParams,
                [
                    hop, at, keys, features, row, cap, ring, stride, lifetime, _pad
                ]
            ),
            twin!(INIT, "InitParams", InitParams, [first, count, stride, _pad]),
            twin!(MERGE, "Feature", FeatureDesc, [agg, column, panes, out]),
        ]
    }

    fn parse(shader: &Shader) -> (Module, Layouter) {
        let module = naga::front::wgsl::parse_str(shader.source).unwrap_or_else(|e| {
            panic!(
                "{}: {}",
                shader.name,
                e.emit_to_string_with_path(shader.source, shader.name)
            )
        });
        let mut layouter = Layouter::default();
        layouter
            .update(module.to_ctx())
            .unwrap_or_else(|e| panic!("{}: naga cannot lay out the module: {e}", shader.name));
        (module, layouter)
    }

    /// The differences between `twin`'s Rust struct and its WGSL struct, one line each.
    fn mismatches(twin: &Twin) -> Vec<String> {
        let (module, layouter) = parse(&twin.shader);
        let (rust, wgsl, kernel) = (twin.rust, twin.wgsl, twin.shader.name);
        let Some((handle, members)) = module.types.iter().find_map(|(h, t)| match &t.inner {
            TypeInner::Struct { members, .. } if t.name.as_deref() == Some(wgsl) => {
                Some((h, members))
            }
            _ => None,
        }) else {
            return vec![format!(
                "{rust}: the `{kernel}` kernel has no struct `{wgsl}`"
            )];
        };
        let mut bad = Vec::new();
        let mut end = 0; // end of the last WGSL member
        for m in members {
            let name = m.name.as_deref().unwrap_or("?");
            let (offset, size) = (m.offset as usize, layouter[m.ty].size as usize);
            end = end.max(offset + size);
            let Some(f) = twin.fields.iter().find(|f| f.name == name) else {
                bad.push(format!(
                    "{rust}: no field `{name}`, which `{wgsl}` ({kernel}) has at offset {offset}"
                ));
                continue;
            };
            if f.offset != offset {
                bad.push(format!(
                    "{rust}.{name}: at offset {} in Rust, {offset} in `{wgsl}` ({kernel})",
                    f.offset
                ));
            }
            if f.size != size {
                bad.push(format!(
                    "{rust}.{name}: {} bytes in Rust, {size} in `{wgsl}` ({kernel})",
                    f.size
                ));
            }
            let scalar = match module.types[m.ty].inner {
                TypeInner::Scalar(s) => Some(s),
                _ => None,
            };
            if scalar != Some(f.scalar) {
                bad.push(format!(
                    "{rust}.{name}: a {:?} in Rust, {:?} in `{wgsl}` ({kernel})",
                    f.scalar, module.types[m.ty].inner
                ));
            }
        }
        // Rust fields the WGSL struct lacks: only explicit padding after its last
        // member, which the kernel never reads, may extend the Rust struct.
        let mut padded = 0;
        for f in &twin.fields {
            if members.iter().any(|m| m.name.as_deref() == Some(f.name)) {
                continue;
            }
            if f.name.starts_with("_pad") && f.offset >= end {
                padded = padded.max(f.offset + f.size);
            } else {
                bad.push(format!(
                    "{rust}.{}: no member of that name in `{wgsl}` ({kernel})",
                    f.name
                ));
            }
        }
        let size = layouter[handle].size as usize;
        if twin.size != size.max(padded) {
            bad.push(format!(
                "{rust}: {} bytes in Rust, {size} in `{wgsl}` ({kernel}){}",
                twin.size,
                if padded > size {
                    format!(", {padded} with the Rust tail padding")
                } else {
                    String::new()
                }
            ));
        }
        bad
    }

    #[test]
    fn host_structs_match_the_wgsl_layout() {
        let bad: Vec<String> = twins().iter().flat_map(mismatches).collect();
        assert!(
            bad.is_empty(),
            "host structs differ from the WGSL structs they mirror:\n  {}",
            bad.join("\n  ")
        );
    }

    /// Every struct a kernel binds as a uniform or storage buffer (or as the element of
    /// one) has a Rust twin above, so a new one cannot go unchecked.
    #[test]
    fn every_bound_struct_has_a_twin() {
        let twins = twins();
        for shader in panes_shaders::SHADERS {
            let (module, _) = parse(shader);
            let bound: BTreeSet<&str> = module
                .global_variables
                .iter()
                .filter(|(_, g)| {
                    matches!(
                        g.space,
                        AddressSpace::Uniform | AddressSpace::Storage { .. }
                    )
                })
                .filter_map(|(_, g)| {
                    let ty = match module.types[g.ty].inner {
                        TypeInner::Array { base, .. } => base,
                        _ => g.ty,
                    };
                    match module.types[ty].inner {
                        TypeInner::Struct { .. } => module.types[ty].name.as_deref(),
                        _ => None,
                    }
                })
                .collect();
            let twinned: BTreeSet<&str> = twins
                .iter()
                .filter(|t| t.shader.name == shader.name)
                .map(|t| t.wgsl)
                .collect();
            assert_eq!(
                bound, twinned,
                "structs the `{}` kernel binds vs their Rust twins",
                shader.name
            );
        }
    }

    fn constant(shader: &Shader, name: &str) -> u32 {
        let (module, _) = parse(shader);
        let c = module
            .constants
            .iter()
            .find(|(_, c)| c.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("the `{}` kernel has no constant {name}", shader.name))
            .1;
        match module.global_expressions[c.init] {
            Expression::Literal(Literal::U32(v)) => v,
            ref e => panic!(
                "{}: constant {name} is {e:?}, not a u32 literal",
                shader.name
            ),
        }
    }

    #[test]
    fn shared_constants_match_the_wgsl() {
        use panes_shaders::{FOLD, MERGE, SORT};
        assert_eq!(u64::from(constant(&SORT, "TILE")), TILE, "TILE");
        assert_eq!(constant(&FOLD, "BLOCK"), BLOCK, "BLOCK");
        for a in crate::Agg::ALL {
            let name = a.name().to_uppercase();
            assert_eq!(constant(&MERGE, &name), agg_code(a), "code of {a:?}");
        }
    }
}
