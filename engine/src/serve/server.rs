//! The server: shared state, binding, serving until shutdown, and the final flush and
//! checkpoint.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;

use super::auth::Auth;
use super::conn::{self, ConnStats};
use super::options::{ServeOptions, lower_priority};
use super::route::{self, Peers};
use super::status::{promised_statuses, status};
use super::workers::{Workers, run_on, run_weighted};
use super::{flight, grpc, metrics, proto};
use crate::error::PanesError;
use crate::histogram::Histogram;
use crate::online::{Engine, ViewMetrics};
use crate::sources::{Source, SourceOptions};
use crate::spec::ViewSpec;

/// Response metadata of `GetFeatures`: the server's own time for the request in whole
/// microseconds, from the decoded request to the reply ready for encoding. A client
/// subtracts it from its own latency to see what the network and its own threads took.
pub const SERVER_TIME_HEADER: &str = "panes-server-time-us";

/// State shared by the services.
#[derive(Debug)]
pub(crate) struct Shared {
    pub engine: Arc<Engine>,
    pub options: ServeOptions,
    reads: Workers,
    writes: Workers,
    /// Server-side duration of reads, per view.
    pub read_time: HashMap<String, ReadTimes>,
    /// Held while checkpoints of pushed views are written.
    checkpointing: std::sync::Mutex<()>,
    /// Views fed by a source, by name.
    pub sources: HashMap<String, Arc<dyn Source>>,
    /// Clients of other instances, for reads routed to them.
    pub peers: Peers,
    /// Connections of the gRPC port.
    pub conns: Arc<ConnStats>,
    /// Connections of the HTTP (metrics) port.
    pub http: metrics::HttpStats,
    /// When the server was built, epoch ms.
    pub started_ms: i64,
    /// Per view, the status page's last sample of accepted events (time, count) and the
    /// rate measured between the last two samples at least a second apart.
    pub rates: std::sync::Mutex<HashMap<String, super::page::RateSample>>,
    /// Checkpoints of pushed views, per view.
    pub checkpoints: HashMap<String, CheckpointCounters>,
    /// `Subscribe` streams: how many, their counters, and their end at shutdown.
    pub subscriptions: super::subscribe::Subscriptions,
    /// The feature file's sinks, while the server runs.
    pub sinks: std::sync::Mutex<Option<crate::sinks::Sinks>>,
    /// The served-feature log, when on.
    pub read_log: Option<super::read_log::ReadLog>,
}

/// The wall clock, epoch ms (0 before 1970).
pub(crate) fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Server-side durations of a view's reads: all of them, and by request size.
#[derive(Debug, Default)]
pub(crate) struct ReadTimes {
    pub all: Histogram,
    /// By keys per request, up to each of [`ReadTimes::SIZES`].
    pub by_keys: [Histogram; 5],
}

impl ReadTimes {
    /// Upper bounds of the request sizes, in keys (`more`: above 1 000).
    pub const SIZES: [&str; 5] = ["1", "10", "100", "1000", "more"];

    /// Records a read of `keys` keys that took `d`.
    pub fn record(&self, keys: usize, d: Duration) {
        self.all.record(d);
        let size = match keys {
            0..=1 => 0,
            2..=10 => 1,
            11..=100 => 2,
            101..=1_000 => 3,
            _ => 4,
        };
        self.by_keys[size].record(d);
    }
}

/// Checkpoints of a pushed view: where they go, written, failed and fenced.
#[derive(Debug, Default)]
pub(crate) struct CheckpointCounters {
    /// The view's checkpoint location, claimed by this server at start (`None`:
    /// checkpoints are off).
    pub dir: Option<crate::checkpoint::CheckpointDir>,
    pub written: AtomicU64,
    pub failed: AtomicU64,
    /// Writes refused because another instance claimed the location since; after the
    /// first, this server stops checkpointing the view.
    pub fenced: AtomicU64,
    /// Size of the last checkpoint written, bytes.
    pub last_bytes: AtomicU64,
    /// Time the last checkpoint written took (state encoded and written), microseconds.
    pub last_micros: AtomicU64,
    /// When the last checkpoint was written, epoch ms (0: none yet).
    pub last_at_ms: std::sync::atomic::AtomicI64,
}

