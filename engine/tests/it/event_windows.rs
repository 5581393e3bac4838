//! Count and session windows (DESIGN §3b) through the engine: checkpoints, reads the
//! state cannot answer, and their memory in the metrics. Their values are checked
//! against the oracle in `differential` (every aggregation, every backend) and
//! `backfill` (the CLI).

use std::sync::Arc;

use arrow_array::{Array, Float64Array, Int64Array, RecordBatch};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile, PanesError};

const FEATURES: &str = r#"
[[views]]
name = "v"
key = "k"
time = "ts"
allowed_lateness = "5s"

[[views.features]]
name = "x_sum_3"
agg = "sum"
column = "x"
window = "3 events"

[[views.features]]
name = "x_last_10"
agg = "last_n"
n = 10
column = "x"
window = "10 events"

[[views.features]]
name = "visit_events"
agg = "count"
session_gap = "1s"

[[views.features]]
name = "visit_mean"
agg = "mean"
column = "x"
session_gap = "1s"

[[views.features]]
name = "x_sum_1m"
agg = "sum"
column = "x"
window = "1m"
"#;

fn batch(keys: &[i64], ts: &[i64], xs: &[f64]) -> RecordBatch {
    RecordBatch::try_from_iter([
        (
            "k",
            Arc::new(Int64Array::from(keys.to_vec())) as Arc<dyn Array>,
        ),
        ("ts", Arc::new(Int64Array::from(ts.to_vec())) as _),
        ("x", Arc::new(Float64Array::from(xs.to_vec())) as _),
    ])
    .unwrap()
}

fn engine(backend: BackendKind) -> Engine {
    let file = FeatureFile::parse(FEATURES, "event_windows.toml").unwrap();
    let options = EngineOptions {
        backend: Some(backend),
        ..Default::default()
    };
    Engine::new(&file, options).unwrap()
}

/// Events of keys 0..4, a few per second, with disorder and gaps of 1.5 s every 20
/// events (sessions end there).
fn stream(from: usize, n: usize) -> RecordBatch {
    let (mut keys, mut ts, mut xs) = (Vec::new(), Vec::new(), Vec::new());
    for i in from..from + n {
        keys.push((i * 7 % 4) as i64);
        let gap = (i / 20) as i64 * 1_500;
        ts.push(i as i64 * 50 + gap - (i as i64 * 37 % 300));
        xs.push((i % 13) as f64 - 4.5);
    }
    batch(&keys, &ts, &xs)
}

fn values(e: &Engine) -> Vec<u64> {
    let keys = Int64Array::from_iter_values(0..5);
    let f = e.read("v", &keys, None, None).unwrap();
    let mut out: Vec<u64> = f.values.iter().map(|v| v.to_bits()).collect();
    for r in 0..5 {
        out.extend(f.list(r, 1).iter().map(|v| v.to_bits()));
    }
    out
}

#[test]
fn a_restored_checkpoint_reads_and_goes_on_as_the_uninterrupted_view() {
    for backend in [BackendKind::Scalar, BackendKind::Cpu] {
        let uninterrupted = engine(backend);
        let first = engine(backend);
        for e in [&uninterrupted, &first] {
            e.push("v", &stream(0, 700)).unwrap();
        }
        let bytes = first.checkpoint("v", &[]).unwrap();
        let restored = engine(backend);
        restored.restore("v", &bytes).unwrap();
        assert_eq!(values(&restored), values(&first), "{backend}: restored");
        for e in [&uninterrupted, &restored] {
            e.push("v", &stream(700, 500)).unwrap();
        }
        assert_eq!(
            values(&restored),
            values(&uninterrupted),
            "{backend}: after more events"
        );
        // A damaged image of the event windows is refused, not half restored.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 40] ^= 0xff;
        assert!(engine(backend).restore("v", &bad).is_err());
    }
}

