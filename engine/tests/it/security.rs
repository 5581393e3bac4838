//! Who may reach the server and what they may do: bearer tokens with scopes per view
//! (gRPC, Flight, metrics), TLS, and mutual TLS, against a real server on loopback.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Int64Array, RecordBatch};
use futures::TryStreamExt;
use panes_engine::serve::auth::{TlsFiles, Tokens};
use panes_engine::serve::proto::features_client::FeaturesClient;
use panes_engine::serve::proto::{
    GetFeaturesRequest, IngestRequest, IntKeys, ListFeaturesRequest, Row, Rows,
    get_features_request, ingest_request, row,
};
use panes_engine::serve::{ServeOptions, Server};
use panes_engine::{BackendKind, Engine, EngineOptions, FeatureFile};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
[[views.features]]
name = "n_1h"
agg = "count"
window = "1h"

[[views]]
name = "users"
key = "user"
time = "ts"
[[views.features]]
name = "u_1h"
agg = "count"
window = "1h"
"#;

const TOKENS: &str = r#"
[[tokens]]
name = "model"
token = "read-cards-0123456789"
scopes = ["read"]
views = ["cards"]

[[tokens]]
name = "producer"
token = "ingest-all-0123456789"
scopes = ["ingest", "read"]

[[tokens]]
name = "ops"
token = "admin-all-0123456789"
scopes = ["admin"]
"#;

struct Running {
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<panes_engine::Result<panes_engine::serve::ServeReport>>,
}

async fn start(options: ServeOptions) -> Running {
    let file = FeatureFile::parse(FEATURES, "security").unwrap();
    let engine = Engine::new(
        &file,
        EngineOptions {
            backend: Some(BackendKind::Cpu),
            shards: 2,
            batch_age: Duration::from_millis(5),
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
    let (addr, metrics) = (
        server.grpc_addr().unwrap(),
        server.metrics_addr().unwrap().unwrap(),
    );
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    Running {
        addr,
        metrics,
        stop,
        done,
    }
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap().unwrap();
    }
}

fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn read_request(view: &str) -> GetFeaturesRequest {
    GetFeaturesRequest {
        view: view.into(),
        keys: Some(get_features_request::Keys::IntKeys(IntKeys {
            keys: vec![1],
        })),
        ..Default::default()
    }
}

fn rows_message(view: &str) -> IngestRequest {
    IngestRequest {
        view: view.into(),
        payload: Some(ingest_request::Payload::Rows(Rows {
            columns: vec![],
            rows: vec![Row {
                key: Some(row::Key::IntKey(1)),
                time_ms: 1_000,
                ..Default::default()
            }],
        })),
    }
}

/// `GET /metrics` over plain HTTP with an optional token: the status line.
fn scrape_status(addr: std::net::SocketAddr, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r17_tokens_authenticate_and_scopes_decide_per_view() {
    let tokens = Tokens::parse(TOKENS, "tokens.toml", |_| None).unwrap();
    let server = start(ServeOptions {
        tokens: Some(Arc::new(tokens)),
        ..ServeOptions::default()
    })
    .await;
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = FeaturesClient::new(channel.clone());

    // No token, a wrong one: UNAUTHENTICATED, on reads and writes alike.
    for token in [None, Some("read-cards-0123456780")] {
        let e = client
            .get_features(with_token(read_request("cards"), token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}: {e:?}");
        let stream = futures::stream::iter(vec![rows_message("cards")]);
        let e = client.ingest(with_token(stream, token)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // A read token reads its view, and cannot ingest nor read another view.
    let model = Some("read-cards-0123456789");
    client
        .get_features(with_token(read_request("cards"), model))
        .await
        .unwrap();
    let e = client
        .get_features(with_token(read_request("users"), model))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("token \"model\" may not read view \"users\""),
        "{}",
        e.message()
    );
    let stream = futures::stream::iter(vec![rows_message("cards")]);
    let e = client.ingest(with_token(stream, model)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("may not ingest"), "{}", e.message());
    let listed = client
        .list_features(with_token(ListFeaturesRequest {}, model))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.views.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        ["cards"],
        "only the views the token may read are listed"
    );

    // An ingest token writes, and the read token sees it.
    let producer = Some("ingest-all-0123456789");
    let stream = futures::stream::iter(vec![rows_message("cards")]);
    let r = client
        .ingest(with_token(stream, producer))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.accepted, 1);
    let f = client
        .get_features(with_token(read_request("cards"), model))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(f.values, [1.0]);

    // Flight: the same tokens and scopes.
    let mut flight = arrow_flight::FlightClient::new(channel.clone());
    let ticket = || arrow_flight::Ticket::new(r#"{"view": "cards", "keys": [1]}"#);
    let e = flight.do_get(ticket()).await.unwrap_err();
    assert!(e.to_string().contains("no token"), "{e}");
    flight
        .add_header("authorization", "Bearer read-cards-0123456789")
        .unwrap();
    let batches: Vec<RecordBatch> = flight
        .do_get(ticket())
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(batches[0].num_rows(), 1);
    let batch = RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(vec![2])) as _),
        ("ts", Arc::new(Int64Array::from(vec![2_000])) as _),
    ])
    .unwrap();
    let put = arrow_flight::encode::FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(arrow_flight::FlightDescriptor::new_path(vec![
            "cards".into(),
        ])))
        .build(futures::stream::iter([Ok(batch)]));
    let e = flight
        .do_put(put)
        .await
        .and_then(|s| futures::executor::block_on(s.try_collect::<Vec<_>>()))
        .unwrap_err();
    assert!(e.to_string().contains("may not ingest view"), "{e}");

    // Health needs no token (load balancers probe it).
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(h.into_inner().status, 1, "SERVING");

    // Metrics: an admin token only.
    let m = server.metrics;
    let statuses = tokio::task::spawn_blocking(move || {
        [
            None,
            Some("read-cards-0123456789"),
            Some("admin-all-0123456789"),
        ]
        .map(|t| scrape_status(m, t))
    })
    .await
    .unwrap();
    assert_eq!(statuses[0], "HTTP/1.1 401 Unauthorized");
    assert_eq!(statuses[1], "HTTP/1.1 403 Forbidden");
    assert_eq!(statuses[2], "HTTP/1.1 200 OK");
    server.stop().await;
}

