//! `panes serve` end to end: a real server on loopback, driven through the generated
//! tonic client, the standard health and reflection clients and plain HTTP for the
//! metrics; and the `panes` binary itself for SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch};
use futures::{StreamExt, TryStreamExt};
use panes_engine::serve::proto::features_client::FeaturesClient;
use panes_engine::serve::proto::{
    self, DescribeViewRequest, GetFeaturesRequest, GetFeaturesResponse, IngestRequest,
    ListFeaturesRequest, get_features_request, ingest_request,
};
use panes_engine::serve::{ServeOptions, ServeReport, Server};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile, KeyValue};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"
allowed_lateness = "2s"

[[views.features]]
name = "n_1m"
agg = "count"
window = "1m"

[[views.features]]
name = "amount_sum_1m"
agg = "sum"
column = "amount"
window = "1m"

[[views.features]]
name = "amount_max_10m"
agg = "max"
column = "amount"
window = "10m"
hop = "10s"

[[views.features]]
name = "amount_mean_life"
agg = "mean"
column = "amount"
window = "lifetime"

[[views]]
name = "users"
key = "user"
time = "ts"
filter = "page <> 'health'"

[[views.columns]]
name = "section"
expr = "split_part(page, '/', 2)"

[[views.features]]
name = "clicks_1h"
agg = "count"
window = "1h"
filter = "section = 'shop'"
"#;

/// Sends SIGTERM to `child`.
fn sigterm(child: &std::process::Child) {
    let pid = child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(sent.success());
}

/// [`FEATURES`] written to `dir/features.toml`, for a `panes serve` process.
fn features_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("features.toml");
    std::fs::write(&path, FEATURES).unwrap();
    path
}

fn file() -> FeatureFile {
    FeatureFile::parse(FEATURES, "serve test").unwrap()
}

struct Running {
    addr: SocketAddr,
    metrics: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<panes_engine::Result<ServeReport>>,
}

impl Running {
    /// A connection to the server's gRPC (and Flight) port.
    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    async fn client(&self) -> FeaturesClient<Channel> {
        FeaturesClient::new(self.channel().await)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    async fn stop(mut self) -> ServeReport {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap()
    }
}

async fn start(options: ServeOptions, batch_age: Duration, batch_rows: usize) -> Running {
    start_file(&file(), options, batch_age, batch_rows).await
}

/// [`start`] with the views of `file`.
async fn start_file(
    file: &FeatureFile,
    options: ServeOptions,
    batch_age: Duration,
    batch_rows: usize,
) -> Running {
    let engine = Engine::new(
        file,
        EngineOptions {
            backend: Some(BackendKind::Cpu),
            batch_age,
            batch_rows,
            shards: 8,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    let server = Server::bind(
        Arc::new(engine),
        options,
        "127.0.0.1:0".parse().unwrap(),
        Some("127.0.0.1:0".parse().unwrap()),
    )
    .await
    .unwrap();
    let addr = server.grpc_addr().unwrap();
    let metrics = server.metrics_addr().unwrap().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        metrics,
        stop: Some(tx),
        done,
    }
}

/// Random card events: `n` rows, keys 0..keys, times from `t0` rising by ~1 ms per row
/// with some disorder, a few null amounts.
fn cards_batch(rng: &mut StdRng, n: usize, keys: i64, t0: i64) -> RecordBatch {
    let card: Vec<i64> = (0..n).map(|_| rng.random_range(0..keys)).collect();
    let ts: Vec<i64> = (0..n)
        .map(|i| t0 + i as i64 * 3 - rng.random_range(0..500))
        .collect();
    let amount: Vec<Option<f64>> = (0..n)
        .map(|_| {
            rng.random_bool(0.95)
                .then(|| rng.random_range(1.0..500.0f64).round())
        })
        .collect();
    RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(card)) as ArrayRef),
        ("ts", Arc::new(Int64Array::from(ts)) as ArrayRef),
        ("amount", Arc::new(Float64Array::from(amount)) as ArrayRef),
    ])
    .unwrap()
}

fn ipc(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
    w.write(batch).unwrap();
    w.finish().unwrap();
    drop(w);
    out
}

fn ipc_message(view: &str, batch: &RecordBatch) -> IngestRequest {
    IngestRequest {
        view: view.into(),
        payload: Some(ingest_request::Payload::ArrowIpc(ipc(batch))),
    }
}

fn int_keys(keys: impl IntoIterator<Item = i64>) -> Option<get_features_request::Keys> {
    Some(get_features_request::Keys::IntKeys(proto::IntKeys {
        keys: keys.into_iter().collect(),
    }))
}

fn read(
    view: &str,
    keys: Option<get_features_request::Keys>,
    at: Option<i64>,
) -> GetFeaturesRequest {
    GetFeaturesRequest {
        view: view.into(),
        keys,
        features: vec![],
        at_ms: at,
        ..Default::default()
    }
}

/// A reply as (values with None for null), row-major.
fn cells(r: &GetFeaturesResponse) -> Vec<Option<f64>> {
    r.values
        .iter()
        .enumerate()
        .map(|(i, v)| (r.validity[i / 8] >> (i % 8) & 1 == 1).then_some(*v))
        .collect()
}

/// The oracle: the scalar backend, fed the same batches, read at `at`.
fn oracle(batches: &[RecordBatch], keys: &[i64], at: i64) -> Vec<Option<f64>> {
    let engine = Engine::new(
        &file(),
        EngineOptions {
            backend: Some(BackendKind::Scalar),
            ..EngineOptions::default()
        },
    )
    .unwrap();
    for b in batches {
        engine.push("cards", b).unwrap();
    }
    let keys: Vec<KeyValue> = keys.iter().map(|&k| KeyValue::Int(k.into())).collect();
    let f = engine.read_keys("cards", &keys, Some(at), None).unwrap();
    f.values
        .iter()
        .zip(f.valid.iter())
        .map(|(v, ok)| ok.then_some(*v))
        .collect()
}

