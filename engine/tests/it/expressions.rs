//! Derived columns, the view's filter and per-feature filters (DESIGN §3b), on every
//! backend, against an oracle computed row by row from the same events.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile, PanesError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"
allowed_lateness = "3s"
filter = "status = 'approved'"

[[views.columns]]
name = "amount_usd"
expr = "amount * fx"

[[views.columns]]
name = "per_unit"
expr = "amount_usd / units"

[[views.columns]]
name = "tier"
expr = "CASE WHEN amount_usd > 50 THEN 'big' ELSE lower(status) || '-small' END"

[[views.features]]
name = "rows_10s"
agg = "count"
window = "10s"

[[views.features]]
name = "usd_sum_10s"
agg = "sum"
column = "amount_usd"
window = "10s"

[[views.features]]
name = "big_rows_10s"
agg = "count"
window = "10s"
filter = "amount_usd > 40 OR tier = 'none'"

[[views.features]]
name = "per_unit_mean_life"
agg = "mean"
column = "per_unit"
window = "lifetime"
filter = "units > 1"

[[views.features]]
name = "tier_last_10s"
agg = "last"
column = "tier"
window = "10s"
"#;

/// One generated event.
#[derive(Clone, Debug)]
struct Ev {
    card: i64,
    ts: i64,
    amount: Option<f64>,
    fx: f64,
    units: i64,
    status: Option<&'static str>,
}

fn events(n: usize, seed: u64) -> Vec<Ev> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 100_000i64;
    (0..n)
        .map(|_| {
            t += rng.random_range(0..400);
            Ev {
                card: rng.random_range(0..7),
                // Some disorder, some of it past the lateness bound.
                ts: t - rng.random_range(0..5_000) * i64::from(rng.random_bool(0.2)),
                amount: rng
                    .random_bool(0.9)
                    .then(|| f64::from(rng.random_range(0..1000)) / 8.0),
                fx: [0.5, 1.25, 2.0][rng.random_range(0..3)],
                // Zero units: the division fails for that row.
                units: rng.random_range(0..4),
                status: [Some("approved"), Some("declined"), None, Some("approved")]
                    [rng.random_range(0..4)],
            }
        })
        .collect()
}

fn batch(evs: &[Ev]) -> RecordBatch {
    RecordBatch::try_from_iter(vec![
        (
            "card",
            Arc::new(Int64Array::from_iter_values(evs.iter().map(|e| e.card))) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(Int64Array::from_iter_values(evs.iter().map(|e| e.ts))) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from_iter(evs.iter().map(|e| e.amount))) as _,
        ),
        (
            "fx",
            Arc::new(Float64Array::from_iter_values(evs.iter().map(|e| e.fx))) as _,
        ),
        (
            "units",
            Arc::new(Int64Array::from_iter_values(evs.iter().map(|e| e.units))) as _,
        ),
        (
            "status",
            Arc::new(StringArray::from_iter(evs.iter().map(|e| e.status))) as _,
        ),
    ])
    .unwrap()
}

/// An accepted event: card, ts, amount_usd, per_unit, tier, units.
type Row = (i64, i64, Option<f64>, Option<f64>, String, i64);

/// What the engine should hold: the accepted events (in arrival order) with their
/// derived columns, and the counters.
struct Oracle {
    accepted: Vec<Row>,
    filtered: u64,
    expr_errors: u64,
    late: u64,
}

fn oracle(evs: &[Ev]) -> Oracle {
    let mut o = Oracle {
        accepted: Vec::new(),
        filtered: 0,
        expr_errors: 0,
        late: 0,
    };
    let mut max_ts: Option<i64> = None;
    for e in evs {
        let usd = e.amount.map(|a| a * e.fx);
        // amount_usd / units: units is an integer, so the division is a float one
        // (amount_usd is a float); zero units fail where amount_usd is not null.
        let failed = usd.is_some() && e.units == 0;
        let per_unit = usd.filter(|_| !failed).map(|u| u / e.units as f64);
        if failed {
            o.expr_errors += 1;
        }
        // NULL > 50 is null: the ELSE branch; lower(NULL) || … is null.
        let tier = if usd.is_some_and(|u| u > 50.0) {
            Some("big".to_string())
        } else {
            e.status.map(|s| format!("{}-small", s.to_lowercase()))
        };
        if e.status != Some("approved") {
            o.filtered += 1;
            continue;
        }
        if max_ts.is_some_and(|m| e.ts < m - 3_000) {
            o.late += 1;
            continue;
        }
        max_ts = Some(max_ts.map_or(e.ts, |m| m.max(e.ts)));
        o.accepted.push((
            e.card,
            e.ts,
            usd,
            per_unit,
            tier.expect("approved rows have a status"),
            e.units,
        ));
    }
    o
}

