//! The HTTP port (`--metrics`): `GET /metrics`, the Prometheus text of every view, and
//! the status page (`GET /`, `/status.json`, `/lookup`: see [`super::page`]).
//!
//! Served by hyper (HTTP/1.1, one request per connection) behind limits that a slow
//! or hostile client cannot get around: at most [`MAX_CONNECTIONS`] connections at
//! once (more are closed on accept, so that a flood cannot take the descriptors the
//! gRPC port needs), a request head must arrive whole within [`HEAD_TIMEOUT`] of the
//! connection opening (an idle or trickling client is closed), a head is at most
//! [`MAX_HEAD_BYTES`], a TLS handshake must finish within [`HEAD_TIMEOUT`], and no
//! connection lives longer than [`CONNECTION_LIFETIME`]. Malformed requests get
//! hyper's `400` (or `431` for a head too large) and the connection is closed.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::auth::TlsFiles;
use super::server::Shared;
use crate::histogram::Histogram;

/// Most connections open at once on the HTTP port.
pub(crate) const MAX_CONNECTIONS: usize = 1_024;
/// Longest wait for a request head (or a TLS handshake), from the connection opening.
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, however busy.
pub(crate) const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request head, bytes (hyper's smallest read buffer).
pub(crate) const MAX_HEAD_BYTES: usize = 8_192;

/// Connections of the HTTP port, for its own metrics.
#[derive(Debug, Default)]
pub(crate) struct HttpStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections closed on accept at [`MAX_CONNECTIONS`].
    pub refused: AtomicU64,
    /// Connections that ended in an error: a malformed request, a head over the
    /// limit or late, a failed TLS handshake, a reset.
    pub failed: AtomicU64,
}

/// Accepts connections until the task is aborted: over TLS when the server has it,
/// and with an `admin` token when it has tokens.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let tls = match shared.options.tls.as_ref().map(TlsFiles::rustls) {
        None => None,
        Some(Ok(config)) => Some(tokio_rustls::TlsAcceptor::from(config)),
        Some(Err(e)) => {
            tracing::error!(error = %e, "the metrics endpoint is off");
            return;
        }
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            // Descriptors exhausted: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.http.refused.fetch_add(1, Ordering::Relaxed);
            drop(socket);
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenConnection::new(shared.clone());
            let stats = shared.clone();
            let connection = async move {
                match tls {
                    Some(tls) => match tokio::time::timeout(HEAD_TIMEOUT, tls.accept(socket)).await
                    {
                        Ok(Ok(stream)) => connection(stream, shared).await,
                        _ => false,
                    },
                    None => connection(socket, shared).await,
                }
            };
            // A connection cut at the end of its life counts as failed too.
            let ok = tokio::time::timeout(CONNECTION_LIFETIME, connection)
                .await
                .unwrap_or(false);
            if !ok {
                stats.http.failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Counts a connection in [`HttpStats::open`] while it lives.
struct OpenConnection(Arc<Shared>);

impl OpenConnection {
    fn new(shared: Arc<Shared>) -> Self {
        shared.http.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(shared)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.http.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the requests of one connection; whether it ended without an error.
async fn connection<S>(stream: S, shared: Arc<Shared>) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service =
        hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let shared = shared.clone();
            // The body is not read: every route is a GET.
            let (request, _body) = request.into_parts();
            async move { Ok::<_, Infallible>(respond(request, shared).await) }
        });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await
        .is_ok()
}

/// The response to one request.
async fn respond(request: http::request::Parts, shared: Arc<Shared>) -> Response<Full<Bytes>> {
    let authorization = request
        .headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Some(tokens) = &shared.options.tokens {
        match tokens.authenticate(authorization) {
            Ok(caller) if caller.is_admin() => {}
            Ok(_) => {
                return text(
                    StatusCode::FORBIDDEN,
                    "the metrics need a token with the admin scope\n".into(),
                );
            }
            Err(_) => {
                return text(
                    StatusCode::UNAUTHORIZED,
                    "send `Authorization: Bearer <token>` (admin scope)\n".into(),
                );
            }
        }
    }
    let path = request.uri.path();
    if request.method != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    let query = request.uri.query().unwrap_or("").to_string();
    // The counters are read on a write thread, as a fold would: never beside one.
    let s = shared.clone();
    let answer = match path {
        "/metrics" => {
            shared
                .on_writes(move || text(StatusCode::OK, render(&s, &s.engine)))
                .await
        }
        "/status.json" => {
            shared
                .on_writes(move || json(StatusCode::OK, &super::page::status(&s)))
                .await
        }
        "/lookup" => {
            shared
                .on_reads(move || match super::page::lookup(&s, &query) {
                    Ok(v) => json(StatusCode::OK, &v),
                    Err((unknown, why)) => {
                        let code = if unknown {
                            StatusCode::NOT_FOUND
                        } else {
                            StatusCode::BAD_REQUEST
                        };
                        json(code, &serde_json::json!({ "error": why }))
                    }
                })
                .await
        }
        "/" => Ok(typed(
            StatusCode::OK,
            super::page::PAGE.into(),
            "text/html; charset=utf-8",
        )),
        _ => Ok(text(
            StatusCode::NOT_FOUND,
            "served here: GET /, /status.json, /lookup?view=V&key=K, /metrics\n".into(),
        )),
    };
    answer.unwrap_or_else(|s| text(StatusCode::INTERNAL_SERVER_ERROR, s.message().to_string()))
}