impl Shared {
    /// Runs `f` on the read pool.
    pub async fn on_reads<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        run_on(&self.reads, f).await
    }

    /// Runs `f`, the work of a read of `keys` keys, on the calling (network) thread
    /// when `keys` is at most [`ServeOptions::inline_read_keys`], else on the read pool.
    /// `f` must not block: it may only take locks that are never held across a fold.
    pub async fn on_reads_for<T: Send + 'static>(
        &self,
        keys: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        if keys <= self.options.inline_read_keys {
            Ok(f())
        } else {
            self.on_reads(f).await
        }
    }

    /// Runs `f` on the write pool.
    pub async fn on_writes<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        run_on(&self.writes, f).await
    }

    /// Runs `f`, a write holding `bytes` of input, on the write pool once the input
    /// queued there leaves room for it ([`ServeOptions::max_write_queue_bytes`]).
    pub async fn on_writes_of<T: Send + 'static>(
        &self,
        bytes: usize,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Status> {
        run_weighted(&self.writes, bytes, f).await
    }

    /// Bytes of input held by queued and running writes.
    pub fn write_queue_bytes(&self) -> usize {
        self.writes.queued_bytes()
    }

    /// Reads `keys` of `view` as of `at` from the published state: the engine's, or for
    /// a Kafka view the partitions' wherever they are owned (`forwarded`: a read
    /// another instance routed here, answered from local partitions only).
    pub async fn read(
        self: &Arc<Self>,
        view: String,
        keys: Vec<crate::ingest::keys::KeyValue>,
        at: Option<i64>,
        features: Vec<String>,
        forwarded: bool,
        token: Option<tonic::metadata::AsciiMetadataValue>,
    ) -> Result<crate::online::ServedFrame, Status> {
        self.check_features(features.len())
            .map_err(|e| status(e, "features"))?;
        if let Ok(compiled) = self.engine.compiled(&view) {
            let limit = self
                .options
                .max_keys
                .saturating_mul(self.options.max_features);
            within_limit(
                reply_values(compiled, keys.len(), &features),
                limit,
                "values in the reply (keys × features, a list at its longest)",
                "ServeOptions::max_keys × max_features, --max-keys × --max-features",
            )
            .map_err(|e| status(e, "features"))?;
        }
        if let Some(source) = self.sources.get(&view) {
            let origin = route::Origin { forwarded, token };
            return route::read(self, source, keys, at, features, origin).await;
        }
        let engine = self.engine.clone();
        self.on_reads_for(keys.len(), move || {
            let names: Vec<&str> = features.iter().map(String::as_str).collect();
            let names = (!names.is_empty()).then_some(names.as_slice());
            engine.read_snapshot(&view, &keys, at, names)
        })
        .await?
        .map_err(|e| status(e, "keys"))
    }

    /// [`PanesError::FailedPrecondition`] for a push into a view that takes its events
    /// from a source.
    pub fn check_pushable(&self, view: &str) -> crate::error::Result<()> {
        let sourced = self
            .engine
            .compiled(view)
            .is_ok_and(|v| v.spec.source.is_some());
        if sourced {
            return Err(PanesError::FailedPrecondition(format!(
                "view {view:?} takes its events from Kafka; produce them to its topic"
            )));
        }
        Ok(())
    }

    /// A view's counters: the engine's, or summed over a Kafka view's partitions.
    pub fn view_metrics(&self, view: &str) -> crate::error::Result<ViewMetrics> {
        if let Some(source) = self.sources.get(view) {
            return source.metrics();
        }
        self.engine.metrics(view)
    }

    /// Writes a checkpoint of every pushed view that changed since `done` says.
    ///
    /// One at a time: at shutdown a periodic checkpoint may still be running on
    /// another write thread (aborting its task does not stop its job), and two writers
    /// would take the same sequence number, so the final checkpoint could fail or be
    /// overwritten by an older state.
    /// Checkpoints every pushed view that took events since its last checkpoint
    /// (`done`: the version checkpointed, per view); returns the failures.
    fn checkpoint_pushed(&self, done: &mut HashMap<String, u64>) -> Vec<String> {
        let mut failures = Vec::new();
        if self.options.checkpoint_dir.is_none() {
            return failures;
        }
        let _one_at_a_time = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        for v in self.engine.views() {
            let name = &v.spec.name;
            if v.spec.source.is_some() {
                continue;
            }
            let version = self.engine.metrics(name).map_or(0, |m| m.version);
            if done.get(name) == Some(&version) {
                continue;
            }
            let Some(counters) = self.checkpoints.get(name) else {
                continue;
            };
            let Some(dir) = &counters.dir else { continue };
            if counters.fenced.load(Ordering::Relaxed) > 0 {
                continue;
            }
            let started = std::time::Instant::now();
            let written = self
                .engine
                .checkpoint(name, &[])
                .and_then(|bytes| dir.write(&bytes).map(|path| (path, bytes.len())));
            let counters = Some(counters);
            match written {
                Ok((path, bytes)) => {
                    let took = started.elapsed();
                    done.insert(name.clone(), version);
                    if let Some(c) = counters {
                        c.written.fetch_add(1, Ordering::Relaxed);
                        c.last_bytes.store(bytes as u64, Ordering::Relaxed);
                        c.last_micros
                            .store(took.as_micros() as u64, Ordering::Relaxed);
                        c.last_at_ms.store(epoch_ms(), Ordering::Relaxed);
                    }
                    tracing::info!(
                        view = %name,
                        path = %path,
                        bytes,
                        ms = took.as_secs_f64() * 1e3,
                        "checkpoint written"
                    );
                }
                Err(e @ PanesError::Fenced(_)) => {
                    tracing::error!(
                        view = %name,
                        error = %e,
                        "checkpoint refused: another instance took this view's checkpoints; \
                         this server writes no more of them"
                    );
                    counters.map(|c| c.fenced.fetch_add(1, Ordering::Relaxed));
                    failures.push(format!("view {name:?}: {e}"));
                }
                Err(e) => {
                    tracing::error!(view = %name, error = %e, "checkpoint failed");
                    counters.map(|c| c.failed.fetch_add(1, Ordering::Relaxed));
                    failures.push(format!("view {name:?}: {e}"));
                }
            }
        }
        failures
    }

    /// [`PanesError::ResourceExhausted`] when a request asks for more keys than allowed.
    pub fn check_keys(&self, n: usize) -> crate::error::Result<()> {
        within_limit(
            n,
            self.options.max_keys,
            "keys in one request",
            "ServeOptions::max_keys, --max-keys",
        )
    }

    /// [`PanesError::ResourceExhausted`] when a read names more features than allowed.
    pub fn check_features(&self, n: usize) -> crate::error::Result<()> {
        within_limit(
            n,
            self.options.max_features,
            "features in one read",
            "ServeOptions::max_features, --max-features",
        )
    }
}

