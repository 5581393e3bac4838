//! Ingest throughput of the standard workload next to the memory-bandwidth bound of
//! the same machine, measured in the same run.
//!
//! ```text
//! cargo run --release -p panes-bench --bin ingest [-- --events N --keys K --batch B --repeats R --backends cpu,scalar]
//! ```
//!
//! Workload: N events (default 10 M) of K (default 100 K) Int64 card ids drawn from
//! Zipf(1.1), 8 features over 3 windows (`benches/workload.toml`), pushed as Arrow
//! batches of B rows through `Engine::push` (decode, lateness, key index, fold), then
//! flushed. The bound is the streaming read bandwidth divided by the 24 input bytes
//! of an event (key, time, amount). The `Cpu` backend runs twice, with and without
//! the read copies it keeps for serving (`EngineOptions::read_copy`), and once more
//! with a view filter and two derived columns added to the same view
//! ([`with_expressions`]): the cost of expressions.

use std::time::Instant;

use arrow_array::Int64Array;
use panes_bench::{
    BYTES_PER_EVENT, WORKLOAD, arg, ingest_batches, machine, memory_bandwidth, workload,
};
use panes_engine::sources::synth::Synth;
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile};

/// The standard workload with a view filter that keeps every row (`items` is 1 to 12)
/// and two derived columns, one numeric and one string: what expressions cost when
/// they change nothing.
fn with_expressions() -> FeatureFile {
    let text = WORKLOAD.replacen(
        "allowed_lateness = \"5s\"\n",
        "allowed_lateness = \"5s\"\nfilter = \"items >= 1 AND card IS NOT NULL\"\n\n\
         [[views.columns]]\nname = \"amount_usd\"\nexpr = \"amount * 1.08\"\n\n\
         [[views.columns]]\nname = \"size\"\n\
         expr = \"CASE WHEN amount > 100 THEN 'large' ELSE 'small' END\"\n",
        1,
    );
    assert_ne!(text, WORKLOAD, "the workload's view header changed");
    FeatureFile::parse(&text, "workload with expressions").expect("valid")
}

fn main() {
    let events: usize = arg("--events", "10000000").parse().expect("--events N");
    let keys: u64 = arg("--keys", "100000").parse().expect("--keys K");
    let batch: usize = arg("--batch", "65536").parse().expect("--batch B");
    let repeats: usize = arg("--repeats", "3").parse().expect("--repeats R");
    let backends: Vec<BackendKind> = arg("--backends", "cpu,scalar")
        .split(',')
        .map(|b| b.parse().expect("--backends scalar,cpu"))
        .collect();

    println!("machine: {}", machine());
    let (bw, bw1, bwn) = memory_bandwidth();
    let bound = bw / BYTES_PER_EVENT as f64;
    println!(
        "memory read bandwidth: {:.1} GB/s (1 thread {:.1}, all threads {:.1}) → bound {:.0} M events/s at {BYTES_PER_EVENT} B/event",
        bw / 1e9,
        bw1 / 1e9,
        bwn / 1e9,
        bound / 1e6
    );
    let t = Instant::now();
    let batches = ingest_batches(events, keys, batch, 0.01, 42);
    println!(
        "workload: {events} events, {keys} Int64 keys (Zipf 1.1), batches of {batch}, 8 features over 3 windows (generated in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let file = workload();
    let read_keys = Int64Array::from((1..=keys).map(Synth::card).collect::<Vec<_>>());
    // The `Cpu` backend with and without its read copies (which only it keeps), the
    // repeats of all configurations interleaved so that the machine's drift hits each.
    let exprs = with_expressions();
    // (backend, read copy, expressions)
    let configs: Vec<(BackendKind, bool, bool)> = backends
        .iter()
        .flat_map(|&b| match b {
            BackendKind::Cpu => vec![(b, true, false), (b, false, false), (b, true, true)],
            _ => vec![(b, true, false)],
        })
        .collect();
    let mut results = vec![(Vec::new(), Vec::new(), 0); configs.len()];
    for _ in 0..repeats {
        for (&(backend, read_copy, with_exprs), (rates, read_s, state)) in
            configs.iter().zip(&mut results)
        {
            let engine = Engine::new(
                if with_exprs { &exprs } else { &file },
                EngineOptions {
                    backend: Some(backend),
                    read_copy,
                    ..Default::default()
                },
            )
            .expect("engine");
            let t = Instant::now();
            for b in &batches {
                engine.push("cards", b).expect("push");
            }
            engine.flush().expect("flush");
            rates.push(events as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let f = engine.read("cards", &read_keys, None, None).expect("read");
            read_s.push(t.elapsed().as_secs_f64());
            assert_eq!(f.values.nrows(), keys as usize);
            let m = engine.metrics("cards").expect("metrics");
            assert_eq!((m.counters.filtered, m.counters.expr_errors), (0, 0));
            *state = m.state_bytes;
        }
    }
    for (&(backend, read_copy, with_exprs), (rates, read_s, state)) in
        configs.iter().zip(&mut results)
    {
        let name = match (backend, read_copy, with_exprs) {
            (BackendKind::Cpu, false, _) => "cpu, no read copy".to_string(),
            (_, _, true) => format!("{backend} + filter, 2 derived"),
            _ => backend.to_string(),
        };
        rates.sort_by(f64::total_cmp);
        read_s.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!(
            "ingest {name:>26}: {:.1} M events/s (min {:.1}, median {:.1}, max {:.1}) = {:.2} GB/s of input, {:.1} % of the bound; read of {keys} keys × 8 features {:.1} ms; state {:.0} MiB",
            median / 1e6,
            rates[0] / 1e6,
            median / 1e6,
            rates[rates.len() - 1] / 1e6,
            median * BYTES_PER_EVENT as f64 / 1e9,
            100.0 * median / bound,
            read_s[read_s.len() / 2] * 1e3,
            *state as f64 / (1 << 20) as f64,
        );
    }
}