fn typed(code: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    typed(code, body, "text/plain; version=0.0.4; charset=utf-8")
}

fn json(code: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    typed(code, value.to_string(), "application/json")
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text of every view.
pub(crate) fn render(shared: &Shared, engine: &crate::online::Engine) -> String {
    let mut out = String::new();
    let now = super::server::epoch_ms();
    let mut metrics = Vec::new();
    for v in engine.views() {
        match shared.view_metrics(&v.spec.name) {
            Ok(m) => metrics.push(m),
            Err(e) => {
                let _ = writeln!(out, "# view {:?}: {e}", v.spec.name);
            }
        }
    }
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        &mut out,
        "panes_backend_info",
        "gauge",
        "The backend in use (value 1).",
    );
    let _ = writeln!(
        out,
        "panes_backend_info{{backend=\"{}\"}} 1",
        engine.backend().kind().name()
    );
    let per_view = |out: &mut String,
                    name: &str,
                    kind: &str,
                    help: &str,
                    value: &dyn Fn(&crate::online::ViewMetrics) -> Option<f64>| {
        family(out, name, kind, help);
        for m in &metrics {
            if let Some(x) = value(m) {
                let _ = writeln!(out, "{name}{{view=\"{}\"}} {x}", escape(&m.view));
            }
        }
    };
    per_view(
        &mut out,
        "panes_events_accepted_total",
        "counter",
        "Events accepted.",
        &|m| Some(m.counters.accepted as f64),
    );
    per_view(
        &mut out,
        "panes_events_late_total",
        "counter",
        "Events rejected as late.",
        &|m| Some(m.counters.late as f64),
    );
    per_view(
        &mut out,
        "panes_events_filtered_total",
        "counter",
        "Events the view's filter left out.",
        &|m| Some(m.counters.filtered as f64),
    );
    per_view(
        &mut out,
        "panes_expression_errors_total",
        "counter",
        "Events for which a derived column or filter could not be evaluated (null for them).",
        &|m| Some(m.counters.expr_errors as f64),
    );
    family(
        &mut out,
        "panes_events_rejected_total",
        "counter",
        "Events rejected, by reason.",
    );
    for m in &metrics {
        for (reason, n) in m.rejected_by_reason() {
            let _ = writeln!(
                out,
                "panes_events_rejected_total{{view=\"{}\",reason=\"{reason}\"}} {n}",
                escape(&m.view)
            );
        }
    }
    per_view(
        &mut out,
        "panes_events_folded_total",
        "counter",
        "Events folded into the state.",
        &|m| Some(m.folded as f64),
    );
    per_view(
        &mut out,
        "panes_events_pending",
        "gauge",
        "Accepted events not yet folded.",
        &|m| Some(m.pending as f64),
    );
    per_view(
        &mut out,
        "panes_publishes_total",
        "counter",
        "States published to reads.",
        &|m| Some(m.version as f64),
    );
    per_view(
        &mut out,
        "panes_watermark_ms",
        "gauge",
        "Latest event time minus allowed lateness, epoch ms.",
        &|m| m.watermark.map(|w| w as f64),
    );
    per_view(
        &mut out,
        "panes_event_time_lag_seconds",
        "gauge",
        "Wall clock minus the latest event time.",
        &|m| m.max_event_time.map(|t| (now - t) as f64 / 1e3),
    );
    per_view(&mut out, "panes_keys", "gauge", "Distinct keys.", &|m| {
        Some(m.keys as f64)
    });
    per_view(
        &mut out,
        "panes_state_bytes",
        "gauge",
        "Bytes of pane state (both replicas, with their read copies).",
        &|m| Some(m.state_bytes as f64),
    );
    type Of = for<'e> fn(&'e crate::online::Engine, &str) -> crate::error::Result<&'e Histogram>;
    let histograms: [(&str, &str, Of); 2] = [
        (
            "panes_fold_duration_seconds",
            "Duration of micro-batch folds.",
            crate::online::Engine::fold_time,
        ),
        (
            "panes_freshness_seconds",
            "Per accepted event, from its push's arrival to its visibility in reads (pushed \
             views; a Kafka view's partitions are not counted here).",
            crate::online::Engine::freshness,
        ),
    ];
    for (name, help, of) in histograms {
        family(&mut out, name, "histogram", help);
        for v in engine.views() {
            if let Ok(h) = of(engine, &v.spec.name) {
                h.write_prometheus(
                    &mut out,
                    name,
                    &format!("view=\"{}\"", escape(&v.spec.name)),
                );
            }
        }
    }
    family(
        &mut out,
        "panes_read_duration_seconds",
        "histogram",
        "Server-side duration of feature reads (GetFeatures, DoGet).",
    );
    for v in engine.views() {
        if let Some(h) = shared.read_time.get(&v.spec.name) {
            h.all.write_prometheus(
                &mut out,
                "panes_read_duration_seconds",
                &format!("view=\"{}\"", escape(&v.spec.name)),
            );
        }
    }
    let name = "panes_read_duration_by_keys_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Server-side duration of feature reads by keys per request (`keys`: the size \
         class's upper bound).",
    );
    for v in engine.views() {
        if let Some(h) = shared.read_time.get(&v.spec.name) {
            for (size, h) in super::server::ReadTimes::SIZES.iter().zip(&h.by_keys) {
                let labels = format!("view=\"{}\",keys=\"{size}\"", escape(&v.spec.name));
                h.write_prometheus(&mut out, name, &labels);
            }
        }
    }
    if let Some(b) = engine.options().state_budget.as_deref() {
        let _ = writeln!(
            out,
            "# HELP panes_state_budget_bytes The state memory budget (--max-state-memory).\n\
             # TYPE panes_state_budget_bytes gauge\npanes_state_budget_bytes {}\n\
             # HELP panes_state_budget_used_bytes State memory charged to the budget by keys.\n\
             # TYPE panes_state_budget_used_bytes gauge\npanes_state_budget_used_bytes {}",
            b.limit(),
            b.used()
        );
    }
    let _ = writeln!(
        out,
        "# HELP panes_write_queue_bytes Input held by queued and running writes (bounded by --max-write-queue-bytes).\n\
         # TYPE panes_write_queue_bytes gauge\npanes_write_queue_bytes {}",
        shared.write_queue_bytes()
    );
    render_connections(&mut out, shared);
    render_subscriptions(&mut out, shared);
    render_sinks(&mut out, shared);
    render_read_log(&mut out, shared);
    render_checkpoints(&mut out, shared);
    render_sources(&mut out, shared);
    out
}

