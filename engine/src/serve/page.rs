//! The status page of the HTTP port: `GET /` (one HTML page, no external assets),
//! `GET /status.json` (what the page shows, as JSON) and `GET /lookup?view=V&key=K`
//! (one key's current features, as JSON).
//!
//! The JSON takes its numbers from the same [`Shared::view_metrics`] as `/metrics`, so
//! the two agree. The rate of accepted events is measured between status requests at
//! least a second apart (the first request of a view starts it); the page's small
//! charts are drawn from its own successive polls: the server keeps no history.

use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};

use super::server::{ReadTimes, Shared, epoch_ms};
use crate::histogram::Histogram;
use crate::ingest::keys::KeyValue;
use crate::online::ViewMetrics;
use crate::spec::{FeatureSpec, ViewSpec, format_duration};

/// The page: HTML, CSS and script in one file.
pub(crate) const PAGE: &str = include_str!("page.html");

/// Longest key text `/lookup` takes, bytes.
const MAX_KEY_BYTES: usize = 1_024;

/// Everything the page shows, as of now.
pub(crate) fn status(shared: &Shared) -> Value {
    let now = epoch_ms();
    let views: Vec<Value> = shared
        .engine
        .views()
        .map(|v| view_status(shared, &v.spec, now))
        .collect();
    let (c, h) = (&shared.conns, &shared.http);
    json!({
        "now_ms": now,
        "started_ms": shared.started_ms,
        "backend": shared.engine.backend().kind().name(),
        "views": views,
        "connections": {
            "grpc_open": c.open.load(Relaxed),
            "grpc_refused": c.refused.load(Relaxed),
            "grpc_timed_out": c.timed_out.load(Relaxed),
            "accept_errors": c.accept_errors.load(Relaxed),
            "http_open": h.open.load(Relaxed),
            "http_refused": h.refused.load(Relaxed),
            "http_errors": h.failed.load(Relaxed),
        },
    })
}

fn feature(f: &FeatureSpec) -> Value {
    let window = f.window.to_string();
    json!({
        "name": f.name,
        "agg": f.agg.name(),
        "column": f.column,
        "window": window,
        "hop": format_duration(f.hop),
        "filter": f.filter,
    })
}

/// A view's last sample of accepted events and the rate measured up to it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RateSample {
    at_ms: i64,
    accepted: u64,
    per_second: Option<f64>,
}

/// Events per second accepted by `view`, from the previous sample at least a second
/// old (replaced by this one), else the rate measured at that sample.
fn accepted_rate(shared: &Shared, view: &str, accepted: u64, now: i64) -> Option<f64> {
    let mut rates = shared.rates.lock().unwrap_or_else(|p| p.into_inner());
    let fresh = RateSample {
        at_ms: now,
        accepted,
        per_second: None,
    };
    let sample = rates.entry(view.to_string()).or_insert(fresh);
    if now - sample.at_ms >= 1_000 {
        let seconds = (now - sample.at_ms) as f64 / 1e3;
        *sample = RateSample {
            per_second: Some(accepted.saturating_sub(sample.accepted) as f64 / seconds),
            ..fresh
        };
    }
    sample.per_second
}

