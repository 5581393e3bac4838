//! Backfill through the `panes` command, checked against the naive oracle.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use crate::common::{Ev, accepted, assert_close, feature, scale};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow_schema::DataType;
use panes_engine::offline::io::{read_file, write_file};
use panes_engine::{FeatureFile, Window};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "10s"
allowed_lateness = "2s"

[[views.features]]
name = "rows_1m"
agg = "count"
window = "1m"

[[views.features]]
name = "amount_sum_1m"
agg = "sum"
column = "amount"
window = "1m"

[[views.features]]
name = "amount_mean_10m"
agg = "mean"
column = "amount"
window = "10m"
hop = "1m"

[[views.features]]
name = "amount_max_5m_tumbling"
agg = "max"
column = "amount"
window = "5m"
hop = "5m"

[[views.features]]
name = "amount_min_1h"
agg = "min"
column = "amount"
window = "1h"
hop = "5m"

[[views.features]]
name = "amount_var_1h"
agg = "var"
column = "amount"
window = "1h"
hop = "5m"

[[views.features]]
name = "amount_std_1h"
agg = "std"
column = "amount"
window = "1h"
hop = "5m"

[[views.features]]
name = "amount_last"
agg = "last"
column = "amount"
window = "lifetime"

[[views.features]]
name = "qty_count_lifetime"
agg = "count"
column = "qty"
window = "lifetime"

[[views.features]]
name = "rows_lifetime"
agg = "count"
window = "lifetime"

[[views.features]]
name = "amount_mean_last_20"
agg = "mean"
column = "amount"
window = "20 events"

[[views.features]]
name = "amount_last_session"
agg = "last"
column = "amount"
session_gap = "90s"

[[views.features]]
name = "rows_session"
agg = "count"
session_gap = "90s"
"#;

const BASE: i64 = 1_767_225_600_000;

fn gen_events(rng: &mut StdRng, n: usize, keys: i64) -> Vec<Ev> {
    (0..n)
        .map(|i| {
            let mut ts = BASE + i as i64 * 100;
            match rng.random_range(0..20) {
                0..=3 => ts -= rng.random_range(0..2_500),
                4 => ts -= rng.random_range(0..60_000),
                _ => {}
            }
            let key = (!rng.random_bool(0.001)).then(|| rng.random_range(0..keys));
            let ts = (!rng.random_bool(0.001)).then_some(ts);
            let amount = match rng.random_range(0..50) {
                0 => None,
                1 => Some(f64::NAN),
                _ => Some((rng.random_range(0.0..500.0f64) * 100.0).round() / 100.0),
            };
            let qty = (!rng.random_bool(0.05)).then(|| rng.random_range(1..10) as f64);
            Ev {
                key,
                ts,
                vals: vec![amount, qty],
            }
        })
        .collect()
}

fn key_array(keys: impl Iterator<Item = Option<i64>>, strings: bool) -> ArrayRef {
    if strings {
        Arc::new(StringArray::from(
            keys.map(|k| k.map(|k| format!("c{k}"))).collect::<Vec<_>>(),
        ))
    } else {
        Arc::new(Int64Array::from(keys.collect::<Vec<_>>()))
    }
}

fn events_batch(events: &[Ev], strings: bool, timestamp: bool) -> RecordBatch {
    let ts: Vec<_> = events.iter().map(|e| e.ts).collect();
    let ts: ArrayRef = if timestamp {
        Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC"))
    } else {
        Arc::new(Int64Array::from(ts))
    };
    RecordBatch::try_from_iter([
        ("card", key_array(events.iter().map(|e| e.key), strings)),
        ("ts", ts),
        (
            "amount",
            Arc::new(Float64Array::from(
                events.iter().map(|e| e.vals[0]).collect::<Vec<_>>(),
            )) as _,
        ),
        (
            "qty",
            Arc::new(Int32Array::from(
                events
                    .iter()
                    .map(|e| e.vals[1].map(|q| q as i32))
                    .collect::<Vec<_>>(),
            )) as _,
        ),
    ])
    .unwrap()
}

struct Spine {
    keys: Vec<Option<i64>>,
    at: Vec<Option<i64>>,
}

fn gen_spine(rng: &mut StdRng, rows: usize, keys: i64, end: i64) -> Spine {
    let keys_v = (0..rows)
        .map(|_| (!rng.random_bool(0.001)).then(|| rng.random_range(0..keys + 50)))
        .collect();
    let at = (0..rows)
        .map(|_| (!rng.random_bool(0.001)).then(|| rng.random_range(BASE - 10_000..end + 600_000)))
        .collect();
    Spine { keys: keys_v, at }
}

