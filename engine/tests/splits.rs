//! Results do not depend on micro-batch boundaries: the same stream pushed whole and
//! in random pieces, with random micro-batch sizes, on every host backend, reads the
//! same (count, min, max and `last` bit for bit; sums and moments within 1e-9).
//!
//! A fold that loses or doubles a pre-aggregated group fails it. Ties between one
//! batch's cell and the next (−0.0 against +0.0, `last` at equal times) are rarely
//! visible in a whole window; `kernels/tests/backends.rs` (`check_ties`) tests them at
//! the cell level.

use std::sync::Arc;

use arrow_array::{Array, Float64Array, Int64Array, RecordBatch};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FEATURES: &str = include_str!("data/fold_paths.toml");

/// Names of the features compared bit for bit.
const EXACT: [&str; 5] = ["n", "nx", "lo", "hi", "last"];

fn stream(rng: &mut StdRng, n: usize) -> RecordBatch {
    let mut clock = 5_000_000i64;
    let (mut keys, mut ts, mut xs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        clock += rng.random_range(0..3);
        keys.push(rng.random_range(0..4i64));
        // Late events, within the lateness and beyond it.
        ts.push(if rng.random_bool(0.1) {
            clock - rng.random_range(0..100)
        } else {
            clock
        });
        // Mostly signed zeros and small integers: minima are ±0.0 and times tie
        // often, which is where grouping could change bits.
        xs.push(match rng.random_range(0..20) {
            0 => None,
            1 => Some(f64::NAN),
            2..=5 => Some(-0.0),
            6..=9 => Some(0.0),
            10..=16 => Some(rng.random_range(1..5) as f64),
            _ => Some(rng.random_range(0.0..1.0e3)),
        });
    }
    RecordBatch::try_from_iter([
        ("k", Arc::new(Int64Array::from(keys)) as Arc<dyn Array>),
        ("ts", Arc::new(Int64Array::from(ts)) as _),
        ("x", Arc::new(Float64Array::from(xs)) as _),
    ])
    .unwrap()
}

fn engine(backend: BackendKind, batch_rows: usize) -> Engine {
    let file = FeatureFile::parse(FEATURES, "splits.toml").unwrap();
    let options = EngineOptions {
        backend: Some(backend),
        batch_rows,
        ..Default::default()
    };
    Engine::new(&file, options).unwrap()
}

#[test]
fn r18_micro_batch_boundaries_do_not_change_answers() {
    let keys = Int64Array::from_iter_values(0..6);
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(1_000..30_000);
        let events = stream(&mut rng, n);
        let whole = engine(BackendKind::Scalar, 1 << 20);
        whole.push("v", &events).unwrap();
        whole.flush().unwrap();
        let at = whole.read("v", &keys, None, None).unwrap().at;
        for backend in [BackendKind::Scalar, BackendKind::Cpu] {
            let split = engine(backend, rng.random_range(1..5_000));
            let mut start = 0;
            while start < events.num_rows() {
                let len = rng.random_range(1..4_000).min(events.num_rows() - start);
                split.push("v", &events.slice(start, len)).unwrap();
                if rng.random_bool(0.3) {
                    split.flush().unwrap();
                }
                start += len;
            }
            split.flush().unwrap();
            for t in [at, at + 15, at + 60, at + 1_000] {
                let want = whole.read("v", &keys, Some(t), None).unwrap();
                let got = split.read("v", &keys, Some(t), None).unwrap();
                for ((k, f), w) in want.values.indexed_iter() {
                    let g = got.values[(k, f)];
                    let name = &want.names[f];
                    assert_eq!(
                        got.valid[(k, f)],
                        want.valid[(k, f)],
                        "seed {seed} {backend} key {k} {name} at {t}: validity"
                    );
                    let same = if EXACT.contains(&name.as_str()) {
                        g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
                    } else {
                        g.to_bits() == w.to_bits() || (g - w).abs() <= 1e-9 * g.abs().max(w.abs())
                    };
                    assert!(
                        same,
                        "seed {seed} {backend} key {k} {name} at {t}: {g:?} vs {w:?}"
                    );
                }
            }
        }
    }
}
