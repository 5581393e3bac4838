//! The command line as a new user first meets it.

use std::process::Command;

/// `panes demo` on a machine without a desktop session (a server, a container, CI)
/// opens with what Panes does, not with errors that are not ones: before, Mesa's
/// Vulkan device-select layer, probing for a Wayland compositor while the `auto`
/// backend looked for a GPU, made libwayland print "error: XDG_RUNTIME_DIR is invalid
/// or not set in the environment." twice. Every line on stderr is now Panes' own, and
/// one of them says which backend runs and why.
#[test]
fn r26_the_demo_opens_without_errors_from_the_gpu_probe() {
    let out = Command::new(env!("CARGO_BIN_EXE_panes"))
        .args(["demo", "--events", "20000", "--backend", "auto"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .env_remove("PANES_BACKEND")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Panes' own lines: the demo's, or log events of its crates (`INFO panes_kernels…`).
    for line in stderr.lines() {
        assert!(
            line.starts_with("panes: ") || line.contains(" panes_"),
            "a line on stderr that is not Panes': {line:?}\n{stderr}"
        );
    }
    #[cfg(feature = "gpu")]
    assert!(
        stderr.contains("panes: auto backend"),
        "the auto backend says what it chose:\n{stderr}"
    );
}