#[test]
fn reads_in_the_past_are_exact_or_refused_with_the_reason() {
    let e = engine(BackendKind::Cpu);
    // One key: events at 0..=900 ms, then at 5 000..=5 400 ms.
    let ts: Vec<i64> = (0..10)
        .map(|i| i * 100)
        .chain((0..5).map(|i| 5_000 + i * 100))
        .collect();
    let xs: Vec<f64> = (0..15).map(f64::from).collect();
    e.push("v", &batch(&[1; 15], &ts, &xs)).unwrap();
    let key = Int64Array::from(vec![1]);
    let read = |at: i64, feature: &str| {
        e.read("v", &key, Some(at), Some(&[feature]))
            .map(|f| f.values[[0, 0]])
    };
    // At the latest event: the session 5 000–5 400 (values 10..=14).
    assert_eq!(read(5_400, "visit_mean").unwrap(), 12.0);
    assert_eq!(read(5_400, "x_sum_3").unwrap(), 12.0 + 13.0 + 14.0);
    // More than the gap after the last event: no session.
    assert_eq!(read(6_401, "visit_events").unwrap(), 0.0);
    assert_eq!(read(6_400, "visit_events").unwrap(), 5.0);
    // Between the sessions: the first one ended more than 1 s before.
    assert_eq!(read(3_000, "visit_events").unwrap(), 0.0);
    // Inside the first session, whose cell also holds later events: refused.
    match read(500, "visit_mean") {
        Err(PanesError::InexactRead { reason, .. }) => {
            assert!(reason.contains("pane or session"), "{reason}")
        }
        other => panic!("a read inside a session is refused, got {other:?}"),
    }
    // Count windows keep the newest 10 events: at 950 ms the 3 newest (7, 8, 9) are
    // among them; at 250 ms (events 0..=2) they are not.
    assert_eq!(read(950, "x_sum_3").unwrap(), 7.0 + 8.0 + 9.0);
    match read(250, "x_sum_3") {
        Err(PanesError::InexactRead { reason, .. }) => {
            assert!(reason.contains("the newest 10 events"), "{reason}")
        }
        other => panic!("a read past the kept events is refused, got {other:?}"),
    }
}

#[test]
fn late_events_within_the_lateness_merge_sessions() {
    let e = engine(BackendKind::Scalar);
    let key = Int64Array::from(vec![1]);
    let visit = |e: &Engine| {
        let f = e
            .read("v", &key, None, Some(&["visit_events", "visit_mean"]))
            .unwrap();
        (f.values[[0, 0]], f.values[[0, 1]])
    };
    e.push("v", &batch(&[1, 1], &[0, 2_000], &[1.0, 3.0]))
        .unwrap();
    assert_eq!(
        visit(&e),
        (1.0, 3.0),
        "two sessions: the read sees the second"
    );
    // Late (2 s behind the latest) but within the 5 s lateness: it joins both.
    e.push("v", &batch(&[1], &[1_000], &[2.0])).unwrap();
    assert_eq!(visit(&e), (3.0, 2.0), "merged into one session");
    let m = e.metrics("v").unwrap();
    assert_eq!((m.counters.accepted, m.counters.late), (3, 0));
    // Beyond the lateness: counted late, not aggregated.
    e.push("v", &batch(&[1, 1], &[9_000, 1_500], &[7.0, 100.0]))
        .unwrap();
    assert_eq!(visit(&e), (1.0, 7.0));
    assert_eq!(e.metrics("v").unwrap().counters.late, 1);
}

#[test]
fn the_metrics_count_the_event_windows_memory() {
    let e = engine(BackendKind::Cpu);
    let before = e.metrics("v").unwrap().state_bytes;
    e.push("v", &stream(0, 2_000)).unwrap();
    e.flush().unwrap();
    let after = e.metrics("v").unwrap().state_bytes;
    // Four keys × 10 kept events × (16 B of time and arrival + 8 B of value), in both
    // replicas, at least.
    assert!(after - before >= 2 * 4 * 10 * 24, "{before} → {after}");
}

#[test]
fn a_view_of_count_and_session_windows_only_folds_no_panes() {
    let text = FEATURES
        .split("\n[[views.features]]\nname = \"x_sum_1m\"")
        .next()
        .unwrap();
    let file = FeatureFile::parse(text, "only.toml").unwrap();
    assert!(
        panes_engine::CompiledView::new(&file.views[0], 4)
            .state
            .levels
            .is_empty()
    );
    let mut backends = vec![BackendKind::Scalar, BackendKind::Cpu];
    if crate::common::gpu_available() {
        backends.push(BackendKind::Gpu);
    }
    let mut answers = Vec::new();
    for backend in backends {
        let options = EngineOptions {
            backend: Some(backend),
            batch_rows: 97,
            ..Default::default()
        };
        let e = Engine::new(&file, options).unwrap();
        e.push("v", &stream(0, 1_000)).unwrap();
        let bytes = e.checkpoint("v", &[]).unwrap();
        let restored = Engine::new(&file, EngineOptions::default()).unwrap();
        restored.restore("v", &bytes).unwrap();
        let keys = Int64Array::from_iter_values(0..5);
        let f = e.read("v", &keys, None, None).unwrap();
        let g = restored.read("v", &keys, None, None).unwrap();
        let bits = |v: &ndarray::Array2<f64>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&f.values), bits(&g.values), "{backend}: restored");
        assert!(
            f.values[[0, 2]] > 0.0,
            "{backend}: a session is open at the end"
        );
        answers.push(bits(&f.values));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "every backend");
}
