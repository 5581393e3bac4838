//! Composite keys (`key = ["merchant", "card"]`, DESIGN §3b): ingest with parts of any
//! encoding, reads by tuple on every backend, checkpoints, and the errors a user meets.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    StructArray,
};
use arrow_schema::{DataType, Field};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile, KeyValue, PanesError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FEATURES: &str = r#"
[[views]]
name = "pairs"
key = ["merchant", "card"]
time = "ts"
pane = "1s"
allowed_lateness = "2s"

[[views.features]]
name = "rows_10s"
agg = "count"
window = "10s"

[[views.features]]
name = "amount_sum_10s"
agg = "sum"
column = "amount"
window = "10s"

[[views.features]]
name = "amount_max_life"
agg = "max"
column = "amount"
window = "lifetime"
"#;

#[derive(Clone, Debug)]
struct Ev {
    merchant: Option<String>,
    card: Option<i64>,
    ts: i64,
    amount: Option<f64>,
}

fn events(n: usize, seed: u64) -> Vec<Ev> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 50_000i64;
    (0..n)
        .map(|_| {
            t += rng.random_range(0..300);
            Ev {
                merchant: rng
                    .random_bool(0.98)
                    .then(|| format!("m{}", rng.random_range(0..5))),
                card: rng.random_bool(0.98).then(|| rng.random_range(0..6)),
                ts: t - rng.random_range(0..4_000) * i64::from(rng.random_bool(0.2)),
                amount: rng
                    .random_bool(0.9)
                    .then(|| f64::from(rng.random_range(0..800)) / 4.0),
            }
        })
        .collect()
}

/// Events as a batch; odd batches carry the merchant dictionary-encoded and the card
/// as Int32 (parts match by value whatever their encoding).
fn batch(evs: &[Ev], odd: bool) -> RecordBatch {
    let merchant: ArrayRef = if odd {
        let d: DictionaryArray<Int32Type> = evs.iter().map(|e| e.merchant.as_deref()).collect();
        Arc::new(d)
    } else {
        Arc::new(StringArray::from_iter(
            evs.iter().map(|e| e.merchant.as_deref()),
        ))
    };
    let card: ArrayRef = if odd {
        Arc::new(Int32Array::from_iter(
            evs.iter().map(|e| e.card.map(|c| c as i32)),
        ))
    } else {
        Arc::new(Int64Array::from_iter(evs.iter().map(|e| e.card)))
    };
    RecordBatch::try_from_iter(vec![
        ("card", card),
        ("merchant", merchant),
        (
            "ts",
            Arc::new(Int64Array::from_iter_values(evs.iter().map(|e| e.ts))) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from_iter(evs.iter().map(|e| e.amount))) as _,
        ),
    ])
    .unwrap()
}

type Pair = (String, i64);
/// A pair's accepted events: (ts, amount).
type PairEvents = HashMap<Pair, Vec<(i64, Option<f64>)>>;

/// Accepted events per pair, and the null-key and late counts.
fn oracle(evs: &[Ev]) -> (PairEvents, u64, u64) {
    let (mut by_pair, mut null_keys, mut late) = (HashMap::new(), 0, 0);
    let mut max_ts: Option<i64> = None;
    for e in evs {
        let (Some(m), Some(c)) = (&e.merchant, e.card) else {
            null_keys += 1;
            continue;
        };
        if max_ts.is_some_and(|x| e.ts < x - 2_000) {
            late += 1;
            continue;
        }
        max_ts = Some(max_ts.map_or(e.ts, |x| x.max(e.ts)));
        by_pair
            .entry((m.clone(), c))
            .or_insert_with(Vec::new)
            .push((e.ts, e.amount));
    }
    (by_pair, null_keys, late)
}

