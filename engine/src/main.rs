//! The `panes` command: `demo`, `backfill`, `serve`, `check`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use arrow_array::Int64Array;
use clap::{Parser, Subcommand};
use panes_engine::error::{ErrorDomain, SpecError, SpecIssue};
use panes_engine::offline::io;
use panes_engine::sources::synth::{Synth, SynthConfig};
use panes_engine::spec::{Window, format_duration};
use panes_engine::{
    Agg, BackendKind, BackfillOptions, CompiledView, DEMO_FEATURES, Engine, EngineOptions,
    FeatureFile, PanesError, PushReport, RejectReason, Result,
};

#[derive(Parser, Debug)]
#[command(
    name = "panes",
    version,
    about = "Panes: real-time ML features from event streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as `text` (time, level, target, message, fields) or `json` (one object
    /// per line). Which lines: $PANES_LOG, else $RUST_LOG (filters such as
    /// `info,panes_engine::sources=debug`), else Panes' own at `info` and other
    /// crates' at `warn`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// How log lines are written (to stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// The log filter when neither `PANES_LOG` nor `RUST_LOG` is set.
const DEFAULT_LOG_FILTER: &str = "warn,panes=info,panes_engine=info,panes_kernels=info";

/// Sends the engine's log events (`tracing`) to stderr in `format`, filtered by
/// `PANES_LOG`, else `RUST_LOG`, else [`DEFAULT_LOG_FILTER`].
fn init_logs(format: LogFormat) -> Result<()> {
    use std::io::IsTerminal;
    let (var, filter) = ["PANES_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|v| std::env::var(v).ok().map(|f| (v, f)))
        .unwrap_or(("", DEFAULT_LOG_FILTER.to_string()));
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| PanesError::Invalid(format!("{var} {filter:?}: not a log filter: {e}")))?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let set = match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => logs.json().with_ansi(false).try_init(),
    };
    set.map_err(|e| PanesError::Internal(format!("cannot start the log: {e}")))
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a synthetic card-transaction stream through the engine and show live features.
    Demo {
        /// Feature file (default: the built-in card-transaction features).
        #[arg(long)]
        features: Option<PathBuf>,
        /// Events to generate.
        #[arg(long, default_value_t = 2_000_000)]
        events: u64,
        /// Run until interrupted (Ctrl-C) instead of stopping after --events.
        #[arg(long)]
        forever: bool,
        /// Events per pushed batch.
        #[arg(long, default_value_t = 8192)]
        batch: usize,
        /// Distinct cards.
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Backend: scalar, cpu, gpu or auto (default: $PANES_BACKEND, else auto).
        #[arg(long)]
        backend: Option<BackendKind>,
    },
    /// Compute point-in-time features for every row of a spine.
    Backfill {
        /// Feature file (TOML).
        #[arg(long)]
        features: PathBuf,
        /// Events file (.parquet, .csv, .arrow, .arrows), replayed in file order.
        #[arg(long)]
        events: PathBuf,
        /// Spine file: key column(s) and a time column.
        #[arg(long)]
        spine: PathBuf,
        /// Output file; its extension picks the format.
        #[arg(long)]
        out: PathBuf,
        /// The spine's time column.
        #[arg(long, default_value = "ts")]
        at_column: String,
        /// Also write the late and rejected events here, with the view and the reason.
        #[arg(long)]
        dead_letter: Option<PathBuf>,
        /// Backend: scalar, cpu, gpu or auto (default: $PANES_BACKEND, else auto).
        #[arg(long)]
        backend: Option<BackendKind>,
        /// Compute the columns of this feature service (`[[services]]`) instead of every
        /// view's features: its features in its order, then its on-demand features over
        /// them and the spine's columns.
        #[arg(long)]
        service: Option<String>,
    },
    /// Serve features over gRPC and Arrow Flight, with health, reflection and metrics.
    Serve(Box<ServeArgs>),
    /// Recompute served reads logged by `panes serve --log-reads` through backfill and
    /// report the values that differ, per feature (exit status 1 when any does).
    Skew {
        /// The log directory (`--log-reads` of the server; a local directory).
        #[arg(long)]
        log: PathBuf,
        /// Feature file (TOML): the server's.
        #[arg(long)]
        features: PathBuf,
        /// Events file (.parquet, .csv, .arrow, .arrows): what the server took, in the
        /// order it took them.
        #[arg(long)]
        events: PathBuf,
        /// Backend: scalar, cpu, gpu or auto (default: $PANES_BACKEND, else auto).
        #[arg(long)]
        backend: Option<BackendKind>,
    },
    /// Validate a feature file and describe the state it needs.
    Check {
        /// Feature file (TOML).
        features: PathBuf,
        /// An events file (Parquet, CSV or Arrow IPC): also check each view's
        /// expressions (derived columns, filters) against its columns and types.
        #[arg(long)]
        events: Option<PathBuf>,
    },
}

