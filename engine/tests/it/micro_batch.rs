//! Micro-batching by rows and by age, and read consistency under concurrent pushes.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Float64Array, Int64Array, RecordBatch};
use panes_engine::{Engine, EngineOptions, FeatureFile};

const FEATURES: &str = r#"
[[views]]
name = "v"
key = "k"
time = "ts"
[[views.features]]
name = "n"
agg = "count"
window = "lifetime"
[[views.features]]
name = "s"
agg = "sum"
column = "x"
window = "lifetime"
"#;

fn batch(start: i64, rows: i64) -> RecordBatch {
    RecordBatch::try_from_iter([
        ("k", Arc::new(Int64Array::from(vec![1; rows as usize])) as _),
        (
            "ts",
            Arc::new(Int64Array::from_iter_values(start..start + rows)) as _,
        ),
        (
            "x",
            Arc::new(Float64Array::from(vec![1.0; rows as usize])) as _,
        ),
    ])
    .unwrap()
}

fn engine(batch_rows: usize, batch_age: Duration) -> Engine {
    let file = FeatureFile::parse(FEATURES, "micro_batch").unwrap();
    Engine::new(
        &file,
        EngineOptions {
            batch_rows,
            batch_age,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn pushes_coalesce_until_rows_or_age() {
    let e = engine(100, Duration::from_secs(3600));
    e.push("v", &batch(0, 60)).unwrap();
    assert_eq!(
        e.metrics("v").unwrap().pending,
        60,
        "below the row target: pending"
    );
    e.push("v", &batch(60, 60)).unwrap();
    assert_eq!(
        e.metrics("v").unwrap().pending,
        0,
        "row target reached: folded"
    );

    let e = engine(1_000_000, Duration::from_millis(20));
    e.push("v", &batch(0, 10)).unwrap();
    assert_eq!(e.metrics("v").unwrap().pending, 10);
    std::thread::sleep(Duration::from_millis(30));
    e.push("v", &batch(10, 1)).unwrap();
    assert_eq!(
        e.metrics("v").unwrap().pending,
        0,
        "oldest pending event older than the age: folded"
    );

    // A read folds pending events first: it sees every event pushed before it.
    let e = engine(1_000_000, Duration::from_secs(3600));
    e.push("v", &batch(0, 10)).unwrap();
    let f = e.read("v", &Int64Array::from(vec![1]), None, None).unwrap();
    assert_eq!(f.values[[0, 0]], 10.0);
    assert_eq!(e.metrics("v").unwrap().pending, 0);
    e.push("v", &batch(10, 5)).unwrap();
    e.flush().unwrap();
    assert_eq!(e.metrics("v").unwrap().pending, 0);
}

#[test]
fn reads_never_see_part_of_a_micro_batch() {
    const ROWS: i64 = 5_000;
    let e = Arc::new(engine(ROWS as usize, Duration::from_secs(3600)));
    let writer = {
        let e = e.clone();
        std::thread::spawn(move || {
            for b in 0..200 {
                e.push("v", &batch(b * ROWS, ROWS)).unwrap();
            }
        })
    };
    let keys = Int64Array::from(vec![1]);
    let mut seen = 0;
    while !writer.is_finished() {
        let f = e.read("v", &keys, None, None).unwrap();
        let (n, s) = (f.values[[0, 0]], f.values[[0, 1]]);
        assert_eq!(
            n % ROWS as f64,
            0.0,
            "a read saw {n} events: part of a micro-batch"
        );
        assert_eq!(n, s, "count and sum come from the same snapshot");
        assert!(n >= seen as f64, "reads move forward");
        seen = n as i64;
    }
    writer.join().unwrap();
    let f = e.read("v", &keys, None, None).unwrap();
    assert_eq!(f.values[[0, 0]], 200.0 * ROWS as f64);
}

/// A batch larger than a micro-batch is taken in slices: the same report (row numbers
/// of the whole batch), counters and features as when it fits in one.
#[test]
fn large_pushes_are_sliced_with_whole_batch_row_numbers() {
    let rows = 1_000usize;
    let ts: Vec<Option<i64>> = (0..rows as i64)
        .map(|i| match i {
            _ if i % 97 == 13 => None,   // null time
            _ if i % 89 == 7 => Some(0), // late once the lateness bound (0) is passed
            _ => Some(i),
        })
        .collect();
    let b = RecordBatch::try_from_iter([
        ("k", Arc::new(Int64Array::from(vec![1; rows])) as _),
        ("ts", Arc::new(Int64Array::from(ts)) as _),
        ("x", Arc::new(Float64Array::from(vec![1.0; rows])) as _),
    ])
    .unwrap();
    let whole = engine(1_000_000, Duration::from_secs(3600));
    let sliced = engine(64, Duration::from_secs(3600));
    let a = whole.push("v", &b).unwrap();
    let s = sliced.push("v", &b).unwrap();
    assert!(a.late > 0 && a.rejected > 0, "{a:?}");
    assert_eq!(a, s, "same report, row numbers of the whole batch");
    assert_eq!(
        whole.metrics("v").unwrap().counters,
        sliced.metrics("v").unwrap().counters
    );
    assert!(
        sliced.metrics("v").unwrap().pending < 64,
        "folded slice by slice"
    );
    let key = Int64Array::from(vec![1]);
    let fa = whole.read("v", &key, None, None).unwrap();
    let fs = sliced.read("v", &key, None, None).unwrap();
    assert_eq!(fa.values, fs.values);
}
