//! The server under a 2 GiB address-space limit (`RLIMIT_AS`) against everything that
//! used to exhaust it: messages of a million new keys each, hostile Arrow IPC and
//! oversized reads, 500 silent connections and 10 000 concurrent streams. It must keep
//! serving (health SERVING), keep its reads exact, and say which limit refused what.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Int64Array, RecordBatch};
use panes_engine::serve::proto::features_client::FeaturesClient;
use panes_engine::serve::proto::{
    GetFeaturesRequest, GetFeaturesResponse, IngestRequest, IntKeys, get_features_request,
    ingest_request,
};
use tonic::Code;
use tonic::transport::Channel;

const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"

[[views.features]]
name = "n_1h"
agg = "count"
window = "1h"
hop = "1m"

[[views.features]]
name = "amount_sum_1h"
agg = "sum"
column = "amount"
window = "1h"
hop = "1m"

[[views]]
name = "capped"
key = "card"
time = "ts"
max_keys = 1000

[[views.features]]
name = "c_n"
agg = "count"
window = "lifetime"
"#;

const ADDRESS_SPACE: u64 = 2 << 30;

struct Serving {
    child: Child,
    addr: String,
    /// The server's first line (its addresses).
    line: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `panes serve` with `args`, under the resource limit `(resource, value)`.
fn serve(dir: &std::path::Path, args: &[&str], limit: (libc::__rlimit_resource_t, u64)) -> Serving {
    let features = dir.join("features.toml");
    std::fs::write(&features, FEATURES).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_panes"));
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "cpu"])
        .arg("--features")
        .arg(&features)
        .args(["--batch-age-ms", "5"])
        .args(args)
        .stderr(Stdio::piped());
    let (resource, value) = limit;
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = after(&line, "gRPC + Flight on ");
    // Keep draining the server's log so that it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while stderr.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    Serving { child, addr, line }
}

/// The address after `label` in the server's first line.
fn after(line: &str, label: &str) -> String {
    line.split(label)
        .nth(1)
        .and_then(|r| {
            r.split(|c: char| c == ',' || c == '/' || c.is_whitespace())
                .next()
        })
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
        .to_string()
}

fn ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema()).unwrap();
    w.write(batch).unwrap();
    w.into_inner().unwrap()
}

fn events(keys: std::ops::Range<i64>, ts: i64) -> RecordBatch {
    let n = (keys.end - keys.start) as usize;
    RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from_iter_values(keys)) as _),
        ("ts", Arc::new(Int64Array::from(vec![ts; n])) as _),
        (
            "amount",
            Arc::new(arrow_array::Float64Array::from(vec![1.0; n])) as _,
        ),
    ])
    .unwrap()
}

/// A 1-row stream whose record batch claims a body of 2^44 bytes: it used to abort the
/// server on the failed allocation.
fn claim_a_huge_body(mut bytes: Vec<u8>) -> Vec<u8> {
    // Each message: 0xFFFFFFFF, the metadata length, the metadata, the body.
    let meta_len =
        |at: usize| i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
    let schema_len = meta_len(0);
    let batch = 8 + schema_len;
    let (meta, len) = (batch + 8, meta_len(batch));
    let body = arrow_ipc::root_as_message(&bytes[meta..meta + len])
        .unwrap()
        .bodyLength();
    let at = (0..len - 8)
        .find(|&i| {
            let mut trial = bytes[meta..meta + len].to_vec();
            if trial[i..i + 8] != body.to_le_bytes() {
                return false;
            }
            trial[i..i + 8].copy_from_slice(&(1i64 << 44).to_le_bytes());
            arrow_ipc::root_as_message(&trial).is_ok_and(|m| m.bodyLength() == 1 << 44)
        })
        .expect("the body length is in the metadata");
    bytes[meta + at..meta + at + 8].copy_from_slice(&(1i64 << 44).to_le_bytes());
    bytes
}

fn message(view: &str, batch: &RecordBatch) -> IngestRequest {
    IngestRequest {
        view: view.into(),
        payload: Some(ingest_request::Payload::ArrowIpc(ipc(batch))),
    }
}