fn view_status(shared: &Shared, spec: &ViewSpec, now: i64) -> Value {
    let name = &spec.name;
    let mut out = json!({
        "name": name,
        "key": spec.key,
        "time": spec.time,
        "allowed_lateness": format_duration(spec.allowed_lateness),
        "filter": spec.filter,
        "features": spec.features.iter().map(feature).collect::<Vec<_>>(),
    });
    match shared.view_metrics(name) {
        Ok(m) => {
            let rate = accepted_rate(shared, name, m.counters.accepted, now);
            merge(&mut out, counters(&m, now));
            merge(&mut out, json!({ "accepted_per_second": rate }));
        }
        Err(e) => merge(&mut out, json!({ "error": e.to_string() })),
    }
    if let Ok(h) = shared.engine.freshness(name) {
        merge(&mut out, json!({ "freshness": percentiles(h) }));
    }
    if let Some(h) = shared.read_time.get(name) {
        let by_keys: serde_json::Map<String, Value> = ReadTimes::SIZES
            .iter()
            .zip(&h.by_keys)
            .filter(|(_, h)| h.count() > 0)
            .map(|(size, h)| (size.to_string(), percentiles(h)))
            .collect();
        let mut reads = percentiles(&h.all);
        merge(&mut reads, json!({ "by_keys": by_keys }));
        merge(&mut out, json!({ "reads": reads }));
    }
    if let Some(c) = shared
        .checkpoints
        .get(name)
        .filter(|_| shared.options.checkpoint_dir.is_some())
    {
        merge(
            &mut out,
            json!({ "checkpoints": {
                "written": c.written.load(Relaxed),
                "failed": c.failed.load(Relaxed),
                "last_bytes": c.last_bytes.load(Relaxed),
                "last_at_ms": Some(c.last_at_ms.load(Relaxed)).filter(|&t| t > 0),
                "last_seconds": c.last_micros.load(Relaxed) as f64 / 1e6,
            }}),
        );
    }
    if let Some(s) = shared.sources.get(name) {
        let stats = s.stats();
        let bad: serde_json::Map<String, Value> = crate::sources::BadMessage::ALL
            .iter()
            .map(|&why| {
                (
                    why.name().to_string(),
                    json!(stats.bad[why as usize].load(Relaxed)),
                )
            })
            .collect();
        merge(
            &mut out,
            json!({ "source": {
                "kind": "kafka",
                "partitions": s.positions().iter().map(|p| json!({
                    "partition": p.partition,
                    "next_offset": p.next_offset,
                    "end": p.end,
                    "lag": p.lag(),
                })).collect::<Vec<_>>(),
                "messages": stats.messages.load(Relaxed),
                "bad": bad,
                "dead_lettered": stats.dead_lettered.load(Relaxed),
                "duplicates": stats.duplicates.load(Relaxed),
                "rebalances": stats.rebalances.load(Relaxed),
                "checkpoints": stats.checkpoints.load(Relaxed),
                "checkpoint_failures": stats.checkpoint_failures.load(Relaxed),
                "checkpoints_skipped": stats.skipped.load(Relaxed),
            }}),
        );
    }
    out
}

/// Count, median and 99th percentile (ms) of a histogram.
fn percentiles(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "p50_ms": h.quantile(0.5).map(|s| s * 1e3),
        "p99_ms": h.quantile(0.99).map(|s| s * 1e3),
    })
}

fn counters(m: &ViewMetrics, now: i64) -> Value {
    let rejected: serde_json::Map<String, Value> = m
        .rejected_by_reason()
        .into_iter()
        .map(|(why, n)| (why.to_string(), json!(n)))
        .collect();
    json!({
        "accepted": m.counters.accepted,
        "late": m.counters.late,
        "rejected": rejected,
        "filtered": m.counters.filtered,
        "expr_errors": m.counters.expr_errors,
        "folded": m.folded,
        "pending": m.pending,
        "publishes": m.version,
        "keys": m.keys,
        "state_bytes": m.state_bytes,
        "watermark_ms": m.watermark,
        "max_event_time_ms": m.max_event_time,
        "event_time_lag_seconds": m.max_event_time.map(|t| (now - t) as f64 / 1e3),
        "backend": m.backend,
    })
}

/// Adds the fields of object `more` to object `out`.
fn merge(out: &mut Value, more: Value) {
    if let (Value::Object(o), Value::Object(m)) = (out, more) {
        o.extend(m);
    }
}

/// A key as the page's lookup box gives it: an integer, a JSON array for a composite
/// key (`[17, "x"]`), else the text as a string.
fn parse_key(text: &str) -> Option<KeyValue> {
    fn from_json(v: &Value) -> Option<KeyValue> {
        match v {
            Value::Number(n) => n.as_i64().map(|i| KeyValue::Int(i.into())),
            Value::String(s) => Some(KeyValue::Str(s.clone())),
            _ => None,
        }
    }
    let text = text.trim();
    if let Ok(i) = text.parse::<i128>() {
        return Some(KeyValue::Int(i));
    }
    if text.starts_with('[') {
        let Value::Array(parts) = serde_json::from_str(text).ok()? else {
            return None;
        };
        return parts
            .iter()
            .map(from_json)
            .collect::<Option<Vec<_>>>()
            .map(KeyValue::Tuple);
    }
    Some(KeyValue::Str(text.to_string()))
}

/// The value of query parameter `name`, percent-decoded: `None` when absent,
/// `Some(None)` when it is not percent-encoded UTF-8.
pub(crate) fn query_param(query: &str, name: &str) -> Option<Option<String>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == name).then(|| decode(v))
    })
}