/// What the server did, returned when it stops.
#[derive(Clone, Debug)]
pub struct ServeReport {
    /// Every view's counters after the final flush.
    pub views: Vec<ViewMetrics>,
    /// Whether in-flight requests were cut off at the grace deadline.
    pub cut_off: bool,
    /// The final checkpoints that failed (view and reason): the events they held are
    /// not saved, and `panes serve` exits with an error.
    pub checkpoint_failures: Vec<String>,
}

/// A bound server, not yet serving.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    grpc: TcpListener,
    metrics: Option<TcpListener>,
}

impl Server {
    /// Binds the gRPC (and Flight) listener and, if given, the metrics listener.
    /// Port 0 picks a free port: see [`Server::grpc_addr`].
    ///
    /// # Errors
    /// When an address cannot be bound or the thread pools cannot be built.
    pub async fn bind(
        engine: Arc<Engine>,
        options: ServeOptions,
        grpc: SocketAddr,
        metrics: Option<SocketAddr>,
    ) -> crate::error::Result<Server> {
        for addr in std::iter::once(grpc).chain(metrics) {
            let missing: Vec<&str> = [
                (options.tls.is_none(), "TLS (--tls-cert, --tls-key)"),
                (options.tokens.is_none(), "tokens (--tokens)"),
            ]
            .into_iter()
            .filter_map(|(missing, what)| missing.then_some(what))
            .collect();
            if !addr.ip().is_loopback() && !missing.is_empty() {
                tracing::warn!(
                    %addr,
                    missing = %missing.join(" or "),
                    "listening beyond this machine without {}: anyone who reaches the port \
                     can read and write every view",
                    missing.join(" or ")
                );
            }
        }
        let grpc = TcpListener::bind(grpc)
            .await
            .map_err(|e| PanesError::Invalid(format!("cannot listen on {grpc}: {e}")))?;
        let metrics = match metrics {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|e| PanesError::Invalid(format!("cannot listen on {a}: {e}")))?,
            ),
            None => None,
        };
        // The kernels' parallel work (a `Cpu` fold) runs on rayon's global pool: give
        // it the write threads' priority too, when this process has not built it yet.
        let (priority, read_priority) = (options.write_priority, options.read_priority);
        let _ = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("panes-kernel-{i}"))
            .start_handler(move |_| lower_priority(priority))
            .build_global();
        let read_time = engine
            .views()
            .map(|v| (v.spec.name.clone(), ReadTimes::default()))
            .collect();
        if let Some(root) = &options.checkpoint_dir {
            root.probe_writable()?;
            restore_pushed(&engine, root)?;
        }
        let owner = grpc
            .local_addr()
            .map_or_else(|_| "unknown".into(), |a| a.to_string());
        let checkpoints = engine
            .views()
            .filter(|v| v.spec.source.is_none())
            .map(|v| {
                let name = v.spec.name.clone();
                let dir = match &options.checkpoint_dir {
                    Some(root) => {
                        let mut dir = crate::checkpoint::CheckpointDir::new(root.join(&name), 3);
                        dir.claim(&owner)?;
                        Some(dir)
                    }
                    None => None,
                };
                Ok((
                    name,
                    CheckpointCounters {
                        dir,
                        ..CheckpointCounters::default()
                    },
                ))
            })
            .collect::<crate::error::Result<_>>()?;
        let sourced: Vec<_> = engine
            .views()
            .filter(|v| v.spec.source.is_some())
            .map(|v| v.spec.clone())
            .collect();
        let sources = open_sources(&engine, &options, &sourced, &grpc)?;
        let peers = Peers::new(options.tls.as_ref())?;
        let read_log = options
            .read_log
            .clone()
            .map(|o| super::read_log::ReadLog::start(engine.clone(), o))
            .transpose()?;
        let shared = Arc::new(Shared {
            reads: Workers::new("read", options.read_threads, move || {
                read_priority.apply_or_warn()
            })?,
            writes: Workers::new("write", options.write_threads, move || {
                lower_priority(priority)
            })?
            .bounded(options.max_write_queue_bytes),
            engine,
            options,
            read_time,
            checkpointing: std::sync::Mutex::new(()),
            sources,
            peers,
            conns: Arc::default(),
            http: metrics::HttpStats::default(),
            started_ms: epoch_ms(),
            rates: std::sync::Mutex::default(),
            checkpoints,
            subscriptions: super::subscribe::Subscriptions::default(),
            sinks: std::sync::Mutex::new(None),
            read_log,
        });
        Ok(Server {
            shared,
            grpc,
            metrics,
        })
    }

    /// The gRPC and Flight address.
    pub fn grpc_addr(&self) -> std::io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The metrics address, if any.
    pub fn metrics_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.metrics.as_ref().map(TcpListener::local_addr)
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish (for at
    /// most [`ServeOptions::shutdown_grace`]), folds every pending micro-batch, and
    /// reports.
    ///
    /// # Errors
    /// A transport failure, or a fold failure in the final flush.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> crate::error::Result<ServeReport> {
        let Server {
            shared,
            grpc,
            metrics,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<proto::features_server::FeaturesServer<grpc::FeaturesService>>()
            .await;
        health
            .set_serving::<arrow_flight::flight_service_server::FlightServiceServer<flight::Flight>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| PanesError::Internal(format!("reflection: {e}")))?;

        let limit = shared.options.max_message_bytes;
        let features =
            proto::features_server::FeaturesServer::new(grpc::FeaturesService::new(shared.clone()))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX);
        let flight = arrow_flight::flight_service_server::FlightServiceServer::new(
            flight::Flight::new(shared.clone()),
        )
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);

        let sinks = crate::sinks::Sinks::start(&shared.engine, &shared.engine.file().sinks)?;
        *shared.sinks.lock().unwrap_or_else(|p| p.into_inner()) = Some(sinks);
        let ticker = spawn_ticker(shared.clone());
        let metrics_task = metrics.map(|l| tokio::spawn(metrics::serve(l, shared.clone())));
        let sources = shared
            .sources
            .values()
            .map(|s| s.clone().start())
            .collect::<crate::error::Result<Vec<_>>>()?;
        let checkpoints = shared
            .options
            .checkpoint_dir
            .as_ref()
            .map(|_| spawn_checkpoints(shared.clone()));
        let mut signalled = stop_rx.clone();
        let incoming = conn::incoming(grpc, &shared.options, shared.conns.clone());
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &shared.options.tls {
            builder = builder
                .tls_config(tls.grpc()?)
                .map_err(|e| PanesError::Invalid(format!("TLS: {e}")))?;
        }
        // Every service but health checks authenticates its callers.
        let auth = Auth(shared.options.tokens.clone());
        let server = builder
            .max_concurrent_streams(Some(shared.options.max_streams_per_connection))
            .layer(tower::util::MapResponseLayer::new(promised_statuses))
            .add_service(health_service)
            .add_service(InterceptedService::new(reflection, auth.clone()))
            .add_service(InterceptedService::new(features, auth.clone()))
            .add_service(InterceptedService::new(flight, auth))
            .serve_with_incoming_shutdown(
                // Nagle off (set on accept): a reply's trailers must not wait for the
                // client's ACK.
                incoming,
                async move {
                    let _ = signalled.wait_for(|s| *s).await;
                },
            );
        // Subscriptions never end by themselves: they end when the server stops.
        let mut stopping = stop_rx.clone();
        let subscribers = shared.clone();
        tokio::spawn(async move {
            let _ = stopping.wait_for(|s| *s).await;
            subscribers.subscriptions.stop();
        });
        let mut graced = stop_rx.clone();
        let grace = shared.options.shutdown_grace;
        let deadline = async move {
            let _ = graced.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        };
        let cut_off = tokio::select! {
            r = server => {
                r.map_err(|e| PanesError::Internal(format!("gRPC transport: {e}")))?;
                false
            }
            () = deadline => true,
        };
        health
            .set_not_serving::<proto::features_server::FeaturesServer<grpc::FeaturesService>>()
            .await;
        ticker.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = checkpoints {
            t.abort();
        }
        for source in sources {
            if !source.stop(shared.options.shutdown_grace.max(Duration::from_secs(10))) {
                tracing::warn!("a source did not finish its final checkpoint in time");
            }
        }
        let s = shared.clone();
        let views = shared
            .on_writes(move || {
                s.engine.flush()?;
                // Sinks write what the final flush published, then stop.
                let sinks = s.sinks.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(sinks) = sinks {
                    sinks.stop();
                }
                if let Some(log) = &s.read_log {
                    log.stop();
                }
                let failures = s.checkpoint_pushed(&mut HashMap::new());
                let views = s
                    .engine
                    .views()
                    .map(|v| s.view_metrics(&v.spec.name))
                    .collect::<crate::error::Result<Vec<_>>>()?;
                Ok::<_, PanesError>((views, failures))
            })
            .await
            .map_err(|s| PanesError::Internal(s.message().to_string()))??;
        let (views, checkpoint_failures) = views;
        Ok(ServeReport {
            views,
            cut_off,
            checkpoint_failures,
        })
    }
}