async fn read(
    client: &mut FeaturesClient<Channel>,
    view: &str,
    keys: Vec<i64>,
) -> GetFeaturesResponse {
    client
        .get_features(GetFeaturesRequest {
            view: view.into(),
            keys: Some(get_features_request::Keys::IntKeys(IntKeys { keys })),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

async fn serving(channel: Channel) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1, "health is SERVING");
}

#[test]
fn r17_a_server_under_a_2_gib_address_space_limit_refuses_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    // The state budget is left at `auto`: half of the address-space limit.
    let mut server = serve(
        dir.path(),
        &["--metrics", "off", "--handshake-timeout", "3"],
        (libc::RLIMIT_AS, ADDRESS_SPACE),
    );
    let addr = server.addr.clone();
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FeaturesClient::new(channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        // Known keys first, for the exactness checks at the end.
        let known = client
            .ingest(futures::stream::iter(vec![message(
                "cards",
                &events(0..10, 1_000),
            )]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(known.accepted, 10);

        // A view's max_keys.
        let reply = client
            .ingest(futures::stream::iter(vec![message(
                "capped",
                &events(0..5_000, 1_000),
            )]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((reply.accepted, reply.rejected), (1_000, 4_000));
        assert!(
            reply.rejections[0].reason.contains("max_keys = 1000"),
            "{:?}",
            reply.rejections[0]
        );

        // Messages of a million new keys each: the state budget refuses keys, and says so.
        let mut refused = 0;
        let mut said = String::new();
        for m in 0..4 {
            let first = 1_000_000 * (m + 1);
            let batch = events(first..first + 1_000_000, 2_000);
            let reply = client
                .ingest(futures::stream::iter(vec![message("cards", &batch)]))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.accepted + reply.rejected, 1_000_000);
            refused += reply.rejected;
            if let Some(r) = reply.rejections.first() {
                said = r.reason.clone();
            }
        }
        assert!(refused > 0, "the budget never refused a key");
        assert!(said.contains("state memory budget"), "{said}");
        // Hostile requests: a body length of 2^44, a read of 30 000 features.
        let hostile = claim_a_huge_body(ipc(&events(0..1, 1_000)));
        let e = client
            .ingest(futures::stream::iter(vec![IngestRequest {
                view: "cards".into(),
                payload: Some(ingest_request::Payload::ArrowIpc(hostile)),
            }]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = client
            .get_features(GetFeaturesRequest {
                view: "cards".into(),
                keys: Some(get_features_request::Keys::IntKeys(IntKeys {
                    keys: (0..10_000).collect(),
                })),
                features: vec!["n_1h".into(); 30_000],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted);
        assert!(e.message().contains("features"), "{}", e.message());

        // 500 connections that never speak.
        let silent: Vec<_> = (0..500)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        // 10 000 concurrent streams: Ingest calls held open over 50 connections.
        let mut held = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..50 {
            let c = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            for _ in 0..200 {
                let (tx, rx) = tokio::sync::mpsc::channel::<IngestRequest>(1);
                let mut client = FeaturesClient::new(c.clone());
                held.push(tokio::spawn(async move {
                    client
                        .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                }));
                senders.push(tx);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        serving(channel.clone()).await;
        let r = read(&mut client, "cards", (0..10).collect()).await;
        assert_eq!(
            r.values.iter().step_by(2).copied().collect::<Vec<_>>(),
            vec![1.0; 10]
        );
        // The streams end cleanly once their senders are dropped.
        drop(senders);
        for h in held {
            let reply = h.await.unwrap().unwrap().into_inner();
            assert_eq!(reply.messages, 0);
        }
        drop(silent);

        // Still serving, still exact, and the refused keys were never created.
        serving(channel).await;
        let r = read(&mut client, "cards", vec![0, 9, 4_999_999]).await;
        assert_eq!(
            r.values.iter().step_by(2).copied().collect::<Vec<_>>()[..2],
            [1.0, 1.0]
        );
        assert_eq!(r.latest_event_ms[2], i64::MIN, "a refused key has no state");
    });
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server exited under the limit"
    );
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "bounded in time"
    );
}

/// CPU seconds the process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses): utime is the 12th field, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn r17_out_of_file_descriptors_the_server_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // 64 descriptors: the server's own files, sockets and pipes take some; a hundred
    // connections exhaust the rest.
    let mut server = serve(
        dir.path(),
        &["--metrics", "127.0.0.1:0", "--handshake-timeout", "60"],
        (libc::RLIMIT_NOFILE, 64),
    );
    let metrics: std::net::SocketAddr = after(&server.line, "metrics on http://").parse().unwrap();
    let held: Vec<_> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(&server.addr).ok())
        .collect();
    assert!(held.len() >= 60, "the backlog takes them: {}", held.len());
    std::thread::sleep(Duration::from_millis(500));
    // Accepting fails (EMFILE) while connections wait: the accept loop must back off
    // instead of spinning on the error.
    let pid = server.child.id();
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "the server used {used} s of CPU in 2 s while out of descriptors"
    );
    drop(held);
    // Descriptors come back: the server serves again, and counted the failures.
    let addr = server.addr.clone();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let connected = Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await;
                match connected {
                    Ok(c) => break serving(c).await,
                    Err(_) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => panic!("the server never served again: {e}"),
                }
            }
        });
    let text = scrape(metrics);
    let failures: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("panes_accept_errors_total "))
        .unwrap_or_else(|| panic!("no panes_accept_errors_total in {text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(failures >= 1.0, "{text}");
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server exited"
    );
}