/// Keeps a GPU probe on a machine without a desktop session (a server, a container, CI)
/// from printing errors that are not ones.
///
/// When Vulkan enumerates GPUs, Mesa's device-select layer looks for the session's
/// Wayland compositor to put its GPU first, and libwayland then prints "error:
/// XDG_RUNTIME_DIR is invalid or not set in the environment." to stderr: the first two
/// lines `panes demo` showed on such a machine. Without a session there is no display
/// to choose by (and the GPU backend picks its adapter by power preference, not by the
/// layer's order), so the layer is turned off for this process with its own switch,
/// `NODEVICE_SELECT=1`, unless the environment already sets that.
fn quiet_vulkan_probe() {
    let session = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir());
    if !session && std::env::var_os("NODEVICE_SELECT").is_none() {
        // SAFETY: the first thing `main` does, before any thread exists.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

fn main() -> ExitCode {
    quiet_vulkan_probe();
    let cli = Cli::parse();
    let json = cli.log_format == LogFormat::Json;
    if let Err(e) = init_logs(cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Demo {
            features,
            events,
            forever,
            batch,
            keys,
            backend,
        } => demo(features.as_deref(), events, forever, batch, keys, backend),
        Command::Backfill {
            features,
            events,
            spine,
            out,
            at_column,
            dead_letter,
            backend,
            service,
        } => run_backfill(
            &features,
            &events,
            &spine,
            &out,
            at_column,
            dead_letter.as_deref(),
            backend,
            service.as_deref(),
        ),
        Command::Serve(args) => serve(*args),
        Command::Check { features, events } => check(&features, events.as_deref()),
        Command::Skew {
            log,
            features,
            events,
            backend,
        } => match skew(&log, &features, &events, backend) {
            Ok(0) => Ok(()),
            Ok(_) => return ExitCode::from(1),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                tracing::error!(error = %e, "stopped by an error");
            } else {
                eprintln!("error: {e}");
            }
            match e.domain() {
                ErrorDomain::User => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Feature file (default: the built-in card-transaction features).
    #[arg(long)]
    features: Option<PathBuf>,
    /// gRPC and Arrow Flight address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: std::net::SocketAddr,
    /// Prometheus endpoint address (`GET /metrics`), or `off`.
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics: String,
    /// Most keys per read.
    #[arg(long, default_value_t = 10_000)]
    max_keys: usize,
    /// Most features named in one read.
    #[arg(long, default_value_t = 1_024)]
    max_features: usize,
    /// Most connections open at once on the gRPC port.
    #[arg(long, default_value_t = 1_024)]
    max_connections: usize,
    /// Most Subscribe streams open at once.
    #[arg(long, default_value_t = 256)]
    max_subscriptions: usize,
    /// Log served GetFeatures reads (keys, read time, values) as Parquet here (a
    /// directory or an object-store URL), for `panes skew`.
    #[arg(long)]
    log_reads: Option<String>,
    /// Log one read in this many.
    #[arg(long, default_value_t = 1)]
    log_reads_every: u64,
    /// Most milliseconds logged reads wait before they are written to a file.
    #[arg(long, default_value_t = 10_000)]
    log_reads_flush_ms: u64,
    /// Most concurrent requests per connection (HTTP/2 MAX_CONCURRENT_STREAMS).
    #[arg(long, default_value_t = 256)]
    max_streams_per_connection: u32,
    /// Close a connection that sends nothing this many seconds after it is accepted.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Close a connection that moves no byte for this many seconds.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// Largest request message, bytes.
    #[arg(long, default_value_t = 64 << 20)]
    max_message_bytes: usize,
    /// Most input bytes queued for the write threads; further ingest waits (pushback).
    #[arg(long, default_value_t = 256 << 20)]
    max_write_queue_bytes: usize,
    /// A micro-batch is folded and published once its oldest event waited this long (ms).
    #[arg(long, default_value_t = 10)]
    batch_age_ms: u64,
    /// …or once it holds this many events.
    #[arg(long, default_value_t = 64 * 1024)]
    batch_rows: usize,
    /// After SIGTERM / Ctrl-C, how long in-flight requests may run (seconds).
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Write the final counters of every view here (JSON) on shutdown.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Feed the first view with this many synthetic card transactions per second (event
    /// time = wall clock), as `panes demo` does: a server with live numbers on its status
    /// page and in its reads, without a producer (1 to 10 000 000).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    demo_rate: Option<u64>,
    /// Backend: scalar, cpu, gpu or auto (default: $PANES_BACKEND, else auto).
    #[arg(long)]
    backend: Option<BackendKind>,
    /// Checkpoint directory, or an object-store URL (s3://BUCKET/PREFIX, gs://…,
    /// az://CONTAINER/PREFIX; file:///PATH): restored at start, written periodically
    /// and on shutdown. Kafka views need one, shared by every instance of their
    /// consumer group.
    #[arg(long)]
    checkpoint_dir: Option<String>,
    /// Time between checkpoints of a view or partition that took events (ms).
    #[arg(long, default_value_t = 10_000)]
    checkpoint_interval_ms: u64,
    /// The address other instances reach this one at (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// Reads of at most this many keys run on the network thread that received them;
    /// larger ones on the read threads (0: all on the read threads).
    #[arg(long, default_value_t = 128)]
    inline_read_keys: usize,
    /// Priority of the network and read threads: normal, realtime or realtime:N (SCHED_FIFO,
    /// needs CAP_SYS_NICE; a woken read then runs before every normal thread).
    #[arg(long, default_value = "normal")]
    read_priority: panes_engine::serve::ReadPriority,
    /// Priority of ingest against reads: idle (a read preempts ingest at once),
    /// nice:N (1–19) or normal.
    #[arg(long, default_value = "idle")]
    write_priority: panes_engine::serve::WritePriority,
    /// Keep no key-major read copy of the pane state: half the memory, some 10 % more
    /// ingest throughput, reads of scattered keys about half as fast.
    #[arg(long)]
    no_read_copy: bool,
    /// Most keys per view whose definition sets no `max_keys` (default: no limit but
    /// the state memory budget). Rows of further new keys are rejected (`key_limit`).
    #[arg(long)]
    max_view_keys: Option<usize>,
    /// State memory budget of all views together, charged per new key: a size such as
    /// 512MiB or 4GiB, `auto` (half of the least of the machine's memory, the cgroup's
    /// limit and the address-space limit) or `off`.
    #[arg(long, default_value = "auto")]
    max_state_memory: StateMemory,
    /// TLS certificate chain (PEM) of the gRPC, Flight and metrics ports; with --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); with --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to: mutual TLS, every
    /// client needs a certificate. Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Token file (TOML): bearer tokens with scopes read / ingest / admin per view;
    /// without it every caller may do everything.
    #[arg(long)]
    tokens: Option<PathBuf>,
}

/// `--max-state-memory`: a size in bytes, `auto` or `off`.
#[derive(Clone, Copy, Debug)]
enum StateMemory {
    Auto,
    Off,
    Bytes(u64),
}

impl std::str::FromStr for StateMemory {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let units = [
            ("KiB", 1u64 << 10),
            ("MiB", 1 << 20),
            ("GiB", 1 << 30),
            ("TiB", 1 << 40),
        ];
        let bytes = |s: &str| -> Option<u64> {
            let (n, unit) = units
                .iter()
                .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
                .unwrap_or((s, 1));
            n.trim().parse::<u64>().ok()?.checked_mul(unit)
        };
        match s {
            "auto" => Ok(StateMemory::Auto),
            "off" => Ok(StateMemory::Off),
            _ => bytes(s)
                .filter(|&b| b > 0)
                .map(StateMemory::Bytes)
                .ok_or_else(|| {
                    format!("{s:?}: expected a size such as 512MiB or 4GiB, `auto` or `off`")
                }),
        }
    }
}

impl StateMemory {
    fn budget(self) -> Option<std::sync::Arc<panes_engine::StateBudget>> {
        let bytes = match self {
            StateMemory::Off => return None,
            StateMemory::Bytes(b) => b,
            StateMemory::Auto => panes_engine::ingest::memory_limit()? / 2,
        };
        Some(std::sync::Arc::new(panes_engine::StateBudget::new(bytes)))
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    use panes_engine::serve::{ServeOptions, Server, shutdown_signal};
    let file = match &args.features {
        Some(p) => FeatureFile::from_path(p)?,
        None => FeatureFile::parse(DEMO_FEATURES, "built-in demo features")?,
    };
    let metrics = match args.metrics.as_str() {
        "off" | "" => None,
        a => Some(a.parse().map_err(|e| {
            PanesError::Invalid(format!("--metrics {a:?}: not an address or `off`: {e}"))
        })?),
    };
    // Each view in one log line once serving: name, key, features, where events come from.
    let view_lines: Vec<(String, String, usize, String)> = file
        .views
        .iter()
        .map(|v| {
            let source = v.source.as_ref().map_or("pushed".to_string(), |s| {
                format!("kafka topic {:?} group {:?}", s.topic, s.group)
            });
            (v.name.clone(), v.key_label(), v.features.len(), source)
        })
        .collect();
    let engine = Engine::new(
        &file,
        EngineOptions {
            backend: args.backend,
            batch_rows: args.batch_rows,
            batch_age: Duration::from_millis(args.batch_age_ms),
            read_copy: !args.no_read_copy,
            max_keys: args.max_view_keys,
            state_budget: args.max_state_memory.budget(),
            ..EngineOptions::default()
        },
    )?;
    let options = ServeOptions {
        max_keys: args.max_keys,
        max_features: args.max_features,
        max_write_queue_bytes: args.max_write_queue_bytes,
        max_connections: args.max_connections,
        max_subscriptions: args.max_subscriptions,
        read_log: args
            .log_reads
            .as_deref()
            .map(|dir| {
                Ok::<_, PanesError>(panes_engine::serve::ReadLogOptions {
                    root: panes_engine::CheckpointRoot::parse(dir)?,
                    every: args.log_reads_every.max(1),
                    flush: Duration::from_millis(args.log_reads_flush_ms.max(1)),
                })
            })
            .transpose()?,
        max_streams_per_connection: args.max_streams_per_connection,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_message_bytes: args.max_message_bytes,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        checkpoint_dir: args
            .checkpoint_dir
            .as_deref()
            .map(panes_engine::CheckpointRoot::parse)
            .transpose()?,
        checkpoint_interval: Duration::from_millis(args.checkpoint_interval_ms.max(1)),
        advertise: args.advertise.clone(),
        write_priority: args.write_priority,
        inline_read_keys: args.inline_read_keys,
        read_priority: args.read_priority,
        tls: args
            .tls_cert
            .clone()
            .zip(args.tls_key.clone())
            .map(|(cert, key)| panes_engine::serve::auth::TlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca.clone(),
            }),
        tokens: match &args.tokens {
            Some(p) => Some(std::sync::Arc::new(
                panes_engine::serve::auth::Tokens::from_path(p, |var| std::env::var(var).ok())?,
            )),
            None => None,
        },
        ..ServeOptions::default()
    };
    if let Some(tls) = &options.tls {
        // Read the files now: a bad one is a start-up error, not a silent plain port.
        tls.check()?;
    }
    let read_priority = args.read_priority;
    let tls = options.tls.is_some();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("panes-io")
        .on_thread_start(move || read_priority.apply_or_warn())
        .build()
        .map_err(|e| PanesError::Internal(format!("cannot start the runtime: {e}")))?;
    let report = runtime.block_on(async {
        let backend = engine.backend().kind().name();
        let engine = std::sync::Arc::new(engine);
        let server = Server::bind(engine.clone(), options, args.listen, metrics).await?;
        let grpc = server.grpc_addr().map_err(|e| PanesError::Internal(e.to_string()))?;
        let (suffix, scheme) = if tls { (" (TLS)", "https") } else { ("", "http") };
        // The first line, which scripts read the addresses from.
        match server.metrics_addr() {
            Some(Ok(m)) => tracing::info!(
                %grpc,
                metrics = %format!("{scheme}://{m}/metrics"),
                backend,
                tls,
                "panes serve: gRPC + Flight on {grpc}{suffix}, metrics on {scheme}://{m}/metrics, backend {backend}"
            ),
            _ => tracing::info!(
                %grpc,
                backend,
                tls,
                "panes serve: gRPC + Flight on {grpc}{suffix}, backend {backend}"
            ),
        }
        tracing::info!(
            tokens = args.tokens.is_some(),
            checkpoint_dir = %args
                .checkpoint_dir
                .as_deref()
                .unwrap_or("off"),
            checkpoint_interval_ms = args.checkpoint_interval_ms,
            max_connections = args.max_connections,
            max_keys = args.max_keys,
            max_message_bytes = args.max_message_bytes,
            read_priority = ?args.read_priority,
            write_priority = ?args.write_priority,
            "configuration"
        );
        for v in &view_lines {
            tracing::info!(view = %v.0, key = %v.1, features = v.2, source = %v.3, "view");
        }
        let feeder = args.demo_rate.map(|rate| DemoFeed::start(engine, rate));
        server
            .run(async move {
                shutdown_signal().await;
                // Stop feeding before the server's final fold and checkpoint.
                if let Some(f) = feeder {
                    let _ = tokio::task::spawn_blocking(move || f.stop()).await;
                }
            })
            .await
    })?;
    for m in &report.views {
        tracing::info!(
            view = %m.view,
            accepted = m.counters.accepted,
            folded = m.folded,
            pending = m.pending,
            late = m.counters.late,
            rejected = m.counters.rejected_total(),
            filtered = m.counters.filtered,
            keys = m.keys,
            cut_off = report.cut_off,
            "stopped"
        );
    }
    if let Some(path) = &args.report {
        let views: Vec<serde_json::Value> = report
            .views
            .iter()
            .map(|m| {
                serde_json::json!({
                    "view": m.view, "accepted": m.counters.accepted, "folded": m.folded,
                    "pending": m.pending, "late": m.counters.late,
                    "rejected": m.counters.rejected_total(), "keys": m.keys,
                })
            })
            .collect();
        let json = serde_json::json!({
            "views": views, "cut_off": report.cut_off,
            "checkpoint_failures": report.checkpoint_failures,
        });
        std::fs::write(path, json.to_string())
            .map_err(|e| PanesError::Invalid(format!("--report {}: {e}", path.display())))?;
    }
    if !report.checkpoint_failures.is_empty() {
        return Err(PanesError::Unavailable(format!(
            "the final checkpoint failed, so the events since the last one are not saved: {}",
            report.checkpoint_failures.join("; ")
        )));
    }
    Ok(())
}

/// `panes serve --demo-rate`: synthetic card transactions pushed into the first view.
struct DemoFeed {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl DemoFeed {
    /// Pushes `rate` events per second, a tenth of a second's worth at a time.
    fn start(engine: std::sync::Arc<Engine>, rate: u64) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let Some(view) = engine.views().next().map(|v| v.spec.name.clone()) else {
                return;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let mut synth = Synth::new(SynthConfig {
                start_ms: now,
                events_per_second: rate.max(1) as f64,
                ..Default::default()
            });
            let per_tick = (rate / 10).max(1) as usize;
            let started = Instant::now();
            let mut sent = 0u64;
            tracing::info!(view = %view, rate, "demo feed started");
            while !flag.load(Ordering::Acquire) {
                if let Err(e) = engine.push(&view, &synth.next_batch(per_tick)) {
                    tracing::error!(view = %view, error = %e, "demo feed stopped");
                    return;
                }
                sent += per_tick as u64;
                // Keep to the rate over the whole run, not per tick.
                let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        });
        DemoFeed { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.thread.join();
    }
}

fn describe(file: &FeatureFile) {
    for v in &file.views {
        let c = CompiledView::new(v, 1);
        println!(
            "view {:?}: key {}, time {:?}, pane {}, allowed lateness {}, up to {} B of state per key (once its rings are full)",
            v.name,
            v.key_label(),
            v.time,
            format_duration(v.pane),
            format_duration(v.allowed_lateness),
            c.bytes_per_key()
        );
        if !c.events.is_empty() {
            let mut parts = Vec::new();
            if c.events.count > 0 {
                parts.push(format!("the newest {} events", c.events.count));
            }
            for s in &c.events.sessions {
                parts.push(format!(
                    "the open session of gap {} (sessions late events can still merge come on top)",
                    format_duration(s.gap)
                ));
            }
            println!(
                "  count and session windows: {} B of it per key, for {}",
                c.event_bytes_per_key(),
                parts.join(", ")
            );
        }
        for f in &v.features {
            let w = match f.window {
                Window::Duration(ms) => {
                    format!("{} (hop {})", format_duration(ms), format_duration(f.hop))
                }
                w => w.to_string(),
            };
            let col = f.column.as_deref().unwrap_or("*");
            let param = match f.agg {
                Agg::DecayedSum { half_life } | Agg::DecayedCount { half_life } => {
                    format!(", half-life {}", format_duration(half_life))
                }
                Agg::ApproxDistinct { precision } => format!(", precision {precision}"),
                Agg::LastN { n } => format!(", n {n}"),
                Agg::TopK { k, capacity } => format!(", k {k}, capacity {capacity}"),
                Agg::Quantile {
                    q,
                    relative_accuracy,
                } => format!(
                    ", q {}, relative accuracy {}",
                    q.get(),
                    relative_accuracy.get()
                ),
                _ => String::new(),
            };
            println!("  {:<28} {}({col}) over {w}{param}", f.name, f.agg);
        }
    }
    for s in &file.services {
        let views: Vec<String> = panes_engine::online::service::service_views(file, s)
            .iter()
            .map(|(v, _)| format!("{:?}", v.name))
            .collect();
        println!(
            "service {:?}: {} features from views {}",
            s.name,
            s.features.len(),
            views.join(", ")
        );
        for d in &s.on_demand {
            println!("  {:<28} on demand: {}", d.name, d.expr);
        }
    }
}

fn check(path: &Path, events: Option<&Path>) -> Result<()> {
    let file = FeatureFile::from_path(path)?;
    if let Some(events) = events {
        let (schema, _) = io::read_file(events)?;
        let issues: Vec<SpecIssue> = file
            .views
            .iter()
            .flat_map(|v| {
                let issues = CompiledView::new(v, 1).schema_issues(&schema);
                issues.into_iter().map(|(field, message)| SpecIssue {
                    location: format!("view {:?}", v.name),
                    field,
                    message: format!("{message} (events {})", events.display()),
                })
            })
            .collect();
        if !issues.is_empty() {
            return Err(SpecError {
                origin: path.display().to_string(),
                issues,
            }
            .into());
        }
    }
    describe(&file);
    for v in &file.views {
        let per_key = CompiledView::new(v, 1).bytes_per_key();
        if per_key > 1 << 20 {
            eprintln!(
                "warning: view {:?} needs {:.1} MiB of state per key: a million keys would need {:.1} TiB",
                v.name,
                per_key as f64 / f64::from(1 << 20),
                per_key as f64 * 1e6 / (1u64 << 40) as f64
            );
        }
    }
    Ok(())
}

/// `panes skew`: prints what it compared and the mismatches; returns their number.
fn skew(log: &Path, features: &Path, events: &Path, backend: Option<BackendKind>) -> Result<u64> {
    let file = FeatureFile::from_path(features)?;
    let (_, event_batches) = io::read_file(events)?;
    let by_view = panes_engine::offline::skew::read_log(log)?;
    let backend = EngineOptions {
        backend,
        ..Default::default()
    }
    .create_backend()?;
    let report = panes_engine::offline::skew::check(&file, &event_batches, &by_view, backend)?;
    let mut total = 0;
    for v in &report {
        println!(
            "view {:?}: {} logged rows from {} files",
            v.view,
            v.rows,
            by_view[&v.view].len()
        );
        println!(
            "  {:<32} {:>10} {:>10}",
            "feature", "compared", "mismatches"
        );
        for f in &v.features {
            println!("  {:<32} {:>10} {:>10}", f.name, f.compared, f.mismatches);
        }
        for f in &v.features {
            for m in &f.examples {
                println!(
                    "  mismatch: {} key {} at {} ms: served {}, recomputed {}",
                    f.name, m.key, m.at_ms, m.served, m.recomputed
                );
            }
        }
        total += v.mismatches();
    }
    println!("{total} mismatches");
    Ok(total)
}

fn run_backfill(
    features: &Path,
    events: &Path,
    spine: &Path,
    out: &Path,
    at_column: String,
    dead_letter: Option<&Path>,
    backend: Option<BackendKind>,
    service: Option<&str>,
) -> Result<()> {
    let file = FeatureFile::from_path(features)?;
    io::Format::of(out)?;
    if let Some(p) = dead_letter {
        io::Format::of(p)?;
    }
    let t0 = Instant::now();
    let (events_schema, event_batches) = io::read_file(events)?;
    let (spine_schema, spine_batches) = io::read_file(spine)?;
    let backend = EngineOptions {
        backend,
        ..Default::default()
    }
    .create_backend()?;
    let options = BackfillOptions {
        at_column,
        dead_letter: dead_letter.is_some(),
        ..Default::default()
    };
    let (schema, batches, report) = match service {
        Some(name) => panes_engine::backfill_service(
            &file,
            name,
            &event_batches,
            &spine_schema,
            &spine_batches,
            backend.clone(),
            &options,
        )?,
        None => panes_engine::backfill(
            &file,
            &event_batches,
            &spine_schema,
            &spine_batches,
            backend.clone(),
            &options,
        )?,
    };
    if report.on_demand_errors > 0 {
        eprintln!(
            "on-demand features: {} spine rows could not be evaluated (null there)",
            report.on_demand_errors
        );
    }
    io::write_file(out, &schema, &batches)?;
    if let Some(p) = dead_letter {
        let dl_schema = match report.dead_letter.first() {
            Some(b) => b.schema(),
            None => panes_engine::offline::backfill::dead_letter_schema(&events_schema),
        };
        io::write_file(p, &dl_schema, &report.dead_letter)?;
        let rows: usize = report.dead_letter.iter().map(|b| b.num_rows()).sum();
        eprintln!(
            "dead letters: {rows} late or rejected events → {}",
            p.display()
        );
    }
    eprintln!(
        "backfill: {} spine rows → {} ({} backend, {:.2} s)",
        report.spine_rows,
        out.display(),
        backend.kind(),
        t0.elapsed().as_secs_f64()
    );
    for (view, c, keys) in &report.views {
        eprintln!(
            "  view {view:?}: {} events accepted, {} late, {} rejected ({}), {keys} keys",
            c.accepted,
            c.late,
            c.rejected_total(),
            RejectReason::ALL
                .iter()
                .map(|r| format!("{} {}", r.name(), c.rejected(*r)))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for v in &report.skipped_views {
        eprintln!("  view {v:?}: skipped (the spine has no column for its key)");
    }
    if report.spine_rows_without_time > 0 {
        eprintln!(
            "  {} spine rows have a null or unparsable time: their features are null",
            report.spine_rows_without_time
        );
    }
    Ok(())
}

fn demo(
    features: Option<&Path>,
    events: u64,
    forever: bool,
    batch: usize,
    keys: u64,
    backend: Option<BackendKind>,
) -> Result<()> {
    let file = match features {
        Some(p) => FeatureFile::from_path(p)?,
        None => FeatureFile::parse(DEMO_FEATURES, "built-in demo features")?,
    };
    let view = file
        .views
        .first()
        .ok_or_else(|| PanesError::Invalid("no view".into()))?
        .name
        .clone();
    let engine = Engine::new(
        &file,
        EngineOptions {
            backend,
            ..Default::default()
        },
    )?;
    println!(
        "Panes demo: synthetic card transactions ({keys} cards, Zipf 1.1), backend {}",
        engine.backend().kind()
    );
    describe(&file);
    let mut synth = Synth::new(SynthConfig {
        keys,
        ..Default::default()
    });
    let hot: Vec<i64> = (1..=3).map(Synth::card).collect();
    let hot_keys = Int64Array::from(hot.clone());
    let start = Instant::now();
    let mut busy = Duration::ZERO;
    let mut last_print = Instant::now();
    // A snapshot every quarter of the run (or every second with --forever).
    let every = (events / 4).max(1);
    let mut next_snapshot = every;
    let mut total = PushReport::default();
    let mut pushed = 0u64;
    while forever || pushed < events {
        let n = if forever {
            batch
        } else {
            batch.min((events - pushed) as usize)
        };
        let b = synth.next_batch(n);
        let t = Instant::now();
        let report = engine.push(&view, &b)?;
        busy += t.elapsed();
        total.absorb(&report);
        pushed += n as u64;
        let due = if forever {
            last_print.elapsed() >= Duration::from_secs(1)
        } else {
            pushed >= next_snapshot
        };
        if due {
            last_print = Instant::now();
            next_snapshot += every;
            let frame = engine.read(&view, &hot_keys, None, None)?;
            let m = engine.metrics(&view)?;
            println!(
                "\n{} events pushed, {:.2} M events/s in the engine; accepted {}, late {}, rejected {}; {} cards, {:.1} MiB of state; event time {}",
                pushed,
                pushed as f64 / busy.as_secs_f64().max(1e-9) / 1e6,
                m.counters.accepted,
                m.counters.late,
                m.counters.rejected_total(),
                m.keys,
                m.state_bytes as f64 / (1 << 20) as f64,
                m.max_event_time.map(format_ms).unwrap_or_default(),
            );
            print!("  {:<14}", "card");
            for n in &frame.names {
                print!(" {:>15}", truncate(n, 15));
            }
            println!();
            for (k, card) in hot.iter().enumerate() {
                print!("  {card:<14}");
                for f in 0..frame.names.len() {
                    if frame.valid[[k, f]] {
                        print!(" {:>15.2}", frame.values[[k, f]]);
                    } else {
                        print!(" {:>15}", "null");
                    }
                }
                println!();
            }
        }
    }
    engine.flush()?;
    let m = engine.metrics(&view)?;
    let wall = start.elapsed().as_secs_f64();
    println!(
        "\ndone: {pushed} events in {wall:.2} s wall ({:.2} M events/s in the engine, generator excluded)",
        pushed as f64 / busy.as_secs_f64().max(1e-9) / 1e6
    );
    println!(
        "accepted {}, late {}, rejected {} ({}); null amounts skipped {}{}",
        m.counters.accepted,
        m.counters.late,
        m.counters.rejected_total(),
        m.rejected_by_reason()
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        m.counters.null_values,
        if m.counters.filtered + m.counters.expr_errors > 0 {
            format!(
                "; filtered {}, expression errors {}",
                m.counters.filtered, m.counters.expr_errors
            )
        } else {
            String::new()
        }
    );
    for r in total.rejections.iter().take(3) {
        println!("  e.g. {}", r.message);
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn format_ms(ms: i64) -> String {
    let s = ms.div_euclid(1000);
    let (d, rem) = (s.div_euclid(86_400), s.rem_euclid(86_400));
    let (y, mo, dd) = civil_from_days(d);
    format!(
        "{y:04}-{mo:02}-{dd:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}
