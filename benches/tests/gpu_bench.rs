//! The GPU benchmark runs end to end on whatever adapter the machine has (lavapipe in
//! the test command, where its speed means nothing): it checks the GPU's answers
//! against the CPU's before timing, and writes its JSON report.

use std::process::Command;

#[test]
fn gpu_benchmark_checks_answers_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("gpu.json");
    let run = Command::new(env!("CARGO_BIN_EXE_gpu"))
        .args([
            "--max-events",
            "16384",
            "--keys",
            "5000",
            "--repeats",
            "1",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() && stderr.contains("GPU backend: backend unavailable") {
        assert!(
            !std::env::var("PANES_REQUIRE_GPU").is_ok_and(|v| v == "1"),
            "PANES_REQUIRE_GPU=1 but no GPU adapter: {stderr}"
        );
        eprintln!("GPU benchmark skipped (set PANES_REQUIRE_GPU=1 to fail instead): {stderr}");
        return;
    }
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("crossover:"), "{stdout}");
    let json = std::fs::read_to_string(&out).unwrap();
    // 1 Ki, 4 Ki and 16 Ki events, each with its phases, then the read.
    assert_eq!(json.matches("\"events\":").count(), 3, "{json}");
    for field in [
        "\"upload_ms\"",
        "\"compute_ms\"",
        "\"download_ms\"",
        "\"crossover_events\"",
        "\"read\"",
    ] {
        assert!(json.contains(field), "{field} missing: {json}");
    }
}
