//! Backfill at scale: N events and M spine rows through the same code as
//! `panes backfill`, with the time of each phase and the peak memory of the process.
//!
//! ```text
//! cargo run --release -p panes-bench --bin backfill [-- --events 10000000 --spine 1000000 --keys 100000]
//! ```

use std::sync::Arc;
use std::time::Instant;

use arrow_array::{Int64Array, RecordBatch, TimestampMillisecondArray};
use panes_bench::{arg, ingest_batches, machine, workload};
use panes_engine::offline::io::{read_file, write_file};
use panes_engine::sources::synth::Synth;
use panes_engine::{BackendKind, BackfillOptions, EngineOptions, backfill};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() {
    let events: usize = arg("--events", "10000000").parse().expect("--events N");
    let spine_rows: usize = arg("--spine", "1000000").parse().expect("--spine M");
    let keys: u64 = arg("--keys", "100000").parse().expect("--keys K");
    let backend: BackendKind = arg("--backend", "cpu").parse().expect("--backend");
    println!("machine: {}", machine());
    let dir = std::env::temp_dir().join(format!("panes-backfill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (ev_path, sp_path, out_path) = (
        dir.join("events.parquet"),
        dir.join("spine.parquet"),
        dir.join("out.parquet"),
    );

    let t = Instant::now();
    let batches = ingest_batches(events, keys, 1 << 20, 0.01, 42);
    write_file(&ev_path, &batches[0].schema(), &batches).expect("write events");
    let end = 1_767_225_600_000 + (events as i64) / 10; // 10 000 events per second
    drop(batches);
    let mut rng = StdRng::seed_from_u64(7);
    let cards: Vec<i64> = (0..spine_rows)
        .map(|_| Synth::card(rng.random_range(1..=keys + keys / 10)))
        .collect();
    let at: Vec<i64> = (0..spine_rows)
        .map(|_| rng.random_range(1_767_225_600_000..end))
        .collect();
    let spine = RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(cards)) as _),
        (
            "ts",
            Arc::new(TimestampMillisecondArray::from(at).with_timezone("UTC")) as _,
        ),
    ])
    .expect("spine");
    write_file(&sp_path, &spine.schema(), &[spine]).expect("write spine");
    println!(
        "inputs: {events} events, {spine_rows} spine rows, {keys} keys (written in {:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    let (_, ev) = read_file(&ev_path).expect("read events");
    let (sp_schema, sp) = read_file(&sp_path).expect("read spine");
    let read_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let be = EngineOptions {
        backend: Some(backend),
        ..Default::default()
    }
    .create_backend()
    .expect("backend");
    let options = BackfillOptions {
        progress: false,
        ..Default::default()
    };
    let (schema, out, _) =
        backfill(&workload(), &ev, &sp_schema, &sp, be, &options).expect("backfill");
    let compute_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    write_file(&out_path, &schema, &out).expect("write output");
    let write_s = t.elapsed().as_secs_f64();
    println!(
        "backfill ({backend}): read {read_s:.1} s, compute {compute_s:.1} s ({:.1} M events/s), write {write_s:.1} s; peak memory {:.0} MiB",
        events as f64 / compute_s / 1e6,
        peak_rss_mib()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
