//! Serving latency under ingest: open-loop `GetFeatures` at a fixed rate while another
//! stream ingests events, with Redis `MGET` of precomputed vectors as the reference,
//! measured in the same run on the same machine.
//!
//! One file, about 1 000 lines, on purpose: a benchmark binary whose parts (the
//! open-loop scheduler, a minimal RESP client for the Redis reference, the ingest
//! producer, the freshness probe, the report) serve this measurement alone and are
//! each a named function or type; a library module for them would have one user.
//!
//! ```text
//! cargo run --release -p panes-bench --bin serve_load [-- --rate 1000 --seconds 10
//!     --ingest-rate 1000000 --keys 100000 --sizes 1,10,100 --service-sizes 100 --out FILE.json
//!     --write-priority idle|normal|nice:N --read-priority normal|realtime[:N]]
//! ```
//!
//! - A `panes serve` (in this process, on loopback) holds one view of 20 features over
//!   `--keys` Zipf(1.1) card ids, preloaded with two events per key.
//! - Ingest: one `Ingest` stream sends Arrow IPC batches of 16 K events at
//!   `--ingest-rate` events/s for the whole run.
//! - Reads, per request size (`--sizes` keys × 20 features): requests are *scheduled*
//!   at a fixed `--rate` per second and each one's latency counts from its scheduled
//!   time, not from when it was sent (open loop: a stalled server cannot slow the
//!   generator down and hide its own stall, i.e. no coordinated omission).
//! - Feature service, per `--service-sizes` (default 100 rows): the same open-loop
//!   schedule of `GetFeatures` by service `fraud`, 20 features of `cards` and 20 of a
//!   second view `cards_slow` (longer windows, preloaded like `cards`, not ingested
//!   into during the run) plus two on-demand features over them and the request's
//!   `amount`; rows as typed columns.
//! - Freshness: every 20 ms a probe event for a reserved key is sent on its own
//!   stream, and the probe polls `GetFeatures` until a read reflects it.
//! - Redis: `redis-server` (Debian package) started on a free loopback port, no
//!   persistence, loaded with one 160-byte vector (20 doubles) per key; the same
//!   open-loop schedule with `MGET` of the same number of keys, over a pool of
//!   connections. Redis runs with no ingest beside it: it is the floor a cache of
//!   precomputed vectors gives, not a like-for-like engine.
//! - Besides the latency it prints, per phase, the server's own time per request (its
//!   `panes-server-time-us` header) and the generator's own lag (scheduled time to
//!   the request's task running). The generator's schedule and client threads run
//!   `SCHED_FIFO` at priority 2 when allowed (above `--read-priority realtime`), the
//!   ingest producer at nice 19: they stand for clients on other machines.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use panes_bench::{arg, machine};
use panes_engine::serve::proto::features_client::FeaturesClient;
use panes_engine::serve::proto::{
    self, GetFeaturesRequest, IngestRequest, IngestResponse, get_features_request, ingest_request,
};
use panes_engine::serve::{ReadPriority, SERVER_TIME_HEADER, ServeOptions, Server, WritePriority};
use panes_engine::{Engine, EngineOptions, FeatureFile};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Zipf};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;

