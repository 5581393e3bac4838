//! The serving load generator runs end to end, briefly: a server in-process, ingest at
//! a fixed rate, open-loop reads of every size and of a feature service, the freshness
//! probe and the Redis
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
            "--service-sizes",
            "100",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    let has_row = |target: &str, keys: &str| {
        stdout.lines().any(|l| {
            l.strip_prefix(target)
                .is_some_and(|rest| rest.split_whitespace().next() == Some(keys))
        })
    };
    for (target, keys) in [
        ("panes + ingest", "1"),
        ("panes + ingest", "100"),
        ("panes service", "100"),
        ("redis MGET", "1"),
        ("redis MGET", "100"),
    ] {
        assert!(
            has_row(target, keys),
            "no row {target} × {keys} in\n{stdout}"
        );
    }
    assert!(stdout.contains("freshness"), "{stdout}");
    let json = std::fs::read_to_string(&out).unwrap();
    assert_eq!(json.matches("\"target\":").count(), 5, "{json}");
    // Every request of every phase succeeded (a service reply has every column).
    assert_eq!(json.matches("\"errors\": 0").count(), 5, "{json}");
    // Panes reports its own time per request (a header); Redis does not.
    assert_eq!(json.matches("\"server_p99_ms\": null").count(), 2, "{json}");
    assert_eq!(json.matches("\"server_p99_ms\": ").count(), 5, "{json}");
}