fn spine_batch(s: &Spine, strings: bool, int32_keys: bool) -> RecordBatch {
    let keys: ArrayRef = if int32_keys {
        Arc::new(Int32Array::from(
            s.keys
                .iter()
                .map(|k| k.map(|k| k as i32))
                .collect::<Vec<_>>(),
        ))
    } else {
        key_array(s.keys.iter().copied(), strings)
    };
    RecordBatch::try_from_iter([
        (
            "label",
            Arc::new(Int64Array::from_iter_values(0..s.keys.len() as i64)) as ArrayRef,
        ),
        ("card", keys),
        (
            "ts",
            Arc::new(TimestampMillisecondArray::from(s.at.clone())) as _,
        ),
    ])
    .unwrap()
}

fn write(path: &Path, b: &RecordBatch) {
    // Several batches, so that readers and backfill see batch boundaries.
    let chunk = 100_000;
    let parts: Vec<_> = (0..b.num_rows())
        .step_by(chunk)
        .map(|s| b.slice(s, chunk.min(b.num_rows() - s)))
        .collect();
    write_file(path, &b.schema(), &parts).unwrap();
}

fn panes(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_panes"))
        .args(args)
        .output()
        .unwrap()
}

/// `panes backfill` of these files on `backend`, with `extra` arguments.
fn backfill_cli(files: [&Path; 4], backend: &str, extra: &[&str]) -> std::process::Output {
    let [features, events, spine, out] = files.map(|p| p.to_str().unwrap());
    let args = [
        "backfill",
        "--features",
        features,
        "--events",
        events,
        "--spine",
        spine,
        "--out",
        out,
        "--backend",
        backend,
    ];
    panes(&[&args[..], extra].concat())
}

/// Runs a backfill through the CLI and checks every output cell against the oracle.
fn check(
    seed: u64,
    events: usize,
    keys: i64,
    spine_rows: usize,
    exts: (&str, &str, &str),
    strings: bool,
    backend: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let evs = gen_events(&mut rng, events, keys);
    let spine = gen_spine(&mut rng, spine_rows, keys, BASE + events as i64 * 100);
    let (ev_path, sp_path, out_path, ft_path, dl_path) = (
        dir.path().join(format!("events.{}", exts.0)),
        dir.path().join(format!("spine.{}", exts.1)),
        dir.path().join(format!("out.{}", exts.2)),
        dir.path().join("features.toml"),
        dir.path().join(format!("dead.{}", exts.2)),
    );
    write(&ev_path, &events_batch(&evs, strings, exts.0 != "csv"));
    write(
        &sp_path,
        &spine_batch(&spine, strings, !strings && seed.is_multiple_of(2)),
    );
    std::fs::write(&ft_path, FEATURES).unwrap();
    let out = backfill_cli(
        [&ft_path, &ev_path, &sp_path, &out_path],
        backend,
        &["--dead-letter", dl_path.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("backfill: {spine_rows} spine rows")),
        "{stderr}"
    );

    let file = FeatureFile::parse(FEATURES, "backfill").unwrap();
    let view = &file.views[0];
    let mut by_key: HashMap<i64, Vec<(usize, Ev)>> = HashMap::new();
    for (i, e) in accepted(view, &evs) {
        by_key.entry(e.key.unwrap()).or_default().push((i, e));
    }
    for v in by_key.values_mut() {
        v.sort_by_key(|(i, e)| (e.ts.unwrap(), *i));
    }
    let accepted = by_key.values().map(Vec::len).sum::<usize>();
    assert!(
        stderr.contains(&format!("{accepted} events accepted")),
        "{stderr}"
    );

    // Every event that was not accepted is in the dead-letter file, with its reason.
    let (_, dead) = read_file(&dl_path).unwrap();
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for b in &dead {
        let r = b.column_by_name("panes_reason").unwrap();
        let r = arrow_cast::cast(r, &DataType::Utf8).unwrap();
        for v in r.as_string::<i32>().iter() {
            *reasons.entry(v.unwrap().to_string()).or_default() += 1;
        }
        assert!(
            b.column_by_name("amount").is_some(),
            "dead letters keep the event's columns"
        );
    }
    assert_eq!(
        reasons.values().sum::<usize>(),
        events - accepted,
        "{reasons:?}"
    );
    let count = |f: &dyn Fn(&Ev) -> bool| evs.iter().filter(|e| f(e)).count();
    assert_eq!(
        reasons.get("null_key").copied().unwrap_or(0),
        count(&|e| e.key.is_none())
    );
    assert_eq!(
        reasons.get("null_time").copied().unwrap_or(0),
        count(&|e| e.key.is_some() && e.ts.is_none())
    );
    assert!(
        reasons
            .keys()
            .all(|r| ["late", "null_key", "null_time"].contains(&r.as_str())),
        "{reasons:?}"
    );

    let (schema, batches) = read_file(&out_path).unwrap();
    let names: Vec<_> = schema.fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names[..3], ["label", "card", "ts"]);
    assert_eq!(
        names[3..].to_vec(),
        view.features
            .iter()
            .map(|f| f.name.clone())
            .collect::<Vec<_>>()
    );
    let out = arrow_select::concat::concat_batches(&schema, &batches).unwrap();
    assert_eq!(out.num_rows(), spine_rows);
    let labels = out.column(0).as_primitive::<Int64Type>();
    let empty = Vec::new();
    for r in 0..spine_rows {
        assert_eq!(
            labels.value(r),
            r as i64,
            "output keeps the spine's row order"
        );
        let key = spine.keys[r];
        for (f, spec) in view.features.iter().enumerate() {
            let col = out.column(3 + f);
            let got = if col.is_null(r) {
                None
            } else if *col.data_type() == DataType::Int64 {
                Some(col.as_primitive::<Int64Type>().value(r) as f64)
            } else {
                Some(col.as_primitive::<Float64Type>().value(r))
            };
            let Some(t) = spine.at[r] else {
                assert_eq!(
                    got, None,
                    "row {r}: a spine row without time gets null features"
                );
                continue;
            };
            let evs = key.and_then(|k| by_key.get(&k)).unwrap_or(&empty);
            let hi = evs.partition_point(|(_, e)| e.ts.unwrap() <= t);
            // A time window's events as a slice (the oracle then keeps them all);
            // count and session windows are chosen by the oracle.
            let lo = match spec.window {
                Window::Duration(w) => {
                    let start = (t.div_euclid(spec.hop) - w / spec.hop + 1) * spec.hop;
                    evs[..hi].partition_point(|(_, e)| e.ts.unwrap() < start)
                }
                _ => 0,
            };
            let column = spec
                .column
                .as_ref()
                .map(|c| if c == "amount" { 0 } else { 1 });
            let k = key.unwrap_or(-1);
            let window = &evs[lo..hi];
            let want = feature(spec, column, window, k, t);
            let sc = scale(spec.agg, spec, column, window, k, t);
            assert_close(spec.agg, got, want, sc, &|| {
                format!(
                    "seed {seed} row {r} key {key:?} at {t} feature {}",
                    spec.name
                )
            });
        }
    }
}

