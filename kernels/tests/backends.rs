//! Baseline-vs-optimised fuzzer: the `Scalar` backend folds each random stream as one
//! batch; every other backend folds it in random splits. Reads (random keys, times and
//! features) must agree: count/min/max/last identically, sums and moments to 1e-9.

use panes_kernels::{
    Agg, Backend, ColumnFields, Cpu, FeatureMerge, FoldBatch, LevelSpec, MergeOutput, PaneState,
    ReadStatus, Scalar, StateSpec,
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
    let columns = rng.random_range(1..=3);
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
        .map(|_| {
            (0..n)
                .map(|_| match rng.random_range(0..30) {
                    0 => f64::NAN,
                    1..=10 => rng.random_range(-50..50) as f64,
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

fn fold_split(backend: &dyn Backend, case: &Case, rng: &mut StdRng, split: bool) -> PaneState {
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
        backend.fold(&mut state, &batch).unwrap();
        start += len;
        if n == 0 {
            break;
        }
    }
    state
}

fn same(agg: Agg, a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    match agg {
        Agg::Count | Agg::Min | Agg::Max | Agg::Last => a == b,
        _ => (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-3),
    }
}

fn check(backend: &dyn Backend, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let mut rng = StdRng::seed_from_u64(seed);
        let case = gen_case(&mut rng);
        let reference = fold_split(&Scalar, &case, &mut rng, false);
        let state = fold_split(backend, &case, &mut rng, true);
        let max_t = case.ts.iter().copied().max().unwrap_or(0);
        for _ in 0..4 {
            let ids: Vec<Option<u32>> = (0..rng.random_range(0..700))
                .map(|_| rng.random_bool(0.95).then(|| rng.random_range(0..600)))
                .collect();
            let at = max_t + rng.random_range(-5_000..100_000);
            let mut want = MergeOutput::default();
            let mut got = MergeOutput::default();
            Scalar
                .merge(&reference, &case.features, &ids, at, &mut want)
                .unwrap();
            backend
                .merge(&state, &case.features, &ids, at, &mut got)
                .unwrap();
            let nf = case.features.len();
            if let Some(k) = (0..ids.len()).find(|&k| got.status[k] != want.status[k]) {
                panic!(
                    "seed {seed} key {:?} at {at}: status {:?} vs {:?}",
                    ids[k], got.status[k], want.status[k]
                );
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
}

#[test]
fn scalar_splits_match_scalar_whole() {
    check(&Scalar, 0..30);
}

#[test]
fn cpu_matches_scalar() {
    check(&Cpu::new(), 100..160);
}

#[test]
fn cpu_two_threads_matches_scalar() {
    check(&Cpu::with_threads(2).unwrap(), 200..230);
}

#[test]
fn cpu_one_thread_matches_scalar() {
    check(&Cpu::with_threads(1).unwrap(), 300..320);
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
