//! The serving load generator runs end to end, briefly: a server in-process, ingest at
//! a fixed rate, open-loop reads of every size, the freshness probe and the Redis
//! reference (`redis-server`, which the test command installs), and its JSON report.
//! Its numbers mean nothing here (a debug build, a fraction of a second).

use std::process::Command;

#[test]
fn load_generator_prints_the_table_and_writes_its_report() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("serve.json");
    let run = Command::new(env!("CARGO_BIN_EXE_serve_load"))
        .args([
            "--seconds",
            "0.5",
            "--rate",
            "100",
            "--ingest-rate",
            "50000",
            "--keys",
            "2000",
            "--sizes",
            "1,100",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    for row in [
        "panes + ingest           1",
        "panes + ingest         100",
        "redis MGET             100",
    ] {
        assert!(stdout.contains(row), "no row {row:?} in\n{stdout}");
    }
    assert!(stdout.contains("freshness"), "{stdout}");
    let json = std::fs::read_to_string(&out).unwrap();
    assert_eq!(json.matches("\"target\":").count(), 4, "{json}");
    // Every request of every phase succeeded.
    assert_eq!(json.matches("\"errors\": 0").count(), 4, "{json}");
}
