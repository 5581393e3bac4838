//! Every class of bad input: a clear error or a counter, and the good rows of the same
//! batch still aggregated.

use std::sync::Arc;

use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampSecondArray,
};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile, PanesError, RejectReason};

const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"
allowed_lateness = "1s"

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
name = "amount_count_10s"
agg = "count"
column = "amount"
window = "10s"
"#;

fn engine() -> Engine {
    let file = FeatureFile::parse(FEATURES, "bad_input").unwrap();
    Engine::new(
        &file,
        EngineOptions {
            backend: Some(BackendKind::Cpu),
            ..Default::default()
        },
    )
    .unwrap()
}

fn batch(cols: Vec<(&str, ArrayRef)>) -> RecordBatch {
    RecordBatch::try_from_iter(cols).unwrap()
}

fn read(e: &Engine, card: i64) -> (f64, f64, f64) {
    let f = e
        .read("cards", &Int64Array::from(vec![card]), None, None)
        .unwrap();
    (f.values[[0, 0]], f.values[[0, 1]], f.values[[0, 2]])
}

#[test]
fn null_keys_are_rejected_and_counted_good_rows_kept() {
    let e = engine();
    let b = batch(vec![
        (
            "card",
            Arc::new(Int64Array::from(vec![Some(1), None, Some(1)])) as _,
        ),
        (
            "ts",
            Arc::new(Int64Array::from(vec![1000, 1001, 1002])) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![1.0, 2.0, 4.0])) as _,
        ),
    ]);
    let r = e.push("cards", &b).unwrap();
    assert_eq!((r.accepted, r.late, r.rejected), (2, 0, 1));
    assert_eq!(r.rejections[0].reason, RejectReason::NullKey);
    assert_eq!(
        r.rejections[0].message,
        "row 1: key column \"card\" is null"
    );
    assert_eq!(r.rejected_rows, vec![(1, RejectReason::NullKey)]);
    assert_eq!(read(&e, 1), (2.0, 5.0, 2.0));
    assert_eq!(
        e.metrics("cards")
            .unwrap()
            .counters
            .rejected(RejectReason::NullKey),
        1
    );
}

#[test]
fn null_and_unparsable_times_are_rejected_with_the_value() {
    let e = engine();
    let b = batch(vec![
        ("card", Arc::new(Int64Array::from(vec![1, 1, 1, 1])) as _),
        (
            "ts",
            Arc::new(StringArray::from(vec![
                Some("1970-01-01T00:00:01Z"),
                None,
                Some("yesterday"),
                Some("1970-01-01 00:00:01.500"),
            ])) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![1.0, 2.0, 4.0, 8.0])) as _,
        ),
    ]);
    let r = e.push("cards", &b).unwrap();
    assert_eq!((r.accepted, r.rejected), (2, 2));
    assert_eq!(r.rejections[0].reason, RejectReason::NullTime);
    assert_eq!(r.rejections[0].message, "row 1: time column \"ts\" is null");
    assert_eq!(r.rejections[1].reason, RejectReason::BadTime);
    assert!(
        r.rejections[1]
            .message
            .contains("row 2: time column \"ts\": cannot parse \"yesterday\" as a time"),
        "{}",
        r.rejections[1].message
    );
    assert_eq!(read(&e, 1), (2.0, 9.0, 2.0));
    let m = e.metrics("cards").unwrap();
    assert_eq!(
        (
            m.counters.rejected(RejectReason::NullTime),
            m.counters.rejected(RejectReason::BadTime)
        ),
        (1, 1)
    );
}

#[test]
fn out_of_range_times_are_rejected() {
    let e = engine();
    let b = batch(vec![
        ("card", Arc::new(Int64Array::from(vec![1, 1])) as _),
        (
            "ts",
            Arc::new(TimestampSecondArray::from(vec![i64::MAX / 10, 1])) as _,
        ),
        ("amount", Arc::new(Float64Array::from(vec![1.0, 2.0])) as _),
    ]);
    let r = e.push("cards", &b).unwrap();
    assert_eq!((r.accepted, r.rejected), (1, 1));
    assert_eq!(r.rejections[0].reason, RejectReason::BadTime);
    assert!(
        r.rejections[0].message.contains("out of range"),
        "{}",
        r.rejections[0].message
    );
    assert_eq!(read(&e, 1), (1.0, 2.0, 1.0));
}

