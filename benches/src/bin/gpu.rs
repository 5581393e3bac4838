//! GPU against CPU, per batch size: the fold of one micro-batch of the standard
//! workload's state (3 hop levels, 8 features) on the `Cpu` backend and on the `Gpu`
//! backend, and a read of 10 K keys, with the GPU's time split into upload, compute
//! (wall, and on the device where timestamp queries are supported) and download.
//!
//! ```text
//! cargo run --release -p panes-bench --bin gpu [-- --min-events 1024 --max-events 16777216
//!     --keys 100000 --repeats 3 --out benches/results/gpu/latest.json]
//! ```
//!
//! Before anything is reported, each size's GPU state is read back and compared with
//! the CPU state's (count/min/max/last identical, sums and moments within 1e-9): a
//! benchmark of wrong answers is worthless. The crossover is the smallest batch from
//! which the GPU is faster at every larger size measured. On a software adapter
//! (lavapipe) this checks the harness; its speed there means nothing.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use panes_bench::{arg, kernel_inputs, machine, workload};
use panes_engine::CompiledView;
use panes_kernels::{Agg, Backend, Cpu, FoldBatch, Gpu, GpuTimings, MergeOutput, PaneState};

struct Row {
    events: usize,
    cpu: Duration,
    gpu: Duration,
    phases: GpuTimings,
}

fn best<T>(repeats: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..repeats {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed());
        last = Some(r);
    }
    (best, last.expect("at least one repeat"))
}

