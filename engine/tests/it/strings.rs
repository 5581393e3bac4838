//! String values: `first`, `last`, `last_n` and `top_k` of a string column return
//! strings (Utf8 and List<Utf8> columns), through checkpoints and backfill, and a
//! column keeps the kind of value its first batch gave it.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::DataType;
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile, PanesError};

const FILE: &str = r#"
[[views]]
name = "clicks"
key = "user"
time = "ts"
allowed_lateness = "10s"

[[views.features]]
name = "first_category"
agg = "first"
column = "category"
window = "1h"
hop = "1m"

[[views.features]]
name = "last_category"
agg = "last"
column = "category"
window = "lifetime"

[[views.features]]
name = "recent_categories"
agg = "last_n"
column = "category"
n = 3
window = "lifetime"

[[views.features]]
name = "top_categories"
agg = "top_k"
column = "category"
k = 2
window = "lifetime"

[[views.features]]
name = "categories"
agg = "count"
column = "category"
window = "lifetime"

[[views.features]]
name = "amount_sum"
agg = "sum"
column = "amount"
window = "lifetime"
"#;

fn engine(backend: BackendKind) -> Engine {
    let file = FeatureFile::parse(FILE, "strings").unwrap();
    let options = EngineOptions {
        backend: Some(backend),
        batch_rows: 3,
        ..Default::default()
    };
    Engine::new(&file, options).unwrap()
}

fn clicks(rows: &[(i64, i64, Option<&str>)]) -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "user",
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))) as _,
        ),
        (
            "category",
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.1 as f64),
            )) as _,
        ),
    ])
    .unwrap()
}

/// The rows of user 1 and 2: ties on time, a null, the empty string.
fn stream() -> Vec<(i64, i64, Option<&'static str>)> {
    vec![
        (1, 5_000, Some("shoes")),
        (1, 1_000, Some("books")),
        (2, 2_000, Some("")),
        (1, 1_000, Some("toys")),
        (1, 9_000, None),
        (1, 7_000, Some("books")),
        (1, 8_000, Some("toys")),
        (2, 3_000, Some("é")),
        (1, 8_000, Some("garden")),
    ]
}

fn strings(a: &ArrayRef) -> Vec<Option<String>> {
    a.as_string::<i32>()
        .iter()
        .map(|s| s.map(str::to_string))
        .collect()
}