/// Checkpoints written, failed and fenced, per view: pushed views' own, sourced
/// views' summed over their partitions.
fn render_checkpoints(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rows: Vec<(&str, [u64; 3])> = shared
        .checkpoints
        .iter()
        .map(|(v, c)| {
            let counts = [&c.written, &c.failed, &c.fenced].map(|n| n.load(Relaxed));
            (v.as_str(), counts)
        })
        .collect();
    rows.extend(shared.sources.values().map(|s| {
        let stats = s.stats();
        let counts = [
            &stats.checkpoints,
            &stats.checkpoint_failures,
            &stats.checkpoint_fenced,
        ]
        .map(|n| n.load(Relaxed));
        (s.spec().name.as_str(), counts)
    }));
    rows.sort_unstable();
    for (column, (name, help)) in [
        (
            "panes_checkpoints_total",
            "Checkpoints written (of each partition, for a Kafka view).",
        ),
        (
            "panes_checkpoint_failures_total",
            "Checkpoints that failed (the store is unreachable, unwritable or full).",
        ),
        (
            "panes_checkpoint_fenced_total",
            "Checkpoint writes refused because another instance claimed the view or \
             partition since (a higher generation): the location is given up.",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (view, counts) in &rows {
            let _ = writeln!(
                out,
                "{name}{{view=\"{}\"}} {}",
                escape(view),
                counts[column]
            );
        }
    }
    // The last checkpoint of each pushed view (a Kafka view's are per partition).
    let mut pushed: Vec<_> = shared.checkpoints.iter().collect();
    pushed.sort_unstable_by_key(|(v, _)| v.as_str());
    let _ = writeln!(
        out,
        "# HELP panes_checkpoint_last_bytes Size of the view's last checkpoint.\n\
         # TYPE panes_checkpoint_last_bytes gauge"
    );
    for (view, c) in &pushed {
        let bytes = c.last_bytes.load(Relaxed);
        let _ = writeln!(
            out,
            "panes_checkpoint_last_bytes{{view=\"{}\"}} {bytes}",
            escape(view)
        );
    }
    let _ = writeln!(
        out,
        "# HELP panes_checkpoint_last_duration_seconds Time the view's last checkpoint took \
         (encode and write).\n# TYPE panes_checkpoint_last_duration_seconds gauge"
    );
    for (view, c) in &pushed {
        let seconds = c.last_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "panes_checkpoint_last_duration_seconds{{view=\"{}\"}} {seconds}",
            escape(view)
        );
    }
}