/// 20 features over one view: counts, sums, means, extremes and spreads over four
/// windows.
fn features() -> FeatureFile {
    let mut toml = String::from(
        "[[views]]\nname = \"cards\"\nkey = \"card\"\ntime = \"ts\"\npane = \"1s\"\nallowed_lateness = \"5s\"\n",
    );
    let mut add = |name: &str, agg: &str, column: Option<&str>, window: &str, hop: &str| {
        toml.push_str(&format!(
            "[[views.features]]\nname = \"{name}\"\nagg = \"{agg}\"\nwindow = \"{window}\"\n"
        ));
        if let Some(c) = column {
            toml.push_str(&format!("column = \"{c}\"\n"));
        }
        if !hop.is_empty() {
            toml.push_str(&format!("hop = \"{hop}\"\n"));
        }
    };
    for (w, hop) in [("1m", "5s"), ("10m", "1m"), ("1h", "5m")] {
        add(&format!("n_{w}"), "count", None, w, hop);
        add(&format!("sum_{w}"), "sum", Some("amount"), w, hop);
        add(&format!("mean_{w}"), "mean", Some("amount"), w, hop);
        add(&format!("max_{w}"), "max", Some("amount"), w, hop);
        add(&format!("min_{w}"), "min", Some("amount"), w, hop);
        add(&format!("std_{w}"), "std", Some("amount"), w, hop);
    }
    add("n_life", "count", None, "lifetime", "");
    add("mean_life", "mean", Some("amount"), "lifetime", "");
    // A second view of the same cards (longer windows), and a service over both.
    toml.push_str(
        "[[views]]\nname = \"cards_slow\"\nkey = \"card\"\ntime = \"ts\"\npane = \"1m\"\nallowed_lateness = \"5s\"\n",
    );
    let mut names: Vec<String> = Vec::new();
    for (w, hop) in [("2h", "10m"), ("6h", "30m"), ("1d", "1h")] {
        for (agg, column) in [
            ("count", None),
            ("sum", Some("amount")),
            ("mean", Some("amount")),
            ("max", Some("amount")),
            ("min", Some("amount")),
            ("std", Some("amount")),
        ] {
            let name = format!("s_{agg}_{w}");
            toml.push_str(&format!(
                "[[views.features]]\nname = \"{name}\"\nagg = \"{agg}\"\nwindow = \"{w}\"\nhop = \"{hop}\"\n"
            ));
            if let Some(c) = column {
                toml.push_str(&format!("column = \"{c}\"\n"));
            }
            names.push(name);
        }
    }
    for (name, agg, column) in [
        ("s_n_life", "count", None),
        ("s_last", "last", Some("amount")),
    ] {
        toml.push_str(&format!(
            "[[views.features]]\nname = \"{name}\"\nagg = \"{agg}\"\nwindow = \"lifetime\"\n"
        ));
        if let Some(c) = column {
            toml.push_str(&format!("column = \"{c}\"\n"));
        }
        names.push(name.to_string());
    }
    let fast = FeatureFile::parse(&toml, "serve_load").expect("valid features");
    let all: Vec<String> = fast.views[0]
        .features
        .iter()
        .map(|f| format!("{:?}", f.name))
        .chain(names.iter().map(|n| format!("{n:?}")))
        .collect();
    toml.push_str(&format!(
        "[[services]]\nname = \"fraud\"\nfeatures = [{}]\n\
         [[services.on_demand]]\nname = \"amount_vs_mean\"\nexpr = \"amount / mean_1m\"\n\
         [[services.on_demand]]\nname = \"recent_share\"\nexpr = \"CAST(n_1m AS DOUBLE) / (s_count_2h + 1)\"\n",
        all.join(", ")
    ));
    FeatureFile::parse(&toml, "serve_load").expect("valid features")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn batch(card: Vec<i64>, ts: Vec<i64>, amount: Vec<f64>) -> RecordBatch {
    RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(card)) as ArrayRef),
        ("ts", Arc::new(Int64Array::from(ts)) as ArrayRef),
        ("amount", Arc::new(Float64Array::from(amount)) as ArrayRef),
    ])
    .expect("valid batch")
}

fn ipc(view: &str, b: &RecordBatch) -> IngestRequest {
    let mut out = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &b.schema()).expect("schema");
    w.write(b).expect("write");
    w.finish().expect("finish");
    drop(w);
    IngestRequest {
        view: view.into(),
        payload: Some(ingest_request::Payload::ArrowIpc(out)),
    }
}

/// Priority of the generator's schedule thread and read client's threads: above
/// `--read-priority realtime` (1), so that the server's reads do not delay them.
const GENERATOR_PRIORITY: ReadPriority = ReadPriority::Realtime(2);

/// What one request gave: whether it succeeded, and the server's own time for it
/// when the server reports one (Panes does, in a response header).
struct Reply {
    ok: bool,
    server_us: Option<u64>,
}

/// Latency percentiles of one phase.
#[derive(Debug)]
struct Phase {
    target: &'static str,
    keys: usize,
    rate: f64,
    achieved: f64,
    errors: u64,
    /// Latency from the scheduled time to the reply, sorted.
    lat_us: Vec<u64>,
    /// The server's own time per request, sorted (empty when it reports none).
    server_us: Vec<u64>,
    /// The generator's own lag: from the scheduled time until the request's task runs
    /// on the client runtime (no server work in it), sorted.
    lag_us: Vec<u64>,
}

/// Percentile `p` of sorted microseconds, in ms (NaN when empty).
fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1e3
}

impl Phase {
    fn pct(&self, p: f64) -> f64 {
        pct_ms(&self.lat_us, p)
    }
}