/// Ends the run with the error, without a backtrace.
fn fail<T>(what: &str, e: impl std::fmt::Display) -> T {
    eprintln!("error: {what}: {e}");
    std::process::exit(1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn json_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn same(agg: Agg, a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if agg.bitwise() {
        a == b
    } else {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-3)
    }
}

fn main() {
    let min: usize = arg("--min-events", "1024").parse().expect("--min-events N");
    let max: usize = arg("--max-events", "16777216")
        .parse()
        .expect("--max-events N");
    let keys: u64 = arg("--keys", "100000").parse().expect("--keys K");
    let repeats: usize = arg("--repeats", "3").parse().expect("--repeats R");
    let out = arg("--out", "benches/results/gpu/latest.json");

    let gpu = Gpu::new().unwrap_or_else(|e| fail("GPU backend", e));
    let cpu = Cpu::new();
    println!("machine: {}", machine());
    println!("GPU: {}", gpu.info());
    let view = CompiledView::new(&workload().views[0], 64);
    println!(
        "state: the standard workload ({} hop levels, {} features), {keys} keys (Zipf 1.1)",
        view.state.levels.len(),
        view.merges.len()
    );

    // Both states hold every key before anything is timed.
    let all: Vec<u32> = (0..keys as u32).collect();
    let t0 = vec![1_767_225_600_000i64; all.len()];
    let v0 = vec![1.0; all.len()];
    let warm_values: Vec<&[f64]> = view.columns.iter().map(|_| v0.as_slice()).collect();
    let warm = FoldBatch {
        ids: &all,
        ts: &t0,
        values: &warm_values,
    };
    let read_ids: Vec<Option<u32>> = (0..10_000u32.min(keys as u32)).map(Some).collect();

    println!(
        "\n{:>10} {:>10} {:>10} {:>8} | {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9}",
        "events",
        "cpu ms",
        "gpu ms",
        "gpu/cpu",
        "upload",
        "compute",
        "device",
        "download",
        "cpu Mev/s",
        "gpu Mev/s"
    );
    let mut rows = Vec::new();
    let mut last_states = None;
    let mut n = min.max(1);
    while n <= max {
        let (row, states) = fold_row(&cpu, &gpu, &view, &warm, &read_ids, n, keys, repeats);
        rows.push(row);
        last_states = Some(states);
        n *= 4;
    }

    // A read of 10 K keys × every feature on the last size's states.
    let read = last_states
        .as_ref()
        .map(|states| read_row(&cpu, &gpu, &view, &read_ids, states, repeats));
    let crossover = (0..rows.len())
        .find(|&i| rows[i..].iter().all(|r| r.gpu < r.cpu))
        .map(|i| rows[i].events);
    match crossover {
        Some(c) => println!("\ncrossover: the GPU is faster from {c} events per batch"),
        None => println!("\ncrossover: none; the CPU was faster at every size measured"),
    }

    let report = Report {
        gpu: &gpu,
        keys,
        repeats,
        crossover,
        rows: &rows,
        read,
        read_keys: read_ids.len(),
        features: view.merges.len(),
    };
    report.write(&out);
}

/// The states of the last size measured, and the time their read is at.
type States = (PaneState, PaneState, i64);

/// Times the fold of `n` events on both backends (the best of `repeats`), the GPU's
/// phases, and checks that both states then read the same.
fn fold_row(
    cpu: &Cpu,
    gpu: &Gpu,
    view: &CompiledView,
    warm: &FoldBatch<'_>,
    read_ids: &[Option<u32>],
    n: usize,
    keys: u64,
    repeats: usize,
) -> (Row, States) {
    let (ids, ts, values) = kernel_inputs(n, keys, 0.01, n as u64);
    let cols: Vec<&[f64]> = view.columns.iter().map(|_| values.as_slice()).collect();
    let batch = FoldBatch {
        ids: &ids,
        ts: &ts,
        values: &cols,
    };
    let mut on_cpu = PaneState::new(view.state.clone()).expect("valid state");
    let mut on_gpu = PaneState::new(view.state.clone()).expect("valid state");
    cpu.fold(&mut on_cpu, warm)
        .unwrap_or_else(|e| fail("cpu fold", e));
    gpu.fold(&mut on_gpu, warm)
        .unwrap_or_else(|e| fail("gpu fold", e));
    let (cpu_t, _) = best(repeats, || {
        cpu.fold(&mut on_cpu, &batch)
            .unwrap_or_else(|e| fail("cpu fold", e))
    });
    gpu.set_profiling(false);
    let (gpu_t, _) = best(repeats, || {
        gpu.fold(&mut on_gpu, &batch)
            .unwrap_or_else(|e| fail("gpu fold", e))
    });
    gpu.set_profiling(true);
    gpu.fold(&mut on_gpu, &batch)
        .unwrap_or_else(|e| fail("gpu fold", e));
    let phases = gpu.last_timings().unwrap_or_default();
    gpu.set_profiling(false);
    cpu.fold(&mut on_cpu, &batch)
        .unwrap_or_else(|e| fail("cpu fold", e));

    // The answers must agree before the times mean anything.
    let at = ts.last().copied().unwrap_or(0);
    let (mut a, mut b) = (MergeOutput::default(), MergeOutput::default());
    let merges = view.pane_merges();
    cpu.merge(&on_cpu, &merges, read_ids, at, &mut a)
        .unwrap_or_else(|e| fail("cpu read", e));
    gpu.merge(&on_gpu, &merges, read_ids, at, &mut b)
        .unwrap_or_else(|e| fail("gpu read", e));
    let nf = merges.len();
    if let Some(i) = (0..a.values.len())
        .find(|&i| a.valid[i] != b.valid[i] || !same(merges[i % nf].agg, a.values[i], b.values[i]))
    {
        eprintln!(
            "error: at {n} events, key {} feature {}: cpu {} vs gpu {}",
            i / nf,
            view.spec.features[i % nf].name,
            a.values[i],
            b.values[i]
        );
        std::process::exit(1);
    }
    let rate = |d: Duration| n as f64 / d.as_secs_f64() / 1e6;
    println!(
        "{n:>10} {:>10.3} {:>10.3} {:>8.2} | {:>9.3} {:>9.3} {:>9} {:>9.3} | {:>9.1} {:>9.1}",
        ms(cpu_t),
        ms(gpu_t),
        gpu_t.as_secs_f64() / cpu_t.as_secs_f64(),
        ms(phases.upload),
        ms(phases.compute),
        phases
            .compute_device
            .map_or("-".to_string(), |d| format!("{:.3}", ms(d))),
        ms(phases.download),
        rate(cpu_t),
        rate(gpu_t),
    );
    let row = Row {
        events: n,
        cpu: cpu_t,
        gpu: gpu_t,
        phases,
    };
    (row, (on_cpu, on_gpu, at))
}

/// Times a read of `read_ids` × every feature on both backends, and the GPU's phases.
fn read_row(
    cpu: &Cpu,
    gpu: &Gpu,
    view: &CompiledView,
    read_ids: &[Option<u32>],
    (on_cpu, on_gpu, at): &States,
    repeats: usize,
) -> (Duration, Duration, GpuTimings) {
    let mut o = MergeOutput::default();
    let merges = view.pane_merges();
    let (cpu_r, _) = best(repeats.max(3), || {
        cpu.merge(on_cpu, &merges, read_ids, *at, &mut o)
            .unwrap_or_else(|e| fail("cpu read", e))
    });
    let (gpu_r, _) = best(repeats.max(3), || {
        gpu.merge(on_gpu, &merges, read_ids, *at, &mut o)
            .unwrap_or_else(|e| fail("gpu read", e))
    });
    gpu.set_profiling(true);
    gpu.merge(on_gpu, &merges, read_ids, *at, &mut o)
        .unwrap_or_else(|e| fail("gpu read", e));
    let p = gpu.last_timings().unwrap_or_default();
    gpu.set_profiling(false);
    println!(
        "read of {} keys × {} features: cpu {:.3} ms, gpu {:.3} ms (upload {:.3}, compute {:.3}, download {:.3})",
        read_ids.len(),
        merges.len(),
        ms(cpu_r),
        ms(gpu_r),
        ms(p.upload),
        ms(p.compute),
        ms(p.download)
    );
    (cpu_r, gpu_r, p)
}

/// What the run measured, for the JSON report.
struct Report<'a> {
    gpu: &'a Gpu,
    keys: u64,
    repeats: usize,
    crossover: Option<usize>,
    rows: &'a [Row],
    read: Option<(Duration, Duration, GpuTimings)>,
    read_keys: usize,
    features: usize,
}

