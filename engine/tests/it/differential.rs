//! Differential tests: random event streams through the engine, on every backend,
//! checked against the naive oracle of `common` for every aggregation × window kind.
//!
//! Streams have random keys (and reads of unseen keys), disorder within and beyond the
//! allowed lateness, null keys and times, null and NaN values, several key, time and
//! value types, and are pushed as random slices (non-zero offsets) of one big batch,
//! with random micro-batch sizes.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use crate::common::{Ev, accepted, assert_close, feature, scale};
use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{
    Array, ArrayRef, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array, ListArray,
    RecordBatch, StringArray, StringViewArray, TimestampMicrosecondArray,
    TimestampMillisecondArray, TimestampNanosecondArray, UInt32Array,
};
use panes_engine::{Agg, BackendKind, Engine, EngineOptions, FeatureFile, PanesError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const KEY_TYPES: [&str; 6] = ["i64", "u32", "utf8", "dict", "view", "i32"];
const TIME_TYPES: [&str; 4] = ["i64ms", "tsms", "tsus", "tsns"];
const VALUE_TYPES: [&str; 4] = ["f64", "f32", "i64", "i16"];
const STRING_TYPES: [&str; 4] = ["utf8", "large", "view", "dict"];

/// The string values of column `s`: 40 of them, in an order unlike their numbers,
/// with the empty string and multi-byte ones.
fn label(i: usize) -> String {
    match i {
        0 => String::new(),
        1 => "é".into(),
        2 => "Zürich".into(),
        _ => format!("{:x}", (i * 7919) % 1000),
    }
}

/// The rank of a string among the labels (the oracle's value for it: ties and order
/// of strings are those of their ranks).
fn rank(s: &str) -> f64 {
    let mut all: Vec<String> = (0..40).map(label).collect();
    all.sort();
    all.iter().position(|x| x == s).expect("a label") as f64
}

/// Every aggregation over every window kind; without `sketches`, none of the sketch
/// and list aggregations (whose levels the `Cpu` backend folds event by event).
fn feature_file(lateness_ms: i64, sketches: bool) -> String {
    let mut s = format!(
        "[[views]]\nname = \"v\"\nkey = \"k\"\ntime = \"ts\"\npane = \"1s\"\nallowed_lateness = \"{lateness_ms}ms\"\n"
    );
    let windows = [
        ("slide", "window = \"5s\"\nhop = \"1s\""),
        ("hop", "window = \"12s\"\nhop = \"4s\""),
        ("tumble", "window = \"3s\"\nhop = \"3s\""),
        ("life", "window = \"lifetime\""),
        ("count", "window = \"7 events\""),
        ("sess", "session_gap = \"2s\""),
    ];
    let aggs = Agg::ALL.into_iter().filter(|a| {
        sketches
            || !matches!(
                a,
                Agg::ApproxDistinct { .. }
                    | Agg::Quantile { .. }
                    | Agg::LastN { .. }
                    | Agg::TopK { .. }
            )
    });
    for agg in aggs {
        for (wname, w) in windows {
            let column = match agg {
                Agg::Count => "",
                // Within capacity (`n` has 100 values): exact.
                Agg::TopK { .. } => "column = \"n\"\n",
                _ => "column = \"v\"\n",
            };
            let half_life = match agg {
                Agg::DecayedSum { half_life } | Agg::DecayedCount { half_life } => {
                    format!("half_life = \"{half_life}ms\"\n")
                }
                Agg::Quantile { q, .. } => format!("q = {:?}\n", q.get()),
                Agg::LastN { n } => format!("n = {n}\n"),
                Agg::TopK { k, .. } => format!("k = {k}\ncapacity = 128\n"),
                _ => String::new(),
            };
            s += &format!(
                "\n[[views.features]]\nname = \"{agg}_{wname}\"\nagg = \"{agg}\"\n{column}{half_life}{w}\n"
            );
        }
    }
    s += "\n[[views.features]]\nname = \"count_v_slide\"\nagg = \"count\"\ncolumn = \"v\"\nwindow = \"5s\"\nhop = \"1s\"\n";
    s += "\n[[views.features]]\nname = \"n_sum_hop\"\nagg = \"sum\"\ncolumn = \"n\"\nwindow = \"12s\"\nhop = \"4s\"\n";
    s += "\n[[views.features]]\nname = \"n_last_life\"\nagg = \"last\"\ncolumn = \"n\"\nwindow = \"lifetime\"\n";
    // A second half-life of `v` (a state column of its own), and decayed rows.
    s += "\n[[views.features]]\nname = \"v_decayed_fast\"\nagg = \"decayed_sum\"\ncolumn = \"v\"\nhalf_life = \"3s\"\nwindow = \"12s\"\nhop = \"4s\"\n";
    s += "\n[[views.features]]\nname = \"rows_decayed_life\"\nagg = \"decayed_count\"\nhalf_life = \"1500ms\"\nwindow = \"lifetime\"\n";
    // Strings (column `s`): counted, and returned by first and last (every backend),
    // last_n and top_k.
    let mut text = vec![
        ("count", "", "window = \"5s\"\nhop = \"1s\""),
        ("last", "", "window = \"3 events\""),
        ("first", "", "session_gap = \"700ms\""),
        ("first", "", "window = \"12s\"\nhop = \"4s\""),
        ("first", "", "window = \"lifetime\""),
        ("last", "", "window = \"3s\"\nhop = \"3s\""),
    ];
    if sketches {
        text.extend([
            ("last_n", "n = 4\n", "window = \"5s\"\nhop = \"1s\""),
            ("top_k", "k = 3\n", "window = \"12s\"\nhop = \"4s\""),
            ("top_k", "k = 5\ncapacity = 64\n", "window = \"lifetime\""),
            ("last_n", "n = 4\n", "window = \"12 events\""),
            ("top_k", "k = 2\n", "session_gap = \"2s\""),
        ]);
    }
    for (i, (agg, params, w)) in text.into_iter().enumerate() {
        s += &format!(
            "\n[[views.features]]\nname = \"s_{agg}_{i}\"\nagg = \"{agg}\"\ncolumn = \"s\"\n{params}{w}\n"
        );
    }
    if sketches {
        // Other parameters of one column: state columns of their own.
        s += "\n[[views.features]]\nname = \"v_p90_coarse\"\nagg = \"quantile\"\ncolumn = \"v\"\nq = 0.9\nrelative_accuracy = 0.05\nwindow = \"12s\"\nhop = \"4s\"\n";
        s += "\n[[views.features]]\nname = \"v_min_q\"\nagg = \"quantile\"\ncolumn = \"v\"\nq = 0\nwindow = \"lifetime\"\n";
        s += "\n[[views.features]]\nname = \"v_distinct_p6\"\nagg = \"approx_distinct\"\ncolumn = \"v\"\nprecision = 6\nwindow = \"5s\"\nhop = \"1s\"\n";
    }
    s
}

struct Stream {
    events: Vec<Ev>,
    key_type: &'static str,
    time_type: &'static str,
    value_type: &'static str,
    string_type: &'static str,
}

fn gen_stream(rng: &mut StdRng, n: usize, keys: i64) -> Stream {
    let value_type = VALUE_TYPES[rng.random_range(0..VALUE_TYPES.len())];
    let int_values = value_type.starts_with('i');
    // Large offsets against a small spread: the hard case for variance.
    let offset = if value_type == "f64" && rng.random_bool(0.3) {
        1.0e9
    } else {
        0.0
    };
    let base: i64 = if rng.random_bool(0.3) {
        -40_000
    } else {
        1_767_225_600_000
    };
    let step = rng.random_range(5..200);
    // Coarse clocks make many events of a key share a timestamp (ties for `last`).
    let tick = if rng.random_bool(0.4) { 500 } else { 1 };
    let events = (0..n)
        .map(|i| {
            let mut ts = base + i as i64 * step;
            match rng.random_range(0..10) {
                0..=2 => ts -= rng.random_range(0..3_000), // disorder, mostly within lateness
                3 => ts -= rng.random_range(3_000..20_000), // far behind: often late
                _ => {}
            }
            ts -= ts.rem_euclid(tick);
            let key = if rng.random_bool(0.02) {
                None
            } else {
                Some(rng.random_range(0..keys))
            };
            let ts = if rng.random_bool(0.02) {
                None
            } else {
                Some(ts)
            };
            let v = match rng.random_range(0..20) {
                0 => None,
                1 if !int_values => Some(f64::NAN),
                _ if int_values => Some(rng.random_range(-1000..1000) as f64),
                _ if rng.random_bool(0.5) => Some(rng.random_range(-4000..4000) as f64 / 4.0),
                _ => Some(rng.random_range(-1.0e3..1.0e3)),
            };
            let v = v.map(|x| x + offset);
            let v = match (value_type, v) {
                ("f32", Some(x)) => Some(x as f32 as f64),
                (_, v) => v,
            };
            let nv = if rng.random_bool(0.1) {
                None
            } else {
                Some(rng.random_range(0..100) as f64)
            };
            let sv = if rng.random_bool(0.1) {
                None
            } else {
                // Skewed, so that top_k has clear leaders as well as ties.
                let u: f64 = rng.random();
                Some(rank(&label((u * u * 40.0) as usize)))
            };
            Ev {
                key,
                ts,
                vals: vec![v, nv, sv],
            }
        })
        .collect();
    Stream {
        events,
        key_type: KEY_TYPES[rng.random_range(0..KEY_TYPES.len())],
        time_type: TIME_TYPES[rng.random_range(0..TIME_TYPES.len())],
        value_type,
        string_type: STRING_TYPES[rng.random_range(0..STRING_TYPES.len())],
    }
}

fn key_array(key_type: &str, keys: &[Option<i64>]) -> ArrayRef {
    let s = |k: &Option<i64>| k.map(|k| format!("key-{k}"));
    match key_type {
        "i64" => Arc::new(Int64Array::from(keys.to_vec())),
        "i32" => Arc::new(Int32Array::from(
            keys.iter().map(|k| k.map(|k| k as i32)).collect::<Vec<_>>(),
        )),
        "u32" => Arc::new(UInt32Array::from(
            keys.iter().map(|k| k.map(|k| k as u32)).collect::<Vec<_>>(),
        )),
        "utf8" => Arc::new(StringArray::from(keys.iter().map(s).collect::<Vec<_>>())),
        "view" => Arc::new(StringViewArray::from(
            keys.iter().map(s).collect::<Vec<_>>(),
        )),
        "dict" => {
            let mut b = StringDictionaryBuilder::<Int32Type>::new();
            for k in keys {
                match s(k) {
                    Some(v) => b.append_value(v),
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        _ => unreachable!(),
    }
}

fn batch(s: &Stream) -> RecordBatch {
    let keys: Vec<_> = s.events.iter().map(|e| e.key).collect();
    let ts: Vec<_> = s.events.iter().map(|e| e.ts).collect();
    let ts: ArrayRef = match s.time_type {
        "i64ms" => Arc::new(Int64Array::from(ts)),
        "tsms" => Arc::new(TimestampMillisecondArray::from(ts).with_timezone("UTC")),
        "tsus" => Arc::new(TimestampMicrosecondArray::from(
            ts.iter().map(|t| t.map(|t| t * 1000)).collect::<Vec<_>>(),
        )),
        "tsns" => Arc::new(
            TimestampNanosecondArray::from(
                ts.iter()
                    .map(|t| t.map(|t| t * 1_000_000 + 999_999))
                    .collect::<Vec<_>>(),
            )
            .with_timezone("+05:30"),
        ),
        _ => unreachable!(),
    };
    let v: Vec<Option<f64>> = s.events.iter().map(|e| e.vals[0]).collect();
    let v: ArrayRef = match s.value_type {
        "f64" => Arc::new(Float64Array::from(v)),
        "f32" => Arc::new(Float32Array::from(
            v.iter().map(|x| x.map(|x| x as f32)).collect::<Vec<_>>(),
        )),
        "i64" => Arc::new(Int64Array::from(
            v.iter().map(|x| x.map(|x| x as i64)).collect::<Vec<_>>(),
        )),
        "i16" => Arc::new(Int16Array::from(
            v.iter().map(|x| x.map(|x| x as i16)).collect::<Vec<_>>(),
        )),
        _ => unreachable!(),
    };
    let n: Vec<Option<i32>> = s
        .events
        .iter()
        .map(|e| e.vals[1].map(|x| x as i32))
        .collect();
    RecordBatch::try_from_iter([
        ("k", key_array(s.key_type, &keys)),
        ("ts", ts),
        ("v", v),
        ("n", Arc::new(Int32Array::from(n)) as ArrayRef),
        ("s", string_column(s)),
        (
            "unused",
            Arc::new(Int32Array::from(vec![0; s.events.len()])) as ArrayRef,
        ),
    ])
    .unwrap()
}

/// Column `s` of the stream, in its string type.
fn string_column(s: &Stream) -> ArrayRef {
    let mut sorted: Vec<String> = (0..40).map(label).collect();
    sorted.sort();
    let v: Vec<Option<String>> = s
        .events
        .iter()
        .map(|e| e.vals[2].map(|r| sorted[r as usize].clone()))
        .collect();
    let utf8: ArrayRef = Arc::new(StringArray::from(v));
    let to = match s.string_type {
        "utf8" => return utf8,
        "large" => arrow_schema::DataType::LargeUtf8,
        "view" => arrow_schema::DataType::Utf8View,
        _ => arrow_schema::DataType::Dictionary(
            Box::new(arrow_schema::DataType::Int16),
            Box::new(arrow_schema::DataType::Utf8),
        ),
    };
    arrow_cast::cast(&utf8, &to).unwrap()
}

/// Checks a read of every key (plus unseen and null keys) against the oracle.
fn check_read(
    engine: &Engine,
    file: &FeatureFile,
    stream: &Stream,
    pushed: usize,
    keys: i64,
    at: Option<i64>,
    ctx: &str,
) -> Result<(), PanesError> {
    let view = &file.views[0];
    let acc = accepted(view, &stream.events[..pushed]);
    let mut by_key: HashMap<i64, Vec<(usize, Ev)>> = HashMap::new();
    for (i, e) in &acc {
        by_key
            .entry(e.key.unwrap())
            .or_default()
            .push((*i, e.clone()));
    }
    let mut read_keys: Vec<Option<i64>> = (0..keys + 3).map(Some).collect();
    read_keys.push(None);
    let arr = key_array(stream.key_type, &read_keys);
    let frame = engine.read("v", arr.as_ref(), at, None)?;
    let t = at.unwrap_or_else(|| acc.iter().map(|(_, e)| e.ts.unwrap()).max().unwrap_or(0));
    assert_eq!(
        frame.at, t,
        "{ctx}: default read time is the latest accepted event time"
    );
    let empty = Vec::new();
    for (r, key) in read_keys.iter().enumerate() {
        let evs = key.and_then(|k| by_key.get(&k)).unwrap_or(&empty);
        let k = key.unwrap_or(-1);
        for (f, spec) in view.features.iter().enumerate() {
            let column = spec.column.as_ref().map(|c| match c.as_str() {
                "v" => 0,
                "n" => 1,
                _ => 2,
            });
            let want = feature(spec, column, evs, k, t);
            let text = frame.text[f];
            assert_eq!(
                text,
                column == Some(2) && spec.agg != Agg::Count,
                "{ctx}: {} returns strings",
                spec.name
            );
            // A string's value for the oracle: its rank.
            let of = |v: f64| {
                if text {
                    rank(&frame.strings[v as usize])
                } else {
                    v
                }
            };
            let got = frame.valid[[r, f]].then(|| frame.values[[r, f]]);
            let got = if spec.agg.is_list() { got } else { got.map(of) };
            let sc = scale(spec.agg, spec, column, evs, k, t);
            assert_close(spec.agg, got, want, sc, &|| {
                format!("{ctx}: key {key:?} feature {} at {t}", spec.name)
            });
            if spec.agg.is_list() {
                let want = common::feature_list(spec, column, evs, k, t);
                let got: Vec<f64> = frame.list(r, f).iter().map(|&v| of(v)).collect();
                assert_eq!(got, want, "{ctx}: key {key:?} feature {} at {t}", spec.name);
            }
        }
    }
    Ok(())
}

/// A read of every key holds each key the oracle accepted an event of, once (and no
/// key without any), with bitwise the values a read of those keys gives.
fn check_read_all(engine: &Engine, file: &FeatureFile, stream: &Stream, ctx: &str) {
    let (all, at) = engine.read_all("v", None, None).unwrap();
    let keys = all.column(0).clone();
    let text = matches!(stream.key_type, "utf8" | "dict" | "view");
    let got: Vec<i64> = if text {
        let s = keys
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("Utf8 keys");
        s.iter()
            .map(|k| k.unwrap().strip_prefix("key-").unwrap().parse().unwrap())
            .collect()
    } else {
        let s = keys
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("Int64 keys");
        s.iter().map(Option::unwrap).collect()
    };
    let mut want: Vec<i64> = accepted(&file.views[0], &stream.events)
        .iter()
        .map(|(_, e)| e.key.unwrap())
        .collect();
    want.sort_unstable();
    want.dedup();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want, "{ctx}: the keys of a read of all");
    assert_eq!(engine.metrics("v").unwrap().keys, got.len(), "{ctx}");
    let frame = engine.read("v", keys.as_ref(), Some(at), None).unwrap();
    for (j, name) in frame.names.iter().enumerate() {
        let column = all.column(j + 1);
        assert_eq!(all.schema().field(j + 1).name(), name);
        let text = |v: &f64| frame.strings[*v as usize].clone();
        if let Some(lists) = column.as_any().downcast_ref::<ListArray>() {
            for r in 0..got.len() {
                let l = lists.value(r);
                if frame.text[j] {
                    let l = l.as_any().downcast_ref::<StringArray>().unwrap();
                    let want: Vec<String> = frame.list(r, j).iter().map(text).collect();
                    let l: Vec<String> = l.iter().map(|s| s.unwrap().to_string()).collect();
                    assert_eq!(l, want, "{ctx}: read of all, {name}");
                } else {
                    let l = l.as_any().downcast_ref::<Float64Array>().unwrap();
                    assert_eq!(l.values(), frame.list(r, j), "{ctx}: read of all, {name}");
                }
            }
            continue;
        }
        if let Some(c) = column.as_any().downcast_ref::<StringArray>() {
            for r in 0..got.len() {
                let want = frame.valid[[r, j]].then(|| text(&frame.values[[r, j]]));
                let value = c.is_valid(r).then(|| c.value(r).to_string());
                assert_eq!(value, want, "{ctx}: read of all, key {}, {name}", got[r]);
            }
            continue;
        }
        for r in 0..got.len() {
            let value = match column.as_any().downcast_ref::<Int64Array>() {
                Some(c) => c.is_valid(r).then(|| (c.value(r) as f64).to_bits()),
                None => {
                    let c = column.as_any().downcast_ref::<Float64Array>().unwrap();
                    c.is_valid(r).then(|| c.value(r).to_bits())
                }
            };
            let want = frame.valid[[r, j]].then(|| frame.values[[r, j]].to_bits());
            assert_eq!(value, want, "{ctx}: read of all, key {}, {name}", got[r]);
        }
    }
}

fn run_case(seed: u64, backend: BackendKind, events: usize, keys: i64, reads: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let lateness = [0, 2_000, 10_000][rng.random_range(0..3)];
    // The Cpu backend folds levels with sketches event by event, and pre-aggregates
    // the others: half its cases have no sketches, to take that path. The Gpu backend
    // folds levels with sketches with a pipeline of their own, without blocks: half its
    // cases each way too (on lavapipe its sketch folds are slow).
    let sketches = match backend {
        BackendKind::Cpu | BackendKind::Gpu => rng.random_bool(0.5),
        _ => true,
    };
    let text = feature_file(lateness, sketches);
    let file = FeatureFile::parse(&text, "differential").unwrap();
    let stream = gen_stream(&mut rng, events, keys);
    let options = EngineOptions {
        backend: Some(backend),
        shards: [1, 4, 32][rng.random_range(0..3)],
        batch_rows: [1, 7, 300, 5000, 40_000][rng.random_range(0..5)],
        ..Default::default()
    };
    let ctx = format!(
        "seed {seed} backend {backend} lateness {lateness} keys {} time {} values {} strings {} shards {} batch_rows {}",
        stream.key_type,
        stream.time_type,
        stream.value_type,
        stream.string_type,
        options.shards,
        options.batch_rows
    );
    let engine = Engine::new(&file, options).unwrap();
    let all = batch(&stream);
    let mut pushed = 0;
    let read_every = (events / reads).max(1);
    let mut next_read = read_every;
    while pushed < events {
        let cap = if rng.random_bool(0.2) { 30_000 } else { 500 };
        let len = rng.random_range(1..=(events - pushed).min(cap));
        let slice = all.slice(pushed, len);
        let report = engine.push("v", &slice).unwrap();
        assert_eq!(
            report.accepted + report.late + report.rejected,
            len,
            "{ctx}"
        );
        pushed += len;
        if pushed >= next_read || pushed == events {
            next_read += read_every;
            check_read(&engine, &file, &stream, pushed, keys, None, &ctx).unwrap();
            let max = accepted(&file.views[0], &stream.events[..pushed])
                .iter()
                .map(|(_, e)| e.ts.unwrap())
                .max()
                .unwrap_or(0);
            // Reads in the future are exact.
            let future = max + rng.random_range(0..20_000);
            check_read(&engine, &file, &stream, pushed, keys, Some(future), &ctx).unwrap();
            // Reads in the past are exact or refused, never wrong.
            let past = max - rng.random_range(1..15_000);
            match check_read(&engine, &file, &stream, pushed, keys, Some(past), &ctx) {
                Ok(()) | Err(PanesError::InexactRead { .. }) => {}
                Err(e) => panic!("{ctx}: {e}"),
            }
        }
    }
    // Counters match the oracle's accept / late / reject split.
    let m = engine.metrics("v").unwrap();
    let acc = accepted(&file.views[0], &stream.events).len() as u64;
    let rejected = stream
        .events
        .iter()
        .filter(|e| e.key.is_none() || e.ts.is_none())
        .count() as u64;
    assert_eq!(m.counters.accepted, acc, "{ctx}");
    assert_eq!(m.counters.rejected_total(), rejected, "{ctx}");
    assert_eq!(m.counters.late, events as u64 - acc - rejected, "{ctx}");
    assert_eq!(
        m.counters.expired, 0,
        "{ctx}: the ring must hold every accepted event"
    );
    check_read_all(&engine, &file, &stream, &ctx);
}

#[test]
fn scalar_matches_oracle() {
    for seed in 0..40 {
        run_case(seed, BackendKind::Scalar, 3000, 20, 6);
    }
}

#[test]
fn cpu_matches_oracle() {
    for seed in 100..140 {
        run_case(seed, BackendKind::Cpu, 3000, 20, 6);
    }
}

#[test]
fn gpu_matches_oracle() {
    if !common::gpu_available() {
        return;
    }
    for seed in 300..312 {
        run_case(seed, BackendKind::Gpu, 3000, 20, 6);
    }
    run_case(320, BackendKind::Gpu, 90_000, 400, 2);
}

/// Large micro-batches take the Cpu backend's parallel path (counting sort by shard,
/// rayon across shards).
#[test]
fn cpu_parallel_fold_matches_oracle() {
    for seed in 200..203 {
        run_case(seed, BackendKind::Cpu, 90_000, 400, 2);
    }
}

#[test]
fn a_software_gpu_refuses_sketches_past_its_loop_budget_at_load_and_auto_takes_them() {
    // A summary of 10 000 counters: merging two may bisect over 20 000 of them, more
    // loop iterations than lavapipe runs in one invocation.
    let text = feature_file(0, true)
        + "\n[[views.features]]\nname = \"n_top_wide\"\nagg = \"top_k\"\ncolumn = \"n\"\nk = 5\ncapacity = 10000\nwindow = \"12s\"\nhop = \"4s\"\n";
    let file = FeatureFile::parse(&text, "sketches").unwrap();
    let options = |backend| EngineOptions {
        backend: Some(backend),
        ..Default::default()
    };
    if common::gpu_available() {
        let software = panes_kernels::Gpu::new().unwrap().info().device_type == "Cpu";
        match Engine::new(&file, options(BackendKind::Gpu)) {
            Err(err) if software => {
                let err = err.to_string();
                assert!(
                    err.contains("view \"v\"") && err.contains("loop iterations"),
                    "{err}"
                );
            }
            Err(err) => panic!("a GPU takes any sketch: {err}"),
            Ok(_) => assert!(!software, "the software adapter refuses it"),
        }
    }
    let engine = Engine::new(&file, options(BackendKind::Auto)).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let stream = gen_stream(&mut rng, 5_000, 20);
    engine.push("v", &batch(&stream)).unwrap();
}

#[test]
fn results_do_not_depend_on_batch_splits_or_backend() {
    let mut rng = StdRng::seed_from_u64(7);
    let full = FeatureFile::parse(&feature_file(2_000, true), "splits").unwrap();
    let plain = FeatureFile::parse(&feature_file(2_000, false), "splits").unwrap();
    let stream = gen_stream(&mut rng, 20_000, 50);
    let all = batch(&stream);
    let mut frames = Vec::new();
    let mut runs = vec![
        (BackendKind::Scalar, 20_000, 1 << 20),
        (BackendKind::Scalar, 13, 5),
        (BackendKind::Cpu, 20_000, 1 << 20),
        (BackendKind::Cpu, 997, 17_000),
    ];
    if common::gpu_available() {
        runs.extend([
            (BackendKind::Gpu, 20_000, 1 << 20),
            (BackendKind::Gpu, 997, 17_000),
        ]);
    }
    for (backend, split, rows) in runs {
        let file = if backend == BackendKind::Cpu && split == 997 {
            &plain
        } else {
            &full
        };
        let engine = Engine::new(
            file,
            EngineOptions {
                backend: Some(backend),
                batch_rows: rows,
                ..Default::default()
            },
        )
        .unwrap();
        for start in (0..20_000).step_by(split) {
            engine
                .push("v", &all.slice(start, split.min(20_000 - start)))
                .unwrap();
        }
        let keys = key_array(stream.key_type, &(0..60).map(Some).collect::<Vec<_>>());
        frames.push(engine.read("v", keys.as_ref(), None, None).unwrap());
    }
    let view = &full.views[0];
    let first = &frames[0];
    for fr in &frames[1..] {
        // Feature j of `fr` is feature `of[j]` of the first frame (the full file's).
        let of: Vec<usize> = fr
            .names
            .iter()
            .map(|n| first.names.iter().position(|m| m == n).unwrap())
            .collect();
        for ((k, j), a) in fr.values.indexed_iter() {
            let (b, valid) = (first.values[[k, of[j]]], first.valid[[k, of[j]]]);
            assert_eq!(fr.valid[[k, j]], valid, "{} of key {k}", fr.names[j]);
            let idx = (k, of[j]);
            let agg = view.features[of[j]].agg;
            if fr.text[j] {
                // Strings are indices into each frame's own strings.
                let (x, y) = (&fr.strings, &first.strings);
                let l = |f: &[f64], s: &[String]| -> Vec<String> {
                    f.iter().map(|&v| s[v as usize].clone()).collect()
                };
                assert_eq!(l(fr.list(k, j), x), l(first.list(k, of[j]), y), "{idx:?}");
                if valid && !agg.is_list() {
                    assert_eq!(x[*a as usize], y[b as usize], "{agg} {idx:?}");
                }
                continue;
            }
            assert_eq!(fr.list(k, j), first.list(k, of[j]), "{agg} {idx:?}");
            if agg.bitwise() {
                assert!(
                    *a == b || (a.is_nan() && b.is_nan()),
                    "{agg} {idx:?}: {a} vs {b}"
                );
            } else {
                assert!(
                    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
                        || (a.is_nan() && b.is_nan()),
                    "{agg} {idx:?}: {a} vs {b}"
                );
            }
        }
    }
}