/// Runs `call` open loop at `rate`/s for `seconds`, latency from the scheduled time.
async fn open_loop<F, Fut>(
    target: &'static str,
    keys: usize,
    rate: f64,
    seconds: f64,
    call: F,
) -> Phase
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    // A plain thread keeps the schedule: `std::thread::sleep` wakes within ~0.1 ms,
    // where tokio's timer has a 1 ms granularity that would count as latency.
    let n = (rate * seconds) as u64;
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(20);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let _ = GENERATOR_PRIORITY.apply();
        for i in 0..n {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let fut = call(i);
            let task = handle.spawn(async move {
                let lag = at.elapsed();
                let reply = fut.await;
                (reply, lag, at.elapsed())
            });
            if tx.send(task).is_err() {
                return;
            }
        }
    });
    let mut tasks = Vec::with_capacity(n as usize);
    while let Some(t) = rx.recv().await {
        tasks.push(t);
    }
    let (mut lat_us, mut server_us, mut lag_us) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = 0;
    for t in tasks {
        let (reply, lag, d) = t.await.expect("request task");
        lag_us.push(lag.as_micros() as u64);
        if reply.ok {
            lat_us.push(d.as_micros() as u64);
            server_us.extend(reply.server_us);
        } else {
            errors += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    server_us.sort_unstable();
    lag_us.sort_unstable();
    Phase {
        target,
        keys,
        rate,
        achieved: lat_us.len() as f64 / elapsed,
        errors,
        lat_us,
        server_us,
        lag_us,
    }
}

/// A minimal RESP client: enough for SET and MGET.
struct Redis {
    stream: BufReader<TcpStream>,
}

impl Redis {
    async fn connect(addr: SocketAddr) -> std::io::Result<Redis> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Redis {
            stream: BufReader::new(s),
        })
    }

    fn command(out: &mut Vec<u8>, parts: &[&[u8]]) {
        out.extend_from_slice(format!("*{}\r\n", parts.len()).as_bytes());
        for p in parts {
            out.extend_from_slice(format!("${}\r\n", p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
    }

    async fn line(&mut self) -> std::io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let b = self.stream.read_u8().await?;
            if b == b'\n' && line.last() == Some(&b'\r') {
                line.pop();
                return Ok(line);
            }
            line.push(b);
        }
    }

    /// Reads one reply; returns the number of bulk strings read (arrays flattened).
    async fn reply(&mut self) -> std::io::Result<usize> {
        let line = self.line().await?;
        let n: i64 = std::str::from_utf8(&line[1..])
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        match line.first() {
            Some(b'+') | Some(b':') => Ok(0),
            Some(b'-') => Err(std::io::Error::other(
                String::from_utf8_lossy(&line).to_string(),
            )),
            Some(b'$') => {
                if n >= 0 {
                    let mut buf = vec![0; n as usize + 2];
                    self.stream.read_exact(&mut buf).await?;
                }
                Ok(1)
            }
            Some(b'*') => {
                let mut total = 0;
                for _ in 0..n.max(0) {
                    total += Box::pin(self.reply()).await?;
                }
                Ok(total)
            }
            _ => Err(std::io::Error::other("unexpected Redis reply")),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(bytes).await
    }
}

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn start_redis() -> (RedisServer, SocketAddr) {
    let port = free_port();
    let child = Command::new(arg("--redis-server", "redis-server"))
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); Debian: apt-get install redis-server")
        });
    let server = RedisServer(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Redis::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (server, addr)
}

