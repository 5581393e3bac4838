//! Baseline-vs-optimised fuzzer: the `Scalar` backend folds each random stream as one
//! batch; every other backend folds it in random splits. Reads (random keys, times and
//! features) must agree: count/min/max/last identically, sums and moments to 1e-9.

use panes_kernels::{
    Agg, Backend, BackendKind, ColumnFields, Cpu, FeatureMerge, FoldBatch, FoldLog, LevelSpec,
    MergeOutput, PaneState, Param, ReadStatus, Scalar, StateSpec, hll,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Case {
    spec: StateSpec,
    features: Vec<FeatureMerge>,
    ids: Vec<u32>,
    ts: Vec<i64>,
    values: Vec<Vec<f64>>,
}

fn gen_case(rng: &mut StdRng) -> Case {
    gen_case_with(rng, Sketches::All)
}

/// Which sketch and list groups a random case may have.
#[derive(Clone, Copy, PartialEq)]
enum Sketches {
    None,
    /// Every parameter the tests use.
    All,
    /// Parameters whose cells leave room for 500 keys in lavapipe's 128 MiB storage
    /// binding (a level's cells must fit one): precision up to 10, accuracy 0.05.
    Small,
}

/// A random case with some columns keeping `sketches`.
fn gen_case_with(rng: &mut StdRng, sketches: Sketches) -> Case {
    let small = sketches == Sketches::Small;
    let sketches = sketches != Sketches::None;
    let columns = rng.random_range(1..=3);
    // Columns of hashes, sketched at one precision each (a view gives each precision
    // of a column its own state column).
    let precisions: Vec<Option<u8>> = (0..columns)
        .map(|_| {
            let p: &[u8] = if small { &[4, 8, 10] } else { &[4, 8, 12, 14] };
            (sketches && rng.random_bool(0.5)).then(|| p[rng.random_range(0..p.len())])
        })
        .collect();
    // Columns with quantile sketches, at one accuracy each.
    let accuracies: Vec<Option<f64>> = (0..columns)
        .map(|_| {
            let a: &[f64] = if small { &[0.05] } else { &[0.01, 0.05, 0.001] };
            (sketches && rng.random_bool(0.5)).then(|| a[rng.random_range(0..a.len())])
        })
        .collect();
    // Columns keeping their newest values (`last_n`), at one n each.
    let newest: Vec<Option<u16>> = (0..columns)
        .map(|_| (sketches && rng.random_bool(0.5)).then(|| [1, 3, 20][rng.random_range(0..3)]))
        .collect();
    // Columns of at most 32 distinct values with frequent-values summaries (within
    // capacity, where `top_k` is exact and every backend agrees bitwise).
    let frequent: Vec<Option<u16>> = (0..columns)
        .map(|c| {
            (sketches && precisions[c].is_none() && rng.random_bool(0.4))
                .then(|| [32, 64][rng.random_range(0..2)])
        })
        .collect();
    let nlevels = rng.random_range(1..=3);
    let mut levels = Vec::new();
    let mut features = Vec::new();
    for l in 0..nlevels {
        let hop = [1, 7, 1000, 60_000][rng.random_range(0..4)];
        let ring = rng.random_range(1..=12);
        let lifetime = rng.random_bool(0.5);
        let mut cols = vec![ColumnFields::default(); columns];
        for _ in 0..rng.random_range(1..=6) {
            let agg = Agg::ALL[rng.random_range(0..Agg::ALL.len())];
            let column =
                (agg != Agg::Count || rng.random_bool(0.5)).then(|| rng.random_range(0..columns));
            // A column keeps one half-life (a view gives each its own column).
            let agg = with_half_life(agg, column.and_then(|c| cols[c].decay), rng);
            let agg = with_precision(agg, column.and_then(|c| precisions[c]));
            let agg = with_accuracy(agg, column.and_then(|c| accuracies[c]), rng);
            let agg = with_n(agg, column.and_then(|c| newest[c]));
            let agg = with_capacity(agg, column.and_then(|c| frequent[c]), rng);
            if let Some(c) = column {
                cols[c] = cols[c].union(agg.fields());
            }
            let panes = if lifetime && rng.random_bool(0.3) {
                None
            } else {
                Some(rng.random_range(1..=ring as u64))
            };
            features.push(FeatureMerge {
                level: l,
                agg,
                column,
                panes,
            });
            // Often a sibling over the same window and column (as a view's count,
            // mean and std of one column are): the CPU backend shares their scan.
            if let Some(c) = column.filter(|_| rng.random_bool(0.4)) {
                let agg = Agg::ALL[rng.random_range(0..Agg::ALL.len())];
                let agg = with_half_life(agg, cols[c].decay, rng);
                let agg = with_precision(agg, precisions[c]);
                let agg = with_accuracy(agg, accuracies[c], rng);
                let agg = with_n(agg, newest[c]);
                let agg = with_capacity(agg, frequent[c], rng);
                cols[c] = cols[c].union(agg.fields());
                features.push(FeatureMerge {
                    level: l,
                    agg,
                    column,
                    panes,
                });
            }
        }
        levels.push(LevelSpec {
            hop,
            ring,
            columns: cols,
            lifetime,
        });
    }
    let shards = [1, 2, 8, 64][rng.random_range(0..4)];
    let n = rng.random_range(0..40_000);
    let keys = rng.random_range(1..500u32);
    let mut t = rng.random_range(-100_000i64..100_000) * 1000;
    let mut ids = Vec::with_capacity(n);
    let mut ts = Vec::with_capacity(n);
    for _ in 0..n {
        t += rng.random_range(0..50);
        ids.push(rng.random_range(0..keys));
        // Some events behind the clock: they land in older panes, or beyond the ring.
        ts.push(if rng.random_bool(0.1) {
            t - rng.random_range(0..200_000)
        } else {
            t
        });
    }
    let values = (0..columns)
        .map(|c| {
            if frequent[c].is_some() {
                return (0..n)
                    .map(|_| match rng.random_range(0..30) {
                        0 => f64::NAN,
                        1 => -0.0,
                        _ => rng.random_range(-15..16) as f64,
                    })
                    .collect();
            }
            // A few thousand distinct hashes (and nulls).
            if precisions[c].is_some() {
                let distinct = rng.random_range(1..5_000u64);
                return (0..n)
                    .map(|_| match rng.random_range(0..30) {
                        0 => f64::NAN,
                        _ => hll::value(hll::splitmix64(rng.random_range(0..distinct))),
                    })
                    .collect();
            }
            (0..n)
                .map(|_| match rng.random_range(0..30) {
                    0 => f64::NAN,
                    // Signed zeros: min/max ties must keep the earlier one.
                    1 => -0.0,
                    2 => 0.0,
                    3..=10 => rng.random_range(-50..50) as f64,
                    _ => rng.random_range(-1.0e6..1.0e6),
                })
                .collect()
        })
        .collect();
    Case {
        spec: StateSpec { levels, shards },
        features,
        ids,
        ts,
        values,
    }
}

/// `agg` with the column's half-life `kept`, or a random one (from 1 ms, where every
/// older value decays to nothing, to 30 days) when the column has none yet.
fn with_half_life(agg: Agg, kept: Option<i64>, rng: &mut StdRng) -> Agg {
    let h = kept.unwrap_or([1, 997, 3_600_000, 30 * 86_400_000][rng.random_range(0..4)]);
    match agg {
        Agg::DecayedSum { .. } => Agg::DecayedSum { half_life: h },
        Agg::DecayedCount { .. } => Agg::DecayedCount { half_life: h },
        a => a,
    }
}

/// `approx_distinct` at the column's precision, or `sum` for a column without codes.
fn with_precision(agg: Agg, precision: Option<u8>) -> Agg {
    match (agg, precision) {
        (Agg::ApproxDistinct { .. }, Some(precision)) => Agg::ApproxDistinct { precision },
        (Agg::ApproxDistinct { .. }, None) => Agg::Sum,
        (a, _) => a,
    }
}

/// `quantile` at a random `q` and the column's accuracy, or `max` for a column
/// without quantile sketches.
fn with_accuracy(agg: Agg, accuracy: Option<f64>, rng: &mut StdRng) -> Agg {
    match (agg, accuracy) {
        (Agg::Quantile { .. }, Some(a)) => Agg::Quantile {
            q: Param::new([0.0, 0.1, 0.5, 0.9, 0.99, 1.0][rng.random_range(0..6)]),
            relative_accuracy: Param::new(a),
        },
        (Agg::Quantile { .. }, None) => Agg::Max,
        (a, ..) => a,
    }
}

/// `last_n` at the column's n, or `last` for a column without.
fn with_n(agg: Agg, n: Option<u16>) -> Agg {
    match (agg, n) {
        (Agg::LastN { .. }, Some(n)) => Agg::LastN { n },
        (Agg::LastN { .. }, None) => Agg::Last,
        (a, _) => a,
    }
}

/// `top_k` at a random `k` and the column's capacity, or `min` for a column without.
fn with_capacity(agg: Agg, capacity: Option<u16>, rng: &mut StdRng) -> Agg {
    match (agg, capacity) {
        (Agg::TopK { .. }, Some(capacity)) => Agg::TopK {
            k: [1, 3, 32][rng.random_range(0..3)],
            capacity,
        },
        (Agg::TopK { .. }, None) => Agg::Min,
        (a, _) => a,
    }
}

/// Whether `spec` keeps sketch or list groups.
fn has_sketches(spec: &StateSpec) -> bool {
    spec.levels
        .iter()
        .flat_map(|l| &l.columns)
        .any(|c| c.hll.is_some() || c.quantile.is_some() || c.last_n.is_some() || c.top_k.is_some())
}

fn fold_split(backend: &dyn Backend, case: &Case, rng: &mut StdRng, split: bool) -> PaneState {
    fold_turns(&[backend], case, rng, split)
}

/// Folds the case in random splits, each split on a backend drawn from `backends`.
fn fold_turns(backends: &[&dyn Backend], case: &Case, rng: &mut StdRng, split: bool) -> PaneState {
    let mut state = PaneState::new(case.spec.clone()).unwrap();
    let n = case.ids.len();
    let mut start = 0;
    while start < n || start == 0 {
        let len = if split {
            rng.random_range(1..=20_000).min(n - start)
        } else {
            n
        };
        let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[start..start + len]).collect();
        let batch = FoldBatch {
            ids: &case.ids[start..start + len],
            ts: &case.ts[start..start + len],
            values: &vals,
        };
        let backend = backends[rng.random_range(0..backends.len())];
        backend.fold(&mut state, &batch).unwrap();
        start += len;
        if n == 0 {
            break;
        }
    }
    state
}