fn close(a: &[Option<f64>], b: &[Option<f64>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
            (None, None) => true,
            _ => false,
        })
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_health_reflection_and_metrics() {
    let server = start(ServeOptions::default(), Duration::from_millis(5), 64 * 1024).await;
    let mut client = server.client().await;
    let mut rng = StdRng::seed_from_u64(7);
    let batches: Vec<RecordBatch> = (0..3)
        .map(|i| cards_batch(&mut rng, 2_000, 50, 1_000_000 + i * 6_000))
        .collect();

    // Ingest: two Arrow IPC messages and one of typed rows (with a null key, counted).
    let rows = proto::Rows {
        columns: vec!["amount".into()],
        rows: vec![
            proto::Row {
                key: Some(proto::row::Key::IntKey(7)),
                time_ms: 1_030_000,
                values: vec![1000.0],
                null_columns: vec![],
                strings: Default::default(),
            },
            proto::Row {
                key: None,
                time_ms: 1_030_001,
                values: vec![1.0],
                null_columns: vec![],
                strings: Default::default(),
            },
            proto::Row {
                key: Some(proto::row::Key::IntKey(8)),
                time_ms: 1_030_002,
                values: vec![0.0],
                null_columns: vec![0],
                strings: Default::default(),
            },
        ],
    };
    let messages = vec![
        ipc_message("cards", &batches[0]),
        ipc_message("cards", &batches[1]),
        IngestRequest {
            view: "cards".into(),
            payload: Some(ingest_request::Payload::Rows(rows)),
        },
        ipc_message("cards", &batches[2]),
    ];
    let reply = client
        .ingest(futures::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.messages, 4);
    assert_eq!(reply.rejected, 1, "{reply:?}");
    assert_eq!(reply.rejections[0].field, "card", "{reply:?}");
    assert_eq!(
        (reply.rejections[0].message, reply.rejections[0].row),
        (2, 1)
    );
    let total = 6_000 + 2;
    assert_eq!(reply.accepted + reply.late, total, "{reply:?}");

    // GetFeatures equals the oracle (the rows message as a batch of its own).
    let rows_batch = RecordBatch::try_from_iter([
        (
            "card",
            Arc::new(Int64Array::from(vec![Some(7), None, Some(8)])) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(Int64Array::from(vec![1_030_000, 1_030_001, 1_030_002])) as ArrayRef,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![Some(1000.0), Some(1.0), None])) as ArrayRef,
        ),
    ])
    .unwrap();
    let fed = [
        batches[0].clone(),
        batches[1].clone(),
        rows_batch,
        batches[2].clone(),
    ];
    let keys: Vec<i64> = (0..60).collect();
    let at = 1_031_000;
    // Published within a few batch ages.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        let r = client
            .get_features(read("cards", int_keys(keys.clone()), Some(at)))
            .await
            .unwrap()
            .into_inner();
        if r.window_events.iter().sum::<u64>() > 0 && r.state_version >= 1
            || Instant::now() > deadline
        {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(got.rows, 60);
    // The server says how long it took, within the client's own latency.
    let asked = Instant::now();
    let timed = client
        .get_features(read("cards", int_keys(keys.clone()), Some(at)))
        .await
        .unwrap();
    let server_us: u64 = timed
        .metadata()
        .get(panes_engine::serve::SERVER_TIME_HEADER)
        .expect("a server-time header")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(server_us as u128 <= asked.elapsed().as_micros());
    assert_eq!(
        got.features,
        [
            "n_1m",
            "amount_sum_1m",
            "amount_max_10m",
            "amount_mean_life"
        ]
    );
    assert_eq!(got.at_ms, at);
    assert!(
        close(&cells(&got), &oracle(&fed, &keys, at)),
        "reply differs from the oracle"
    );
    // Metadata: latest event per key, and events in the widest window (lifetime).
    let life: Vec<u64> = cells(&got)
        .chunks(4)
        .map(|c| c[0].unwrap() as u64)
        .collect();
    assert!(got.latest_event_ms[7] >= 1_030_000);
    assert_eq!(got.latest_event_ms[55], i64::MIN, "key 55 was never seen");
    assert!(got.window_events.iter().zip(&life).all(|(w, n)| w >= n));
    assert_eq!(got.window_events.iter().sum::<u64>(), reply.accepted);

    // A subset of features, by name, in the order asked.
    let sub = client
        .get_features(GetFeaturesRequest {
            features: vec!["amount_mean_life".into(), "n_1m".into()],
            ..read("cards", int_keys([7, 8]), Some(at))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sub.features, ["amount_mean_life", "n_1m"]);
    assert_eq!(sub.values.len(), 4);

    // ListFeatures / DescribeView.
    let list = client
        .list_features(ListFeaturesRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.views.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["cards", "users"]);
    let d = client
        .describe_view(DescribeViewRequest {
            view: "cards".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (d.key.as_str(), d.key_kind.as_str(), d.time.as_str()),
        ("card", "int", "ts")
    );
    assert_eq!(d.allowed_lateness_ms, 2_000);
    let max = &d.features[2];
    assert_eq!(
        (
            max.agg.as_str(),
            max.column.as_str(),
            max.window_ms,
            max.hop_ms
        ),
        ("max", "amount", 600_000, 10_000)
    );
    assert_eq!(
        (d.features[3].window_ms, d.features[0].dtype.as_str()),
        (0, "int64")
    );

    // Filters and derived columns are described as written.
    let u = &list.views[1];
    assert_eq!(u.filter, "page <> 'health'");
    assert_eq!(
        (u.columns[0].name.as_str(), u.columns[0].expr.as_str()),
        ("section", "split_part(page, '/', 2)")
    );
    assert_eq!(u.features[0].filter, "section = 'shop'");
    assert_eq!(d.filter, "");

    // Health: the overall server and each service.
    let channel = server.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in [
        "",
        "panes.v1.Features",
        "arrow.flight.protocol.FlightService",
    ] {
        let h = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            h.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    // Reflection: the services are listed and the API's file is served.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let asks = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "panes.v1.Features".into(),
            )),
        },
    ];
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter(asks))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        services.contains(&"panes.v1.Features".to_string()),
        "{services:?}"
    );
    assert!(
        services.contains(&"grpc.health.v1.Health".to_string()),
        "{services:?}"
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a file descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());

    // Metrics.
    let text = tokio::task::spawn_blocking(move || scrape(server.metrics))
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "panes_events_accepted_total{view=\"cards\"}") as u64,
        reply.accepted
    );
    assert_eq!(
        metric(&text, "panes_events_late_total{view=\"cards\"}") as u64,
        reply.late
    );
    assert_eq!(
        metric(
            &text,
            "panes_events_rejected_total{view=\"cards\",reason=\"null_key\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "panes_backend_info{backend=\"cpu\"}"), 1.0);
    assert_eq!(metric(&text, "panes_keys{view=\"cards\"}"), 50.0);
    assert!(metric(&text, "panes_fold_duration_seconds_count{view=\"cards\"}") >= 1.0);
    assert!(metric(&text, "panes_read_duration_seconds_count{view=\"cards\"}") >= 2.0);
    assert!(
        metric(
            &text,
            "panes_read_duration_seconds_bucket{view=\"cards\",le=\"+Inf\"}"
        ) >= 2.0
    );
    assert!(metric(&text, "panes_state_bytes{view=\"cards\"}") > 0.0);
    assert!(metric(&text, "panes_watermark_ms{view=\"cards\"}") > 1_000_000.0);
    assert!(text.contains("panes_event_time_lag_seconds{view=\"cards\"}"));

    let report = server.stop().await;
    assert_eq!(report.views[0].counters.accepted, reply.accepted);
    assert_eq!(report.views[0].folded, reply.accepted);
}

