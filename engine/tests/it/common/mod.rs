//! A naive oracle: recomputes every feature from the raw events with the formula of
//! DESIGN §3, with no panes, no key index and no shared code with the engine.

#![allow(dead_code)]
// The window test is written exactly as DESIGN §3 states it.
#![allow(clippy::int_plus_one)]

use panes_engine::{Agg, FeatureSpec, ViewSpec, Window};

/// One raw event as pushed (arrival order is the Vec order).
#[derive(Clone, Debug)]
pub struct Ev {
    pub key: Option<i64>,
    pub ts: Option<i64>,
    /// Per value column: None = null (NaN allowed).
    pub vals: Vec<Option<f64>>,
}

/// The accepted events, per the lateness rule (null key / time rejected first).
pub fn accepted(view: &ViewSpec, events: &[Ev]) -> Vec<(usize, Ev)> {
    let mut max: Option<i64> = None;
    let mut out = Vec::new();
    for (i, e) in events.iter().enumerate() {
        let (Some(_), Some(ts)) = (e.key, e.ts) else {
            continue;
        };
        if let Some(m) = max
            && ts < m - view.allowed_lateness
        {
            continue;
        }
        max = Some(max.map_or(ts, |m| m.max(ts)));
        out.push((i, e.clone()));
    }
    out
}

/// Expected value of `f` for `key` at `t` (None = null).
pub fn feature(
    f: &FeatureSpec,
    column: Option<usize>,
    acc: &[(usize, Ev)],
    key: i64,
    t: i64,
) -> Option<f64> {
    let evs = window(f, acc, key, t);
    // 2^(−(t − ts)/h), as DESIGN §3b states it.
    let decayed = |half_life: i64, vals: &mut dyn Iterator<Item = (i64, f64)>| {
        vals.map(|(ts, v)| v * (-((t - ts) as f64) / half_life as f64).exp2())
            .sum::<f64>()
    };
    let Some(c) = column else {
        return match f.agg {
            Agg::Count => Some(evs.len() as f64),
            Agg::DecayedCount { half_life } => Some(decayed(
                half_life,
                &mut evs.iter().map(|(_, e)| (e.ts.unwrap(), 1.0)),
            )),
            a => panic!("{a} without a column"),
        };
    };
    let vals: Vec<(usize, i64, f64)> = evs
        .iter()
        .filter_map(|(i, e)| {
            e.vals[c]
                .filter(|v| !v.is_nan())
                .map(|v| (*i, e.ts.unwrap(), v))
        })
        .collect();
    let n = vals.len() as f64;
    let sum: f64 = vals.iter().map(|x| x.2).sum();
    match f.agg {
        Agg::Count => Some(n),
        Agg::Sum => Some(sum),
        Agg::Mean => (n > 0.0).then(|| sum / n),
        Agg::Min => vals.iter().map(|x| x.2).reduce(f64::min),
        Agg::Max => vals.iter().map(|x| x.2).reduce(f64::max),
        Agg::Var | Agg::Std => (n >= 2.0).then(|| {
            let mean = sum / n;
            let var = vals.iter().map(|x| (x.2 - mean).powi(2)).sum::<f64>() / (n - 1.0);
            if f.agg == Agg::Std { var.sqrt() } else { var }
        }),
        // Greatest ts; ties: the one that arrived last.
        Agg::Last => vals.iter().max_by_key(|x| (x.1, x.0)).map(|x| x.2),
        // Smallest ts; ties: the one that arrived first.
        Agg::First => vals.iter().min_by_key(|x| (x.1, x.0)).map(|x| x.2),
        Agg::DecayedSum { half_life } => {
            Some(decayed(half_life, &mut vals.iter().map(|x| (x.1, x.2))))
        }
        Agg::DecayedCount { half_life } => {
            Some(decayed(half_life, &mut vals.iter().map(|x| (x.1, 1.0))))
        }
        // The exact number of distinct values (−0.0 is 0.0); `assert_close` holds the
        // estimate to the bound of DESIGN §3b.
        Agg::ApproxDistinct { .. } => {
            let mut v: Vec<u64> = vals.iter().map(|x| (x.2 + 0.0).to_bits()).collect();
            v.sort_unstable();
            v.dedup();
            Some(v.len() as f64)
        }
        Agg::LastN { .. } | Agg::TopK { .. } => {
            Some(feature_list(f, column, acc, key, t).len() as f64)
        }
        // The exact v[⌊q · (n − 1)⌋]; `assert_close` holds the sketch to α of it.
        Agg::Quantile { q, .. } => {
            let mut v: Vec<f64> = vals.iter().map(|x| x.2).collect();
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| v[(q.get() * (v.len() - 1) as f64).floor() as usize])
        }
    }
}