fn main() {
    let args = Args::parse();
    println!("machine: {}", machine());
    println!(
        "server: write priority {:?}, read priority {:?}",
        args.write_priority, args.read_priority
    );
    raise_generator_priority();

    let file = features();
    let nfeat = file.views[0].features.len();
    let file_for_service = file.clone();
    let engine = Arc::new(
        Engine::new(
            &file,
            EngineOptions {
                batch_age: Duration::from_millis(10),
                batch_rows: args.batch_rows,
                ..EngineOptions::default()
            },
        )
        .expect("engine"),
    );
    let backend = engine.backend().kind().name();
    // The server gets its own runtime (as `panes serve` has); the load its own.
    let read_priority = args.read_priority;
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || read_priority.apply_or_warn())
        .enable_all()
        .build()
        .expect("runtime");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr, metrics_addr) = server_rt.block_on(start_server(engine, &args, stop_rx));
    // The ingest stream has a runtime of its own: encoding its large messages must not
    // delay the read requests' replies in the client.
    let ingest_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let ingest_handle = ingest_rt.handle().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| {
            let _ = GENERATOR_PRIORITY.apply();
        })
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let (keys, rate, seconds) = (args.keys, args.rate, args.seconds);
        let mut ingest_client =
            FeaturesClient::new(connect(addr).await).max_encoding_message_size(usize::MAX);
        preload(&mut ingest_client, keys, backend, nfeat).await;

        // Ingest at a fixed rate for the whole run, batches of 16 K events.
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let ingest = {
            let (tx, rx) = tokio::sync::mpsc::channel::<IngestRequest>(4);
            // A plain thread: the client runtime's threads (blocking pool included)
            // run at the generator's real-time priority.
            let producer = {
                let (stop, sent, ingest_rate) = (stop.clone(), sent.clone(), args.ingest_rate);
                std::thread::spawn(move || produce(&tx, keys, ingest_rate, &stop, &sent))
            };
            let call = ingest_handle.spawn(async move {
                FeaturesClient::new(connect(addr).await)
                    .max_encoding_message_size(usize::MAX)
                    .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(|r| r.into_inner())
            });
            (producer, call)
        };

        // Freshness probe: a reserved key, one event every 20 ms, polled until seen.
        let probe = tokio::spawn(probe_freshness(
            FeaturesClient::new(connect(addr).await),
            keys,
            stop.clone(),
        ));

        // Reads: open loop per size, over 4 connections.
        let clients: Vec<FeaturesClient<Channel>> = futures::future::join_all(
            (0..4).map(|_| async { FeaturesClient::new(connect(addr).await) }),
        )
        .await;
        let ingest_start = (Instant::now(), sent.load(Ordering::Relaxed));
        let mut phases = Vec::new();
        for &size in &args.sizes {
            let phase = panes_phase(clients.clone(), size, rate, seconds, keys, nfeat).await;
            eprintln!(
                "panes, {size} keys: done ({} ok, {} errors)",
                phase.lat_us.len(),
                phase.errors
            );
            phases.push(phase);
        }
        let nout = engine_outputs(&file_for_service);
        for &size in &args.service_sizes {
            let phase = service_phase(clients.clone(), size, rate, seconds, keys, nout).await;
            eprintln!(
                "panes service, {size} rows: done ({} ok, {} errors)",
                phase.lat_us.len(),
                phase.errors
            );
            phases.push(phase);
        }
        let server_side = server_read_time(metrics_addr).await;
        let ingested = sent.load(Ordering::Relaxed) - ingest_start.1;
        let ingest_rate_seen = ingested as f64 / ingest_start.0.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let _ = ingest.0.join();
        let ingest_reply = ingest.1.await.expect("ingest task");
        let freshness = probe.await.expect("probe task");

        // Redis: the same schedule, MGET of precomputed 20-double vectors.
        let (_redis, raddr) = start_redis().await;
        load_redis(raddr, keys, nfeat).await;
        let pool = async_channel_pool(16, raddr).await;
        for &size in &args.sizes {
            phases.push(redis_phase(pool.clone(), size, rate, seconds, keys).await);
        }
        let run = Run {
            args: &args,
            backend,
            nfeat,
            phases,
            ingest_rate_seen,
            ingest_reply,
            freshness,
            server_side,
        };
        run.report();
    });
    let _ = stop_tx.send(());
    drop(ingest_rt);
    drop(server_rt);
}

/// The command line.
struct Args {
    rate: f64,
    seconds: f64,
    ingest_rate: f64,
    keys: u64,
    sizes: Vec<usize>,
    service_sizes: Vec<usize>,
    out: String,
    batch_rows: usize,
    write_priority: WritePriority,
    read_priority: ReadPriority,
}

impl Args {
    fn parse() -> Self {
        let rate: f64 = arg("--rate", "1000").parse().expect("--rate R");
        let seconds: f64 = arg("--seconds", "10").parse().expect("--seconds S");
        let ingest_rate: f64 = arg("--ingest-rate", "1000000")
            .parse()
            .expect("--ingest-rate E");
        let keys: u64 = arg("--keys", "100000").parse().expect("--keys K");
        let sizes: Vec<usize> = arg("--sizes", "1,10,100")
            .split(',')
            .map(|s| s.parse().expect("--sizes 1,10,100"))
            .collect();
        let service_sizes: Vec<usize> = arg("--service-sizes", "100")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().expect("--service-sizes 100"))
            .collect();
        let out = arg("--out", "");
        let batch_rows: usize = arg("--batch-rows", "65536")
            .parse()
            .expect("--batch-rows N");
        let write_priority: WritePriority = arg("--write-priority", "idle")
            .parse()
            .expect("--write-priority idle|normal|nice:N");
        let read_priority: ReadPriority = arg("--read-priority", "normal")
            .parse()
            .expect("--read-priority normal|realtime[:N]");
        Args {
            rate,
            seconds,
            ingest_rate,
            keys,
            sizes,
            service_sizes,
            out,
            batch_rows,
            write_priority,
            read_priority,
        }
    }
}

