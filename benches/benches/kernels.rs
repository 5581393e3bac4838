//! Criterion benchmarks of the two kernels, Scalar vs Cpu (1 and all threads), with
//! and without nulls; and the sketches (`approx_distinct`, `quantile`) against a plain
//! `sum` of the same events in the same run.
//!
//! ```text
//! cargo bench -p panes-bench --bench kernels
//! ```

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use panes_bench::kernel_inputs;
use panes_kernels::{
    Agg, Backend, ColumnFields, Cpu, FeatureMerge, FoldBatch, LevelSpec, MergeOutput, PaneState,
    Param, Scalar, StateSpec, hll,
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const KEYS: u64 = 100_000;

/// Three levels like the standard workload: 1 m × 5, 5 m × 12, 1 h × 24 panes.
fn spec() -> (StateSpec, Vec<FeatureMerge>) {
    let all = [Agg::Sum, Agg::Max, Agg::Var, Agg::Last]
        .iter()
        .fold(ColumnFields::default(), |f, a| f.union(a.fields()));
    let levels = [(60_000, 5), (300_000, 12), (3_600_000, 24)]
        .iter()
        .map(|&(hop, ring)| LevelSpec {
            hop,
            ring,
            columns: vec![all],
            lifetime: false,
        })
        .collect();
    let features = [
        (0, Agg::Count, None, 5),
        (0, Agg::Sum, Some(0), 5),
        (1, Agg::Mean, Some(0), 12),
        (1, Agg::Max, Some(0), 12),
        (1, Agg::Std, Some(0), 12),
        (2, Agg::Count, None, 24),
        (2, Agg::Mean, Some(0), 24),
        (2, Agg::Last, Some(0), 24),
    ]
    .iter()
    .map(|&(level, agg, column, panes)| FeatureMerge {
        level,
        agg,
        column,
        panes: Some(panes),
    })
    .collect();
    (StateSpec { levels, shards: 32 }, features)
}

fn backends() -> Vec<(&'static str, Box<dyn Backend>)> {
    vec![
        ("scalar", Box::new(Scalar)),
        ("cpu-1t", Box::new(Cpu::with_threads(1).unwrap())),
        ("cpu", Box::new(Cpu::new())),
    ]
}

fn fold(c: &mut Criterion) {
    let (spec, _) = spec();
    let mut g = c.benchmark_group("fold");
    for &n in &[4_096usize, 65_536, 1 << 20] {
        for null_density in [0.0, 0.1] {
            let (ids, ts, values) = kernel_inputs(n, KEYS, null_density, 7);
            let vals = [values.as_slice()];
            let batch = FoldBatch {
                ids: &ids,
                ts: &ts,
                values: &vals,
            };
            g.throughput(Throughput::Bytes((n * (4 + 8 + 8)) as u64));
            for (name, b) in backends() {
                let mut state = PaneState::new(spec.clone()).unwrap();
                b.fold(&mut state, &batch).unwrap(); // allocate every key first
                let id = BenchmarkId::new(format!("{name}/nulls={null_density}"), n);
                g.bench_with_input(id, &batch, |bench, batch| {
                    bench.iter(|| b.fold(&mut state, black_box(batch)).unwrap())
                });
            }
        }
    }
    g.finish();
}

fn merge(c: &mut Criterion) {
    let (spec, features) = spec();
    let mut g = c.benchmark_group("merge");
    for null_density in [0.0, 0.1] {
        let (ids, ts, values) = kernel_inputs(1 << 20, KEYS, null_density, 7);
        let vals = [values.as_slice()];
        let mut state = PaneState::new(spec.clone()).unwrap();
        Scalar
            .fold(
                &mut state,
                &FoldBatch {
                    ids: &ids,
                    ts: &ts,
                    values: &vals,
                },
            )
            .unwrap();
        let at = *ts.last().unwrap();
        // The same state with the `Cpu` backend's key-major read copy in place, as in
        // steady serving (a state the scalar backend folded has none: reads take
        // every cell from the position-major ring).
        let mut with_copy = PaneState::import(spec.clone(), state.export().unwrap()).unwrap();
        with_copy.sync_read_copy();
        // Bytes of state a read touches per key: every cell of the key's rings.
        let per_key: usize = spec.levels.iter().map(LevelSpec::bytes_per_slot).sum();
        for &keys in &[1usize, 100, 10_000] {
            let read: Vec<Option<u32>> = (0..keys as u32).map(Some).collect();
            g.throughput(Throughput::Bytes((keys * per_key) as u64));
            for (name, b) in backends() {
                for (read_from, state) in [("ring", &state), ("copy", &with_copy)] {
                    let mut out = MergeOutput::default();
                    let id =
                        BenchmarkId::new(format!("{name}/nulls={null_density}/{read_from}"), keys);
                    g.bench_with_input(id, &read, |bench, read| {
                        bench.iter(|| {
                            b.merge(state, &features, black_box(read), at, &mut out)
                                .unwrap()
                        })
                    });
                }
            }
        }
        // A serving read: 100 keys scattered over the state, with the caches flushed
        // before each read (the ids above sit together and stay cached).
        let mut rng = StdRng::seed_from_u64(11);
        let mut flush = vec![0u8; 64 << 20];
        g.throughput(Throughput::Bytes((100 * per_key) as u64));
        for (name, b) in backends() {
            for (read_from, state) in [("ring", &state), ("copy", &with_copy)] {
                let mut out = MergeOutput::default();
                let id = BenchmarkId::new(
                    format!("{name}/nulls={null_density}/{read_from}"),
                    "scattered-100",
                );
                g.bench_function(id, |bench| {
                    bench.iter_batched_ref(
                        || {
                            for x in flush.iter_mut().step_by(64) {
                                *x = x.wrapping_add(1);
                            }
                            (0..100)
                                .map(|_| Some(rng.random_range(0..KEYS as u32)))
                                .collect::<Vec<_>>()
                        },
                        |read| b.merge(state, &features, read, at, &mut out).unwrap(),
                        BatchSize::PerIteration,
                    )
                });
            }
        }
    }
    g.finish();
}

/// Fold and read of one feature over 10 K keys, one 1 h level of 24 panes: `sum` (the
/// baseline), `first`, `decayed_sum`, `approx_distinct`, `quantile`, `last_n` and
/// `top_k`.
fn sketches(c: &mut Criterion) {
    const SKETCH_KEYS: u64 = 10_000;
    let aggs = [
        Agg::Sum,
        Agg::First,
        Agg::DecayedSum {
            half_life: 3_600_000,
        },
        Agg::ApproxDistinct { precision: 12 },
        Agg::Quantile {
            q: Param::new(0.9),
            relative_accuracy: Param::new(0.01),
        },
        Agg::LastN { n: 10 },
        Agg::TopK { k: 5, capacity: 64 },
    ];
    let n = 1 << 16;
    let (ids, ts, values) = kernel_inputs(n, SKETCH_KEYS, 0.0, 7);
    // approx_distinct reads hashes (the engine hashes values at ingest); a few
    // thousand distinct values, so the sketches of busy keys turn dense.
    let hashes: Vec<f64> = values
        .iter()
        .map(|v| hll::value(hll::splitmix64((v.abs() * 100.0) as u64 % 5_000)))
        .collect();
    let cpu = Cpu::with_threads(1).unwrap();
    let mut g = c.benchmark_group("sketches");
    for agg in aggs {
        let spec = StateSpec {
            levels: vec![LevelSpec {
                hop: 3_600_000,
                ring: 24,
                columns: vec![agg.fields()],
                lifetime: false,
            }],
            shards: 32,
        };
        let column = if matches!(agg, Agg::ApproxDistinct { .. }) {
            hashes.as_slice()
        } else {
            values.as_slice()
        };
        let vals = [column];
        let batch = FoldBatch {
            ids: &ids,
            ts: &ts,
            values: &vals,
        };
        let mut state = PaneState::new(spec).unwrap();
        cpu.fold(&mut state, &batch).unwrap();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(
            BenchmarkId::new("fold", agg.name()),
            &batch,
            |bench, batch| bench.iter(|| cpu.fold(&mut state, black_box(batch)).unwrap()),
        );
        let features = [FeatureMerge {
            level: 0,
            agg,
            column: Some(0),
            panes: Some(24),
        }];
        let read: Vec<Option<u32>> = (0..1_000).map(Some).collect();
        let at = *ts.last().unwrap();
        let mut out = MergeOutput::default();
        g.throughput(Throughput::Elements(read.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("read-1000", agg.name()),
            &read,
            |bench, read| {
                bench.iter(|| {
                    cpu.merge(&state, &features, black_box(read), at, &mut out)
                        .unwrap()
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, fold, merge, sketches);
criterion_main!(benches);