/// The sources of the views that have one (`sourced`): they need a checkpoint
/// directory shared by their group and an address other instances reach this one at.
fn open_sources(
    engine: &Engine,
    options: &ServeOptions,
    sourced: &[ViewSpec],
    grpc: &TcpListener,
) -> crate::error::Result<HashMap<String, Arc<dyn Source>>> {
    let mut sources = HashMap::new();
    let Some(first) = sourced.first() else {
        return Ok(sources);
    };
    let local = grpc
        .local_addr()
        .map_err(|e| PanesError::Internal(e.to_string()))?;
    let advertise = match &options.advertise {
        Some(a) => a.clone(),
        None if local.ip().is_unspecified() => {
            return Err(PanesError::Invalid(format!(
                "listening on {local}: Kafka views need --advertise HOST:PORT, the address other instances reach this one at"
            )));
        }
        None => local.to_string(),
    };
    let root = options.checkpoint_dir.clone().ok_or_else(|| {
        PanesError::Invalid(format!(
            "view {:?} takes its events from Kafka and needs --checkpoint-dir (a directory every instance of its group shares)",
            first.name
        ))
    })?;
    let source_options = SourceOptions {
        checkpoint_root: root,
        checkpoint_every: options.checkpoint_interval,
        advertise,
    };
    for spec in sourced {
        let source = crate::sources::open(
            spec,
            engine.options().clone(),
            engine.shared_backend(),
            &source_options,
        )?;
        sources.insert(spec.name.clone(), source);
    }
    Ok(sources)
}