/// Counters of the views fed by sources (Kafka: the metric names say so).
fn render_sources(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;

    use crate::sources::{BadMessage, SourceStats};
    if shared.sources.is_empty() {
        return;
    }
    let mut views: Vec<_> = shared.sources.values().collect();
    views.sort_by(|a, b| a.spec().name.cmp(&b.spec().name));
    type Counter = (&'static str, &'static str, fn(&SourceStats) -> u64);
    let counters: [Counter; 5] = [
        (
            "panes_kafka_messages_total",
            "Kafka messages consumed.",
            |s| s.messages.load(Relaxed),
        ),
        (
            "panes_kafka_dead_lettered_total",
            "Bad messages sent to the dead-letter topic.",
            |s| s.dead_lettered.load(Relaxed),
        ),
        (
            "panes_kafka_duplicates_total",
            "Messages below a checkpointed offset, dropped.",
            |s| s.duplicates.load(Relaxed),
        ),
        (
            "panes_kafka_rebalances_total",
            "Consumer-group rebalances seen.",
            |s| s.rebalances.load(Relaxed),
        ),
        (
            "panes_checkpoints_skipped_total",
            "Corrupt or unusable checkpoints skipped on restore.",
            |s| s.skipped.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for v in &views {
            let _ = writeln!(
                out,
                "{name}{{view=\"{}\"}} {}",
                escape(&v.spec().name),
                value(v.stats())
            );
        }
    }
    let name = "panes_kafka_bad_messages_total";
    let _ = writeln!(
        out,
        "# HELP {name} Messages (or Arrow rows) not ingested, by reason.\n# TYPE {name} counter"
    );
    for v in &views {
        for why in BadMessage::ALL {
            let _ = writeln!(
                out,
                "{name}{{view=\"{}\",reason=\"{}\"}} {}",
                escape(&v.spec().name),
                why.name(),
                v.stats().bad[why as usize].load(Relaxed)
            );
        }
    }
    let name = "panes_kafka_consumer_lag";
    let _ = writeln!(
        out,
        "# HELP {name} Messages between a partition's end (from the client's statistics, \
         every 5 s) and the next one to ingest, per partition owned.\n# TYPE {name} gauge"
    );
    for v in &views {
        for p in v.positions() {
            if let Some(lag) = p.lag() {
                let _ = writeln!(
                    out,
                    "{name}{{view=\"{}\",partition=\"{}\"}} {lag}",
                    escape(&v.spec().name),
                    p.partition
                );
            }
        }
    }
    let name = "panes_kafka_partitions_owned";
    let _ = writeln!(
        out,
        "# HELP {name} Partitions this instance owns.\n# TYPE {name} gauge"
    );
    for v in &views {
        let _ = writeln!(
            out,
            "{name}{{view=\"{}\"}} {}",
            escape(&v.spec().name),
            v.owned().len()
        );
    }
}

/// Counters of the gRPC port's connections and of the HTTP port's.
fn render_connections(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let (c, h) = (&shared.conns, &shared.http);
    let _ = writeln!(
        out,
        "# HELP panes_connections_open Connections open on the gRPC port.\n\
         # TYPE panes_connections_open gauge\npanes_connections_open {}\n\
         # HELP panes_http_connections_open Connections open on the metrics (HTTP) port.\n\
         # TYPE panes_http_connections_open gauge\npanes_http_connections_open {}",
        c.open.load(Relaxed),
        h.open.load(Relaxed)
    );
    let counters = [
        (
            "panes_connections_refused_total",
            "Connections closed on accept at --max-connections.",
            &c.refused,
        ),
        (
            "panes_connections_timed_out_total",
            "Connections closed for sending nothing within the handshake or idle timeout.",
            &c.timed_out,
        ),
        (
            "panes_accept_errors_total",
            "Failed accepts (such as file descriptors exhausted).",
            &c.accept_errors,
        ),
        (
            "panes_http_connections_refused_total",
            "Connections closed on accept at the metrics port's connection limit.",
            &h.refused,
        ),
        (
            "panes_http_connection_errors_total",
            "Metrics-port connections that ended in an error (malformed or late request, \
             failed TLS handshake, reset).",
            &h.failed,
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Relaxed)
        );
    }
}