#[test]
fn late_events_are_counted_and_reported_not_aggregated() {
    let e = engine();
    let b = batch(vec![
        ("card", Arc::new(Int64Array::from(vec![1, 1, 1, 1])) as _),
        // Lateness 1 s: after 5000, 4000 is at the bound (kept), 3999 is late.
        (
            "ts",
            Arc::new(Int64Array::from(vec![5000, 3999, 4000, 5500])) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![1.0, 100.0, 2.0, 4.0])) as _,
        ),
    ]);
    let r = e.push("cards", &b).unwrap();
    assert_eq!((r.accepted, r.late, r.rejected), (3, 1, 0));
    assert_eq!(r.late_rows, vec![1]);
    assert_eq!(read(&e, 1), (3.0, 7.0, 3.0));
    assert_eq!(e.metrics("cards").unwrap().counters.late, 1);
    assert_eq!(e.metrics("cards").unwrap().watermark, Some(4500));
}

#[test]
fn null_and_nan_values_are_skipped_and_counted() {
    let e = engine();
    let b = batch(vec![
        ("card", Arc::new(Int64Array::from(vec![1, 1, 1])) as _),
        (
            "ts",
            Arc::new(Int64Array::from(vec![1000, 1001, 1002])) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![Some(1.0), None, Some(f64::NAN)])) as _,
        ),
    ]);
    let r = e.push("cards", &b).unwrap();
    assert_eq!(r.accepted, 3, "null / NaN values do not reject the event");
    assert_eq!(
        read(&e, 1),
        (3.0, 1.0, 1.0),
        "rows 3, sum skips null and NaN, count(amount) 1"
    );
    let m = e.metrics("cards").unwrap();
    assert_eq!((m.counters.null_values, m.counters.nan_values), (1, 1));
}

#[test]
fn schema_errors_name_the_column_and_count_the_rows() {
    let e = engine();
    let good = || {
        batch(vec![
            ("card", Arc::new(Int64Array::from(vec![1])) as _),
            ("ts", Arc::new(Int64Array::from(vec![1000])) as _),
            ("amount", Arc::new(Float64Array::from(vec![1.0])) as _),
        ])
    };
    let cases: Vec<(RecordBatch, &str)> = vec![
        (
            batch(vec![
                ("card", Arc::new(Float64Array::from(vec![1.0, 2.0])) as _),
                ("ts", Arc::new(Int64Array::from(vec![1000, 1000])) as _),
                ("amount", Arc::new(Float64Array::from(vec![1.0, 1.0])) as _),
            ]),
            "view \"cards\": column \"card\": key column has type Float64; a key column must be Utf8",
        ),
        (
            batch(vec![
                ("card", Arc::new(Int64Array::from(vec![1, 2])) as _),
                ("ts", Arc::new(Int64Array::from(vec![1000, 1000])) as _),
                ("amount", Arc::new(StringArray::from(vec!["1", "x"])) as _),
            ]),
            "view \"cards\": column \"amount\": value column has type Utf8; feature \"amount_sum_10s\" (sum) takes numbers",
        ),
        (
            batch(vec![
                ("card", Arc::new(Int64Array::from(vec![1, 2])) as _),
                (
                    "ts",
                    Arc::new(Float64Array::from(vec![1000.0, 1000.0])) as _,
                ),
                ("amount", Arc::new(Float64Array::from(vec![1.0, 1.0])) as _),
            ]),
            "view \"cards\": column \"ts\": time column has type Float64; a time column must be Timestamp",
        ),
        (
            batch(vec![
                ("card", Arc::new(Int64Array::from(vec![1, 2])) as _),
                ("ts", Arc::new(Int64Array::from(vec![1000, 1000])) as _),
            ]),
            "view \"cards\": column \"amount\": the value column is missing; the batch has columns [card, ts]",
        ),
    ];
    for (i, (b, msg)) in cases.iter().enumerate() {
        let err = e.push("cards", b).unwrap_err();
        assert!(matches!(err, PanesError::Schema { .. }), "{err:?}");
        assert!(err.to_string().starts_with(msg), "{err}");
        let m = e.metrics("cards").unwrap();
        assert_eq!(
            m.counters.rejected(RejectReason::Schema),
            2 * (i as u64 + 1)
        );
        // The engine keeps working.
        e.push("cards", &good()).unwrap();
    }
    assert_eq!(read(&e, 1), (4.0, 4.0, 4.0));
}

