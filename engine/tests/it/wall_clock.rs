//! `read_time = "wall_clock"` against the oracle, with a clock the test moves by hand:
//! default reads at "now" equal the oracle at now; events stamped after now are left
//! out (or the read is refused when now's pane holds them: it cannot be split); keys
//! that go idle see their windows empty as time passes, lifetime features stay.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::common::{Ev, accepted, assert_close, feature, scale};
use arrow_array::{Float64Array, Int64Array, RecordBatch};
use panes_engine::{BackendKind, Clock, Engine, EngineOptions, FeatureFile, PanesError};
use rand::{Rng, SeedableRng, rngs::StdRng};

const FEATURES: &str = r#"
[[views]]
name = "v"
key = "k"
time = "ts"
pane = "1s"
allowed_lateness = "3s"
read_time = "wall_clock"

[[views.features]]
name = "n_10s"
agg = "count"
window = "10s"

[[views.features]]
name = "sum_10s"
agg = "sum"
column = "x"
window = "10s"

[[views.features]]
name = "mean_1m"
agg = "mean"
column = "x"
window = "1m"
hop = "10s"

[[views.features]]
name = "max_30s"
agg = "max"
column = "x"
window = "30s"
hop = "5s"

[[views.features]]
name = "var_10s"
agg = "var"
column = "x"
window = "10s"

[[views.features]]
name = "last_life"
agg = "last"
column = "x"
window = "lifetime"

[[views.features]]
name = "n_life"
agg = "count"
window = "lifetime"
"#;

const KEYS: i64 = 12;

struct Setup {
    file: FeatureFile,
    engine: Engine,
    now: Arc<AtomicI64>,
}

