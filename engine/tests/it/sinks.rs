//! Sinks (`[[sinks]]`): Parquet snapshots read back equal the reads at their times; the
//! files of changed keys, applied in order, end at the final read; a sink stopped as a
//! crash would stop it leaves no gap after a restart from a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use panes_engine::sinks::Sinks;
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::{Rng, SeedableRng, rngs::StdRng};

fn features(all: &Path, changes: &Path, interval: &str) -> String {
    format!(
        r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"
allowed_lateness = "2s"

[[views.features]]
name = "n_1m"
agg = "count"
window = "1m"

[[views.features]]
name = "amount_sum_1m"
agg = "sum"
column = "amount"
window = "1m"

[[views.features]]
name = "amount_max_10m"
agg = "max"
column = "amount"
window = "10m"
hop = "10s"

[[views.features]]
name = "amount_last_3"
agg = "last_n"
n = 3
column = "amount"
window = "1h"

[[sinks]]
name = "all"
view = "cards"
kind = "parquet"
path = {all:?}
interval = "{interval}"

[[sinks]]
name = "changes"
view = "cards"
kind = "parquet"
path = {changes:?}
interval = "{interval}"
changed_only = true
"#
    )
}

/// `n` events of keys `0..keys` from time `t0`, `step` ms apart.
fn batch(rng: &mut StdRng, n: usize, keys: i64, t0: i64, step: i64) -> RecordBatch {
    let card: Vec<i64> = (0..n).map(|_| rng.random_range(0..keys)).collect();
    let ts: Vec<i64> = (0..n).map(|i| t0 + i as i64 * step).collect();
    let amount: Vec<Option<f64>> = (0..n)
        .map(|_| {
            rng.random_bool(0.95)
                .then(|| rng.random_range(-50.0..500.0))
        })
        .collect();
    RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(card)) as ArrayRef),
        ("ts", Arc::new(Int64Array::from(ts)) as ArrayRef),
        ("amount", Arc::new(Float64Array::from(amount)) as ArrayRef),
    ])
    .unwrap()
}

/// A Parquet file of a sink: its rows, and its key-value metadata.
struct File {
    path: PathBuf,
    batch: RecordBatch,
    meta: HashMap<String, String>,
}

/// Every `.parquet` file under `dir`, oldest written first (by the name's written time,
/// then publish count).
fn files(dir: &Path) -> Vec<File> {
    let mut paths = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                paths.push(p);
            }
        }
    }
    let order = |p: &PathBuf| -> (i64, i64) {
        let stem = p.file_stem().unwrap().to_str().unwrap();
        let parts: Vec<i64> = stem.rsplitn(3, '-').map(|s| s.parse().unwrap()).collect();
        (parts[1], parts[0])
    };
    paths.sort_by_key(order);
    paths
        .into_iter()
        .map(|path| {
            let builder =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                    .unwrap();
            let meta = builder
                .metadata()
                .file_metadata()
                .key_value_metadata()
                .unwrap()
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
                .collect();
            let schema = builder.schema().clone();
            let batches: Vec<RecordBatch> = builder.build().unwrap().map(Result::unwrap).collect();
            let batch = arrow_select::concat::concat_batches(&schema, &batches).unwrap();
            File { path, batch, meta }
        })
        .collect()
}

/// Per key: its feature cells (every column but the key and `at_ms`).
fn rows(batch: &RecordBatch) -> HashMap<i64, Vec<ArrayRef>> {
    let keys = batch.column(0).as_primitive::<Int64Type>();
    let features: Vec<usize> = (1..batch.num_columns())
        .filter(|&c| batch.schema().field(c).name() != "at_ms")
        .collect();
    (0..batch.num_rows())
        .map(|r| {
            let cells = features
                .iter()
                .map(|&c| batch.column(c).slice(r, 1))
                .collect();
            (keys.value(r), cells)
        })
        .collect()
}