/// `Subscribe` streams: open, their messages and rows, the intervals merged while a
/// client did not read, and the bytes waiting in their streams.
fn render_subscriptions(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &shared.subscriptions;
    let series = [
        (
            "panes_subscriptions_open",
            "gauge",
            "Subscribe streams open (bounded by --max-subscriptions).",
            s.active.load(Relaxed),
        ),
        (
            "panes_subscription_messages_total",
            "counter",
            "Messages sent on Subscribe streams.",
            s.messages.load(Relaxed),
        ),
        (
            "panes_subscription_rows_total",
            "counter",
            "Key rows (vectors) sent on Subscribe streams.",
            s.rows.load(Relaxed),
        ),
        (
            "panes_subscription_coalesced_intervals_total",
            "counter",
            "Intervals that passed while a subscriber had not taken its earlier messages; \
             their changes went out merged, each key's latest vector only.",
            s.coalesced.load(Relaxed),
        ),
        (
            "panes_subscription_queued_bytes",
            "gauge",
            "Bytes of Subscribe messages that clients have not taken yet (at most 2 messages \
             per stream).",
            s.queued_bytes.load(Relaxed),
        ),
        (
            "panes_subscription_queued_bytes_max",
            "gauge",
            "Most bytes of Subscribe messages waiting for clients at once since the start.",
            s.queued_bytes_max.load(Relaxed),
        ),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
}

/// Per sink: writes, rows, bytes, failed writes, and the read time of the last write.
fn render_sinks(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let sinks = shared.sinks.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sinks) = sinks.as_ref() else { return };
    let series: [(&str, &str, &str); 5] = [
        (
            "panes_sink_writes_total",
            "counter",
            "Sink writes that succeeded (a file, or a round of messages).",
        ),
        (
            "panes_sink_rows_total",
            "counter",
            "Key vectors written by sinks.",
        ),
        (
            "panes_sink_bytes_total",
            "counter",
            "Bytes written by sinks (files; message keys and values).",
        ),
        (
            "panes_sink_failures_total",
            "counter",
            "Sink writes that failed (each retried at the next interval).",
        ),
        (
            "panes_sink_last_read_time_ms",
            "gauge",
            "Read time of each sink's last write that succeeded, epoch ms.",
        ),
    ];
    for (i, (name, kind, help)) in series.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (spec, s) in sinks.stats() {
            let value = match i {
                0 => s.writes.load(Relaxed) as i64,
                1 => s.rows.load(Relaxed) as i64,
                2 => s.bytes.load(Relaxed) as i64,
                3 => s.failures.load(Relaxed) as i64,
                _ => match s.last_at_ms.load(Relaxed) as i64 {
                    i64::MIN => continue,
                    at => at,
                },
            };
            let _ = writeln!(
                out,
                "{name}{{sink=\"{}\",view=\"{}\",kind=\"{}\"}} {value}",
                spec.name,
                spec.view,
                spec.kind.name()
            );
        }
    }
}

/// The served-feature log: reads and rows logged, reads dropped (queue full), files
/// written and failed, rows lost with failed files.
fn render_read_log(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(log) = &shared.read_log else { return };
    let s = &log.stats;
    let series = [
        (
            "panes_read_log_reads_total",
            "Reads queued for the served-feature log.",
            &s.reads,
        ),
        (
            "panes_read_log_rows_total",
            "Key rows of those reads.",
            &s.rows,
        ),
        (
            "panes_read_log_dropped_total",
            "Sampled reads not logged because the log's queue was full (reads never wait for it).",
            &s.dropped,
        ),
        (
            "panes_read_log_files_total",
            "Served-feature log files written.",
            &s.files,
        ),
        (
            "panes_read_log_failures_total",
            "Served-feature log rows or files that could not be written.",
            &s.failures,
        ),
        (
            "panes_read_log_lost_rows_total",
            "Rows of log files that could not be written.",
            &s.lost_rows,
        ),
    ];
    for (name, help, value) in series {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Relaxed)
        );
    }
}