/// The generator stands for clients on other machines: its schedule and its read
/// client's threads run SCHED_FIFO when allowed, above the server's real-time
/// priority, so that its own scheduling delays (the `lag` column) do not count as
/// the server's latency. Its work per request is a few microseconds.
fn raise_generator_priority() {
    // Tried on a thread of its own: threads inherit their creator's policy, and the
    // server's threads are created from this one.
    let generator = std::thread::spawn(|| GENERATOR_PRIORITY.apply())
        .join()
        .expect("priority probe");
    println!(
        "generator: schedule and client threads {}",
        match &generator {
            Ok(()) => "SCHED_FIFO".to_string(),
            Err(e) => format!("at normal priority ({e})"),
        }
    );
}

/// Binds and starts the server, which stops when `stop` fires; returns its gRPC and
/// metrics addresses.
async fn start_server(
    engine: Arc<Engine>,
    args: &Args,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> (SocketAddr, SocketAddr) {
    let (write_priority, read_priority) = (args.write_priority, args.read_priority);
    let server = Server::bind(
        engine,
        ServeOptions {
            write_priority,
            read_priority,
            ..ServeOptions::default()
        },
        "127.0.0.1:0".parse().expect("addr"),
        Some("127.0.0.1:0".parse().expect("addr")),
    )
    .await
    .expect("bind");
    let addr = server.grpc_addr().expect("addr");
    let metrics_addr = server
        .metrics_addr()
        .expect("metrics")
        .expect("metrics addr");
    tokio::spawn(server.run(async move {
        let _ = stop.await;
    }));
    (addr, metrics_addr)
}

async fn connect(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect")
}

/// Two events per key, so every read finds state.
async fn preload(
    ingest_client: &mut FeaturesClient<Channel>,
    keys: u64,
    backend: &str,
    nfeat: usize,
) {
    let t0 = now_ms();
    let mut rng = StdRng::seed_from_u64(1);
    let pre: Vec<IngestRequest> = (0..2)
        .map(|round| {
            let card: Vec<i64> = (0..keys as i64).collect();
            let ts = vec![t0 - 60_000 + round * 1_000; keys as usize];
            let amount = (0..keys).map(|_| rng.random_range(1.0..500.0f64)).collect();
            ipc("cards", &batch(card, ts, amount))
        })
        .collect();
    // The second view gets the same two events per key (the ingest stream feeds
    // `cards` only).
    let pre: Vec<IngestRequest> = pre
        .into_iter()
        .flat_map(|r| {
            let mut slow = r.clone();
            slow.view = "cards_slow".into();
            [r, slow]
        })
        .collect();
    let r = ingest_client
        .ingest(futures::stream::iter(pre))
        .await
        .expect("preload")
        .into_inner();
    println!(
        "preloaded {} events over {keys} keys; backend {backend}; {nfeat} features",
        r.accepted
    );
}

/// Sends batches of 16 K Zipf-distributed events to `tx` at `ingest_rate` events/s
/// until `stop`, counting them in `sent`.
fn produce(
    tx: &tokio::sync::mpsc::Sender<IngestRequest>,
    keys: u64,
    ingest_rate: f64,
    stop: &AtomicBool,
    sent: &AtomicU64,
) {
    // The producer stands for clients on other machines: it must not take
    // the server's place on these two cores.
    #[cfg(target_os = "linux")]
    // SAFETY: no memory-safety preconditions; failure leaves the priority.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
    let rows = 16 * 1024;
    let zipf = Zipf::new(keys as f64, 1.1).expect("zipf");
    let mut rng = StdRng::seed_from_u64(2);
    let started = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = started + Duration::from_secs_f64(n as f64 / ingest_rate);
        while let Some(wait) = due.checked_duration_since(Instant::now()) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(wait.min(Duration::from_millis(10)));
        }
        let now = now_ms();
        let card = (0..rows)
            .map(|_| zipf.sample(&mut rng) as i64 - 1)
            .collect();
        let ts = (0..rows)
            .map(|_| now - rng.random_range(0..1_000))
            .collect();
        let amount = (0..rows).map(|_| rng.random_range(1.0..500.0f64)).collect();
        if tx
            .blocking_send(ipc("cards", &batch(card, ts, amount)))
            .is_err()
        {
            break;
        }
        n += rows as u64;
        sent.store(n, Ordering::Relaxed);
    }
}