fn same(agg: Agg, a: f64, b: f64) -> bool {
    if a == b {
        return true;
    }
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if agg.bitwise() {
        a.to_bits() == b.to_bits()
    } else {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-3)
    }
}

fn check(backend: &dyn Backend, seeds: std::ops::Range<u64>) {
    check_turns(&[backend], backend, seeds);
}

/// Folds each case with `folders` taking random turns, reads with `reader`.
fn check_turns(folders: &[&dyn Backend], backend: &dyn Backend, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let on_gpu = folders.iter().any(|b| b.kind() == BackendKind::Gpu);
        let case = gen_case_with(
            &mut rng,
            if on_gpu {
                Sketches::Small
            } else {
                Sketches::All
            },
        );
        let reference = fold_split(&Scalar, &case, &mut rng, false);
        let state = fold_turns(folders, &case, &mut rng, true);
        assert_reads_agree(&case, &reference, &state, backend, &mut rng, seed);
    }
}

/// Random reads of `state` through `backend` agree with the `Scalar` backend's reads of
/// `reference` (the same events folded).
fn assert_reads_agree(
    case: &Case,
    reference: &PaneState,
    state: &PaneState,
    backend: &dyn Backend,
    rng: &mut StdRng,
    seed: u64,
) {
    let max_t = case.ts.iter().copied().max().unwrap_or(0);
    for _ in 0..4 {
        let ids: Vec<Option<u32>> = (0..rng.random_range(0..700))
            .map(|_| rng.random_bool(0.95).then(|| rng.random_range(0..600)))
            .collect();
        let at = max_t + rng.random_range(-5_000..100_000);
        let mut want = MergeOutput::default();
        let mut got = MergeOutput::default();
        Scalar
            .merge(reference, &case.features, &ids, at, &mut want)
            .unwrap();
        backend
            .merge(state, &case.features, &ids, at, &mut got)
            .unwrap();
        let nf = case.features.len();
        if let Some(k) = (0..ids.len()).find(|&k| got.status[k] != want.status[k]) {
            panic!(
                "seed {seed} key {:?} at {at}: status {:?} vs {:?}",
                ids[k], got.status[k], want.status[k]
            );
        }
        let bits = |l: &[f64]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(got.lists.len(), want.lists.len(), "seed {seed}");
        for (i, (g, w)) in got.lists.iter().zip(&want.lists).enumerate() {
            assert_eq!(bits(g), bits(w), "seed {seed} {:?}", case.features[i % nf]);
        }
        for (i, (g, w)) in got.values.iter().zip(&want.values).enumerate() {
            let f = &case.features[i % nf.max(1)];
            assert_eq!(
                got.valid[i],
                want.valid[i],
                "seed {seed} key {:?} feature {f:?} at {at}: validity",
                ids[i / nf]
            );
            assert!(
                same(f.agg, *g, *w),
                "seed {seed} key {:?} feature {f:?} at {at}: {g} vs {w}",
                ids[i / nf]
            );
        }
        if at >= max_t {
            assert!(
                got.status.iter().all(|s| *s == ReadStatus::Exact),
                "seed {seed}: reads at or after the last event are exact"
            );
        }
    }
}

