//! Limits on keys: a view's `max_keys`, the engine's default, and a state memory
//! budget shared by views and engines. New keys past a limit are rejected and counted
//! (`key_limit`), with a message naming the limit; rows of known keys still count;
//! both replicas of a view make the same decisions; backfill honours `max_keys`.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use panes_engine::{
    BackendKind, BackfillOptions, Engine, EngineOptions, FeatureFile, RejectReason, StateBudget,
    backfill,
};

fn text(max_keys: &str) -> String {
    format!(
        r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"
{max_keys}

[[views.features]]
name = "n_1m"
agg = "count"
window = "1m"

[[views.features]]
name = "amount_sum_1m"
agg = "sum"
column = "amount"
window = "1m"

[[views]]
name = "users"
key = "card"
time = "ts"
pane = "1s"

[[views.features]]
name = "users_n_1m"
agg = "count"
window = "1m"
"#
    )
}

fn features(max_keys: &str) -> FeatureFile {
    FeatureFile::parse(&text(max_keys), "key_limits").unwrap()
}

fn engine(file: &FeatureFile, options: EngineOptions) -> Engine {
    Engine::new(
        file,
        EngineOptions {
            backend: Some(BackendKind::Cpu),
            ..options
        },
    )
    .unwrap()
}

fn batch(cards: &[i64], ts: i64) -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "card",
            Arc::new(Int64Array::from(cards.to_vec())) as ArrayRef,
        ),
        ("ts", Arc::new(Int64Array::from(vec![ts; cards.len()])) as _),
        (
            "amount",
            Arc::new(Float64Array::from(vec![1.0; cards.len()])) as _,
        ),
    ])
    .unwrap()
}

fn counts(e: &Engine, view: &str, cards: &[i64]) -> Vec<f64> {
    let f = e
        .read(
            view,
            &Int64Array::from(cards.to_vec()),
            None,
            Some(&["n_1m"]),
        )
        .unwrap();
    f.values.column(0).to_vec()
}

#[test]
fn r17_max_keys_rejects_new_keys_and_keeps_known_ones() {
    let e = engine(&features("max_keys = 3"), EngineOptions::default());
    let r = e
        .push("cards", &batch(&[1, 2, 1, 3, 4, 5, 2], 1_000))
        .unwrap();
    assert_eq!((r.accepted, r.rejected), (5, 2));
    assert_eq!(
        r.rejected_rows,
        vec![(4, RejectReason::KeyLimit), (5, RejectReason::KeyLimit)]
    );
    assert_eq!(
        r.rejections[0].message,
        "row 4: new key 4: the view holds 3 keys, its limit (max_keys = 3)"
    );
    // Known keys still count in later pushes; new ones stay refused. Both replicas
    // took the same decisions: every push publishes and swaps them.
    for round in 0..3 {
        let r = e.push("cards", &batch(&[3, 6], 2_000 + round)).unwrap();
        assert_eq!((r.accepted, r.rejected), (1, 1));
        assert_eq!(
            counts(&e, "cards", &[1, 2, 3, 4, 6]),
            [2.0, 2.0, 2.0 + round as f64, 0.0, 0.0]
        );
    }
    let m = e.metrics("cards").unwrap();
    assert_eq!(m.keys, 3);
    assert_eq!(m.counters.rejected(RejectReason::KeyLimit), 5);
    assert!(m.rejected_by_reason().contains(&("key_limit", 5)));
    // The other view has no limit.
    let r = e.push("users", &batch(&[1, 2, 3, 4, 5], 1_000)).unwrap();
    assert_eq!(r.accepted, 5);
}

#[test]
fn the_engine_default_applies_to_views_without_max_keys() {
    let e = engine(
        &features("max_keys = 10"),
        EngineOptions {
            max_keys: Some(2),
            ..Default::default()
        },
    );
    assert_eq!(
        e.push("cards", &batch(&[1, 2, 3, 4], 0)).unwrap().accepted,
        4
    );
    let r = e.push("users", &batch(&[1, 2, 3, 4], 0)).unwrap();
    assert_eq!((r.accepted, r.rejected), (2, 2));
}