/// The oracle's features of `card` at `at`, in the file's order (NaN = null).
fn expected(o: &Oracle, card: i64, at: i64) -> [f64; 4] {
    let in_10s = |ts: i64| ts <= at && ts.div_euclid(1000) > at.div_euclid(1000) - 10;
    let evs: Vec<_> = o
        .accepted
        .iter()
        .filter(|e| e.0 == card && e.1 <= at)
        .collect();
    let win: Vec<_> = evs.iter().filter(|e| in_10s(e.1)).collect();
    let rows = win.len() as f64;
    let usd: f64 = win.iter().filter_map(|e| e.2).sum();
    // Null for a null amount (null OR false): not counted.
    let big = win.iter().filter(|e| e.2.is_some_and(|u| u > 40.0)).count() as f64;
    let units: Vec<f64> = evs.iter().filter(|e| e.5 > 1).filter_map(|e| e.3).collect();
    let mean = if units.is_empty() {
        f64::NAN
    } else {
        units.iter().sum::<f64>() / units.len() as f64
    };
    [rows, usd, big, mean]
}

fn expected_tier(o: &Oracle, card: i64, at: i64) -> Option<String> {
    o.accepted
        .iter()
        .filter(|e| e.0 == card && e.1 <= at && e.1.div_euclid(1000) > at.div_euclid(1000) - 10)
        .fold(
            None::<&(i64, i64, Option<f64>, Option<f64>, String, i64)>,
            |best, e| match best {
                Some(b) if b.1 > e.1 => Some(b),
                _ => Some(e),
            },
        )
        .map(|e| e.4.clone())
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn run(backend: BackendKind, evs: &[Ev], chunk: usize) -> Engine {
    let file = FeatureFile::parse(FEATURES, "expressions").unwrap();
    let e = Engine::new(
        &file,
        EngineOptions {
            backend: Some(backend),
            ..Default::default()
        },
    )
    .unwrap();
    for part in evs.chunks(chunk) {
        e.push("cards", &batch(part)).unwrap();
    }
    e.flush().unwrap();
    e
}

#[test]
fn filters_and_derived_columns_match_the_oracle_on_every_backend() {
    let evs = events(3_000, 7);
    let o = oracle(&evs);
    assert!(o.filtered > 0 && o.expr_errors > 0 && o.late > 0);
    let at = evs.iter().map(|e| e.ts).max().unwrap();
    let cards = Int64Array::from_iter_values(0..7);
    let mut backends = vec![BackendKind::Scalar, BackendKind::Cpu];
    if crate::common::gpu_available() {
        backends.push(BackendKind::Gpu);
    }
    for (backend, chunk) in backends.into_iter().flat_map(|b| [(b, 3_000), (b, 97)]) {
        let e = run(backend, &evs, chunk);
        let m = e.metrics("cards").unwrap();
        let c = &m.counters;
        assert_eq!(
            (c.filtered, c.expr_errors, c.late, c.accepted),
            (o.filtered, o.expr_errors, o.late, o.accepted.len() as u64),
            "{backend:?}, pushes of {chunk}"
        );
        // The counters survive a checkpoint.
        let restored = run(backend, &[], 1);
        restored
            .restore("cards", &e.checkpoint("cards", &[]).unwrap())
            .unwrap();
        assert_eq!(restored.metrics("cards").unwrap().counters, *c);
        for t in [at] {
            let f = e.read("cards", &cards, Some(t), None).unwrap();
            let keys: ArrayRef = Arc::new(cards.clone());
            let (b, _) = e.read_batch("cards", &keys, Some(t), None).unwrap();
            let tiers = b.column(5).as_string::<i32>();
            for card in 0..7 {
                let want = expected(&o, card, t);
                for (j, w) in want.iter().enumerate() {
                    let got = f.values[[card as usize, j]];
                    assert!(
                        close(got, *w),
                        "{backend:?}, pushes of {chunk}, card {card} at {t}, feature {j}: {got} vs {w}"
                    );
                }
                let tier = tiers.value(card as usize);
                let tier = tiers.is_valid(card as usize).then(|| tier.to_string());
                assert_eq!(
                    tier,
                    expected_tier(&o, card, t),
                    "{backend:?} card {card} at {t}"
                );
            }
        }
    }
}

#[test]
fn an_expression_that_does_not_fit_the_batch_is_a_schema_error_naming_it() {
    let file = FeatureFile::parse(FEATURES, "expressions").unwrap();
    let e = Engine::new(&file, EngineOptions::default()).unwrap();
    let mut b = batch(&events(10, 1));
    // Without `units`, `per_unit` cannot be computed.
    b.remove_column(4);
    let err = e.push("cards", &b).unwrap_err();
    match &err {
        PanesError::Schema {
            column, message, ..
        } => {
            assert_eq!(column, "columns.per_unit.expr");
            assert!(message.contains("units"), "{message}");
            assert!(message.contains("column 14"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.metrics("cards").unwrap().counters.accepted, 0);
}

#[test]
fn bad_expressions_are_spec_errors_with_their_position() {
    let bad = FEATURES
        .replace("status = 'approved'", "status = = 'approved'")
        .replace("amount * fx\"", "amount * (fx\"");
    let err = FeatureFile::parse(&bad, "bad").unwrap_err().to_string();
    assert!(err.contains("filter"), "{err}");
    assert!(err.contains("column 10"), "{err}");
    assert!(
        err.contains("columns") || err.contains("amount_usd"),
        "{err}"
    );
    let shadow = FEATURES.replace("name = \"tier\"", "name = \"card\"");
    let err = FeatureFile::parse(&shadow, "bad").unwrap_err().to_string();
    assert!(err.contains("key column"), "{err}");
}
