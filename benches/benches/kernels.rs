//! Criterion benchmarks of the two kernels, Scalar vs Cpu (1 and all threads), with
//! and without nulls.
//!
//! ```text
//! cargo bench -p panes-bench --bench kernels
//! ```

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use panes_bench::kernel_inputs;
use panes_kernels::{
    Agg, Backend, ColumnFields, Cpu, FeatureMerge, FoldBatch, LevelSpec, MergeOutput, PaneState,
    Scalar, StateSpec,
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

criterion_group!(benches, fold, merge);
criterion_main!(benches);