/// Waits for the first file under `dir` written at publish count `version` or later.
fn wait_file(dir: &Path, version: u64) -> File {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(f) = files(dir)
            .into_iter()
            .find(|f| f.meta["panes.state_version"].parse::<u64>().unwrap() >= version)
        {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "no file of version {version} in {dir:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every key's vector after applying the files of changed keys in order.
fn applied(files: &[File]) -> HashMap<i64, Vec<ArrayRef>> {
    let mut out = HashMap::new();
    for f in files {
        out.extend(rows(&f.batch));
    }
    out
}

#[test]
fn r24_parquet_snapshots_equal_reads_and_a_restart_leaves_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (all, changes) = (dir.path().join("all"), dir.path().join("changes"));
    let file = FeatureFile::parse(&features(&all, &changes, "20ms"), "sinks test").unwrap();
    let options = || EngineOptions {
        backend: Some(BackendKind::Cpu),
        batch_rows: 1_000,
        ..EngineOptions::default()
    };
    let engine = Arc::new(Engine::new(&file, options()).unwrap());
    let sinks = Sinks::start(&engine, &file.sinks).unwrap();
    let mut rng = StdRng::seed_from_u64(24);

    // Each snapshot equals a read of the same published state. The last push changes
    // 20 keys only (at the time the others' windows were read at).
    for i in 0..4 {
        let b = match i {
            3 => batch(&mut rng, 100, 20, 1_000_000 + 2 * 30_000 + 2_999 * 7 + 1, 0),
            _ => batch(&mut rng, 3_000, 400, 1_000_000 + i * 30_000, 7),
        };
        engine.push("cards", &b).unwrap();
        engine.flush().unwrap();
        let version = engine.published("cards").unwrap();
        let snapshot = wait_file(&all, version);
        let (read, at) = engine.read_all("cards", None, None).unwrap();
        assert_eq!(
            engine.published("cards").unwrap(),
            version,
            "nothing else was published"
        );
        assert_eq!(
            snapshot.meta["panes.at_ms"],
            at.to_string(),
            "{:?}",
            snapshot.path
        );
        assert_eq!(snapshot.meta["panes.rows"], "every_key");
        let at_ms = snapshot
            .batch
            .column_by_name("at_ms")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert!(at_ms.iter().all(|v| v == Some(at)));
        assert_eq!(snapshot.batch.num_rows(), read.num_rows());
        assert!(
            rows(&snapshot.batch) == rows(&read),
            "snapshot {i} differs from the read"
        );
        // The files of changed keys, applied in order, give the same vectors.
        wait_file(&changes, version);
        assert!(
            applied(&files(&changes)) == rows(&read),
            "changes up to {i}"
        );
    }
    let last = files(&changes).pop().unwrap();
    assert_eq!(last.meta["panes.rows"], "changed");
    assert!(
        (1..=20).contains(&last.batch.num_rows()),
        "the last file holds only the keys that changed: {}",
        last.batch.num_rows()
    );
    sinks.stop();

    // A restart between two writes: the first sinks stop as a crash stops them (no
    // final write) after two more publishes; a second engine restored from the
    // checkpoint, with new sinks, writes every key first.
    let quiet = FeatureFile::parse(&features(&all, &changes, "1h"), "sinks test").unwrap();
    let sinks = Sinks::start(&engine, &quiet.sinks).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let before = files(&changes).len();
    for i in 4..6 {
        engine
            .push(
                "cards",
                &batch(&mut rng, 3_000, 400, 1_000_000 + i * 30_000, 7),
            )
            .unwrap();
        engine.flush().unwrap();
    }
    let checkpoint = engine.checkpoint("cards", &[]).unwrap();
    drop(sinks);
    assert_eq!(
        files(&changes).len(),
        before,
        "the stopped sinks wrote nothing more"
    );
    let (final_read, _) = engine.read_all("cards", None, None).unwrap();
    assert!(
        applied(&files(&changes)) != rows(&final_read),
        "the last publishes were not written before the crash"
    );
    let restarted = Arc::new(Engine::new(&file, options()).unwrap());
    restarted.restore("cards", &checkpoint).unwrap();
    let sinks = Sinks::start(&restarted, &file.sinks).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while files(&changes).len() == before {
        assert!(
            Instant::now() < deadline,
            "the restarted sink wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = files(&changes).into_iter().nth(before).unwrap();
    assert_eq!(first.meta["panes.rows"], "every_key", "{:?}", first.path);
    assert!(
        applied(&files(&changes)) == rows(&final_read),
        "after the restart, the files end at the final read"
    );
    sinks.stop();
}

#[test]
fn r24_bad_sinks_are_spec_errors_naming_the_field() {
    let base = features(Path::new("/x"), Path::new("/y"), "1s");
    for (extra, field, needle) in [
        (
            "[[sinks]]\nname = \"a\"\nview = \"nope\"\nkind = \"parquet\"\npath = \"/z\"\n",
            "view",
            "unknown view",
        ),
        (
            "[[sinks]]\nname = \"a\"\nview = \"cards\"\nkind = \"csv\"\n",
            "kind",
            "unknown sink kind",
        ),
        (
            "[[sinks]]\nname = \"a\"\nview = \"cards\"\nkind = \"parquet\"\n",
            "path",
            "is required",
        ),
        (
            "[[sinks]]\nname = \"a\"\nview = \"cards\"\nkind = \"parquet\"\npath = \"/z\"\ninterval = \"1ms\"\n",
            "interval",
            "the least",
        ),
        (
            "[[sinks]]\nname = \"a\"\nview = \"cards\"\nkind = \"kafka\"\nbrokers = \"b\"\n",
            "topic",
            "is required",
        ),
        (
            "[[sinks]]\nname = \"a\"\nview = \"cards\"\nkind = \"kafka\"\nbrokers = \"b\"\ntopic = \"t\"\npath = \"/z\"\n",
            "path",
            "does not apply",
        ),
        (
            "[[sinks]]\nname = \"a\"\nview = \"cards\"\nkind = \"parquet\"\npath = \"/z\"\nfeatures = [\"nope\"]\n",
            "features",
            "no feature",
        ),
        (
            "[[sinks]]\nname = \"all\"\nview = \"cards\"\nkind = \"parquet\"\npath = \"/z\"\n",
            "name",
            "duplicate",
        ),
    ] {
        let text = format!("{base}\n{extra}");
        let e = FeatureFile::parse(&text, "bad sink")
            .unwrap_err()
            .to_string();
        assert!(e.contains(field) && e.contains(needle), "{field}: {e}");
    }
    // Every field survives a round trip through TOML.
    let file = FeatureFile::parse(&base, "sinks").unwrap();
    assert_eq!(FeatureFile::parse(&file.to_toml(), "again").unwrap(), file);
    assert_eq!(file.sinks.len(), 2);
}