/// The list a list-valued feature (`last_n`) holds for `key` at `t`: the values of
/// the `n` events with the greatest (ts, arrival), newest first.
pub fn feature_list(
    f: &FeatureSpec,
    column: Option<usize>,
    acc: &[(usize, Ev)],
    key: i64,
    t: i64,
) -> Vec<f64> {
    let c = column.expect("lists have a column");
    if let Agg::TopK { k, .. } = f.agg {
        // Exact frequencies (−0.0 is 0.0), most frequent first, ties to the smaller.
        let mut counts: Vec<(f64, usize)> = Vec::new();
        for (_, e) in window(f, acc, key, t) {
            let Some(x) = e.vals[c].filter(|v| !v.is_nan()).map(|v| v + 0.0) else {
                continue;
            };
            match counts.iter_mut().find(|(v, _)| *v == x) {
                Some(e) => e.1 += 1,
                None => counts.push((x, 1)),
            }
        }
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.total_cmp(&b.0)));
        return counts.iter().take(k.into()).map(|e| e.0).collect();
    }
    let Agg::LastN { n } = f.agg else {
        return Vec::new();
    };
    let mut vals: Vec<(i64, usize, f64)> = window(f, acc, key, t)
        .into_iter()
        .filter_map(|(i, e)| {
            e.vals[c]
                .filter(|v| !v.is_nan())
                .map(|v| (e.ts.unwrap(), *i, v))
        })
        .collect();
    vals.sort_by_key(|&(ts, i, _)| std::cmp::Reverse((ts, i)));
    vals.iter().take(n.into()).map(|x| x.2).collect()
}

/// The accepted events of `key` in the window of `f` at `t`, by the definitions of
/// DESIGN §3 (time windows) and §3b (count and session windows).
pub fn window<'a>(
    f: &FeatureSpec,
    acc: &'a [(usize, Ev)],
    key: i64,
    t: i64,
) -> Vec<&'a (usize, Ev)> {
    let ts = |e: &Ev| e.ts.unwrap();
    let mut evs: Vec<&(usize, Ev)> = acc
        .iter()
        .filter(|(_, e)| e.key == Some(key) && ts(e) <= t)
        .collect();
    // In (ts, arrival) order.
    evs.sort_by_key(|(i, e)| (ts(e), *i));
    match f.window {
        Window::Lifetime => evs,
        Window::Duration(w) => {
            let n = w / f.hop;
            evs.retain(|(_, e)| ts(e).div_euclid(f.hop) > t.div_euclid(f.hop) - n);
            evs
        }
        // The up to n events with the greatest (ts, arrival).
        Window::Events(n) => evs.split_off(evs.len().saturating_sub(n as usize)),
        // The longest suffix with consecutive gaps of at most `gap`; none when the
        // last event is more than `gap` before t.
        Window::Session(gap) => {
            let Some(last) = evs.last() else { return evs };
            if t - ts(&last.1) > gap {
                return Vec::new();
            }
            let mut start = evs.len() - 1;
            while start > 0 && ts(&evs[start].1) - ts(&evs[start - 1].1) <= gap {
                start -= 1;
            }
            evs.split_off(start)
        }
    }
}

