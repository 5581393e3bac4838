//! The Prometheus text endpoint (`GET /metrics`), a minimal HTTP/1.1 responder: one
//! request per connection, no body, no keep-alive.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::auth::TlsFiles;
use super::server::Shared;

/// Most metrics connections served at once.
const MAX_SCRAPES: usize = 16;

/// Accepts scrapes until the task is aborted: over TLS when the server has it, and
/// with an `admin` token when it has tokens.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let tls = match shared.options.tls.as_ref().map(TlsFiles::rustls) {
        None => None,
        Some(Ok(config)) => Some(tokio_rustls::TlsAcceptor::from(config)),
        Some(Err(e)) => {
            eprintln!("panes serve: metrics endpoint off: {e}");
            return;
        }
    };
    // Scrapes at once; more connections are closed on accept, so that a flood of them
    // cannot take the descriptors the gRPC port needs.
    let scrapes = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            // Descriptors exhausted: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = scrapes.clone().try_acquire_owned() else {
            drop(socket);
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let scrape = async move {
                match tls {
                    Some(tls) => match tls.accept(socket).await {
                        Ok(stream) => answer(stream, shared).await,
                        Err(_) => Ok(()),
                    },
                    None => answer(socket, shared).await,
                }
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), scrape).await;
        });
    }
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut socket: S,
    shared: Arc<Shared>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await?;
        if n == 0 || head.len() > 16 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let mut parts = text.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authorization = text.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim().as_bytes().to_vec())
    });
    let allowed = match &shared.options.tokens {
        None => Ok(()),
        Some(tokens) => match tokens.authenticate(authorization.as_deref()) {
            Ok(caller) if caller.is_admin() => Ok(()),
            Ok(_) => Err((
                "403 Forbidden",
                "the metrics need a token with the admin scope\n",
            )),
            Err(_) => Err((
                "401 Unauthorized",
                "send `Authorization: Bearer <token>` (admin scope)\n",
            )),
        },
    };
    let (code, body) = if let Err((code, why)) = allowed {
        (code, why.to_string())
    } else if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
        let engine = shared.engine.clone();
        let shared2 = shared.clone();
        match shared.on_writes(move || render(&shared2, &engine)).await {
            Ok(body) => ("200 OK", body),
            Err(s) => ("500 Internal Server Error", s.message().to_string()),
        }
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text of every view.
pub(crate) fn render(shared: &Shared, engine: &crate::online::Engine) -> String {
    let mut out = String::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
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
    family(
        &mut out,
        "panes_fold_duration_seconds",
        "histogram",
        "Duration of micro-batch folds.",
    );
    for v in engine.views() {
        if let Ok(h) = engine.fold_time(&v.spec.name) {
            h.write_prometheus(
                &mut out,
                "panes_fold_duration_seconds",
                &format!("view=\"{}\"", escape(&v.spec.name)),
            );
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
            h.write_prometheus(
                &mut out,
                "panes_read_duration_seconds",
                &format!("view=\"{}\"", escape(&v.spec.name)),
            );
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
    render_checkpoints(&mut out, shared);
    render_sources(&mut out, shared);
    out
}

/// Checkpoints written and failed, per view: pushed views' own, sourced views'
/// summed over their partitions.
fn render_checkpoints(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rows: Vec<(&str, u64, u64)> = shared
        .checkpoints
        .iter()
        .map(|(v, c)| (v.as_str(), c.written.load(Relaxed), c.failed.load(Relaxed)))
        .collect();
    rows.extend(shared.sources.values().map(|s| {
        let stats = s.stats();
        (
            s.spec().name.as_str(),
            stats.checkpoints.load(Relaxed),
            stats.checkpoint_failures.load(Relaxed),
        )
    }));
    rows.sort_unstable();
    for (name, help, column) in [
        (
            "panes_checkpoints_total",
            "Checkpoints written (of each partition, for a Kafka view).",
            1,
        ),
        (
            "panes_checkpoint_failures_total",
            "Checkpoints that failed (the directory is unwritable or full).",
            2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for &(view, written, failed) in &rows {
            let n = if column == 1 { written } else { failed };
            let _ = writeln!(out, "{name}{{view=\"{}\"}} {n}", escape(view));
        }
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

/// Counters of the gRPC port's connections.
fn render_connections(out: &mut String, shared: &Shared) {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &shared.conns;
    let _ = writeln!(
        out,
        "# HELP panes_connections_open Connections open on the gRPC port.\n\
         # TYPE panes_connections_open gauge\npanes_connections_open {}",
        c.open.load(Relaxed)
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
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            value.load(Relaxed)
        );
    }
}