/// Ingests one event of a reserved key every 20 ms and polls until a read reflects
/// it, until `stop`; returns the delays, sorted, in µs.
async fn probe_freshness(
    mut client: FeaturesClient<Channel>,
    keys: u64,
    stop: Arc<AtomicBool>,
) -> Vec<u64> {
    let key = keys as i64 + 1_000_000;
    let mut delays = Vec::new();
    let mut seen = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let b = batch(vec![key], vec![now_ms()], vec![1.0]);
        if client
            .ingest(futures::stream::iter(vec![ipc("cards", &b)]))
            .await
            .is_err()
        {
            break;
        }
        loop {
            let r = client
                .get_features(GetFeaturesRequest {
                    view: "cards".into(),
                    keys: Some(get_features_request::Keys::IntKeys(proto::IntKeys {
                        keys: vec![key],
                    })),
                    features: vec!["n_life".into()],
                    at_ms: None,
                    ..Default::default()
                })
                .await;
            let n = r.map(|r| r.into_inner().values[0] as u64).unwrap_or(0);
            if n > seen {
                seen = n;
                delays.push(sent.elapsed().as_micros() as u64);
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    delays.sort_unstable();
    delays
}

/// What a `GetFeatures` call gave: success when the reply holds `values` values, and
/// the server's own time.
fn reply(
    r: Result<tonic::Response<proto::GetFeaturesResponse>, tonic::Status>,
    values: usize,
) -> Reply {
    match r {
        Ok(r) => Reply {
            ok: r.get_ref().values.len() == values,
            server_us: r
                .metadata()
                .get(SERVER_TIME_HEADER)
                .and_then(|v| v.to_str().ok()?.parse().ok()),
        },
        Err(_) => Reply {
            ok: false,
            server_us: None,
        },
    }
}

/// One open-loop phase of `size`-key reads against Panes.
async fn panes_phase(
    clients: Vec<FeaturesClient<Channel>>,
    size: usize,
    rate: f64,
    seconds: f64,
    keys: u64,
    nfeat: usize,
) -> Phase {
    open_loop("panes + ingest", size, rate, seconds, move |i| {
        let mut c = clients[i as usize % clients.len()].clone();
        let mut rng = StdRng::seed_from_u64(i);
        let ks: Vec<i64> = (0..size)
            .map(|_| rng.random_range(0..keys as i64))
            .collect();
        async move {
            let r = c
                .get_features(GetFeaturesRequest {
                    view: "cards".into(),
                    keys: Some(get_features_request::Keys::IntKeys(proto::IntKeys {
                        keys: ks,
                    })),
                    features: vec![],
                    at_ms: None,
                    ..Default::default()
                })
                .await;
            reply(r, size * nfeat)
        }
    })
    .await
}

/// Loads a precomputed vector of `nfeat` doubles for every key into Redis.
async fn load_redis(raddr: SocketAddr, keys: u64, nfeat: usize) {
    let mut r = Redis::connect(raddr).await.expect("redis");
    let vector = vec![0u8; nfeat * 8];
    let mut buf = Vec::new();
    let mut pending = 0;
    for k in 0..keys {
        Redis::command(&mut buf, &[b"SET", format!("card:{k}").as_bytes(), &vector]);
        pending += 1;
        if pending == 1000 || k + 1 == keys {
            r.send(&buf).await.expect("SET");
            for _ in 0..pending {
                r.reply().await.expect("SET reply");
            }
            buf.clear();
            pending = 0;
        }
    }
}

/// Columns of a `fraud` service read: its features and on-demand features.
fn engine_outputs(file: &FeatureFile) -> usize {
    file.service("fraud")
        .map_or(0, |s| s.features.len() + s.on_demand.len())
}

/// One open-loop phase of `size`-row reads of the `fraud` service (two views × 20
/// features and two on-demand features per row), rows as typed columns: a card and an
/// amount.
async fn service_phase(
    clients: Vec<FeaturesClient<Channel>>,
    size: usize,
    rate: f64,
    seconds: f64,
    keys: u64,
    nout: usize,
) -> Phase {
    use proto::request_column::Values;
    open_loop("panes service", size, rate, seconds, move |i| {
        let mut c = clients[i as usize % clients.len()].clone();
        let mut rng = StdRng::seed_from_u64(i);
        let ks: Vec<i64> = (0..size)
            .map(|_| rng.random_range(0..keys as i64))
            .collect();
        let amounts: Vec<f64> = (0..size).map(|_| rng.random_range(1.0..500.0)).collect();
        let column = |name: &str, values: Values| proto::RequestColumn {
            name: name.into(),
            values: Some(values),
            nulls: vec![],
        };
        let request = proto::ServiceRequest {
            data: Some(proto::service_request::Data::Columns(
                proto::RequestColumns {
                    columns: vec![
                        column("card", Values::Ints(proto::IntKeys { keys: ks })),
                        column(
                            "amount",
                            Values::Doubles(proto::DoubleValues { values: amounts }),
                        ),
                    ],
                },
            )),
            at_column: String::new(),
        };
        async move {
            let r = c
                .get_features(GetFeaturesRequest {
                    service: "fraud".into(),
                    request: Some(request),
                    ..Default::default()
                })
                .await;
            reply(r, size * nout)
        }
    })
    .await
}

/// One open-loop phase of `size`-key MGETs against Redis.
async fn redis_phase(pool: Pool, size: usize, rate: f64, seconds: f64, keys: u64) -> Phase {
    open_loop("redis MGET", size, rate, seconds, move |i| {
        let (tx, rx) = pool.clone();
        let mut rng = StdRng::seed_from_u64(i);
        let ks: Vec<String> = (0..size)
            .map(|_| format!("card:{}", rng.random_range(0..keys)))
            .collect();
        async move {
            let Some(mut conn) = rx.lock().await.recv().await else {
                return Reply {
                    ok: false,
                    server_us: None,
                };
            };
            let mut parts: Vec<&[u8]> = vec![b"MGET"];
            parts.extend(ks.iter().map(|k| k.as_bytes()));
            let mut buf = Vec::new();
            Redis::command(&mut buf, &parts);
            let ok = conn.send(&buf).await.is_ok() && conn.reply().await.is_ok_and(|n| n == size);
            let _ = tx.send(conn).await;
            Reply {
                ok,
                server_us: None,
            }
        }
    })
    .await
}

/// What one run measured.
struct Run<'a> {
    args: &'a Args,
    backend: &'static str,
    nfeat: usize,
    phases: Vec<Phase>,
    ingest_rate_seen: f64,
    ingest_reply: Result<IngestResponse, tonic::Status>,
    freshness: Vec<u64>,
    server_side: String,
}

impl Run<'_> {
    /// Prints the table and the summary, and writes the JSON report if asked.
    fn report(&self) {
        let Run {
            args,
            backend,
            nfeat,
            ref phases,
            ingest_rate_seen,
            ref ingest_reply,
            ref freshness,
            ref server_side,
        } = *self;
        let Args {
            rate,
            seconds,
            ingest_rate,
            ref sizes,
            ref out,
            ..
        } = *args;
        println!(
            "\nopen loop at {rate} requests/s per phase, {seconds} s each; latency from the scheduled send time\n"
        );
        println!(
            "{:<16} {:>8} {:>10} {:>6} {:>7} {:>7} {:>8} {:>7} | {:>10} {:>10} | {:>7}",
            "target",
            "keys/req",
            "achieved/s",
            "errors",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "server p50",
            "server p99",
            "lag p99"
        );
        for p in phases {
            println!(
                "{:<16} {:>8} {:>10.0} {:>6} {:>7.3} {:>7.3} {:>8.3} {:>7.3} | {:>10.3} {:>10.3} | {:>7.3}",
                p.target,
                p.keys,
                p.achieved,
                p.errors,
                p.pct(0.5),
                p.pct(0.99),
                p.pct(0.999),
                p.pct(1.0),
                pct_ms(&p.server_us, 0.5),
                pct_ms(&p.server_us, 0.99),
                pct_ms(&p.lag_us, 0.99)
            );
        }
        println!(
            "server: the server's own time per request (its {SERVER_TIME_HEADER} header); lag: the generator's own delay \
             from the scheduled time until the request's task runs, before any server work"
        );
        let accepted = ingest_reply.as_ref().map_or(0, |r| r.accepted);
        println!(
            "\ningest during the reads: {:.2} M events/s sent (target {:.2} M); {} events accepted by the stream{}",
            ingest_rate_seen / 1e6,
            ingest_rate / 1e6,
            accepted,
            ingest_reply
                .as_ref()
                .err()
                .map_or(String::new(), |e| format!(" (stream error: {e})"))
        );
        let fp = |p: f64| pct_ms(freshness, p);
        println!(
            "freshness (ingest of an event → first read that reflects it), {} probes: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            freshness.len(),
            fp(0.5),
            fp(0.99),
            fp(1.0)
        );
        println!("server-side read time (all sizes, from its histogram): {server_side}");
        for &size in sizes {
            let p = phases
                .iter()
                .find(|p| p.target.starts_with("panes") && p.keys == size);
            let r = phases
                .iter()
                .find(|p| p.target.starts_with("redis") && p.keys == size);
            if let (Some(p), Some(r)) = (p, r) {
                println!(
                    "{size:>4} keys × {nfeat} features: panes p99 {:.3} ms = {:.1}× redis p99 {:.3} ms",
                    p.pct(0.99),
                    p.pct(0.99) / r.pct(0.99),
                    r.pct(0.99)
                );
            }
        }
        if !out.is_empty() {
            let json = format!(
                "{{\"machine\": {:?}, \"backend\": {:?}, \"rate\": {rate}, \"seconds\": {seconds}, \"ingest_target\": {ingest_rate}, \"ingest_sent_per_s\": {ingest_rate_seen:.0}, \"freshness_ms\": {{\"p50\": {:.3}, \"p99\": {:.3}, \"max\": {:.3}}}, \"phases\": [{}]}}",
                machine(),
                backend,
                fp(0.5),
                fp(0.99),
                fp(1.0),
                phases
                    .iter()
                    .map(|p| format!(
                        "{{\"target\": {:?}, \"keys\": {}, \"rate\": {}, \"achieved\": {:.1}, \"errors\": {}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"p999_ms\": {:.3}, \"max_ms\": {:.3}, \"server_p50_ms\": {}, \"server_p99_ms\": {}, \"lag_p99_ms\": {:.3}}}",
                        p.target, p.keys, p.rate, p.achieved, p.errors, p.pct(0.5), p.pct(0.99), p.pct(0.999), p.pct(1.0),
                        json_ms(pct_ms(&p.server_us, 0.5)), json_ms(pct_ms(&p.server_us, 0.99)), pct_ms(&p.lag_us, 0.99)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if let Some(dir) = std::path::Path::new(&out).parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(out, json).expect("write the JSON report");
            println!("wrote {out}");
        }
    }
}

/// Milliseconds as JSON: a number, or `null` when there are none.
fn json_ms(ms: f64) -> String {
    if ms.is_nan() {
        "null".into()
    } else {
        format!("{ms:.3}")
    }
}

/// The server's own read-duration histogram, as "p50 ≤ x ms, p99 ≤ y ms" (bucket
/// upper bounds), scraped from its Prometheus endpoint.
async fn server_read_time(addr: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return "unavailable".into();
    };
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = s.read_to_string(&mut text).await;
    let prefix = "panes_read_duration_seconds_bucket{view=\"cards\",le=\"";
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|r| {
            let (le, n) = r.split_once("\"} ")?;
            Some((le.to_string(), n.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|b| b.1 >= q * total)
            .map_or("?".to_string(), |b| match b.0.parse::<f64>() {
                Ok(s) => format!("{:.3}", s * 1e3),
                Err(_) => b.0.clone(),
            })
    };
    format!(
        "{} reads, p50 ≤ {} ms, p99 ≤ {} ms",
        total,
        at(0.5),
        at(0.99)
    )
}

type Pool = (
    tokio::sync::mpsc::Sender<Redis>,
    Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Redis>>>,
);

/// `n` Redis connections handed out through a channel: a request takes one, uses it
/// and gives it back.
async fn async_channel_pool(n: usize, addr: SocketAddr) -> Pool {
    let (tx, rx) = tokio::sync::mpsc::channel(n);
    for _ in 0..n {
        tx.send(Redis::connect(addr).await.expect("redis connection"))
            .await
            .expect("pool");
    }
    (tx, Arc::new(tokio::sync::Mutex::new(rx)))
}