fn setup(backend: BackendKind) -> Setup {
    let file = FeatureFile::parse(FEATURES, "wall_clock").unwrap();
    let now = Arc::new(AtomicI64::new(0));
    let clock = {
        let now = now.clone();
        Clock::from_fn(move || now.load(Ordering::SeqCst))
    };
    let engine = Engine::new(
        &file,
        EngineOptions {
            backend: Some(backend),
            shards: 4,
            clock,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    Setup { file, engine, now }
}

fn push(engine: &Engine, events: &[Ev]) {
    let batch = RecordBatch::try_from_iter([
        (
            "k",
            Arc::new(Int64Array::from_iter(events.iter().map(|e| e.key))) as _,
        ),
        (
            "ts",
            Arc::new(Int64Array::from_iter(events.iter().map(|e| e.ts))) as _,
        ),
        (
            "x",
            Arc::new(Float64Array::from_iter(events.iter().map(|e| e.vals[0]))) as _,
        ),
    ])
    .unwrap();
    engine.push("v", &batch).unwrap();
}

/// Events of keys `0..KEYS` at times in `from..to`, in a mildly disordered order.
fn events(rng: &mut StdRng, n: usize, from: i64, to: i64) -> Vec<Ev> {
    let mut ts: Vec<i64> = (0..n).map(|_| rng.random_range(from..to)).collect();
    ts.sort_unstable();
    for i in 1..ts.len() {
        if rng.random_bool(0.2) {
            ts.swap(i - 1, i);
        }
    }
    ts.into_iter()
        .map(|t| Ev {
            key: Some(rng.random_range(0..KEYS)),
            ts: Some(t),
            vals: vec![
                rng.random_bool(0.9)
                    .then(|| rng.random_range(-50.0..50.0f64).round()),
            ],
        })
        .collect()
}

/// A default read (no `at`) of `keys` equals the oracle at the clock's time, for every
/// feature.
fn check_keys_at_now(
    s: &Setup,
    pushed: &[Ev],
    keys: Vec<i64>,
    ctx: &str,
) -> Result<(), PanesError> {
    let now = s.now.load(Ordering::SeqCst);
    let view = &s.file.views[0];
    let acc = accepted(view, pushed);
    let frame = s
        .engine
        .read("v", &Int64Array::from(keys.clone()), None, None)?;
    assert_eq!(
        frame.at, now,
        "{ctx}: a wall-clock view reads at the clock's time"
    );
    for (r, &k) in keys.iter().enumerate() {
        for (f, spec) in view.features.iter().enumerate() {
            let column = spec.column.as_ref().map(|_| 0);
            let want = feature(spec, column, &acc, k, now);
            let got = frame.valid[[r, f]].then(|| frame.values[[r, f]]);
            let sc = scale(spec.agg, spec, column, &acc, k, now);
            assert_close(spec.agg, got, want, sc, &|| {
                format!("{ctx}: key {k} feature {} at now = {now}", spec.name)
            });
        }
    }
    Ok(())
}

/// [`check_keys_at_now`] for every key, and one never seen.
fn check_at_now(s: &Setup, pushed: &[Ev], ctx: &str) -> Result<(), PanesError> {
    check_keys_at_now(s, pushed, (0..=KEYS).collect(), ctx)
}

fn run(backend: BackendKind, seed: u64) {
    let s = setup(backend);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pushed = Vec::new();
    // Events up to 100 s; the clock follows them, reading between pushes.
    for step in 0..10 {
        let batch = events(&mut rng, 300, step * 10_000, (step + 1) * 10_000);
        push(&s.engine, &batch);
        pushed.extend(batch);
        s.now.store((step + 1) * 10_000 + 250, Ordering::SeqCst);
        check_at_now(&s, &pushed, &format!("{backend:?} step {step}")).unwrap();
    }
    // Events stamped ahead of the clock, for keys 0..4. Reads at now of the other keys
    // are exact. Those keys' reads at now are refused with the reason, never answered
    // with a future event counted: a pane cannot be split at now ("also holds later
    // events"), and a ring sized to the window has recycled the oldest pane the window
    // needs ("already recycled").
    s.now.store(120_500, Ordering::SeqCst);
    let one = |key: i64, ts: i64| Ev {
        key: Some(key),
        ts: Some(ts),
        vals: vec![Some(1.0)],
    };
    let ahead: Vec<Ev> = (0..4).map(|k| one(k, 120_600 + 700 * k)).collect();
    push(&s.engine, &ahead);
    pushed.extend(ahead);
    check_keys_at_now(
        &s,
        &pushed,
        (4..=KEYS).collect(),
        &format!("{backend:?} ahead"),
    )
    .unwrap();
    let read = |key: i64| {
        s.engine
            .read("v", &Int64Array::from(vec![key]), None, None)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    for k in 0..4 {
        let e = read(k).unwrap_err();
        assert!(
            e.contains("also holds later events") || e.contains("already recycled"),
            "{backend:?} key {k}: {e}"
        );
    }
    // Time passes: idle keys' windows empty one feature after another; lifetime stays.
    for now in [
        123_000, 125_000, 131_000, 161_000, 175_000, 200_000, 10_000_000,
    ] {
        s.now.store(now, Ordering::SeqCst);
        check_at_now(&s, &pushed, &format!("{backend:?} idle at {now}")).unwrap();
    }
    let frame = s
        .engine
        .read(
            "v",
            &Int64Array::from(vec![0]),
            None,
            Some(&["n_10s", "n_life"]),
        )
        .unwrap();
    assert_eq!(
        frame.values[[0, 0]],
        0.0,
        "the 10 s window is empty long after"
    );
    assert!(
        frame.values[[0, 1]] > 0.0,
        "lifetime features keep every event"
    );
    // An event far ahead of the clock recycles the panes of now for its key: reads of
    // that key at now are refused with the reason until the clock catches up; other
    // keys are not affected.
    push(&s.engine, &[one(3, 10_100_000)]);
    pushed.push(one(3, 10_100_000));
    let e = read(3).unwrap_err();
    assert!(e.contains("already recycled"), "{backend:?}: {e}");
    read(0).unwrap();
    s.now.store(10_100_000, Ordering::SeqCst);
    check_at_now(&s, &pushed, &format!("{backend:?} caught up")).unwrap();
}

#[test]
fn wall_clock_reads_match_the_oracle_scalar() {
    run(BackendKind::Scalar, 1);
}

#[test]
fn wall_clock_reads_match_the_oracle_cpu() {
    run(BackendKind::Cpu, 2);
}

#[test]
fn wall_clock_reads_match_the_oracle_gpu() {
    if !common::gpu_available() {
        return;
    }
    run(BackendKind::Gpu, 3);
}