fn expected(evs: Option<&Vec<(i64, Option<f64>)>>, at: i64) -> [f64; 3] {
    let evs: Vec<_> = evs
        .map(|v| v.iter().filter(|e| e.0 <= at).collect())
        .unwrap_or_default();
    let win: Vec<_> = evs
        .iter()
        .filter(|e| e.0.div_euclid(1000) > at.div_euclid(1000) - 10)
        .collect();
    let sum = win.iter().filter_map(|e| e.1).sum();
    let max = evs
        .iter()
        .filter_map(|e| e.1)
        .fold(f64::NAN, |m, v| if m.is_nan() || v > m { v } else { m });
    [win.len() as f64, sum, max]
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn engine(backend: BackendKind) -> Engine {
    let file = FeatureFile::parse(FEATURES, "composite").unwrap();
    Engine::new(
        &file,
        EngineOptions {
            backend: Some(backend),
            ..Default::default()
        },
    )
    .unwrap()
}

/// Every pair the events could hold, and one never seen.
fn pairs() -> Vec<Pair> {
    let mut p: Vec<Pair> = (0..5)
        .flat_map(|m| (0..6).map(move |c| (format!("m{m}"), c)))
        .collect();
    p.push(("m9".into(), 0));
    p
}

/// `pairs` as a struct column with the key columns in another order than the view's
/// and one more column, as a DataFrame of a spine would be: matched by name.
fn struct_keys(pairs: &[Pair]) -> ArrayRef {
    let cards: ArrayRef = Arc::new(Int64Array::from_iter_values(pairs.iter().map(|p| p.1)));
    let merchants: ArrayRef = Arc::new(StringArray::from_iter_values(
        pairs.iter().map(|p| p.0.as_str()),
    ));
    let label: ArrayRef = Arc::new(Int64Array::from_iter_values(0..pairs.len() as i64));
    Arc::new(StructArray::from(vec![
        (Arc::new(Field::new("label", DataType::Int64, false)), label),
        (Arc::new(Field::new("card", DataType::Int64, false)), cards),
        (
            Arc::new(Field::new("merchant", DataType::Utf8, false)),
            merchants,
        ),
    ]))
}

#[test]
fn composite_keys_match_the_oracle_on_every_backend() {
    let evs = events(4_000, 11);
    let (by_pair, null_keys, late) = oracle(&evs);
    assert!(null_keys > 0 && late > 0);
    let at = evs.iter().map(|e| e.ts).max().unwrap();
    let pairs = pairs();
    let mut backends = vec![BackendKind::Scalar, BackendKind::Cpu];
    if crate::common::gpu_available() {
        backends.push(BackendKind::Gpu);
    }
    for (backend, chunk) in backends.into_iter().flat_map(|b| [(b, 4_000), (b, 113)]) {
        let e = engine(backend);
        for (i, part) in evs.chunks(chunk).enumerate() {
            e.push("pairs", &batch(part, i % 2 == 1)).unwrap();
        }
        e.flush().unwrap();
        let c = e.metrics("pairs").unwrap().counters;
        assert_eq!(
            (c.accepted, c.late),
            (evs.len() as u64 - null_keys - late, late),
            "{backend:?}, pushes of {chunk}"
        );
        assert_eq!(
            e.key_kind("pairs").unwrap().as_deref(),
            Some("(string, int)")
        );
        let check = |what: &str, values: &dyn Fn(usize, usize) -> f64| {
            for (r, p) in pairs.iter().enumerate() {
                let want = expected(by_pair.get(p), at);
                for (j, w) in want.iter().enumerate() {
                    let got = values(r, j);
                    assert!(
                        close(got, *w),
                        "{backend:?}, pushes of {chunk}, {what}, {p:?} feature {j}: {got} vs {w}"
                    );
                }
            }
        };
        // By a struct column (matched by name), and by tuples of values.
        let keys = struct_keys(&pairs);
        let f = e.read("pairs", keys.as_ref(), Some(at), None).unwrap();
        check("read", &|r, j| f.values[[r, j]]);
        let tuples: Vec<KeyValue> = pairs
            .iter()
            .map(|(m, c)| {
                KeyValue::Tuple(vec![KeyValue::Str(m.clone()), KeyValue::Int(*c as i128)])
            })
            .collect();
        let f = e.read_keys("pairs", &tuples, Some(at), None).unwrap();
        check("read_keys", &|r, j| f.values[[r, j]]);
        // A batch names the key columns after the view's, in its order.
        let (b, _) = e.read_batch("pairs", &keys, Some(at), None).unwrap();
        assert_eq!(b.schema().field(0).name(), "merchant");
        assert_eq!(b.schema().field(1).name(), "card");
        assert_eq!(
            b.column(1)
                .as_primitive::<arrow_array::types::Int64Type>()
                .value(3),
            pairs[3].1
        );
        // Every key the view holds, with its parts as columns.
        let (all, _) = e.read_all("pairs", Some(at), None).unwrap();
        assert_eq!(all.num_rows(), by_pair.len());
        let merchants = all.column(0).as_string::<i32>();
        let cards = all
            .column(1)
            .as_primitive::<arrow_array::types::Int64Type>();
        let counts = all
            .column(2)
            .as_primitive::<arrow_array::types::Int64Type>();
        for r in 0..all.num_rows() {
            let p = (merchants.value(r).to_string(), cards.value(r));
            assert_eq!(
                counts.value(r) as f64,
                expected(by_pair.get(&p), at)[0],
                "{p:?}"
            );
        }
        // A checkpoint holds the composite keys.
        let restored = engine(backend);
        restored
            .restore("pairs", &e.checkpoint("pairs", &[]).unwrap())
            .unwrap();
        let f = restored
            .read_keys("pairs", &tuples, Some(at), None)
            .unwrap();
        check("restored", &|r, j| f.values[[r, j]]);
        assert_eq!(restored.metrics("pairs").unwrap().counters, c);
    }
}

#[test]
fn composite_key_errors_name_the_part_and_what_was_expected() {
    let e = engine(BackendKind::Scalar);
    let evs = events(50, 3);
    // A null part is a null key, counted, and the message names the part.
    let mut with_null = evs.clone();
    with_null[4].card = None;
    with_null[4].merchant = Some("m1".into());
    let r = e.push("pairs", &batch(&with_null, false)).unwrap();
    assert!(
        r.rejections
            .iter()
            .any(|x| x.row == 4 && x.message.contains("key column \"card\" is null")),
        "{:?}",
        r.rejections
    );
    // A missing part is a schema error naming it.
    let mut b = batch(&evs, false);
    b.remove_column(1);
    match e.push("pairs", &b).unwrap_err() {
        PanesError::Schema {
            column, message, ..
        } => {
            assert_eq!(column, "merchant");
            assert!(message.contains("key column is missing"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // Single keys, or tuples of another length, for a composite key.
    let single = Int64Array::from(vec![1, 2]);
    let err = e
        .read("pairs", &single, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("composite key"), "{err}");
    let short = vec![KeyValue::Tuple(vec![KeyValue::Str("m1".into())])];
    let err = e
        .read_keys("pairs", &short, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("composite key"), "{err}");
    // Integers where the view holds strings, part by part.
    let swapped = vec![KeyValue::Tuple(vec![KeyValue::Int(1), KeyValue::Int(1)])];
    let err = e
        .read_keys("pairs", &swapped, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("key column 1"), "{err}");
    // A view with one key column takes no tuples.
    let one = FeatureFile::parse(
        &FEATURES.replace(r#"key = ["merchant", "card"]"#, r#"key = "card""#),
        "one",
    )
    .unwrap();
    let e = Engine::new(&one, EngineOptions::default()).unwrap();
    e.push("pairs", &batch(&evs, false)).unwrap();
    let err = e
        .read_keys("pairs", &swapped, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("one key column"), "{err}");
}

#[test]
fn composite_keys_in_the_feature_file() {
    let file = FeatureFile::parse(FEATURES, "composite").unwrap();
    assert_eq!(file.views[0].key, ["merchant", "card"]);
    // The TOML round-trips.
    assert_eq!(FeatureFile::parse(&file.to_toml(), "again").unwrap(), file);
    for (bad, want) in [
        (r#"key = ["merchant", "merchant"]"#, "appears twice"),
        (r#"key = []"#, "a key has 1 to 8"),
        (
            r#"key = ["merchant", 3]"#,
            "expected a column name or a list",
        ),
        (
            r#"key = ["merchant", "ts"]"#,
            "must differ from the key columns",
        ),
    ] {
        let text = FEATURES.replace(r#"key = ["merchant", "card"]"#, bad);
        let err = FeatureFile::parse(&text, "bad").unwrap_err().to_string();
        assert!(err.contains(want), "{bad}: {err}");
    }
}
