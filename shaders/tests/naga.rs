//! Every kernel parses and validates with naga (the front end wgpu uses), with the
//! capabilities the GPU backend requests, and every `.wgsl` file is part of a kernel.

use std::collections::BTreeSet;

use naga::valid::{Capabilities, ValidationFlags, Validator};

#[test]
fn every_kernel_validates() {
    for shader in panes_shaders::SHADERS {
        let module = naga::front::wgsl::parse_str(shader.source).unwrap_or_else(|e| {
            panic!(
                "{}: {}",
                shader.name,
                e.emit_to_string_with_path(shader.source, shader.name)
            )
        });
        Validator::new(
            ValidationFlags::all(),
            Capabilities::FLOAT64 | Capabilities::SHADER_INT64,
        )
        .validate(&module)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {}",
                shader.name,
                e.emit_to_string_with_path(shader.source, shader.name)
            )
        });
        assert!(
            !module.entry_points.is_empty(),
            "{} has no entry point",
            shader.name
        );
    }
}

#[test]
fn every_wgsl_file_is_in_a_kernel() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/wgsl");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wgsl"))
        .collect();
    let used: BTreeSet<String> = panes_shaders::SHADERS
        .iter()
        .flat_map(|s| s.files.iter().map(|f| f.to_string()))
        .collect();
    assert_eq!(on_disk, used);
}

#[test]
fn a_broken_shader_is_rejected() {
    // The validation above can fail: an f64 kernel without the capability does.
    let module = naga::front::wgsl::parse_str(panes_shaders::FOLD.source).unwrap();
    let err = Validator::new(ValidationFlags::all(), Capabilities::SHADER_INT64).validate(&module);
    assert!(err.is_err());
}
