//! Shared inputs and measurements of the Panes benchmarks.
//!
//! Every benchmark takes its inputs from [`kernel_inputs`] / [`ingest_batches`]
//! (seeded, with a null density), and reports throughput next to a bound measured in
//! the same run ([`memory_bandwidth`]), because the machines are shared and noisy.

#![warn(missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use arrow_array::RecordBatch;
use panes_engine::FeatureFile;
use panes_engine::sources::synth::{Synth, SynthConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rayon::prelude::*;

/// The standard workload's feature file: 8 features over 3 windows.
pub const WORKLOAD: &str = include_str!("../workload.toml");

/// The standard workload's features.
pub fn workload() -> FeatureFile {
    FeatureFile::parse(WORKLOAD, "benches/workload.toml").expect("the workload file is valid")
}

/// Bytes of input per event of the standard workload: Int64 key, timestamp, f64 amount.
pub const BYTES_PER_EVENT: usize = 24;

/// Kernel inputs: key ids (Zipf), increasing times (10 events per ms), and one value
/// column with `null_density` NaNs.
pub fn kernel_inputs(
    events: usize,
    keys: u64,
    null_density: f64,
    seed: u64,
) -> (Vec<u32>, Vec<i64>, Vec<f64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let zipf = Zipf::new(keys as f64, 1.1).expect("valid zipf");
    let ids = (0..events)
        .map(|_| zipf.sample(&mut rng) as u32 - 1)
        .collect();
    let ts = (0..events as i64)
        .map(|i| 1_767_225_600_000 + i / 10)
        .collect();
    let values = (0..events)
        .map(|_| {
            if rng.random_bool(null_density) {
                f64::NAN
            } else {
                rng.random_range(0.0..500.0)
            }
        })
        .collect();
    (ids, ts, values)
}

/// `events` synthetic card transactions over `keys` Zipf(1.1) cards, in batches of
/// `batch` rows; `null_density` of the amounts are null. 10 000 events per second of
/// event time, 2 s of disorder, no late or bad rows.
pub fn ingest_batches(
    events: usize,
    keys: u64,
    batch: usize,
    null_density: f64,
    seed: u64,
) -> Vec<RecordBatch> {
    let mut synth = Synth::new(SynthConfig {
        keys,
        zipf: 1.1,
        null_fraction: null_density,
        late_fraction: 0.0,
        bad_fraction: 0.0,
        seed,
        ..Default::default()
    });
    let mut out = Vec::new();
    let mut left = events;
    while left > 0 {
        let n = left.min(batch);
        out.push(synth.next_batch(n));
        left -= n;
    }
    out
}

/// Streaming read bandwidth in bytes/s: the best of several sums over a buffer much
/// larger than the caches, on one thread and on all threads (the larger is returned,
/// with both).
pub fn memory_bandwidth() -> (f64, f64, f64) {
    const BYTES: usize = 1 << 30;
    let buf: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let sum1 = |b: &[u64]| {
        let mut acc = [0u64; 8];
        for c in b.chunks_exact(8) {
            for l in 0..8 {
                acc[l] = acc[l].wrapping_add(c[l]);
            }
        }
        acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
    };
    let time = |f: &dyn Fn() -> u64| {
        (0..5)
            .map(|_| {
                let t = Instant::now();
                black_box(f());
                BYTES as f64 / t.elapsed().as_secs_f64()
            })
            .fold(0.0, f64::max)
    };
    let one = time(&|| sum1(&buf));
    let all = time(&|| {
        buf.par_chunks(1 << 20)
            .map(sum1)
            .reduce(|| 0, u64::wrapping_add)
    });
    (one.max(all), one, all)
}

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// One-line description of the machine: CPU model and thread count.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!(
        "{model}, {} threads",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )
}