#[test]
fn scalar_splits_match_scalar_whole() {
    check(&Scalar, 0..30);
}

#[test]
fn cpu_matches_scalar() {
    check(&Cpu::new(), 100..160);
}

/// Reads through the `Cpu` backend's key-major read copies give the very bytes that
/// reads of the ring alone give, after every fold of a stream whose clock moves
/// slowly (so that older panes go quiet and get copied) with late events (which must
/// take cells back out of the copies).
#[test]
fn read_copies_give_the_ring_s_bytes() {
    let cpu = Cpu::with_threads(2).unwrap();
    let mut folds_reading_copies = 0;
    for seed in 0..40 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut case = gen_case(&mut rng);
        let mut t = rng.random_range(-100_000i64..100_000) * 1000;
        for ts in &mut case.ts {
            t += rng.random_range(0..4);
            *ts = if rng.random_bool(0.01) {
                t - rng.random_range(0..60_000)
            } else {
                t
            };
        }
        let mut state = PaneState::new(case.spec.clone()).unwrap();
        let mut start = 0;
        while start < case.ids.len() {
            let len = rng.random_range(1..=4_000).min(case.ids.len() - start);
            let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[start..start + len]).collect();
            let batch = FoldBatch {
                ids: &case.ids[start..start + len],
                ts: &case.ts[start..start + len],
                values: &vals,
            };
            cpu.fold(&mut state, &batch).unwrap();
            start += len;
            if state.memory_bytes() > state.cell_bytes() {
                folds_reading_copies += 1;
            }
            let ring_only = PaneState::import(case.spec.clone(), state.export().unwrap()).unwrap();
            assert_eq!(ring_only.memory_bytes(), ring_only.cell_bytes());
            let ids: Vec<Option<u32>> = (0..rng.random_range(1..700))
                .map(|_| Some(rng.random_range(0..600)))
                .collect();
            let at = case.ts[start - 1] + rng.random_range(-20_000..1_000);
            let mut got = MergeOutput::default();
            let mut want = MergeOutput::default();
            cpu.merge(&state, &case.features, &ids, at, &mut got)
                .unwrap();
            cpu.merge(&ring_only, &case.features, &ids, at, &mut want)
                .unwrap();
            let nf = case.features.len().max(1);
            if let Some(i) = (0..got.values.len()).find(|&i| {
                got.values[i].to_bits() != want.values[i].to_bits()
                    || got.valid[i] != want.valid[i]
                    || got.status[i / nf] != want.status[i / nf]
            }) {
                panic!(
                    "seed {seed} after {start} events, key {:?} feature {:?} at {at}: {} vs {}",
                    ids[i / nf],
                    case.features[i % nf],
                    got.values[i],
                    want.values[i]
                );
            }
        }
    }
    assert!(
        folds_reading_copies > 100,
        "{folds_reading_copies} folds left copies to read"
    );
}

#[test]
fn cpu_two_threads_matches_scalar() {
    check(&Cpu::with_threads(2).unwrap(), 200..230);
}

#[test]
fn cpu_one_thread_matches_scalar() {
    check(&Cpu::with_threads(1).unwrap(), 300..320);
}