/// Query parameter `name` of a lookup, or the error that says what is wrong with it.
fn lookup_param(query: &str, name: &str) -> Result<String, (bool, String)> {
    match query_param(query, name) {
        None => Err((false, "give ?view=NAME&key=KEY".into())),
        Some(None) => Err((false, format!("{name}: not percent-encoded UTF-8"))),
        Some(Some(v)) => Ok(v),
    }
}

/// Percent-decoding (`+` as a space); `None` for a bad escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                (hi * 16 + lo) as u8
            }
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// One key's current features (`/lookup`): `Ok` with the JSON, or `Err` with a message
/// for a `400` (or `404` for an unknown view, flagged by the `bool`).
pub(crate) fn lookup(shared: &Shared, query: &str) -> Result<Value, (bool, String)> {
    let view = lookup_param(query, "view")?;
    let key = lookup_param(query, "key")?;
    if key.len() > MAX_KEY_BYTES {
        return Err((false, format!("key: longer than {MAX_KEY_BYTES} bytes")));
    }
    let value = parse_key(&key).ok_or((false, format!("key {key:?}: not a key")))?;
    let spec = &shared
        .engine
        .views()
        .find(|v| v.spec.name == view)
        .ok_or((true, format!("no view {view:?}")))?
        .spec;
    // Digits name an integer key, or a string one where the view's keys are strings.
    let tries = match &value {
        KeyValue::Int(_) => vec![value.clone(), KeyValue::Str(key.trim().to_string())],
        _ => vec![value],
    };
    let mut last = String::new();
    for k in tries {
        match shared
            .engine
            .read_snapshot(&view, std::slice::from_ref(&k), None, None)
        {
            Ok(served) => {
                let f = &served.frame;
                let features: serde_json::Map<String, Value> = f
                    .names
                    .iter()
                    .enumerate()
                    .map(|(c, name)| (name.clone(), cell(f, c)))
                    .collect();
                let latest = served.latest_event_ms[0];
                return Ok(json!({
                    "view": view,
                    "key": k.to_string(),
                    "key_columns": spec.key,
                    "at_ms": f.at,
                    "latest_event_ms": (latest != i64::MIN).then_some(latest),
                    "features": features,
                }));
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err((false, last))
}

/// Feature `c` of the frame's one row as JSON: null, a number (non-finite ones as
/// text), a string, or a list.
fn cell(f: &crate::online::FeatureFrame, c: usize) -> Value {
    let number = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else {
            json!(x.to_string())
        }
    };
    let text = |x: f64| json!(f.strings.get(x as usize).map_or("", String::as_str));
    if !f.valid[[0, c]] {
        Value::Null
    } else if f.is_list[c] {
        let items = f.list(0, c).iter();
        Value::Array(if f.text[c] {
            items.map(|&x| text(x)).collect()
        } else {
            items.map(|&x| number(x)).collect()
        })
    } else if f.text[c] {
        text(f.values[[0, c]])
    } else {
        number(f.values[[0, c]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_query_parameters_parse() {
        assert_eq!(parse_key(" 42 "), Some(KeyValue::Int(42)));
        assert_eq!(parse_key("card-7"), Some(KeyValue::Str("card-7".into())));
        assert_eq!(
            parse_key(r#"[1, "x"]"#),
            Some(KeyValue::Tuple(vec![
                KeyValue::Int(1),
                KeyValue::Str("x".into())
            ]))
        );
        assert_eq!(parse_key("[1, {}]"), None);
        assert_eq!(parse_key("[1,"), None);
        let q = "view=cards&key=%5B1%2C%22a+b%22%5D&x";
        assert_eq!(query_param(q, "view"), Some(Some("cards".into())));
        assert_eq!(query_param(q, "key"), Some(Some(r#"[1,"a b"]"#.into())));
        assert_eq!(query_param(q, "x"), Some(Some(String::new())));
        assert_eq!(query_param(q, "y"), None);
        assert_eq!(query_param("key=%zz", "key"), Some(None));
        assert_eq!(query_param("key=%ff", "key"), Some(None), "not UTF-8");
        assert_eq!(query_param("key=%4", "key"), Some(None));
        assert!(
            lookup_param("key=%4", "key")
                .unwrap_err()
                .1
                .contains("percent")
        );
        assert!(
            lookup_param("view=x", "key")
                .unwrap_err()
                .1
                .contains("?view=")
        );
    }
}