fn lists(a: &ArrayRef) -> Vec<Vec<String>> {
    let l = a.as_list::<i32>();
    (0..l.len())
        .map(|r| {
            let v = l.value(r);
            v.as_string::<i32>()
                .iter()
                .map(|s| s.unwrap().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn string_features_return_strings_on_every_backend() {
    let mut backends = vec![BackendKind::Scalar, BackendKind::Cpu];
    if panes_engine::BackendKind::Gpu.create().is_ok() {
        // last_n and top_k run on the CPU; `auto` takes such a view.
        backends.push(BackendKind::Auto);
    }
    for backend in backends {
        let e = engine(backend);
        e.push("clicks", &clicks(&stream())).unwrap();
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let (b, _) = e.read_batch("clicks", &keys, Some(10_000), None).unwrap();
        let types: Vec<DataType> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        assert_eq!(types[1], DataType::Utf8, "{backend}");
        assert_eq!(types[2], DataType::Utf8);
        assert!(matches!(&types[3], DataType::List(f) if f.data_type() == &DataType::Utf8));
        assert!(matches!(&types[4], DataType::List(f) if f.data_type() == &DataType::Utf8));
        assert_eq!(types[5], DataType::Int64);
        assert_eq!(types[6], DataType::Float64);
        // First: smallest time, ties to the first to arrive ("books" before "toys").
        assert_eq!(
            strings(b.column(1)),
            [Some("books".into()), Some("".into()), None],
            "{backend}"
        );
        // Last: greatest time, ties to the last to arrive; the null is skipped.
        assert_eq!(
            strings(b.column(2)),
            [Some("garden".into()), Some("é".into()), None]
        );
        assert_eq!(
            lists(b.column(3)),
            [vec!["garden", "toys", "books"], vec!["é", ""], vec![]]
        );
        // books and toys twice; then shoes and garden once (ties: smaller string).
        assert_eq!(
            lists(b.column(4)),
            [vec!["books", "toys"], vec!["", "é"], vec![]]
        );
        assert_eq!(
            b.column(5)
                .as_primitive::<arrow_array::types::Int64Type>()
                .values(),
            &[6, 2, 0]
        );
        let text = e.text_features("clicks").unwrap();
        assert_eq!(text, [true, true, true, true, false, false]);
        // The string table is part of the state's bytes.
        let before = e.metrics("clicks").unwrap().state_bytes;
        let long: Vec<String> = (0..100).map(|i| format!("{i:0>1000}")).collect();
        let rows: Vec<(i64, i64, Option<&str>)> =
            long.iter().map(|s| (3, 9_000, Some(s.as_str()))).collect();
        e.push("clicks", &clicks(&rows)).unwrap();
        e.read_batch("clicks", &keys, None, None).unwrap();
        let after = e.metrics("clicks").unwrap().state_bytes;
        assert!(after >= before + 2 * 100_000, "{before} -> {after}");
    }
}

#[test]
fn strings_survive_a_checkpoint() {
    let rows = stream();
    let whole = engine(BackendKind::Cpu);
    whole.push("clicks", &clicks(&rows)).unwrap();
    let first = engine(BackendKind::Cpu);
    first.push("clicks", &clicks(&rows[..5])).unwrap();
    let bytes = first.checkpoint("clicks", &[]).unwrap();
    let restored = engine(BackendKind::Cpu);
    restored.restore("clicks", &bytes).unwrap();
    restored.push("clicks", &clicks(&rows[5..])).unwrap();
    let keys: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
    let read = |e: &Engine| e.read_batch("clicks", &keys, Some(10_000), None).unwrap().0;
    assert_eq!(read(&restored), read(&whole));
    // A column that held strings before the checkpoint takes no numbers after it.
    let numbers = RecordBatch::try_from_iter([
        ("user", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("ts", Arc::new(Int64Array::from(vec![9_500])) as _),
        ("category", Arc::new(Float64Array::from(vec![1.0])) as _),
        ("amount", Arc::new(Float64Array::from(vec![1.0])) as _),
    ])
    .unwrap();
    let err = restored.push("clicks", &numbers).unwrap_err();
    assert!(matches!(err, PanesError::Schema { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("column \"category\"")
            && msg.contains("earlier batches gave this column strings; this one gives numbers"),
        "{msg}"
    );
}

#[test]
fn a_column_of_numbers_stays_numbers_and_numeric_features_refuse_strings() {
    let e = engine(BackendKind::Cpu);
    let numbers = RecordBatch::try_from_iter([
        ("user", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("ts", Arc::new(Int64Array::from(vec![1_000])) as _),
        ("category", Arc::new(Int64Array::from(vec![7])) as _),
        ("amount", Arc::new(Float64Array::from(vec![1.0])) as _),
    ])
    .unwrap();
    e.push("clicks", &numbers).unwrap();
    let keys: ArrayRef = Arc::new(Int64Array::from(vec![1]));
    e.read_batch("clicks", &keys, None, None).unwrap();
    assert_eq!(
        e.text_features("clicks").unwrap(),
        [false; 6],
        "numbers stay numbers"
    );
    let err = e
        .push("clicks", &clicks(&stream()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gave this column numbers; this one gives strings"),
        "{err}"
    );
    // The sum's column as strings names the feature that needs numbers.
    let e = engine(BackendKind::Cpu);
    let text_amounts = RecordBatch::try_from_iter([
        ("user", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("ts", Arc::new(Int64Array::from(vec![1_000])) as _),
        ("category", Arc::new(StringArray::from(vec!["a"])) as _),
        ("amount", Arc::new(StringArray::from(vec!["12.5"])) as _),
    ])
    .unwrap();
    let err = e.push("clicks", &text_amounts).unwrap_err().to_string();
    assert!(
        err.contains("column \"amount\"")
            && err.contains("feature \"amount_sum\" (sum) takes numbers"),
        "{err}"
    );
    // A rejected batch fixes no column's kind.
    assert_eq!(e.text_features("clicks").unwrap(), [false; 6]);
    e.push("clicks", &clicks(&stream())).unwrap();
    let keys: ArrayRef = Arc::new(Int64Array::from(vec![1]));
    e.read_batch("clicks", &keys, None, None).unwrap(); // publishes
    assert!(e.text_features("clicks").unwrap()[0]);
}

/// A column of nulls only (a batch whose string field was null in every message, a
/// column of `None`s typed `Null`, `Float64` or `Utf8`) has no kind: it neither fixes
/// the column's kind nor contradicts it, and its rows count as null values.
#[test]
fn a_column_of_nulls_only_has_no_kind() {
    use arrow_array::NullArray;
    let e = engine(BackendKind::Cpu);
    let nulls = |category: ArrayRef, amount: ArrayRef| {
        RecordBatch::try_from_iter([
            ("user", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            ("ts", Arc::new(Int64Array::from(vec![500, 600])) as _),
            ("category", category),
            ("amount", amount),
        ])
        .unwrap()
    };
    let f64_nulls: ArrayRef = Arc::new(Float64Array::from(vec![None, None]));
    let str_nulls: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>, None]));
    let null_type: ArrayRef = Arc::new(NullArray::new(2));
    // Before any kind: nulls typed as numbers, then as the Null type.
    e.push("clicks", &nulls(f64_nulls.clone(), f64_nulls.clone()))
        .unwrap();
    e.push("clicks", &nulls(null_type.clone(), null_type.clone()))
        .unwrap();
    // Strings for the category, and strings of nulls for the numeric amount.
    e.push("clicks", &clicks(&stream())).unwrap();
    e.push("clicks", &nulls(f64_nulls, str_nulls.clone()))
        .unwrap();
    e.push("clicks", &nulls(str_nulls, null_type)).unwrap();
    let keys: ArrayRef = Arc::new(Int64Array::from(vec![1, 2]));
    let (batch, _) = e.read_batch("clicks", &keys, None, None).unwrap();
    assert_eq!(
        e.text_features("clicks").unwrap(),
        [true, true, true, true, false, false]
    );
    assert_eq!(
        strings(batch.column_by_name("last_category").unwrap()),
        [Some("garden".to_string()), Some("é".to_string())]
    );
    let m = e.metrics("clicks").unwrap();
    // Two null rows per all-null batch and column read, four batches, two columns,
    // plus the stream's own null category.
    assert_eq!(m.counters.null_values, 4 * 2 * 2 + 1);
    assert_eq!(m.counters.accepted, 4 * 2 + stream().len() as u64);
}

/// A view's string table is charged to the state budget (both replicas' copies): rows
/// whose new strings the budget cannot pay for are refused as `key_limit`, rows of
/// known strings are taken, a restore charges the restored table and dropping the
/// engine gives it all back.
#[test]
fn the_string_table_is_charged_to_the_state_budget() {
    use panes_engine::{RejectReason, StateBudget};
    let file = FeatureFile::parse(FILE, "strings").unwrap();
    let with = |budget: &Arc<StateBudget>| {
        let options = EngineOptions {
            backend: Some(BackendKind::Cpu),
            state_budget: Some(budget.clone()),
            ..Default::default()
        };
        Engine::new(&file, options).unwrap()
    };
    let long = |i: usize| format!("{i:04}{}", "x".repeat(996));
    let rows = |n: usize| -> Vec<(i64, i64, Option<String>)> {
        (0..n)
            .map(|i| (1, 1_000 + i as i64, Some(long(i))))
            .collect()
    };
    let batch = |rows: &[(i64, i64, Option<String>)]| {
        let r: Vec<(i64, i64, Option<&str>)> =
            rows.iter().map(|r| (r.0, r.1, r.2.as_deref())).collect();
        clicks(&r)
    };
    // What one key costs, then ten strings of 1 000 bytes.
    let budget = Arc::new(StateBudget::new(u64::MAX / 2));
    let e = with(&budget);
    e.push("clicks", &batch(&[(1, 500, None)])).unwrap();
    let key = budget.used();
    e.push("clicks", &batch(&rows(10))).unwrap();
    let ten = budget.used() - key;
    assert!(
        (2 * 10_000..2 * 11_000).contains(&ten),
        "ten strings of 1000 bytes, twice: {ten}"
    );
    drop(e);
    assert_eq!(budget.used(), 0);

    // Room for the key and about half the strings: the rest are refused, a row of a
    // known string after them is taken.
    let budget = Arc::new(StateBudget::new(key + ten / 2));
    let e = with(&budget);
    let mut stream = rows(10);
    stream.insert(0, (1, 500, None));
    stream.push((1, 5_000, Some(long(0))));
    let r = e.push("clicks", &batch(&stream)).unwrap();
    assert_eq!(
        (r.accepted, r.rejected),
        (1 + 5 + 1, 5),
        "{:?}",
        r.rejections
    );
    assert!(
        r.rejected_rows
            .iter()
            .all(|&(_, why)| why == RejectReason::KeyLimit)
    );
    let why = &r.rejections[0].message;
    assert!(
        why.contains("row 6: a new string value") && why.contains("bytes of new strings"),
        "{why}"
    );
    let used = budget.used();
    assert_eq!(used, key + ten / 2, "the budget is spent");

    // A restore charges the restored table in place of the old charge.
    let ckpt = e.checkpoint("clicks", &[]).unwrap();
    e.restore("clicks", &ckpt).unwrap();
    assert_eq!(budget.used(), used);
    drop(e);
    assert_eq!(budget.used(), 0);
}