/// Sum of |x| over the window: the scale of summation error.
pub fn abs_scale(
    f: &FeatureSpec,
    column: Option<usize>,
    acc: &[(usize, Ev)],
    key: i64,
    t: i64,
) -> f64 {
    let Some(c) = column else { return 0.0 };
    let g = FeatureSpec {
        agg: Agg::Sum,
        ..f.clone()
    };
    let abs: Vec<(usize, Ev)> = acc
        .iter()
        .map(|(i, e)| {
            let mut e = e.clone();
            e.vals = e.vals.iter().map(|v| v.map(f64::abs)).collect();
            (*i, e)
        })
        .collect();
    feature(&g, Some(c), &abs, key, t).unwrap_or(0.0)
}

/// The scale against which summation error is measured for `agg`: `Σ|x|` for sums,
/// `Σ|x| / n` for means, `(Σ|x| / n)²` for variances.
pub fn scale(
    agg: Agg,
    f: &FeatureSpec,
    column: Option<usize>,
    acc: &[(usize, Ev)],
    key: i64,
    t: i64,
) -> f64 {
    let s = abs_scale(f, column, acc, key, t);
    let cnt = FeatureSpec {
        agg: Agg::Count,
        ..f.clone()
    };
    let n = feature(&cnt, column, acc, key, t).unwrap_or(0.0).max(1.0);
    match agg {
        // Every weight is at most 2^(window / half_life) ≥ 1 times the value's own.
        Agg::Sum | Agg::DecayedSum { .. } => s,
        Agg::DecayedCount { .. } => n,
        Agg::Mean => s / n,
        Agg::Var | Agg::Std => (s / n).powi(2),
        _ => 0.0,
    }
}

/// Asserts `got` equals `want` under the contract: count/min/max/last identical,
/// sum/mean/var/std within 1e-9 relative to the summation scale (see [`scale`]).
pub fn assert_close(
    agg: Agg,
    got: Option<f64>,
    want: Option<f64>,
    scale: f64,
    ctx: &dyn Fn() -> String,
) {
    match (got, want) {
        (None, None) => {}
        (Some(g), Some(w)) => {
            let ok = match agg {
                Agg::ApproxDistinct { precision } => {
                    let se = 1.04 / f64::from(1u32 << precision).sqrt();
                    (g - w).abs() <= (3.0 * se * w).max(3.0)
                }
                Agg::Quantile {
                    relative_accuracy, ..
                } => (g - w).abs() <= relative_accuracy.get() * w.abs(),
                a if a.bitwise() => g == w || (g.is_nan() && w.is_nan()),
                // The list's length; lists are compared apart.
                Agg::TopK { .. } => g == w,
                Agg::Sum | Agg::Mean => (g - w).abs() <= 1e-9 * scale.max(w.abs()),
                Agg::DecayedSum { .. } | Agg::DecayedCount { .. } => {
                    (g - w).abs() <= 1e-9 * scale.max(w.abs())
                }
                Agg::Var => (g - w).abs() <= 1e-9 * scale.max(w.abs()),
                Agg::Std => (g * g - w * w).abs() <= 1e-9 * scale.max(w * w),
                _ => unreachable!("{agg} is bitwise"),
            };
            assert!(ok, "{}: {agg} got {g:?}, want {w:?}", ctx());
        }
        _ => panic!("{}: {agg} got {got:?}, want {want:?}", ctx()),
    }
}

/// Whether the GPU backend can run here. With `PANES_REQUIRE_GPU=1` (set by the test
/// command, which installs Mesa's software Vulkan driver) a missing adapter fails the
/// calling test instead of skipping its GPU part.
#[allow(dead_code)]
pub fn gpu_available() -> bool {
    match panes_engine::BackendKind::Gpu.create() {
        Ok(_) => true,
        Err(e) if std::env::var("PANES_REQUIRE_GPU").is_ok_and(|v| v == "1") => {
            panic!("PANES_REQUIRE_GPU=1 but the GPU backend is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("GPU part skipped (set PANES_REQUIRE_GPU=1 to fail instead): {e}");
            false
        }
    }
}