#[test]
fn backfill_1m_events_parquet_100k_spine_matches_oracle() {
    check(
        1,
        1_000_000,
        2_000,
        100_000,
        ("parquet", "parquet", "parquet"),
        false,
        "cpu",
    );
}

#[test]
fn backfill_scalar_backend_matches_oracle() {
    check(
        2,
        100_000,
        300,
        20_000,
        ("parquet", "parquet", "parquet"),
        false,
        "scalar",
    );
}

#[test]
fn backfill_csv_and_arrow_ipc_with_string_keys() {
    check(
        3,
        50_000,
        200,
        10_000,
        ("csv", "arrow", "arrows"),
        true,
        "cpu",
    );
    check(
        4,
        50_000,
        200,
        10_000,
        ("arrows", "csv", "csv"),
        false,
        "cpu",
    );
}

#[test]
fn backfill_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    std::fs::write(p("f.toml"), FEATURES).unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    write(
        Path::new(&p("e.parquet")),
        &events_batch(&gen_events(&mut rng, 100, 5), false, true),
    );
    let spine = gen_spine(&mut rng, 10, 5, BASE);
    write(
        Path::new(&p("s.parquet")),
        &spine_batch(&spine, false, false),
    );

    let run = |args: &[&str]| {
        let o = panes(args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let base = [
        "backfill",
        "--features",
        &p("f.toml"),
        "--events",
        &p("e.parquet"),
        "--spine",
        &p("s.parquet"),
    ];
    let (code, err) = run(&[&base[..], &["--out", &p("o.json")]].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown file extension \"json\""), "{err}");

    let (code, err) = run(&[
        &base[..],
        &["--out", &p("o.parquet"), "--at-column", "when"],
    ]
    .concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the spine has no time column \"when\" (set it with --at-column); its columns are [label, card, ts]"), "{err}");

    // backfill with feature file `f` and events file `e`, the rest as usual.
    let with = |f: &str, e: &str| {
        run(&[
            "backfill",
            "--features",
            &p(f),
            "--events",
            &p(e),
            "--spine",
            &p("s.parquet"),
            "--out",
            &p("o.parquet"),
        ])
    };
    let (code, err) = with("f.toml", "missing.parquet");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing.parquet: No such file"), "{err}");

    // r17: a feature file that is missing, not UTF-8 or endless, and an events file
    // that opens but is not Parquet, are the user's to fix: status 2, with the reason.
    let (code, err) = with("missing.toml", "e.parquet");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("missing.toml: cannot be read"), "{err}");
    std::fs::write(p("latin1.toml"), b"[[views]]\nname = \"caf\xe9\"\n").unwrap();
    let (code, err) = with("latin1.toml", "e.parquet");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("is not UTF-8 text"), "{err}");
    let (code, err) = run(&["check", "/dev/zero"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("/dev/zero: larger than 16777216 bytes"),
        "{err}"
    );
    std::fs::write(p("garbage.parquet"), b"this is not a Parquet file").unwrap();
    let (code, err) = with("f.toml", "garbage.parquet");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("garbage.parquet: not a valid Parquet file"),
        "{err}"
    );

    std::fs::write(
        p("bad.toml"),
        FEATURES.replace("agg = \"std\"", "agg = \"stdev\""),
    )
    .unwrap();
    let (code, err) = with("bad.toml", "e.parquet");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "view \"cards\" feature \"amount_std_1h\", field `agg`: unknown aggregation \"stdev\""
        ),
        "{err}"
    );

    std::fs::write(
        p("collide.toml"),
        FEATURES.replace("name = \"rows_1m\"", "name = \"label\""),
    )
    .unwrap();
    let (code, err) = with("collide.toml", "e.parquet");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("feature \"label\" has the name of a spine column"),
        "{err}"
    );

    let (code, out) = {
        let o = panes(&["check", &p("f.toml")]);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    assert_eq!(code, Some(0));
    assert!(out.contains("amount_std_1h"), "{out}");
}