/// A CA, and a certificate it signed for `localhost` / 127.0.0.1 (server and client
/// use alike), written as PEM files under `dir`.
struct Pki {
    ca: String,
    cert: String,
    key: String,
    files: TlsFiles,
}

fn pki(dir: &Path, mutual: bool) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let (ca, cert, key) = (ca.pem(), cert.pem(), key.serialize_pem());
    for (name, text) in [("ca.pem", &ca), ("cert.pem", &cert), ("key.pem", &key)] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        client_ca: mutual.then(|| dir.join("ca.pem")),
    };
    Pki {
        ca,
        cert,
        key,
        files,
    }
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    pki: &Pki,
    identity: bool,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if identity {
        tls = tls.identity(Identity::from_pem(&pki.cert, &pki.key));
    }
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    // A TLS failure may surface on the first call instead of on connect.
    FeaturesClient::new(channel.clone())
        .list_features(ListFeaturesRequest {})
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r17_tls_serves_encrypted_and_mutual_tls_needs_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let one_way = pki(dir.path(), false);
    let server = start(ServeOptions {
        tls: Some(one_way.files.clone()),
        ..ServeOptions::default()
    })
    .await;
    tls_channel(server.addr, &one_way, false).await.unwrap();
    // Plain text to a TLS port gets nothing.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(c) = plain {
        // Refused one way or another (cancelled, broken pipe…), never answered.
        FeaturesClient::new(c)
            .list_features(ListFeaturesRequest {})
            .await
            .unwrap_err();
    }
    // The metrics port speaks TLS too: a plain request gets no HTTP answer.
    let m = server.metrics;
    let reply = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(m).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(
        !reply.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let mutual = pki(dir.path(), true);
    let server = start(ServeOptions {
        tls: Some(mutual.files.clone()),
        ..ServeOptions::default()
    })
    .await;
    let e = tls_channel(server.addr, &mutual, false).await.unwrap_err();
    assert!(!e.is_empty());
    tls_channel(server.addr, &mutual, true).await.unwrap();
    server.stop().await;
}

#[test]
fn r17_bad_tls_files_are_refused_at_start_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), false);
    std::fs::write(dir.path().join("junk.pem"), "not pem").unwrap();
    let cases = [
        (
            TlsFiles {
                cert: dir.path().join("missing.pem"),
                ..good.files.clone()
            },
            "--tls-cert",
        ),
        (
            TlsFiles {
                key: dir.path().join("junk.pem"),
                ..good.files.clone()
            },
            "--tls-key",
        ),
        (
            // A key that is not the certificate's.
            TlsFiles {
                key: {
                    let other = dir.path().join("other.pem");
                    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
                    other
                },
                ..good.files.clone()
            },
            "--tls-cert",
        ),
    ];
    let endless = TlsFiles {
        cert: "/dev/zero".into(),
        ..good.files.clone()
    };
    let e = endless.check().unwrap_err().to_string();
    assert!(e.contains("--tls-cert /dev/zero: larger than"), "{e}");
    for (files, named) in cases {
        let e = files.check().unwrap_err().to_string();
        assert!(e.contains(named), "{e}");
    }
    good.files.check().unwrap();
}