/// Streams made of ties: values only −0.0 and +0.0 (min is −0.0 and max +0.0 when
/// both are in the window, however the events were grouped), and many events of one key at one time with different values (`last`
/// takes the one ingested last), folded in random splits. Every backend must give the
/// scalar reference's bits.
fn check_ties(backend: &dyn Backend, seeds: std::ops::Range<u64>) {
    let fields = Agg::Min.fields().union(Agg::Max.fields());
    let spec = StateSpec {
        levels: vec![
            LevelSpec {
                hop: 10,
                ring: 4,
                columns: vec![fields, Agg::Last.fields()],
                lifetime: true,
            },
            LevelSpec {
                hop: 40,
                ring: 2,
                columns: vec![fields, Agg::Last.fields()],
                lifetime: false,
            },
        ],
        shards: 2,
    };
    let mut features = Vec::new();
    for level in 0..2 {
        for panes in [Some(1), Some(2)] {
            for (agg, column) in [
                (Agg::Min, 0),
                (Agg::Max, 0),
                (Agg::Last, 1),
                (Agg::Count, 0),
            ] {
                features.push(FeatureMerge {
                    level,
                    agg,
                    column: Some(column),
                    panes,
                });
            }
        }
    }
    features.push(FeatureMerge {
        level: 0,
        agg: Agg::Min,
        column: Some(0),
        panes: None,
    });
    features.push(FeatureMerge {
        level: 0,
        agg: Agg::Last,
        column: Some(1),
        panes: None,
    });
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..3000);
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..5)).collect();
        // Times move slowly and sometimes back (late events into older panes).
        let mut t = 0i64;
        let ts: Vec<i64> = (0..n)
            .map(|_| {
                t += (rng.random_range(0..20) == 0) as i64 * rng.random_range(1..8);
                if rng.random_bool(0.05) {
                    t - rng.random_range(0..60)
                } else {
                    t
                }
            })
            .collect();
        let zeros: Vec<f64> = (0..n)
            .map(|_| if rng.random_bool(0.5) { -0.0 } else { 0.0 })
            .collect();
        let order: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let case = Case {
            spec: spec.clone(),
            features: features.clone(),
            ids,
            ts,
            values: vec![zeros, order],
        };
        let reference = fold_split(&Scalar, &case, &mut rng, false);
        let mut state = PaneState::new(spec.clone()).unwrap();
        let mut start = 0;
        while start < n {
            let len = rng.random_range(1..=64).min(n - start);
            let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[start..start + len]).collect();
            let batch = FoldBatch {
                ids: &case.ids[start..start + len],
                ts: &case.ts[start..start + len],
                values: &vals,
            };
            backend.fold(&mut state, &batch).unwrap();
            start += len;
        }
        let ids: Vec<Option<u32>> = (0..5).map(Some).collect();
        for at in [t - 50, t - 10, t, t + 30] {
            let (mut want, mut got) = (MergeOutput::default(), MergeOutput::default());
            Scalar
                .merge(&reference, &features, &ids, at, &mut want)
                .unwrap();
            backend
                .merge(&state, &features, &ids, at, &mut got)
                .unwrap();
            for (i, (g, w)) in got.values.iter().zip(&want.values).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "seed {seed} at {at} key {} feature {:?}: {g:?} vs {w:?}",
                    i / features.len(),
                    features[i % features.len()]
                );
            }
        }
    }
}

#[cfg(feature = "gpu")]
#[test]
fn r18_gpu_keeps_ties_exact() {
    if let Some(g) = gpu() {
        check_ties(&g, 100..110);
    }
}

#[test]
fn r18_cpu_keeps_ties_exact() {
    check_ties(&Cpu::with_threads(1).unwrap(), 0..40);
    check_ties(&Cpu::with_threads(2).unwrap(), 40..60);
}

/// The GPU backend, or `None` (with a note) where this machine has no usable adapter.
/// With `PANES_REQUIRE_GPU=1` (set by the test command, which installs Mesa's software
/// Vulkan driver) a missing adapter fails the test instead of skipping it.
#[cfg(feature = "gpu")]
fn gpu() -> Option<panes_kernels::Gpu> {
    match panes_kernels::Gpu::new() {
        Ok(g) => {
            eprintln!("GPU adapter: {}", g.info());
            Some(g)
        }
        Err(e) if std::env::var("PANES_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("PANES_REQUIRE_GPU=1 but the GPU backend is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("GPU tests skipped (set PANES_REQUIRE_GPU=1 to fail instead): {e}");
            None
        }
    }
}

#[cfg(feature = "gpu")]
#[test]
fn gpu_matches_scalar() {
    if let Some(g) = gpu() {
        check(&g, 400..440);
    }
}

/// A case whose sketches all pass their capacities: a HyperLogLog sketch turns dense,
/// DDSketch bins collapse, `top_k` summaries drop counters and `last_n` lists drop
/// their oldest; two levels, one with lifetime cells (recycled cells merge into them),
/// late events.
fn sketches_past_capacity(rng: &mut StdRng) -> Case {
    let column = ColumnFields {
        hll: Some(8),
        quantile: Some(Param::new(0.2)),
        last_n: Some(5),
        top_k: Some(8),
        ..ColumnFields::default()
    }
    .union(Agg::Count.fields());
    let levels = vec![
        LevelSpec {
            hop: 1000,
            ring: 4,
            columns: vec![column],
            lifetime: true,
        },
        LevelSpec {
            hop: 7,
            ring: 3,
            columns: vec![column],
            lifetime: false,
        },
    ];
    let mut features = Vec::new();
    for (level, panes) in [(0, None), (0, Some(2)), (1, Some(3))] {
        for agg in [
            Agg::ApproxDistinct { precision: 8 },
            Agg::Quantile {
                q: Param::new(0.5),
                relative_accuracy: Param::new(0.2),
            },
            Agg::Quantile {
                q: Param::new(0.99),
                relative_accuracy: Param::new(0.2),
            },
            Agg::LastN { n: 5 },
            Agg::TopK { k: 3, capacity: 8 },
            Agg::Count,
        ] {
            features.push(FeatureMerge {
                level,
                agg,
                column: Some(0),
                panes,
            });
        }
    }
    let n = 30_000;
    let mut t = 1_000_000i64;
    let (mut ids, mut ts, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        t += rng.random_range(0..20);
        ids.push(rng.random_range(0..40u32));
        ts.push(if rng.random_bool(0.1) {
            t - rng.random_range(0..10_000)
        } else {
            t
        });
        // Whole numbers below 2^52 (hashes to the HyperLogLog sketch) over 15 decades,
        // many of them repeated (heavy hitters), some nulls.
        values.push(match rng.random_range(0..20) {
            0 => f64::NAN,
            1..=8 => rng.random_range(0..4) as f64,
            _ => (hll::splitmix64(i) >> 12 >> rng.random_range(0..52)) as f64,
        });
    }
    Case {
        spec: StateSpec { levels, shards: 4 },
        features,
        ids,
        ts,
        values: vec![values],
    }
}

#[cfg(feature = "gpu")]
#[test]
fn the_gpu_folds_sketches_past_their_capacities_as_the_scalar_backend() {
    let Some(g) = gpu() else { return };
    for seed in 0..3 {
        let mut rng = StdRng::seed_from_u64(seed);
        let case = sketches_past_capacity(&mut rng);
        let reference = fold_split(&Scalar, &case, &mut rng, false);
        let state = fold_split(&g, &case, &mut rng, true);
        assert!(state.on_device());
        // Past every capacity: key 0 alone has over 64 distinct values (the sparse
        // sketch's capacity, and 8 times the summary's).
        let mut distinct: Vec<u64> = (0..case.ids.len())
            .filter(|&e| case.ids[e] == 0 && !case.values[0][e].is_nan())
            .map(|e| case.values[0][e].to_bits())
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() > 64, "{}", distinct.len());
        assert_reads_agree(&case, &reference, &state, &g, &mut rng, seed);
        // Read through the CPU backend too (the state comes back to the host).
        assert_reads_agree(&case, &reference, &state, &Cpu::new(), &mut rng, seed);
    }
}