#[test]
fn r17_a_budget_is_shared_by_views_and_engines_and_released() {
    let file = features("");
    let per_key = {
        let e = engine(&file, EngineOptions::default());
        // Two replicas, each with its read copy.
        4 * e.compiled("cards").unwrap().bytes_per_key() as u64
    };
    let budget = Arc::new(StateBudget::new(5 * per_key));
    let options = EngineOptions {
        state_budget: Some(budget.clone()),
        ..Default::default()
    };
    let a = engine(&file, options.clone());
    assert_eq!(a.push("cards", &batch(&[1, 2, 3], 0)).unwrap().accepted, 3);
    assert_eq!(budget.used(), 3 * per_key);
    let b = engine(&file, options.clone());
    let r = b.push("cards", &batch(&[7, 8, 9, 7], 0)).unwrap();
    assert_eq!((r.accepted, r.rejected), (3, 1), "{:?}", r.rejections);
    assert!(
        r.rejections[0].message.contains("state memory budget"),
        "{}",
        r.rejections[0].message
    );
    // Key 7 was created before the refusal: its second row counts.
    assert_eq!(r.rejected_rows, vec![(2, RejectReason::KeyLimit)]);
    assert_eq!(counts(&b, "cards", &[7, 8, 9]), [2.0, 1.0, 0.0]);
    assert_eq!(budget.used(), 5 * per_key);

    // Restoring a checkpoint charges its keys; dropping an engine gives them back.
    let ckpt = a.checkpoint("cards", &[]).unwrap();
    drop(a);
    assert_eq!(budget.used(), 2 * per_key);
    let c = engine(&file, options);
    c.restore("cards", &ckpt).unwrap();
    assert_eq!(budget.used(), 5 * per_key);
    c.restore("cards", &ckpt).unwrap();
    assert_eq!(
        budget.used(),
        5 * per_key,
        "a second restore replaces the charge"
    );
    assert_eq!(counts(&c, "cards", &[1, 2, 3]), [1.0, 1.0, 1.0]);
    drop((b, c));
    assert_eq!(budget.used(), 0);
}

#[test]
fn backfill_honours_max_keys_as_online() {
    let file = features("max_keys = 2");
    let events = batch(&[5, 6, 7, 5], 1_000);
    let spine = RecordBatch::try_from_iter([
        (
            "card",
            Arc::new(Int64Array::from(vec![5, 6, 7])) as ArrayRef,
        ),
        ("ts", Arc::new(Int64Array::from(vec![2_000; 3])) as _),
    ])
    .unwrap();
    let (_, out, report) = backfill(
        &file,
        std::slice::from_ref(&events),
        &spine.schema(),
        &[spine],
        BackendKind::Cpu.create().unwrap(),
        &BackfillOptions::default(),
    )
    .unwrap();
    let n = out[0].column_by_name("n_1m").unwrap().clone();
    let e = engine(&file, EngineOptions::default());
    e.push("cards", &events).unwrap();
    assert!(file.to_toml().contains("max_keys = 2"));
    let online = counts(&e, "cards", &[5, 6, 7]);
    let offline: Vec<f64> = arrow_cast::cast(&n, &arrow_schema::DataType::Float64)
        .unwrap()
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap()
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .collect();
    assert_eq!(online, [2.0, 1.0, 0.0]);
    assert_eq!(offline, online);
    let cards = report.views.iter().find(|v| v.0 == "cards").unwrap();
    assert_eq!(cards.1.rejected(RejectReason::KeyLimit), 1);
}

#[test]
fn max_keys_out_of_range_is_a_spec_error() {
    for bad in ["max_keys = 0", "max_keys = -1", "max_keys = 5000000000"] {
        let e = FeatureFile::parse(&text(bad), "f").unwrap_err().to_string();
        assert!(e.contains("max_keys"), "{bad}: {e}");
    }
}