fn violation_field(s: &tonic::Status) -> String {
    s.get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
        .unwrap_or_else(|| panic!("no BadRequest detail in {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_classified_statuses_and_the_server_carries_on() {
    let options = ServeOptions {
        max_keys: 100,
        max_message_bytes: 64 * 1024,
        ..ServeOptions::default()
    };
    let server = start(options, Duration::from_millis(5), 64 * 1024).await;
    let mut client = server.client().await;
    let mut rng = StdRng::seed_from_u64(9);
    let b = cards_batch(&mut rng, 500, 20, 5_000_000);
    client
        .ingest(futures::stream::iter(vec![ipc_message("cards", &b)]))
        .await
        .unwrap();
    // Published by the timer within a few batch ages.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client
        .get_features(read("cards", int_keys([1]), None))
        .await
        .unwrap()
        .into_inner()
        .state_version
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the ingested batch was never published"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let expect = |r: Result<tonic::Response<GetFeaturesResponse>, tonic::Status>,
                  code: Code,
                  field: Option<&str>| {
        let e = r.expect_err("the request must fail");
        assert_eq!(e.code(), code, "{e:?}");
        if let Some(f) = field {
            assert_eq!(violation_field(&e), f, "{e:?}");
        }
        e
    };
    // Unknown view, unknown feature, wrong key type, no keys, read time out of range.
    expect(
        client.get_features(read("nope", int_keys([1]), None)).await,
        Code::InvalidArgument,
        Some("view"),
    );
    expect(
        client
            .get_features(GetFeaturesRequest {
                features: vec!["n_1m".into(), "n_2m".into()],
                ..read("cards", int_keys([1]), None)
            })
            .await,
        Code::InvalidArgument,
        Some("features"),
    );
    let strings = Some(get_features_request::Keys::StringKeys(proto::StringKeys {
        keys: vec!["a".into()],
    }));
    let e = expect(
        client.get_features(read("cards", strings, None)).await,
        Code::InvalidArgument,
        Some("keys"),
    );
    assert!(e.message().contains("integer keys"), "{e:?}");
    expect(
        client.get_features(read("cards", None, None)).await,
        Code::InvalidArgument,
        Some("keys"),
    );
    expect(
        client
            .get_features(read("cards", int_keys([1]), Some(i64::MAX)))
            .await,
        Code::InvalidArgument,
        Some("at_ms"),
    );
    // Limits: too many keys; a message over the size limit.
    let e = expect(
        client
            .get_features(read("cards", int_keys(0..101), None))
            .await,
        Code::ResourceExhausted,
        None,
    );
    assert!(e.message().contains("limit is 100"), "{e:?}");
    expect(
        client
            .get_features(read("cards", int_keys(0..20_000), None))
            .await,
        Code::ResourceExhausted,
        None,
    );
    // r17: features per read are capped too (10 000 keys × one feature named 30 000
    // times asked for a 2.4 GB reply).
    let e = expect(
        client
            .get_features(GetFeaturesRequest {
                features: vec!["n_1m".into(); 2_000],
                ..read("cards", int_keys([1]), None)
            })
            .await,
        Code::ResourceExhausted,
        None,
    );
    assert!(e.message().contains("max_features"), "{e:?}");

    // Ingest: malformed IPC, unknown view, no payload, an oversized message.
    let ingest = |m: IngestRequest| {
        let mut c = client.clone();
        async move { c.ingest(futures::stream::iter(vec![m])).await }
    };
    let bad_ipc = IngestRequest {
        view: "cards".into(),
        payload: Some(ingest_request::Payload::ArrowIpc(b"not arrow".to_vec())),
    };
    let e = ingest(bad_ipc).await.unwrap_err();
    assert_eq!(
        (e.code(), violation_field(&e).as_str()),
        (Code::InvalidArgument, "arrow_ipc"),
        "{e:?}"
    );
    let mut truncated = ipc(&b);
    truncated.truncate(truncated.len() / 2);
    let e = ingest(IngestRequest {
        view: "cards".into(),
        payload: Some(ingest_request::Payload::ArrowIpc(truncated)),
    })
    .await
    .unwrap_err();
    assert_eq!(
        (e.code(), violation_field(&e).as_str()),
        (Code::InvalidArgument, "arrow_ipc"),
        "{e:?}"
    );
    let e = ingest(ipc_message("nope", &b)).await.unwrap_err();
    assert_eq!(
        (e.code(), violation_field(&e).as_str()),
        (Code::InvalidArgument, "view"),
        "{e:?}"
    );
    let e = ingest(IngestRequest {
        view: "cards".into(),
        payload: None,
    })
    .await
    .unwrap_err();
    assert_eq!(
        (e.code(), violation_field(&e).as_str()),
        (Code::InvalidArgument, "payload"),
        "{e:?}"
    );
    let big = cards_batch(&mut rng, 10_000, 20, 5_010_000);
    let e = ingest(ipc_message("cards", &big)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // A batch without the value column: the whole batch is rejected and counted, and
    // the stream goes on.
    let no_amount = b.project(&[0, 1]).unwrap();
    let r = ingest(ipc_message("cards", &no_amount))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (0, 1));
    assert_eq!(r.rejections[0].field, "amount", "{r:?}");

    // Still serving, and nothing was lost.
    let ok = client
        .get_features(read("cards", int_keys(0..20), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.rows, 20);
    let report = server.stop().await;
    assert_eq!(
        report.views[0].counters.accepted + report.views[0].counters.late,
        500
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_during_ingest_see_whole_prefixes_of_the_batches() {
    // Every read of every run must equal a whole prefix (checked inside). A run must
    // also have seen several intermediate states to have tested anything; on a loaded
    // machine the timer that folds each message's tail can be starved for a whole run
    // (seen once: the reads saw 0, 5 and 40 messages), so up to three runs are made.
    let mut runs = Vec::new();
    for seed in [11, 12, 13] {
        let seen = prefixes_seen_during_ingest(seed).await;
        let mut distinct = seen.clone();
        distinct.dedup();
        println!(
            "{} reads saw {} distinct prefixes: {seen:?}",
            seen.len(),
            distinct.len()
        );
        if distinct.len() >= 5 {
            return;
        }
        runs.push(distinct);
    }
    panic!("reads saw too few intermediate states to test anything: {runs:?}");
}

/// Streams 40 messages into a server while reading; returns, per read, the number of
/// messages whose events it saw (panicking on a read that equals no whole prefix).
async fn prefixes_seen_during_ingest(seed: u64) -> Vec<usize> {
    // Micro-batches of 512 rows: each 1 500-row message is folded in pieces, and its
    // tail waits for the timer; a read must still see whole messages only.
    let server = start(ServeOptions::default(), Duration::from_millis(2), 512).await;
    let mut rng = StdRng::seed_from_u64(seed);
    let n = 40;
    let batches: Vec<RecordBatch> = (0..n)
        .map(|i| cards_batch(&mut rng, 1_500, 200, 2_000_000 + i as i64 * 4_500))
        .collect();
    let keys: Vec<i64> = (0..200).collect();
    let at = 2_000_000 + n as i64 * 4_500 + 10_000;
    let expected: Vec<Vec<Option<f64>>> =
        (0..=n).map(|k| oracle(&batches[..k], &keys, at)).collect();
    // Every other read asks for 100 keys, which the server answers on its network
    // thread; 200 keys go to its read threads.
    let few = &keys[..100];
    let expected_few: Vec<Vec<Option<f64>>> =
        (0..=n).map(|k| oracle(&batches[..k], few, at)).collect();
    assert!(few.len() <= ServeOptions::default().inline_read_keys);
    assert!(keys.len() > ServeOptions::default().inline_read_keys);

    let writer = {
        let mut client = server.client().await;
        let batches = batches.clone();
        tokio::spawn(async move {
            let messages = futures::stream::iter(
                batches.into_iter().map(|b| ipc_message("cards", &b)),
            )
            .then(|m| async move {
                tokio::time::sleep(Duration::from_millis(15)).await;
                m
            });
            client.ingest(messages).await.unwrap().into_inner()
        })
    };
    let mut reader = server.client().await;
    let mut seen = Vec::new();
    let mut last = 0;
    let started = Instant::now();
    loop {
        let (ask, expected) = if seen.len() % 2 == 0 {
            (&keys[..], &expected)
        } else {
            (few, &expected_few)
        };
        let r = reader
            .get_features(read("cards", int_keys(ask.to_vec()), Some(at)))
            .await
            .unwrap()
            .into_inner();
        let got = cells(&r);
        // Prefixes only grow: search from the last one matched.
        let k = (last..=n)
            .find(|&k| close(&got, &expected[k]))
            .unwrap_or_else(|| {
                panic!(
                    "read {} (version {}) equals no prefix of the batches from {last} on",
                    seen.len(),
                    r.state_version
                )
            });
        last = k;
        seen.push(k);
        if k == n || started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let reply = writer.await.unwrap();
    assert_eq!(reply.messages, n as u64);
    assert_eq!(last, n, "the reads never saw every batch");
    server.stop().await;
    seen
}

#[test]
fn sigterm_during_ingest_loses_no_accepted_event() {
    let dir = tempfile::tempdir().unwrap();
    let features = features_file(dir.path());
    let report = dir.path().join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_panes"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
            "--backend",
            "cpu",
        ])
        .arg("--features")
        .arg(&features)
        .arg("--report")
        .arg(&report)
        // A long batch age: the final flush, not the timer, must fold the tail.
        .args(["--batch-age-ms", "60000", "--batch-rows", "1000000"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .split("gRPC + Flight on ")
        .nth(1)
        .and_then(|r| r.split(|c: char| c == ',' || c.is_whitespace()).next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let pid = child.id().to_string();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let reply = runtime.block_on(async move {
        let mut client = FeaturesClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let call = tokio::spawn(async move {
            client
                .ingest(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let mut rng = StdRng::seed_from_u64(5);
        for i in 0..60 {
            if i == 30 {
                // SIGTERM in the middle of the stream: the call in flight must finish.
                let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
                assert!(status.success());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let b = cards_batch(&mut rng, 1_000, 300, 9_000_000 + i * 3_000);
            tx.send(ipc_message("cards", &b)).await.unwrap();
        }
        drop(tx);
        call.await.unwrap().unwrap().into_inner()
    });
    let status = child.wait().unwrap();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{status:?}: {rest}");
    assert_eq!(reply.messages, 60);
    assert_eq!(reply.accepted + reply.late, 60_000);
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let cards = &json["views"][0];
    assert_eq!(cards["view"], "cards");
    assert_eq!(cards["accepted"].as_u64(), Some(reply.accepted), "{json}");
    assert_eq!(cards["folded"].as_u64(), Some(reply.accepted), "{json}");
    assert_eq!(cards["pending"].as_u64(), Some(0), "{json}");
    assert_eq!(json["cut_off"], false);
    assert!(rest.contains("accepted"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_restores_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let options = || ServeOptions {
        checkpoint_dir: Some(dir.path().into()),
        checkpoint_interval: Duration::from_millis(50),
        ..ServeOptions::default()
    };
    let mut rng = StdRng::seed_from_u64(17);
    let batches: Vec<RecordBatch> = (0..5)
        .map(|i| cards_batch(&mut rng, 2_000, 100, 5_000_000 + i * 6_000))
        .collect();
    let keys: Vec<i64> = (0..120).collect();
    let at = 5_100_000;

    let server = start(options(), Duration::from_millis(5), 1_000).await;
    let mut client = server.client().await;
    let messages: Vec<IngestRequest> = batches.iter().map(|b| ipc_message("cards", b)).collect();
    client.ingest(tokio_stream::iter(messages)).await.unwrap();
    let before = client
        .get_features(read("cards", int_keys(keys.clone()), Some(at)))
        .await
        .unwrap()
        .into_inner();
    assert!(close(&cells(&before), &oracle(&batches, &keys, at)));
    let report = server.stop().await;
    let accepted = report.views[0].counters.accepted;
    assert!(accepted > 0);
    assert!(
        std::fs::read_dir(dir.path().join("cards")).unwrap().count() >= 1,
        "no checkpoint written"
    );

    // A new server on the same directory starts with the state it had.
    let server = start(options(), Duration::from_millis(5), 1_000).await;
    let mut client = server.client().await;
    let after = client
        .get_features(read("cards", int_keys(keys.clone()), Some(at)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cells(&after), cells(&before));
    let scraped = scrape(server.metrics);
    assert_eq!(
        metric(&scraped, "panes_events_accepted_total{view=\"cards\"}"),
        accepted as f64
    );
    server.stop().await;

    // The view gains a feature whose state the checkpoint holds (a lifetime sum beside
    // the lifetime mean): a restart keeps the state, and the new feature is exact too.
    let grown = FeatureFile::parse(
        &FEATURES.replace(
            "[[views]]\nname = \"users\"",
            "[[views.features]]\nname = \"amount_sum_life\"\nagg = \"sum\"\ncolumn = \"amount\"\nwindow = \"lifetime\"\n\n[[views]]\nname = \"users\"",
        ),
        "grown",
    )
    .unwrap();
    assert_eq!(
        grown.views[0].features.len(),
        file().views[0].features.len() + 1
    );
    let server = start_file(&grown, options(), Duration::from_millis(5), 1_000).await;
    let mut client = server.client().await;
    let old: Vec<String> = file().views[0]
        .features
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let after = client
        .get_features(GetFeaturesRequest {
            features: old,
            ..read("cards", int_keys(keys.clone()), Some(at))
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cells(&after), cells(&before));
    let sums = client
        .get_features(GetFeaturesRequest {
            features: vec!["amount_sum_life".into()],
            ..read("cards", int_keys(keys.clone()), Some(at))
        })
        .await
        .unwrap()
        .into_inner();
    let whole = Engine::new(&grown, EngineOptions::default()).unwrap();
    for b in &batches {
        whole.push("cards", b).unwrap();
    }
    let want = whole
        .read(
            "cards",
            &arrow_array::Int64Array::from(keys.clone()),
            Some(at),
            Some(&["amount_sum_life"]),
        )
        .unwrap();
    let want: Vec<Option<f64>> = want
        .values
        .iter()
        .zip(want.valid.iter())
        .map(|(v, ok)| ok.then_some(*v))
        .collect();
    for (i, (got, w)) in cells(&sums).into_iter().zip(want).enumerate() {
        assert!(
            got == w
                || got
                    .zip(w)
                    .is_some_and(|(g, w)| (g - w).abs() <= 1e-9 * w.abs()),
            "key {}: {got:?} vs {w:?}",
            keys[i]
        );
    }
    server.stop().await;
}

/// A codec that sends and receives raw bytes, as a client with a broken encoder would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

struct Raw;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, n).to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r17_a_request_that_is_not_protobuf_is_invalid_argument_not_internal() {
    let server = start(ServeOptions::default(), Duration::from_millis(5), 1024).await;
    let channel = server.channel().await;
    // Field 1 (a string) claiming 2^35 bytes, then nothing.
    let garbage = vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x7f];
    for path in [
        "/panes.v1.Features/GetFeatures",
        "/panes.v1.Features/ListFeatures",
        "/panes.v1.Features/Ingest",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(path);
        let e = if path.path().ends_with("Ingest") {
            let stream = futures::stream::iter(vec![garbage.clone()]);
            grpc.client_streaming::<_, Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(stream),
                path.clone(),
                RawCodec,
            )
            .await
            .unwrap_err()
        } else {
            grpc.unary::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(garbage.clone()),
                path.clone(),
                RawCodec,
            )
            .await
            .unwrap_err()
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e:?}");
        assert!(
            e.message().contains("not a valid protobuf"),
            "{path}: {e:?}"
        );
    }
    // Arrow Flight's generated service decodes with tonic's codec.
    for path in [
        "/arrow.flight.protocol.FlightService/GetFlightInfo",
        "/arrow.flight.protocol.FlightService/DoGet",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = http::uri::PathAndQuery::from_static(path);
        let e = if path.path().ends_with("DoGet") {
            grpc.server_streaming::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(garbage.clone()),
                path.clone(),
                RawCodec,
            )
            .await
            .map(drop)
            .unwrap_err()
        } else {
            grpc.unary::<Vec<u8>, Vec<u8>, _>(
                tonic::Request::new(garbage.clone()),
                path.clone(),
                RawCodec,
            )
            .await
            .unwrap_err()
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e:?}");
        assert!(e.message().contains("decode"), "{path}: {e:?}");
    }
    // And the server carries on.
    let mut client = server.client().await;
    client
        .get_features(read("cards", int_keys([1]), None))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r17_mutated_flight_do_put_data_is_an_error_never_a_silent_loss() {
    use arrow_flight::error::FlightError;
    use arrow_flight::{FlightData, FlightDescriptor};

    let server = start(ServeOptions::default(), Duration::from_millis(5), 1024).await;
    let channel = server.channel().await;
    let mut rng = StdRng::seed_from_u64(17);
    let batch = cards_batch(&mut rng, 50, 10, 1_000_000);
    let good: Vec<FlightData> = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(FlightDescriptor::new_path(vec!["cards".into()])))
        .build(futures::stream::iter([Ok(batch)]))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(good.len(), 2, "a schema message and one batch");
    let mut client = arrow_flight::FlightClient::new(channel);
    // Every mutation of the batch's IPC header (and a truncated body): the client gets
    // an error or one result for its one batch, never an OK stream that lost it.
    let mut mutations: Vec<Vec<FlightData>> = Vec::new();
    for i in 0..good[1].data_header.len() {
        for v in [0x00, 0xff, good[1].data_header[i] ^ 0x10] {
            let mut data = good.clone();
            let mut header = data[1].data_header.to_vec();
            header[i] = v;
            data[1].data_header = header.into();
            mutations.push(data);
        }
    }
    let mut truncated = good.clone();
    truncated[1].data_body = truncated[1]
        .data_body
        .slice(..truncated[1].data_body.len() / 2);
    mutations.push(truncated);
    let (mut refused, mut taken) = (0, 0);
    for (m, data) in mutations.into_iter().enumerate() {
        let sent = futures::stream::iter(data.into_iter().map(Ok::<_, FlightError>));
        match client.do_put(sent).await {
            Err(_) => refused += 1,
            Ok(results) => match results.try_collect::<Vec<_>>().await {
                Err(_) => refused += 1,
                Ok(results) => {
                    assert_eq!(
                        results.len(),
                        1,
                        "mutation {m}: OK without the batch's result"
                    );
                    taken += 1;
                }
            },
        }
    }
    assert!(refused > 0 && taken > 0, "refused {refused}, taken {taken}");
    // Still serving.
    let mut reads = server.client().await;
    reads
        .get_features(read("cards", int_keys([1]), None))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r17_flight_do_get_returns_integer_keys_above_i64_max() {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Decimal128Type, UInt64Type};

    let server = start(ServeOptions::default(), Duration::from_millis(5), 1024).await;
    let channel = server.channel().await;
    let mut client = arrow_flight::FlightClient::new(channel);
    let mut get = async |keys: &str| -> Vec<RecordBatch> {
        let ticket = format!(r#"{{"view": "cards", "keys": {keys}}}"#);
        client
            .do_get(arrow_flight::Ticket::new(ticket))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    };
    let big = get("[18446744073709551615, 1]").await;
    let keys = big[0].column(0).as_primitive::<UInt64Type>();
    assert_eq!(keys.null_count(), 0);
    assert_eq!(keys.values().to_vec(), vec![u64::MAX, 1]);
    let mixed = get("[18446744073709551615, -1]").await;
    let keys = mixed[0].column(0).as_primitive::<Decimal128Type>();
    assert_eq!(keys.values().to_vec(), vec![u64::MAX as i128, -1]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r17_silent_and_surplus_connections_are_closed_and_the_server_keeps_serving() {
    use tokio::io::AsyncReadExt;

    let options = ServeOptions {
        max_connections: 20,
        // Long enough that all 60 connect while the first 20 are held, on a busy machine.
        handshake_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        ..ServeOptions::default()
    };
    let server = start(options, Duration::from_millis(5), 1024).await;
    // 60 connections that never send the HTTP/2 preface: 20 are held until the
    // handshake timeout, the others closed on accept (they used to stay open forever).
    let mut silent = Vec::new();
    for _ in 0..60 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    for s in &mut silent {
        // The server may send its HTTP/2 settings first; then it must close.
        let mut sent = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut sent))
            .await
            .expect("the server closes a silent connection");
        assert!(sent.len() < 1024, "{read:?}: {} bytes", sent.len());
    }
    // A real client is served once they are gone.
    let mut client = server.client().await;
    client
        .get_features(read("cards", int_keys([1]), None))
        .await
        .unwrap();
    let text = scrape(server.metrics);
    let refused = metric(&text, "panes_connections_refused_total");
    let timed_out = metric(&text, "panes_connections_timed_out_total");
    assert!(refused >= 1.0 && refused + timed_out >= 60.0, "{text}");
    assert_eq!(metric(&text, "panes_connections_open"), 1.0, "{text}");
    server.stop().await;
}

/// Starts the `panes` binary with `args`; returns it and the line it wrote first (the
/// addresses it serves on).
fn spawn_panes(args: &[&str]) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_panes"))
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = stderr.read_to_string(&mut rest);
    });
    (child, line)
}

/// Ingests 100 random card events into the `panes serve` process at `grpc` and gives
/// it 400 ms to fold and checkpoint them.
fn ingest_cards_and_wait(grpc: &str, seed: u64) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = FeaturesClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let b = cards_batch(&mut StdRng::seed_from_u64(seed), 100, 10, 1_000);
        client
            .ingest(futures::stream::iter(vec![ipc_message("cards", &b)]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    });
}

/// The address after `label` in a start-up line.
fn address_after(line: &str, label: &str) -> String {
    line.split(label)
        .nth(1)
        .and_then(|r| {
            r.split(|c: char| c == ',' || c == '/' || c.is_whitespace())
                .next()
        })
        .unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
        .to_string()
}

#[test]
fn r17_an_unwritable_checkpoint_directory_is_an_error_and_a_metric() {
    let dir = tempfile::tempdir().unwrap();
    let features = features_file(dir.path());
    let features = features.to_str().unwrap();
    // A file where the directory should be: refused at start (exit 2), naming the flag.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"a file").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_panes"))
        .args([
            "serve",
            "--features",
            features,
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "off",
        ])
        .arg("--checkpoint-dir")
        .arg(blocked.join("ckpt"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--checkpoint-dir") && stderr.contains("cannot be written"),
        "{stderr}"
    );

    // Writable at start, then a view's directory becomes a file: each checkpoint fails
    // and is counted, and the lost final one makes the exit an error.
    let root = dir.path().join("ckpt");
    let (mut child, line) = spawn_panes(&[
        "serve",
        "--features",
        features,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--backend",
        "cpu",
        "--checkpoint-interval-ms",
        "50",
        "--checkpoint-dir",
        root.to_str().unwrap(),
    ]);
    let grpc = address_after(&line, "gRPC + Flight on ");
    let metrics: SocketAddr = address_after(&line, "metrics on http://").parse().unwrap();
    std::fs::remove_dir_all(root.join("cards")).ok();
    std::fs::write(root.join("cards"), b"not a directory").unwrap();
    ingest_cards_and_wait(&grpc, 9);
    let text = scrape(metrics);
    assert!(
        metric(&text, "panes_checkpoint_failures_total{view=\"cards\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "panes_checkpoint_failures_total{view=\"users\"}"),
        0.0
    );
    sigterm(&child);
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the lost final checkpoint is an error exit"
    );
}

/// Whether the peer closed `s` (or reset it) within its read timeout.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
    match (&*s).read(&mut [0u8; 256]) {
        Ok(n) => n == 0 || closed_by_peer(s),
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn r26_idle_and_malformed_clients_do_not_stop_the_metrics_port() {
    let dir = tempfile::tempdir().unwrap();
    let features = features_file(dir.path());
    let (mut child, line) = spawn_panes(&[
        "serve",
        "--features",
        features.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--backend",
        "cpu",
    ]);
    let metrics: SocketAddr = address_after(&line, "metrics on http://").parse().unwrap();
    // 500 connections that never send a byte.
    let idle: Vec<std::net::TcpStream> = (0..500)
        .map(|_| std::net::TcpStream::connect(metrics).unwrap())
        .collect();
    // Malformed requests: each gets an error status or a closed connection, at once.
    let long_header = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let malformed: [&[u8]; 6] = [
        b"GARBAGE\r\n\r\n",
        long_header.as_bytes(),
        &[0, 1, 2, 255, 254, 13, 10, 13, 10],
        b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        // A TLS ClientHello's first bytes on the plain port.
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ],
    ];
    for request in malformed {
        let mut s = std::net::TcpStream::connect(metrics).unwrap();
        let _ = s.write_all(request);
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{:?}: {answer}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
    }
    // A request that trickles in and never ends holds its connection no longer than
    // the head timeout either.
    let mut trickle = std::net::TcpStream::connect(metrics).unwrap();
    trickle.write_all(b"GET /met").unwrap();
    // With all of that open, the status page and the metrics still answer, and see the
    // idle connections.
    let (code, page) = http_get(metrics, "/");
    assert!(
        code == 200 && page.contains("<title>Panes status</title>"),
        "{code}"
    );
    let (code, status) = http_get(metrics, "/status.json");
    assert_eq!(code, 200, "{status}");
    let text = scrape(metrics);
    assert!(text.contains("panes_events_accepted_total"), "{text}");
    assert!(
        metric(&text, "panes_http_connections_open") >= 501.0,
        "the idle connections are open: {text}"
    );
    // The server closes every idle and trickling connection after its head timeout
    // (5 s); none is left waiting beyond it.
    let started = Instant::now();
    let held: Vec<&std::net::TcpStream> = idle.iter().chain([&trickle]).collect();
    for s in &held {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let closed = held.iter().filter(|s| closed_by_peer(s)).count();
    assert_eq!(closed, held.len(), "closed by the server");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "closed after {:?}",
        started.elapsed()
    );
    let text = scrape(metrics);
    assert_eq!(metric(&text, "panes_http_connections_open"), 1.0, "{text}");
    assert!(
        metric(&text, "panes_http_connection_errors_total") >= 501.0 + malformed.len() as f64,
        "idle, trickling and malformed connections are counted: {text}"
    );
    assert!(child.try_wait().unwrap().is_none(), "the server exited");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn r26_json_logs_are_one_object_per_line_with_level_target_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let features = features_file(dir.path());
    let root = dir.path().join("ckpt");
    let mut child = Command::new(env!("CARGO_BIN_EXE_panes"))
        .args(["serve", "--log-format", "json", "--features"])
        .arg(&features)
        .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
        .args(["--backend", "cpu", "--batch-age-ms", "5"])
        .args(["--checkpoint-interval-ms", "50", "--checkpoint-dir"])
        .arg(&root)
        .env_remove("PANES_LOG")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&first).unwrap();
    let grpc = ready["fields"]["grpc"].as_str().unwrap().to_string();
    ingest_cards_and_wait(&grpc, 3);
    let metrics: SocketAddr = ready["fields"]["metrics"]
        .as_str()
        .and_then(|m| address_after(m, "http://").parse().ok())
        .unwrap();
    let last_checkpoint_bytes = metric(
        &scrape(metrics),
        "panes_checkpoint_last_bytes{view=\"cards\"}",
    );
    assert!(last_checkpoint_bytes > 0.0);
    sigterm(&child);
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let lines: Vec<serde_json::Value> = std::iter::once(first.as_str())
        .chain(rest.lines())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {l:?}"));
            for key in ["timestamp", "level", "target"] {
                assert!(v[key].is_string(), "no {key}: {l}");
            }
            assert!(v["fields"]["message"].is_string(), "no message: {l}");
            v
        })
        .collect();
    let find = |message: &str, view: Option<&str>| {
        lines
            .iter()
            .find(|v| {
                v["fields"]["message"] == message && view.is_none_or(|n| v["fields"]["view"] == n)
            })
            .unwrap_or_else(|| panic!("no {message:?} ({view:?}) in {lines:#?}"))
    };
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["target"], "panes");
    assert_eq!(ready["fields"]["backend"], "cpu");
    assert!(
        ready["fields"]["metrics"]
            .as_str()
            .unwrap()
            .ends_with("/metrics")
    );
    assert_eq!(find("configuration", None)["fields"]["tokens"], false);
    assert_eq!(find("view", Some("users"))["fields"]["source"], "pushed");
    let written = find("checkpoint written", Some("cards"));
    assert!(
        written["fields"]["bytes"].as_u64().unwrap() > 0,
        "{written}"
    );
    assert_eq!(written["target"], "panes_engine::serve::server");
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "checkpoint written"
                && v["fields"]["view"] == "cards"
                && v["fields"]["bytes"] == last_checkpoint_bytes),
        "the metric gives a size the log gave: {last_checkpoint_bytes}"
    );
    let stopped = find("stopped", Some("cards"));
    assert_eq!(stopped["fields"]["accepted"], 100, "{stopped}");

    // A filter that does not parse is a start-up error that names the variable.
    let out = Command::new(env!("CARGO_BIN_EXE_panes"))
        .args(["check", features.to_str().unwrap()])
        .env("PANES_LOG", "panes=[")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("PANES_LOG"), "{said}");
}

/// `GET path` on the HTTP port: the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r26_status_json_gives_the_numbers_of_the_metrics_and_lookup_the_reads() {
    let server = start(ServeOptions::default(), Duration::from_millis(5), 1024).await;
    let mut client = server.client().await;
    let b = cards_batch(&mut StdRng::seed_from_u64(5), 500, 50, 10_000);
    // A late row and a null key, so that those counters are not zero.
    let odd = RecordBatch::try_from_iter([
        (
            "card",
            Arc::new(Int64Array::from(vec![Some(1), None])) as ArrayRef,
        ),
        (
            "ts",
            Arc::new(Int64Array::from(vec![1, 11_000])) as ArrayRef,
        ),
        (
            "amount",
            Arc::new(Float64Array::from(vec![1.0, 2.0])) as ArrayRef,
        ),
    ])
    .unwrap();
    let messages = vec![ipc_message("cards", &b), ipc_message("cards", &odd)];
    client
        .ingest(futures::stream::iter(messages))
        .await
        .unwrap();
    let want = client
        .get_features(read("cards", int_keys([3, 999]), None))
        .await
        .unwrap()
        .into_inner();
    let metrics = server.metrics;
    let (status, text, found, unknown) = tokio::task::spawn_blocking(move || {
        (
            http_get(metrics, "/status.json"),
            scrape(metrics),
            http_get(metrics, "/lookup?view=cards&key=3"),
            http_get(metrics, "/lookup?view=cards&key=999"),
        )
    })
    .await
    .unwrap();
    assert_eq!(status.0, 200);
    let status: serde_json::Value = serde_json::from_str(&status.1).unwrap();
    let views = status["views"].as_array().unwrap();
    assert_eq!(views.len(), 2);
    for v in views {
        let name = v["name"].as_str().unwrap();
        let series = |family: &str| format!("{family}{{view=\"{name}\"}}");
        for (field, family) in [
            ("accepted", "panes_events_accepted_total"),
            ("late", "panes_events_late_total"),
            ("filtered", "panes_events_filtered_total"),
            ("expr_errors", "panes_expression_errors_total"),
            ("folded", "panes_events_folded_total"),
            ("pending", "panes_events_pending"),
            ("publishes", "panes_publishes_total"),
            ("keys", "panes_keys"),
            ("state_bytes", "panes_state_bytes"),
        ] {
            assert_eq!(
                v[field].as_f64().unwrap(),
                metric(&text, &series(family)),
                "{name}: {field}"
            );
        }
        for (reason, n) in v["rejected"].as_object().unwrap() {
            let s = format!("panes_events_rejected_total{{view=\"{name}\",reason=\"{reason}\"}}");
            assert_eq!(n.as_f64().unwrap(), metric(&text, &s), "{name}: {reason}");
        }
    }
    let cards = &views[0];
    assert_eq!(cards["accepted"], 500);
    // The one read so far: two keys, in the size class of up to 10.
    assert_eq!(cards["reads"]["count"], 1);
    assert_eq!(
        cards["reads"]["by_keys"]["10"]["count"], 1,
        "{}",
        cards["reads"]
    );
    assert_eq!(
        metric(
            &text,
            "panes_read_duration_by_keys_seconds_count{view=\"cards\",keys=\"10\"}"
        ),
        1.0
    );
    // Every accepted event is counted once in the freshness histogram, when a publish
    // makes it visible.
    let deadline = Instant::now() + Duration::from_secs(10);
    let freshness = "panes_freshness_seconds_count{view=\"cards\"}";
    while metric(
        &tokio::task::spawn_blocking(move || scrape(metrics))
            .await
            .unwrap(),
        freshness,
    ) < 500.0
    {
        assert!(Instant::now() < deadline, "not every event was published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = tokio::task::spawn_blocking(move || scrape(metrics))
        .await
        .unwrap();
    assert_eq!(metric(&text, freshness), 500.0);
    let (_, status) = tokio::task::spawn_blocking(move || http_get(metrics, "/status.json"))
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let freshness = &status["views"][0]["freshness"];
    assert_eq!(freshness["count"], 500, "{freshness}");
    assert!(freshness["p99_ms"].as_f64().unwrap() > 0.0, "{freshness}");
    assert_eq!(cards["late"], 1);
    assert_eq!(cards["rejected"]["null_key"], 1);
    assert_eq!(cards["features"][0]["name"], "n_1m");
    assert_eq!(cards["features"][0]["window"], "1m");
    // The lookup gives what GetFeatures gives, feature by feature.
    assert_eq!(found.0, 200, "{}", found.1);
    let found: serde_json::Value = serde_json::from_str(&found.1).unwrap();
    let n = want.features.len();
    let got: Vec<Option<f64>> = want
        .features
        .iter()
        .map(|f| found["features"][f.as_str()].as_f64())
        .collect();
    // (serde_json's parser, without its `float_roundtrip` feature, may miss by an ulp.)
    assert!(close(&got, &cells(&want)[..n]), "{found}");
    assert!(found["latest_event_ms"].as_i64().unwrap() >= 10_000 - 500);
    // A key never seen: the empty-window values, and no latest event.
    let unknown: serde_json::Value = serde_json::from_str(&unknown.1).unwrap();
    assert_eq!(unknown["latest_event_ms"], serde_json::Value::Null);
    let got: Vec<Option<f64>> = want
        .features
        .iter()
        .map(|f| unknown["features"][f.as_str()].as_f64())
        .collect();
    assert!(close(&got, &cells(&want)[n..]), "{unknown}");
    server.stop().await;
}

/// Rows of a `Subscribe` message by integer key, as (values with None for null).
fn update_rows(u: &proto::SubscribeUpdate) -> Vec<(i64, Vec<Option<f64>>)> {
    let f = u.features.as_ref().unwrap();
    let keys = match &u.keys {
        Some(proto::subscribe_update::Keys::IntKeys(k)) => k.keys.clone(),
        other => panic!("integer keys expected, got {other:?}"),
    };
    assert_eq!(keys.len(), f.rows as usize);
    let nf = f.features.len();
    let cells = cells(f);
    keys.into_iter()
        .enumerate()
        .map(|(r, k)| (k, cells[r * nf..(r + 1) * nf].to_vec()))
        .collect()
}

/// Subscribe: a client following 100 keys while 100 000 events are ingested ends with
/// each key's final vector, exactly as a read gives it; beside it, a client that
/// subscribed to every key and never reads stays within its bound of queued bytes, has
/// its intervals counted as merged, and holds up neither the ingest (every event is
/// accepted while its stream is full) nor the other subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r24_subscribers_get_every_change_and_a_stalled_one_is_bounded() {
    let server = start(ServeOptions::default(), Duration::from_millis(5), 4_096).await;
    let mut rng = StdRng::seed_from_u64(24);
    let followed: Vec<i64> = (0..100).collect();

    // The stalled subscriber: every key, a 10 ms interval, and HTTP/2 windows of 64 KiB
    // that it never opens again.
    let stalled_channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stalled_client = FeaturesClient::new(stalled_channel);
    let stalled = stalled_client
        .subscribe(proto::SubscribeRequest {
            view: "cards".into(),
            all_keys: true,
            interval_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // The following subscriber keeps each key's latest vector.
    let mut client = server.client().await;
    let mut updates = client
        .subscribe(proto::SubscribeRequest {
            view: "cards".into(),
            keys: Some(proto::subscribe_request::Keys::IntKeys(proto::IntKeys {
                keys: followed.clone(),
            })),
            interval_ms: 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert!(first.snapshot, "the first message is the snapshot");
    let snapshot = update_rows(&first);
    assert_eq!(
        snapshot.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
        followed,
        "the snapshot holds every key followed, in request order"
    );
    let latest = Arc::new(std::sync::Mutex::new(
        snapshot
            .into_iter()
            .collect::<std::collections::HashMap<_, _>>(),
    ));
    let messages = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let follower = {
        let (latest, messages) = (latest.clone(), messages.clone());
        tokio::spawn(async move {
            while let Some(u) = updates.message().await.unwrap() {
                assert!(!u.snapshot);
                messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut latest = latest.lock().unwrap();
                for (k, row) in update_rows(&u) {
                    latest.insert(k, row);
                }
            }
        })
    };

    // 100 000 events over 20 000 keys (the followed ones among them), 50 messages.
    let batches: Vec<RecordBatch> = (0..50)
        .map(|i| cards_batch(&mut rng, 2_000, 20_000, 1_000_000 + i * 6_000))
        .collect();
    let mut ingest = server.client().await;
    let reply = ingest
        .ingest(futures::stream::iter(
            batches
                .iter()
                .map(|b| ipc_message("cards", b))
                .collect::<Vec<_>>(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.rejected, 0);
    assert_eq!(reply.accepted + reply.late, 100_000);

    // The final online read of the followed keys.
    let want = cells(
        &client
            .get_features(read("cards", int_keys(followed.clone()), None))
            .await
            .unwrap()
            .into_inner(),
    );
    let nf = want.len() / followed.len();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let same = {
            let latest = latest.lock().unwrap();
            followed
                .iter()
                .enumerate()
                .all(|(i, k)| latest[k] == want[i * nf..(i + 1) * nf])
        };
        if same {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the subscriber's last vectors differ from the final read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = messages.load(std::sync::atomic::Ordering::Relaxed);
    assert!(got > 2, "changes came in {got} messages");

    // The stalled subscriber: its stream stayed full during the ingest, its intervals
    // were counted, and what waits for it is bounded.
    // (It stays stalled: its counter of merged intervals only grows.)
    let text = loop {
        let text = scrape(server.metrics);
        let coalesced = metric(&text, "panes_subscription_coalesced_intervals_total");
        if coalesced >= 10.0 {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "merged intervals: {coalesced}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(metric(&text, "panes_subscriptions_open"), 2.0);
    let queued = metric(&text, "panes_subscription_queued_bytes");
    let queued_max = metric(&text, "panes_subscription_queued_bytes_max");
    // Two messages of at most 65 536 values each (about 9 B per value and row with
    // its validity, key and metadata): under 4 MiB whatever the view's size.
    assert!(
        queued > 0.0 && queued_max < (4 << 20) as f64,
        "queued {queued} B, at most {queued_max} B"
    );
    drop(stalled);
    follower.abort();
    drop(client);
    let report = server.stop().await;
    assert!(!report.cut_off, "subscriptions ended at shutdown");
}

/// Subscribe's requests are checked like reads: the field at fault is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r24_bad_subscriptions_name_the_field() {
    let server = start(
        ServeOptions {
            max_subscriptions: 1,
            ..ServeOptions::default()
        },
        Duration::from_millis(5),
        4_096,
    )
    .await;
    let mut client = server.client().await;
    let base = client.clone();
    let ask = |r: proto::SubscribeRequest| {
        let mut client = base.clone();
        async move { client.subscribe(r).await.map(|_| ()).unwrap_err() }
    };
    let keys = Some(proto::subscribe_request::Keys::IntKeys(proto::IntKeys {
        keys: vec![1, 2],
    }));
    let cases = [
        (
            proto::SubscribeRequest {
                view: "cards".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "keys",
        ),
        (
            proto::SubscribeRequest {
                view: "cards".into(),
                keys: keys.clone(),
                all_keys: true,
                ..Default::default()
            },
            Code::InvalidArgument,
            "all_keys",
        ),
        (
            proto::SubscribeRequest {
                view: "cards".into(),
                keys: keys.clone(),
                interval_ms: 5,
                ..Default::default()
            },
            Code::InvalidArgument,
            "interval_ms",
        ),
        (
            proto::SubscribeRequest {
                view: "cards".into(),
                keys: keys.clone(),
                features: vec!["nope".into()],
                ..Default::default()
            },
            Code::InvalidArgument,
            "features",
        ),
    ];
    for (req, code, field) in cases {
        let s = ask(req).await;
        assert_eq!(s.code(), code, "{s:?}");
        assert_eq!(violation_field(&s), field, "{s:?}");
    }
    let s = ask(proto::SubscribeRequest {
        view: "nope".into(),
        keys: keys.clone(),
        ..Default::default()
    })
    .await;
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(violation_field(&s), "view", "{s:?}");
    // One subscription is allowed; a second is refused while it is open.
    let open = client
        .subscribe(proto::SubscribeRequest {
            view: "cards".into(),
            keys: keys.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let s = ask(proto::SubscribeRequest {
        view: "cards".into(),
        keys,
        ..Default::default()
    })
    .await;
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    drop(open);
    server.stop().await;
}

/// `panes serve` runs the feature file's sinks, reports them in its metrics, and at
/// shutdown writes what the final flush published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r24_the_server_runs_sinks_and_writes_once_more_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let text = format!(
        "{FEATURES}\n[[sinks]]\nname = \"lake\"\nview = \"cards\"\nkind = \"parquet\"\n\
         path = {:?}\ninterval = \"1h\"\n",
        lake.display().to_string()
    );
    let file = FeatureFile::parse(&text, "sinks").unwrap();
    // Micro-batches published only when the stream ends or the server stops.
    let server = start_file(
        &file,
        ServeOptions::default(),
        Duration::from_secs(3600),
        1 << 20,
    )
    .await;
    let mut client = server.client().await;
    let mut rng = StdRng::seed_from_u64(5);
    let batch = cards_batch(&mut rng, 5_000, 300, 1_000_000);
    let reply = client
        .ingest(futures::stream::iter(vec![ipc_message("cards", &batch)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.rejected, 0);
    // The sink's thread makes its first write as the server starts, not before it
    // answers: wait for it, then there is no other in an hour's interval.
    let writes = || {
        metric(
            &scrape(server.metrics),
            "panes_sink_writes_total{sink=\"lake\",view=\"cards\",kind=\"parquet\"}",
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while writes() < 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        writes(),
        1.0,
        "the first write, at start (an hour's interval)"
    );
    let keys: Vec<i64> = (0..300).collect();
    let want = cells(
        &client
            .get_features(read("cards", int_keys(keys.clone()), None))
            .await
            .unwrap()
            .into_inner(),
    );
    drop(client);
    server.stop().await;
    // The last file is the state at shutdown: every key, as the last read gave it.
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(lake.join("view=cards"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort_by_key(|p| {
        let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
        let parts: Vec<i64> = stem.rsplitn(3, '-').map(|s| s.parse().unwrap()).collect();
        (parts[1], parts[0])
    });
    assert_eq!(files.len(), 2, "{files:?}");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(files.last().unwrap()).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let mut got: std::collections::HashMap<i64, Vec<Option<f64>>> = Default::default();
    for b in reader {
        let b = b.unwrap();
        let k = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
        for r in 0..b.num_rows() {
            let row = (1..b.num_columns() - 1)
                .map(|c| {
                    let col =
                        arrow_cast::cast(b.column(c), &arrow_schema::DataType::Float64).unwrap();
                    let col = col.as_any().downcast_ref::<Float64Array>().unwrap();
                    arrow_array::Array::is_valid(col, r).then(|| col.value(r))
                })
                .collect();
            got.insert(k.value(r), row);
        }
    }
    let nf = want.len() / keys.len();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(got[k], want[i * nf..(i + 1) * nf], "key {k}");
    }
}

/// The served-feature log and `panes skew`: 10 000 reads served during an ingest, logged
/// and recomputed through backfill from the same events, match value for value; one
/// logged value changed is reported, with its feature, key and both values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r24_skew_check_finds_no_mismatch_in_10k_served_reads_and_a_planted_one() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let options = ServeOptions {
        read_log: Some(panes_engine::serve::ReadLogOptions {
            root: panes_engine::CheckpointRoot::dir(&log),
            every: 1,
            flush: Duration::from_millis(200),
        }),
        ..ServeOptions::default()
    };
    let server = start(options, Duration::from_millis(5), 4_096).await;
    let mut client = server.client().await;
    let mut rng = StdRng::seed_from_u64(11);
    let mut batches = Vec::new();
    let mut reads = 0;
    for i in 0..20 {
        // Batches 4 s apart: no event arrives after a read with a time at or before the
        // read's (which a read cannot see and backfill would count).
        let b = cards_batch(&mut rng, 2_000, 300, 1_000_000 + i * 10_000);
        let reply = client
            .ingest(futures::stream::iter(vec![ipc_message("cards", &b)]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.rejected, 0);
        batches.push(b);
        for j in 0..500 {
            let key = rng.random_range(0..320);
            // Some reads ask for two features only.
            let features = if j % 5 == 0 {
                vec!["amount_max_10m".to_string(), "n_1m".to_string()]
            } else {
                vec![]
            };
            client
                .get_features(GetFeaturesRequest {
                    features,
                    ..read("cards", int_keys([key]), None)
                })
                .await
                .unwrap();
            reads += 1;
        }
    }
    assert_eq!(reads, 10_000);
    let text = scrape(server.metrics);
    assert_eq!(metric(&text, "panes_read_log_dropped_total"), 0.0);
    server.stop().await;

    // The same events, the same definitions, to a file.
    let events = dir.path().join("events.parquet");
    let schema = batches[0].schema();
    panes_engine::offline::io::write_file(&events, &schema, &batches).unwrap();
    let features = features_file(dir.path());
    let skew = || {
        Command::new(env!("CARGO_BIN_EXE_panes"))
            .arg("skew")
            .arg("--log")
            .arg(&log)
            .arg("--features")
            .arg(&features)
            .arg("--events")
            .arg(&events)
            .args(["--backend", "cpu"])
            .output()
            .unwrap()
    };
    let out = skew();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("view \"cards\": 10000 logged rows"),
        "{stdout}"
    );
    assert!(stdout.contains("\n0 mismatches"), "{stdout}");
    // Every feature was compared: n_1m and amount_max_10m in every read, the others in
    // the reads of every feature.
    assert!(
        stdout.contains(&format!("{:<32} {:>10} {:>10}", "n_1m", 10_000, 0)),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{:<32} {:>10} {:>10}", "amount_sum_1m", 8_000, 0)),
        "{stdout}"
    );

    // One logged value changed: reported, and the exit status says so.
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let mut dirs = vec![log.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                files.push(p);
            }
        }
    }
    files.sort();
    let (schema, batches) = panes_engine::offline::io::read_file(&files[0]).unwrap();
    let mut batch = arrow_select::concat::concat_batches(&schema, &batches).unwrap();
    let served = batch
        .column_by_name("features")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::StringArray>()
        .unwrap();
    let c = schema.index_of("amount_sum_1m").unwrap();
    let sums = batch
        .column(c)
        .as_any()
        .downcast_ref::<Float64Array>()
        .unwrap();
    let row = (0..batch.num_rows())
        .find(|&r| {
            served.value(r).contains("amount_sum_1m") && arrow_array::Array::is_valid(sums, r)
        })
        .unwrap();
    let planted: Float64Array = (0..batch.num_rows())
        .map(|r| {
            arrow_array::Array::is_valid(sums, r)
                .then(|| sums.value(r) + if r == row { 1.0 } else { 0.0 })
        })
        .collect();
    let mut columns = batch.columns().to_vec();
    columns[c] = Arc::new(planted);
    batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    panes_engine::offline::io::write_file(&files[0], &schema, &[batch]).unwrap();
    let out = skew();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("\n1 mismatches"), "{stdout}");
    assert!(stdout.contains("mismatch: amount_sum_1m key "), "{stdout}");
}

/// Subscribe to the rows of a feature-service request: the snapshot has every row, and
/// each row's last vector equals the final service read, on-demand feature included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r24_a_service_subscription_ends_at_the_final_service_read() {
    let text = format!(
        "{FEATURES}\n[[services]]\nname = \"svc\"\nfeatures = [\"n_1m\", \"amount_sum_1m\"]\n\
         [[services.on_demand]]\nname = \"per_event\"\nexpr = \"amount_sum_1m / n_1m\"\n"
    );
    let file = FeatureFile::parse(&text, "service").unwrap();
    let server = start_file(
        &file,
        ServeOptions::default(),
        Duration::from_millis(5),
        4_096,
    )
    .await;
    let mut client = server.client().await;
    let cards: Vec<i64> = (0..30).collect();
    let request = || proto::ServiceRequest {
        data: Some(proto::service_request::Data::Columns(
            proto::RequestColumns {
                columns: vec![proto::RequestColumn {
                    name: "card".into(),
                    values: Some(proto::request_column::Values::Ints(proto::IntKeys {
                        keys: cards.clone(),
                    })),
                    nulls: vec![],
                }],
            },
        )),
        at_column: String::new(),
    };
    let mut updates = client
        .subscribe(proto::SubscribeRequest {
            service: "svc".into(),
            request: Some(request()),
            interval_ms: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert!(first.snapshot && first.keys.is_none());
    assert_eq!(first.request_rows, (0..30).collect::<Vec<u32>>());
    let nf = first.features.as_ref().unwrap().features.len();
    assert_eq!(nf, 3, "two features and the on-demand one");
    let latest = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let follower = {
        let latest = latest.clone();
        let first = first.clone();
        tokio::spawn(async move {
            let mut u = Some(first);
            while let Some(m) = u.take() {
                let f = m.features.as_ref().unwrap();
                let cells = cells(f);
                {
                    let mut latest = latest.lock().unwrap();
                    for (i, r) in m.request_rows.iter().enumerate() {
                        latest.insert(*r, cells[i * nf..(i + 1) * nf].to_vec());
                    }
                }
                u = updates.message().await.unwrap();
            }
        })
    };
    let mut rng = StdRng::seed_from_u64(3);
    for i in 0..10 {
        let b = cards_batch(&mut rng, 1_000, 40, 1_000_000 + i * 3_000);
        client
            .ingest(futures::stream::iter(vec![ipc_message("cards", &b)]))
            .await
            .unwrap();
    }
    let want = cells(
        &client
            .get_features(GetFeaturesRequest {
                service: "svc".into(),
                request: Some(request()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let same = {
            let latest = latest.lock().unwrap();
            (0..30u32).all(|r| {
                latest.get(&r).map(Vec::as_slice)
                    == Some(&want[r as usize * nf..(r as usize + 1) * nf])
            })
        };
        if same {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service subscription did not reach the final read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    follower.abort();
    server.stop().await;
}