#[cfg(feature = "gpu")]
#[test]
fn a_software_adapter_refuses_sketches_past_its_loop_budget_and_auto_folds_them() {
    use panes_kernels::{Auto, Calibration, KernelError};
    use std::sync::Arc;
    let Some(g) = gpu() else { return };
    let mut rng = StdRng::seed_from_u64(17);
    let mut case = sketches_past_capacity(&mut rng);
    // A top_k summary of capacity 10 000: its merge may bisect over 20 000 counters.
    let big = ColumnFields {
        top_k: Some(10_000),
        ..ColumnFields::default()
    }
    .union(Agg::Count.fields());
    case.spec.levels[1].columns = vec![big];
    case.features.retain(|f| f.level == 0);
    case.ids.truncate(3_000);
    case.ts.truncate(3_000);
    case.values[0].truncate(3_000);
    let software = g.info().device_type == "Cpu";
    assert_eq!(g.refuses(&case.spec).is_some(), software);
    let vals: Vec<&[f64]> = case.values.iter().map(Vec::as_slice).collect();
    let batch = FoldBatch {
        ids: &case.ids,
        ts: &case.ts,
        values: &vals,
    };
    let mut state = PaneState::new(case.spec.clone()).unwrap();
    if software {
        let err = g.fold(&mut state, &batch).unwrap_err();
        assert!(matches!(err, KernelError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("loop iterations"), "{err}");
        assert!(!state.on_device());
    }
    // Auto, even past its crossover, folds where it can.
    let c = Calibration {
        sizes: vec![],
        cpu_s: vec![],
        gpu_s: vec![],
        crossover: Some(1),
        transfer_bytes_per_s: 1e8,
    };
    let auto = Auto::new(Cpu::new(), g, Arc::new(c), 1);
    let mut state = PaneState::new(case.spec.clone()).unwrap();
    auto.fold(&mut state, &batch).unwrap();
    assert_eq!(state.on_device(), !software);
    let reference = fold_split(&Scalar, &case, &mut rng, false);
    assert_reads_agree(&case, &reference, &state, &auto, &mut rng, 17);
}

#[cfg(feature = "gpu")]
#[test]
fn gpu_and_cpu_take_turns_on_one_state() {
    // The state moves between host and device as the backends alternate; reads go
    // through either backend, whichever side the state is on.
    if let Some(g) = gpu() {
        let cpu = Cpu::new();
        check_turns(&[&g, &cpu, &Scalar], &g, 500..515);
        check_turns(&[&g, &cpu], &cpu, 520..535);
    }
}

#[test]
fn shape_errors_are_reported_not_panics() {
    let spec = StateSpec {
        levels: vec![LevelSpec {
            hop: 1000,
            ring: 2,
            columns: vec![Agg::Sum.fields()],
            lifetime: false,
        }],
        shards: 1,
    };
    let mut state = PaneState::new(spec).unwrap();
    let v = [1.0];
    let bad = FoldBatch {
        ids: &[0, 1],
        ts: &[0],
        values: &[&v],
    };
    for b in [&Scalar as &dyn Backend, &Cpu::new()] {
        let e = b.fold(&mut state, &bad).unwrap_err().to_string();
        assert!(e.contains("2 key ids but 1 timestamps"), "{e}");
        let far = FoldBatch {
            ids: &[0],
            ts: &[i64::MIN],
            values: &[&v],
        };
        let e = b.fold(&mut state, &far).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        let f = FeatureMerge {
            level: 0,
            agg: Agg::Max,
            column: Some(0),
            panes: Some(1),
        };
        let e = b
            .merge(&state, &[f], &[Some(0)], 0, &mut MergeOutput::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not store the fields of max"), "{e}");
        let f = FeatureMerge {
            level: 0,
            agg: Agg::Sum,
            column: Some(0),
            panes: Some(3),
        };
        let e = b
            .merge(&state, &[f], &[Some(0)], 0, &mut MergeOutput::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("exceeds the ring"), "{e}");
    }
    assert!(
        PaneState::new(StateSpec {
            levels: vec![],
            shards: 3
        })
        .is_err()
    );
}

#[cfg(feature = "gpu")]
#[test]
fn gpu_hot_key_longer_than_a_thread_segment() {
    // One key with more events in a batch than one GPU thread may walk: its run is
    // folded in several rounds of segments, in order.
    let Some(g) = gpu() else { return };
    let cols = vec![
        Agg::Var
            .fields()
            .union(Agg::Last.fields())
            .union(Agg::Sum.fields()),
        Agg::Min.fields().union(Agg::Max.fields()),
    ];
    let features: Vec<FeatureMerge> = [
        (Agg::Count, None),
        (Agg::Sum, Some(0)),
        (Agg::Var, Some(0)),
        (Agg::Last, Some(0)),
        (Agg::Min, Some(1)),
        (Agg::Max, Some(1)),
    ]
    .into_iter()
    .flat_map(|(agg, column)| {
        [Some(3), None].map(|panes| FeatureMerge {
            level: 0,
            agg,
            column,
            panes,
        })
    })
    .collect();
    // Hop 7 ms: nearly every event opens a pane. Hop 60 s: long runs share a pane, so
    // whole blocks of events are reduced in parallel before the walk.
    for (n, hop) in [
        (1_000usize, 7),
        (20_000, 7),
        (150_000, 7),
        (20_000, 60_000),
        (150_000, 60_000),
    ] {
        let spec = StateSpec {
            levels: vec![LevelSpec {
                hop,
                ring: 8,
                columns: cols.clone(),
                lifetime: true,
            }],
            shards: 4,
        };
        let mut a = PaneState::new(spec.clone()).unwrap();
        let mut b = PaneState::new(spec).unwrap();
        let ids: Vec<u32> = (0..n as u32)
            .map(|i| if i % 7 == 0 { i % 5 } else { 3 })
            .collect();
        let ts: Vec<i64> = (0..n as i64)
            .map(|i| if i % 10 == 0 { i * 7 - 500 } else { i * 7 })
            .collect();
        let v: Vec<f64> = (0..n).map(|i| (i as f64).sin() * 1e3).collect();
        let vals = [v.as_slice(), v.as_slice()];
        let batch = FoldBatch {
            ids: &ids,
            ts: &ts,
            values: &vals,
        };
        assert_eq!(
            Scalar.fold(&mut a, &batch).unwrap(),
            g.fold(&mut b, &batch).unwrap(),
            "n={n}"
        );
        let keys: Vec<Option<u32>> = (0..6).map(Some).collect();
        for at in [n as i64 * 7, n as i64 * 3] {
            let mut want = MergeOutput::default();
            let mut got = MergeOutput::default();
            Scalar.merge(&a, &features, &keys, at, &mut want).unwrap();
            g.merge(&b, &features, &keys, at, &mut got).unwrap();
            assert_eq!(want.status, got.status, "n={n} hop={hop} at={at}");
            for (i, (w, x)) in want.values.iter().zip(&got.values).enumerate() {
                let f = &features[i % features.len()];
                assert!(
                    same(f.agg, *w, *x),
                    "n={n} at={at} key {} {f:?}: {w} vs {x}",
                    i / features.len()
                );
            }
        }
    }
}

/// `auto` on `g` with a made-up calibration: the GPU wins from 5 000 events; copying
/// state is slow enough that a few small batches are folded on the GPU before it
/// moves back.
#[cfg(feature = "gpu")]
fn made_up_auto(g: panes_kernels::Gpu) -> panes_kernels::Auto {
    let c = panes_kernels::Calibration {
        sizes: vec![1_000, 100_000],
        cpu_s: vec![0.001, 0.1],
        gpu_s: vec![0.005, 0.02],
        crossover: Some(5_000),
        transfer_bytes_per_s: 1e8,
    };
    panes_kernels::Auto::new(Cpu::new(), g, std::sync::Arc::new(c), 5_000)
}

#[cfg(feature = "gpu")]
#[test]
fn auto_sends_large_batches_to_the_gpu_and_brings_the_state_back() {
    let Some(g) = gpu() else { return };
    let auto = made_up_auto(g);
    let mut rng = StdRng::seed_from_u64(7);
    let mut case = gen_case_with(&mut rng, Sketches::None);
    while case.ids.len() < 30_000 {
        case = gen_case_with(&mut rng, Sketches::None);
    }
    let mut state = PaneState::new(case.spec.clone()).unwrap();
    let mut reference = PaneState::new(case.spec.clone()).unwrap();
    let mut sides = Vec::new();
    let mut start = 0;
    for len in [
        100, 200, 10_000, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100, 100,
    ] {
        let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[start..start + len]).collect();
        let batch = FoldBatch {
            ids: &case.ids[start..start + len],
            ts: &case.ts[start..start + len],
            values: &vals,
        };
        assert_eq!(
            auto.fold(&mut state, &batch).unwrap(),
            Scalar.fold(&mut reference, &batch).unwrap()
        );
        sides.push(state.on_device());
        start += len;
    }
    assert!(
        !sides[0] && !sides[1],
        "small batches stay on the host: {sides:?}"
    );
    assert!(
        sides[2] && sides[3],
        "a large batch moves the state to the GPU: {sides:?}"
    );
    assert!(
        !sides[sides.len() - 1],
        "enough small batches bring it back: {sides:?}"
    );
    let ids: Vec<Option<u32>> = (0..600).map(Some).collect();
    let at = case.ts[..start].iter().copied().max().unwrap();
    let (mut want, mut got) = (MergeOutput::default(), MergeOutput::default());
    Scalar
        .merge(&reference, &case.features, &ids, at, &mut want)
        .unwrap();
    auto.merge(&state, &case.features, &ids, at, &mut got)
        .unwrap();
    for (i, (w, x)) in want.values.iter().zip(&got.values).enumerate() {
        let f = &case.features[i % case.features.len()];
        assert!(same(f.agg, *w, *x), "{f:?}: {w} vs {x}");
    }
}

/// `auto` logs the batches it folds on the host: a second state that replays those
/// logs, and folds the batches that went to the GPU, stays bitwise equal to the first
/// one and on the same side, as the state moves to the GPU and back.
#[cfg(feature = "gpu")]
#[test]
fn r18_auto_logs_its_host_folds_for_a_replica() {
    let Some(g) = gpu() else { return };
    let auto = made_up_auto(g);
    let mut rng = StdRng::seed_from_u64(7);
    let mut log = FoldLog::new();
    // A case the CPU backend logs (cells narrow enough to pre-aggregate).
    let logged = |case: &Case, log: &mut FoldLog| {
        let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[..300]).collect();
        let batch = FoldBatch {
            ids: &case.ids[..300],
            ts: &case.ts[..300],
            values: &vals,
        };
        let mut s = PaneState::new(case.spec.clone()).unwrap();
        Cpu::new().fold_logged(&mut s, &batch, log).unwrap();
        log.is_complete()
    };
    let mut case = gen_case_with(&mut rng, Sketches::None);
    while case.ids.len() < 30_000 || !logged(&case, &mut log) {
        case = gen_case_with(&mut rng, Sketches::None);
    }
    let mut a = PaneState::new(case.spec.clone()).unwrap();
    let mut b = PaneState::new(case.spec.clone()).unwrap();
    let (mut replayed, mut folded_again, mut on_gpu) = (0, 0, 0);
    let mut start = 0;
    for len in [
        300, 1_000, 10_000, 300, 300, 300, 300, 300, 300, 300, 300, 300, 300, 100,
    ] {
        let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[start..start + len]).collect();
        let batch = FoldBatch {
            ids: &case.ids[start..start + len],
            ts: &case.ts[start..start + len],
            values: &vals,
        };
        let stats = auto.fold_logged(&mut a, &batch, &mut log).unwrap();
        on_gpu += a.on_device() as usize;
        if log.is_complete() {
            assert_eq!(auto.replay(&mut b, &log).unwrap(), stats);
            replayed += 1;
        } else {
            assert_eq!(auto.fold(&mut b, &batch).unwrap(), stats);
            folded_again += 1;
        }
        assert_eq!(a.on_device(), b.on_device(), "after {start} events");
        assert!(
            bits_of(&a) == bits_of(&b),
            "after {start} events: states differ"
        );
        start += len;
    }
    assert!(!a.on_device(), "the small batches brought the state back");
    assert!(
        replayed >= 4 && folded_again >= 2 && on_gpu >= 1,
        "{replayed} replayed, {folded_again} folded again, {on_gpu} on the GPU"
    );
    // A log of a host fold does not replay where `auto` folds on the GPU.
    let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[..300]).collect();
    let small = FoldBatch {
        ids: &case.ids[..300],
        ts: &case.ts[..300],
        values: &vals,
    };
    let mut c = PaneState::new(case.spec.clone()).unwrap();
    auto.fold_logged(&mut c, &small, &mut log).unwrap();
    assert!(log.is_complete());
    let big: Vec<&[f64]> = case.values.iter().map(|v| &v[..10_000]).collect();
    let mut d = PaneState::new(case.spec.clone()).unwrap();
    auto.fold(
        &mut d,
        &FoldBatch {
            ids: &case.ids[..10_000],
            ts: &case.ts[..10_000],
            values: &big,
        },
    )
    .unwrap();
    assert!(d.on_device());
    let err = auto.replay(&mut d, &log).unwrap_err().to_string();
    assert!(err.contains("on the GPU"), "{err}");
}