/// [`PanesError::ResourceExhausted`] naming the limit and its setting when a request
/// asks for `n` `what` and `limit` are allowed.
/// The most values a read of `keys` keys and `features` (all, when empty) of a view can
/// reply with: one per key and feature, and a list-valued feature's longest list (a
/// `last_n` of 1 000 turns a reply of numbers into one a thousand times larger).
/// Unknown features count as numbers: the read refuses them anyway.
pub(crate) fn reply_values(
    view: &crate::spec::CompiledView,
    keys: usize,
    features: &[String],
) -> usize {
    let longest = |agg: panes_kernels::Agg| match agg {
        panes_kernels::Agg::LastN { n } => usize::from(n),
        panes_kernels::Agg::TopK { k, .. } => usize::from(k),
        _ => 0,
    };
    let per_key: usize = if features.is_empty() {
        view.spec.features.iter().map(|f| 1 + longest(f.agg)).sum()
    } else {
        features
            .iter()
            .map(|name| {
                1 + view
                    .feature_index(name)
                    .map_or(0, |i| longest(view.spec.features[i].agg))
            })
            .sum()
    };
    keys.saturating_mul(per_key)
}

fn within_limit(n: usize, limit: usize, what: &str, setting: &str) -> crate::error::Result<()> {
    if n > limit {
        return Err(PanesError::ResourceExhausted(format!(
            "{n} {what}; the limit is {limit} ({setting})"
        )));
    }
    Ok(())
}