impl Report<'_> {
    fn write(&self, out: &str) {
        let Report {
            gpu,
            keys,
            repeats,
            crossover,
            rows,
            read,
            read_keys,
            features,
        } = *self;
        let mut j = String::new();
        let _ = write!(
            j,
            "{{\n  \"machine\": {},\n  \"gpu\": {{\"name\": {}, \"backend\": {}, \"driver\": {}, \"device_type\": {}, \"timestamps\": {}}},\n  \"keys\": {keys},\n  \"repeats\": {repeats},\n  \"crossover_events\": {},\n  \"rows\": [",
            json_str(&machine()),
            json_str(&gpu.info().name),
            json_str(&gpu.info().backend),
            json_str(&gpu.info().driver),
            json_str(&gpu.info().device_type),
            gpu.info().timestamps,
            crossover.map_or("null".to_string(), |c| c.to_string()),
        );
        for (i, r) in rows.iter().enumerate() {
            let _ = write!(
                j,
                "{}\n    {{\"events\": {}, \"cpu_ms\": {:.4}, \"gpu_ms\": {:.4}, \"upload_ms\": {:.4}, \"compute_ms\": {:.4}, \"compute_device_ms\": {}, \"download_ms\": {:.4}}}",
                if i == 0 { "" } else { "," },
                r.events,
                ms(r.cpu),
                ms(r.gpu),
                ms(r.phases.upload),
                ms(r.phases.compute),
                r.phases
                    .compute_device
                    .map_or("null".to_string(), |d| format!("{:.4}", ms(d))),
                ms(r.phases.download),
            );
        }
        j.push_str("\n  ]");
        if let Some((c, g, p)) = read {
            let _ = write!(
                j,
                ",\n  \"read\": {{\"keys\": {}, \"features\": {}, \"cpu_ms\": {:.4}, \"gpu_ms\": {:.4}, \"upload_ms\": {:.4}, \"compute_ms\": {:.4}, \"download_ms\": {:.4}}}",
                read_keys,
                features,
                ms(c),
                ms(g),
                ms(p.upload),
                ms(p.compute),
                ms(p.download)
            );
        }
        j.push_str("\n}\n");
        if let Some(dir) = std::path::Path::new(&out).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(out, j).expect("write the JSON report");
        println!("wrote {out}");
    }
}
