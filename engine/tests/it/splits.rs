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

const FEATURES: &str = include_str!("../data/fold_paths.toml");

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

/// A push large enough to look its keys up on every core first decides every row as
/// pushes too small for that do: the same rows accepted, late and refused (new keys
/// past `max_keys`, null keys), the same key ids (`read_all` lists keys in id order)
/// and the same values.
#[test]
fn r18_a_large_push_finds_its_keys_as_small_pushes_do() {
    let mut rng = StdRng::seed_from_u64(5);
    let n = 40_000;
    let mut clock = 1_000_000i64;
    let (mut keys, mut ts, mut xs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        clock += rng.random_range(0..2);
        // Keys known from the first push, keys new in this one, and null keys.
        keys.push(match rng.random_range(0..20) {
            0 => None,
            1..=4 => Some(rng.random_range(1_000..3_000i64)),
            _ => Some(rng.random_range(0..500i64)),
        });
        ts.push(clock - if rng.random_bool(0.05) { 500 } else { 0 });
        xs.push(rng.random_range(0.0..10.0));
    }
    let events = RecordBatch::try_from_iter([
        ("k", Arc::new(Int64Array::from(keys)) as Arc<dyn Array>),
        ("ts", Arc::new(Int64Array::from(ts)) as _),
        ("x", Arc::new(Float64Array::from(xs)) as _),
    ])
    .unwrap();
    let first = RecordBatch::try_from_iter([
        (
            "k",
            Arc::new(Int64Array::from_iter_values(0..500)) as Arc<dyn Array>,
        ),
        ("ts", Arc::new(Int64Array::from(vec![999_000i64; 500])) as _),
        ("x", Arc::new(Float64Array::from(vec![1.0; 500])) as _),
    ])
    .unwrap();
    let make = || {
        let file = FeatureFile::parse(FEATURES, "splits.toml").unwrap();
        let options = EngineOptions {
            backend: Some(BackendKind::Cpu),
            max_keys: Some(1_600),
            ..Default::default()
        };
        Engine::new(&file, options).unwrap()
    };
    let (whole, pieces) = (make(), make());
    whole.push("v", &first).unwrap();
    pieces.push("v", &first).unwrap();
    let w = whole.push("v", &events).unwrap();
    let (mut accepted, mut late, mut rejected) = (0, 0, 0);
    for start in (0..n).step_by(1_000) {
        let r = pieces.push("v", &events.slice(start, 1_000)).unwrap();
        accepted += r.accepted;
        late += r.late;
        rejected += r.rejected;
    }
    assert_eq!((w.accepted, w.late, w.rejected), (accepted, late, rejected));
    assert!(w.late > 0 && w.rejected > 0, "{w:?}");
    whole.flush().unwrap();
    pieces.flush().unwrap();
    let (a, at) = whole.read_all("v", None, None).unwrap();
    let (b, _) = pieces.read_all("v", Some(at), None).unwrap();
    assert_eq!(a.num_rows(), 1_600);
    assert_eq!(a.column(0), b.column(0), "keys in the same id order");
    for c in 1..a.num_columns() {
        let float =
            |col: &Arc<dyn Array>| arrow_cast::cast(col, &arrow_schema::DataType::Float64).unwrap();
        let (x, y) = (float(a.column(c)), float(b.column(c)));
        let (x, y) = (
            x.as_any().downcast_ref::<Float64Array>().unwrap(),
            y.as_any().downcast_ref::<Float64Array>().unwrap(),
        );
        for i in 0..x.len() {
            let (g, w) = (x.value(i), y.value(i));
            assert!(
                x.is_null(i) == y.is_null(i)
                    && (x.is_null(i)
                        || g.to_bits() == w.to_bits()
                        || (g - w).abs() <= 1e-9 * g.abs().max(w.abs())),
                "column {c} row {i}: {g} vs {w}"
            );
        }
    }
}