/// Keeps reads fresh between pushes: publishes micro-batches once they are due.
fn spawn_ticker(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    let period = (shared.engine.options().batch_age / 4).max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let engine = shared.engine.clone();
            match shared.on_writes(move || engine.fold_due()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "a timed fold failed"),
                Err(e) => tracing::error!(error = %e.message(), "a timed fold did not run"),
            }
        }
    })
}

/// Checkpoints the pushed views that changed, every checkpoint interval.
fn spawn_checkpoints(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(shared.options.checkpoint_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let done = Arc::new(std::sync::Mutex::new(HashMap::new()));
        loop {
            tick.tick().await;
            let (s, done) = (shared.clone(), done.clone());
            let _ = shared
                .on_writes(move || {
                    if let Ok(mut d) = done.lock() {
                        s.checkpoint_pushed(&mut d);
                    }
                })
                .await;
        }
    })
}

/// Restores each pushed view from the newest valid checkpoint under `root/<view>/`.
fn restore_pushed(
    engine: &Engine,
    root: &crate::checkpoint::CheckpointRoot,
) -> crate::error::Result<()> {
    for v in engine.views() {
        let name = &v.spec.name;
        if v.spec.source.is_some() {
            continue;
        }
        let dir = crate::checkpoint::CheckpointDir::new(root.join(name), 3);
        let restored = dir.restore_newest(
            |bytes| engine.restore(name, bytes).map_err(|e| e.to_string()),
            |path, why| {
                tracing::warn!(
                    view = %name,
                    path = %path,
                    reason = %why,
                    "skipping checkpoint"
                );
            },
        )?;
        if let Some((info, path)) = restored {
            tracing::info!(
                view = %name,
                path = %path,
                events = info.folded,
                "restored from a checkpoint"
            );
        }
    }
    Ok(())
}

/// A future that completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_counts_lists_at_their_longest() {
        let text = r#"
[[views]]
name = "v"
key = "k"
time = "ts"

[[views.features]]
name = "n"
agg = "count"
window = "1m"

[[views.features]]
name = "last"
agg = "last_n"
column = "x"
n = 1000
window = "1m"
"#;
        let file = crate::spec::FeatureFile::parse(text, "t").unwrap();
        let view = crate::spec::CompiledView::new(&file.views[0], 1);
        assert_eq!(reply_values(&view, 10, &[]), 10 * (1 + 1001));
        assert_eq!(reply_values(&view, 10, &["n".into()]), 10);
        // A name repeated: counted each time.
        let many = vec!["last".to_string(); 1_024];
        assert_eq!(reply_values(&view, 10_000, &many), 10_000 * 1_024 * 1_001);
        let err = within_limit(
            reply_values(&view, 10_000, &many),
            10_000 * 1_024,
            "values",
            "x",
        );
        assert!(matches!(err, Err(PanesError::ResourceExhausted(_))));
    }
}