#[cfg(feature = "gpu")]
#[test]
fn calibration_measures_both_backends() {
    let Some(g) = gpu() else { return };
    let c = panes_kernels::Calibration::measure(&Cpu::new(), &g).unwrap();
    eprintln!("{c:?}");
    assert!(
        !c.sizes.is_empty() && c.sizes.len() == c.cpu_s.len() && c.sizes.len() == c.gpu_s.len()
    );
    assert!(c.cpu_s.iter().chain(&c.gpu_s).all(|t| *t > 0.0));
    assert!(c.transfer_bytes_per_s > 0.0);
    if let Some(n) = c.crossover {
        let i = c.sizes.iter().position(|&s| s == n).unwrap();
        assert!((i..c.sizes.len()).all(|j| c.gpu_s[j] < c.cpu_s[j]), "{c:?}");
    }
}

/// Sample variance as numpy computes it (two passes, IEEE): the oracle for infinities
/// and overflow.
fn numpy_var(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    values.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
}

/// `var` and `std` of each case's values on `backend` (one key per case, spread over
/// two panes of a 4-pane window, so cells are merged).
fn variances(backend: &dyn Backend, cases: &[Vec<f64>]) -> Vec<(f64, f64)> {
    let spec = StateSpec {
        levels: vec![LevelSpec {
            hop: 1000,
            ring: 4,
            columns: vec![Agg::Var.fields()],
            lifetime: false,
        }],
        shards: 1,
    };
    let mut state = PaneState::new(spec).unwrap();
    let (mut ids, mut ts, mut values) = (Vec::new(), Vec::new(), Vec::new());
    for (k, case) in cases.iter().enumerate() {
        for (i, &v) in case.iter().enumerate() {
            ids.push(k as u32);
            ts.push(i as i64 * 1900 / case.len() as i64);
            values.push(v);
        }
    }
    let batch = FoldBatch {
        ids: &ids,
        ts: &ts,
        values: &[&values],
    };
    backend.fold(&mut state, &batch).unwrap();
    let features: Vec<FeatureMerge> = [Agg::Var, Agg::Std]
        .map(|agg| FeatureMerge {
            level: 0,
            agg,
            column: Some(0),
            panes: Some(4),
        })
        .into();
    let keys: Vec<Option<u32>> = (0..cases.len() as u32).map(Some).collect();
    let mut out = MergeOutput::default();
    backend
        .merge(&state, &features, &keys, 1999, &mut out)
        .unwrap();
    (0..cases.len())
        .map(|k| (out.values[2 * k], out.values[2 * k + 1]))
        .collect()
}