#[test]
fn request_errors_are_clear() {
    let e = engine();
    let keys = Int64Array::from(vec![1]);
    let err = e.read("cards ", &keys, None, None).unwrap_err().to_string();
    assert_eq!(err, "unknown view \"cards \"; the views are: cards");
    let err = e
        .read("cards", &keys, None, Some(&["rows_1h"]))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "view \"cards\" has no feature \"rows_1h\"; its features are: rows_10s, amount_sum_10s, amount_count_10s"
    );
    let err = e
        .read("cards", &Float64Array::from(vec![1.0]), None, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("keys has type Float64; a key column must be"),
        "{err}"
    );
    // Keys of the other kind can never match: an error, not a row of empty values.
    e.push(
        "cards",
        &batch(vec![
            ("card", Arc::new(Int64Array::from(vec![1])) as _),
            ("ts", Arc::new(Int64Array::from(vec![1_000])) as _),
            ("amount", Arc::new(Float64Array::from(vec![1.0])) as _),
        ]),
    )
    .unwrap();
    let err = e
        .read("cards", &StringArray::from(vec!["1"]), None, None)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "view \"cards\" has integer keys; the keys given are Utf8, which can never match"
    );
    let err = e
        .read("cards", &Float64Array::from(vec![1.0]), None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("a key column must be"), "{err}");
    assert_eq!(
        "fpga".parse::<BackendKind>().unwrap_err().to_string(),
        "unknown backend \"fpga\"; expected one of scalar, cpu, gpu, auto"
    );
    // Asking for the GPU where there is none is an error, not a silent CPU run. (Where
    // a GPU exists, the backend tests cover it.)
    let file = FeatureFile::parse(FEATURES, "x").unwrap();
    match Engine::new(
        &file,
        EngineOptions {
            backend: Some(BackendKind::Gpu),
            ..Default::default()
        },
    ) {
        Ok(e) => assert_eq!(e.backend().kind(), BackendKind::Gpu),
        Err(e) => {
            let err = e.to_string();
            assert!(
                err.contains("GPU") && err.contains("use the cpu backend"),
                "{err}"
            );
        }
    }
}

#[test]
fn past_reads_that_panes_cannot_answer_are_refused() {
    let e = engine();
    let b = batch(vec![
        ("card", Arc::new(Int64Array::from(vec![1, 1])) as _),
        (
            "ts",
            Arc::new(Int64Array::from(vec![100_000, 100_600])) as _,
        ),
        ("amount", Arc::new(Float64Array::from(vec![1.0, 2.0])) as _),
    ]);
    e.push("cards", &b).unwrap();
    // 100_300 falls inside the pane [100_000, 101_000) that also holds 100_600.
    let err = e
        .read("cards", &Int64Array::from(vec![1]), Some(100_300), None)
        .unwrap_err();
    assert!(matches!(err, PanesError::InexactRead { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot read key 1 exactly as of 100300 ms: the pane or session containing that time also holds later events"), "{err}");
    // Far in the past: the window's panes were recycled.
    let err = e
        .read("cards", &Int64Array::from(vec![1]), Some(50_000), None)
        .unwrap_err();
    assert!(err.to_string().contains("already recycled"), "{err}");
    // Reads at or after the key's latest event are exact; 10 s later the window is empty.
    let f = e
        .read("cards", &Int64Array::from(vec![1, 2]), Some(109_999), None)
        .unwrap();
    assert_eq!(f.values.row(0).to_vec(), vec![2.0, 3.0, 2.0]);
    assert_eq!(
        f.values.row(1).to_vec(),
        vec![0.0, 0.0, 0.0],
        "unknown keys read as empty windows"
    );
    let f = e
        .read("cards", &Int64Array::from(vec![1]), Some(110_000), None)
        .unwrap();
    assert_eq!(f.values.row(0).to_vec(), vec![0.0, 0.0, 0.0]);
}