#[test]
fn backfill_on_the_gpu_equals_the_cpu_on_1m_events() {
    if !common::gpu_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let events = 1_000_000;
    let evs = gen_events(&mut rng, events, 5_000);
    let spine = gen_spine(&mut rng, 3_000, 5_000, BASE + events as i64 * 100);
    let ev_path = dir.path().join("events.parquet");
    let sp_path = dir.path().join("spine.parquet");
    let ft_path = dir.path().join("features.toml");
    write(&ev_path, &events_batch(&evs, false, true));
    write(&sp_path, &spine_batch(&spine, false, false));
    std::fs::write(&ft_path, FEATURES).unwrap();
    let mut outputs = Vec::new();
    for backend in ["cpu", "gpu"] {
        let out_path = dir.path().join(format!("out-{backend}.arrow"));
        let out = backfill_cli([&ft_path, &ev_path, &sp_path, &out_path], backend, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{backend}: {stderr}");
        assert!(stderr.contains(&format!("({backend} backend")), "{stderr}");
        let (_, batches) = read_file(&out_path).unwrap();
        outputs.push(arrow_select::concat::concat_batches(&batches[0].schema(), &batches).unwrap());
    }
    let (cpu, gpu) = (&outputs[0], &outputs[1]);
    assert_eq!(cpu.schema(), gpu.schema());
    assert_eq!(cpu.num_rows(), 3_000);
    let file = FeatureFile::parse(FEATURES, "backfill").unwrap();
    let mut compared = 0;
    for f in &file.views[0].features {
        let a = arrow_cast::cast(cpu.column_by_name(&f.name).unwrap(), &DataType::Float64).unwrap();
        let b = arrow_cast::cast(gpu.column_by_name(&f.name).unwrap(), &DataType::Float64).unwrap();
        let (a, b) = (
            a.as_primitive::<Float64Type>(),
            b.as_primitive::<Float64Type>(),
        );
        for r in 0..a.len() {
            assert_eq!(a.is_valid(r), b.is_valid(r), "{} row {r}: validity", f.name);
            if a.is_null(r) {
                continue;
            }
            let (x, y) = (a.value(r), b.value(r));
            let exact = f.agg.bitwise();
            assert!(
                if exact {
                    x == y
                } else {
                    (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1e-3)
                },
                "{} ({}) row {r}: cpu {x} vs gpu {y}",
                f.name,
                f.agg
            );
            compared += 1;
        }
    }
    assert!(compared > 3_000, "{compared}");
}