/// r17: `var`/`std` follow IEEE like numpy on every backend: an infinite value gives
/// NaN, squared deviations that overflow give +inf; before, both were a valid 0.
fn check_ieee_variance(backend: &dyn Backend) {
    let inf = f64::INFINITY;
    let mut big: Vec<f64> = (0..128)
        .map(|i| if i % 2 == 0 { 1e200 } else { -1e200 })
        .collect();
    let mut ones_then_inf = vec![1.0; 127];
    ones_then_inf.push(inf);
    let cases = vec![
        vec![1.0, inf],
        vec![inf, 1.0],
        vec![-inf, inf],
        vec![1e200, -1e200],
        std::mem::take(&mut big),
        ones_then_inf,
        vec![1.0, 2.0, 4.0],
        vec![5.0, 5.0],
    ];
    let got = variances(backend, &cases);
    for (case, (var, std)) in cases.iter().zip(got) {
        let want = numpy_var(case);
        let agrees = |got: f64, want: f64| {
            (got.is_nan() && want.is_nan())
                || got == want
                || (got - want).abs() <= 1e-9 * want.abs()
        };
        let label = format!("{:?} on {:?}", &case[..case.len().min(4)], backend.kind());
        assert!(agrees(var, want), "var of {label}: {var}, numpy {want}");
        assert!(
            agrees(std, want.sqrt()),
            "std of {label}: {std}, numpy {}",
            want.sqrt()
        );
    }
}

#[test]
fn r17_variance_follows_ieee_on_the_cpu_backends() {
    check_ieee_variance(&Scalar);
    check_ieee_variance(&Cpu::new());
}

#[cfg(feature = "gpu")]
#[test]
fn r17_variance_follows_ieee_on_the_gpu() {
    if let Some(g) = gpu() {
        check_ieee_variance(&g);
    }
}

/// The states' exported cells, bit for bit (NaN compares by its bits).
fn bits_of(state: &PaneState) -> Vec<(usize, Vec<u64>, Vec<u64>)> {
    state
        .export()
        .unwrap()
        .into_iter()
        .map(|l| {
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (l.slots, bits(&l.ring), bits(&l.base))
        })
        .collect()
}

/// A state that replays the `Cpu` fold logs of another one's folds stays bitwise equal
/// to it (rings, bases, slots and reads), over random streams with late and expired
/// events, split in random batches, on one and two threads; small batches, which are
/// not logged, are folded instead.
#[test]
fn r18_a_replayed_fold_log_is_bitwise_the_fold() {
    let cpus = [Cpu::with_threads(1).unwrap(), Cpu::with_threads(2).unwrap()];
    let (mut replayed, mut folded_again) = (0, 0);
    for seed in 0..40 {
        let rng = &mut StdRng::seed_from_u64(seed);
        let case = gen_case(rng);
        let mut a = PaneState::new(case.spec.clone()).unwrap();
        let mut b = PaneState::new(case.spec.clone()).unwrap();
        let mut log = FoldLog::new();
        let n = case.ids.len();
        let mut start = 0;
        while start < n {
            let len = [100, 300, 5_000, 20_000][rng.random_range(0..4)].min(n - start);
            let vals: Vec<&[f64]> = case.values.iter().map(|v| &v[start..start + len]).collect();
            let batch = FoldBatch {
                ids: &case.ids[start..start + len],
                ts: &case.ts[start..start + len],
                values: &vals,
            };
            let cpu = &cpus[rng.random_range(0..2)];
            let stats = cpu.fold_logged(&mut a, &batch, &mut log).unwrap();
            if log.is_complete() {
                assert_eq!(cpu.replay(&mut b, &log).unwrap(), stats, "seed {seed}");
                replayed += 1;
            } else {
                cpu.fold(&mut b, &batch).unwrap();
                folded_again += 1;
            }
            start += len;
        }
        assert!(bits_of(&a) == bits_of(&b), "seed {seed}: states differ");
        let ids: Vec<Option<u32>> = (0..600).map(Some).collect();
        let at = case.ts.iter().copied().max().unwrap_or(0);
        let (mut ra, mut rb) = (MergeOutput::default(), MergeOutput::default());
        cpus[0]
            .merge(&a, &case.features, &ids, at, &mut ra)
            .unwrap();
        cpus[0]
            .merge(&b, &case.features, &ids, at, &mut rb)
            .unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&ra.values),
            bits(&rb.values),
            "seed {seed}: reads differ"
        );
        assert_eq!(ra.valid, rb.valid);
    }
    assert!(
        replayed > 50 && folded_again > 10,
        "{replayed} replayed, {folded_again} folded again"
    );
}

#[test]
fn r18_fold_logs_that_do_not_fit_are_refused() {
    let rng = &mut StdRng::seed_from_u64(7);
    let cpu = Cpu::new();
    // A case the Cpu backend logs: no sketches or lists, whose levels it folds event by
    // event, unlogged.
    let mut case = gen_case(rng);
    while case.ids.len() < 1000 || has_sketches(&case.spec) {
        case = gen_case(rng);
    }
    let vals: Vec<&[f64]> = case.values.iter().map(Vec::as_slice).collect();
    let batch = FoldBatch {
        ids: &case.ids,
        ts: &case.ts,
        values: &vals,
    };
    let mut a = PaneState::new(case.spec.clone()).unwrap();
    let mut log = FoldLog::new();
    // Other backends do not log, and cannot replay.
    Scalar.fold_logged(&mut a, &batch, &mut log).unwrap();
    assert!(!log.is_complete());
    let err = Scalar.replay(&mut a, &log).unwrap_err().to_string();
    assert!(err.contains("does not replay"), "{err}");
    assert!(cpu.replay(&mut a, &log).is_err(), "an incomplete log");
    cpu.fold_logged(&mut a, &batch, &mut log).unwrap();
    assert!(log.is_complete() && log.bytes() > 0);
    let mut spec = case.spec.clone();
    spec.shards = if spec.shards == 64 {
        8
    } else {
        spec.shards * 2
    };
    let mut other = PaneState::new(spec).unwrap();
    let err = cpu.replay(&mut other, &log).unwrap_err().to_string();
    assert!(err.contains("cannot be replayed"), "{err}");
}

#[test]
fn a_checkpoint_image_with_a_sketch_header_out_of_range_is_refused() {
    let fields = Agg::ApproxDistinct { precision: 8 }.fields().union(
        Agg::Quantile {
            q: Param::new(0.5),
            relative_accuracy: Param::new(0.05),
        }
        .fields(),
    );
    let spec = StateSpec {
        levels: vec![LevelSpec {
            hop: 1_000,
            ring: 2,
            columns: vec![fields],
            lifetime: true,
        }],
        shards: 1,
    };
    let mut state = PaneState::new(spec.clone()).unwrap();
    let values: Vec<f64> = (0..100u64)
        .map(|i| hll::value(hll::splitmix64(i)))
        .collect();
    let batch = FoldBatch {
        ids: &[0; 100],
        ts: &(0..100).map(|t| t * 50).collect::<Vec<_>>(),
        values: &[&values],
    };
    Scalar.fold(&mut state, &batch).unwrap();
    let image = state.export().unwrap();
    assert!(PaneState::import(spec.clone(), image.clone()).is_ok());
    // Every word that is a sketch's header, set out of range, in turn.
    let ring = &image[0].ring;
    let headers: Vec<usize> = (0..ring.len())
        .filter(|&i| {
            let mut bad = image.clone();
            bad[0].ring[i] = 1e9;
            PaneState::import(spec.clone(), bad).is_err()
        })
        .collect();
    // Two headers (one per sketch) in every cell, at the same offsets: nothing else
    // is checked.
    let stride = headers[2] - headers[0];
    assert_eq!(headers.len(), 2 * ring.len() / stride, "{headers:?}");
    assert!(
        headers
            .chunks(2)
            .all(|h| h[1] - h[0] == headers[1] - headers[0])
    );
    for i in headers {
        let mut bad = image.clone();
        bad[0].ring[i] = -2.0;
        let err = PaneState::import(spec.clone(), bad)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sketch"), "{err}");
    }
}
