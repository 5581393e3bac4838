//! Feature services (DESIGN §3b) in Rust: definitions and their errors, online reads
//! over a composite-key view and a single-key one with per-row times, on-demand
//! expressions, and the backfill of the same rows. The DuckDB oracle of the same
//! capability is `python/tests/test_services.py`.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use panes_engine::{
    BackendKind, BackfillOptions, Engine, EngineOptions, FeatureFile, PanesError, backfill_service,
};

const FEATURES: &str = r#"
[[views]]
name = "pairs"
key = ["card", "merchant"]
time = "ts"

[[views.features]]
name = "pair_sum_1m"
agg = "sum"
column = "amount"
window = "1m"

[[views.features]]
name = "pair_last"
agg = "last"
column = "amount"
window = "lifetime"

[[views]]
name = "cards"
key = "card"
time = "ts"

[[views.features]]
name = "card_count_3"
agg = "count"
window = "3 events"

[[views.features]]
name = "card_mean_1m"
agg = "mean"
column = "amount"
window = "1m"

[[services]]
name = "s"
features = ["card_count_3", "pair_sum_1m", "pair_last"]

[[services.on_demand]]
name = "share"
expr = "pair_sum_1m / limit_amount"

[[services.on_demand]]
name = "twice"
expr = "share * 2"
"#;

fn events() -> RecordBatch {
    let n = 40;
    RecordBatch::try_from_iter([
        (
            "card",
            Arc::new(Int64Array::from_iter_values((0..n).map(|i| i % 3))) as ArrayRef,
        ),
        (
            "merchant",
            Arc::new(StringArray::from_iter_values(
                (0..n).map(|i| format!("m{}", i % 2)),
            )) as _,
        ),
        (
            "ts",
            Arc::new(Int64Array::from_iter_values((0..n).map(|i| i * 1_000))) as _,
        ),
        (
            "amount",
            Arc::new(Float64Array::from_iter_values((0..n).map(|i| i as f64))) as _,
        ),
    ])
    .unwrap()
}

fn request(ts: Option<Vec<Option<i64>>>) -> RecordBatch {
    let mut cols: Vec<(&str, ArrayRef)> = vec![
        (
            "merchant",
            Arc::new(StringArray::from(vec!["m0", "m1", "m1", "m0"])),
        ),
        ("card", Arc::new(Int64Array::from(vec![0, 1, 2, 7]))),
        (
            "limit_amount",
            Arc::new(Float64Array::from(vec![
                Some(100.0),
                Some(0.0),
                None,
                Some(50.0),
            ])),
        ),
    ];
    if let Some(ts) = ts {
        cols.push(("at", Arc::new(Int64Array::from(ts))));
    }
    RecordBatch::try_from_iter(cols).unwrap()
}

fn engine(backend: BackendKind) -> Engine {
    let file = FeatureFile::parse(FEATURES, "services.toml").unwrap();
    let options = EngineOptions {
        backend: Some(backend),
        ..Default::default()
    };
    let e = Engine::new(&file, options).unwrap();
    for view in ["pairs", "cards"] {
        e.push(view, &events()).unwrap();
    }
    e
}

fn f64s(b: &RecordBatch, name: &str) -> Vec<Option<f64>> {
    let c = b.column_by_name(name).unwrap();
    match c.data_type() {
        arrow_schema::DataType::Int64 => c
            .as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map(|v| v as f64))
            .collect(),
        _ => c.as_primitive::<Float64Type>().iter().collect(),
    }
}

#[test]
fn a_service_reads_several_views_and_computes_on_demand_features() {
    for backend in [BackendKind::Scalar, BackendKind::Cpu] {
        let e = engine(backend);
        // At the views' read time (39 s): card 0's newest 3 events, pair (0, m0)'s
        // events in the minute.
        let got = e.read_service("s", &request(None), "at").unwrap();
        let names: Vec<String> = got
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            ["card_count_3", "pair_sum_1m", "pair_last", "share", "twice"]
        );
        assert_eq!(
            f64s(&got, "card_count_3"),
            [Some(3.0), Some(3.0), Some(3.0), Some(0.0)]
        );
        // Pair (0, m0): i ≡ 0 mod 3 and even, so i ≡ 0 mod 6: 0 + 6 + … + 36.
        assert_eq!(f64s(&got, "pair_sum_1m")[0], Some(126.0));
        assert_eq!(f64s(&got, "pair_last")[0], Some(36.0));
        // A division by zero is null (and counted), a null operand null.
        assert_eq!(f64s(&got, "share")[0], Some(1.26));
        assert_eq!(f64s(&got, "share")[1..3], [None, None]);
        assert_eq!(f64s(&got, "twice")[0], Some(2.52));
        // An unknown key reads empty windows.
        assert_eq!(f64s(&got, "pair_sum_1m")[3], Some(0.0));

        // Per-row times (a past one is refused, as a view read refuses it); a null
        // one reads at the read time.
        let past = request(Some(vec![Some(39_000), Some(20_000), None, Some(5_000)]));
        assert!(matches!(
            e.read_service("s", &past, "at"),
            Err(PanesError::InexactRead { .. })
        ));
        let timed = e
            .read_service(
                "s",
                &request(Some(vec![Some(39_000), Some(95_000), None, Some(50_000)])),
                "at",
            )
            .unwrap();
        assert_eq!(f64s(&timed, "pair_sum_1m")[0], Some(126.0));
        // Pair (1, m1) at 95 s: i ≡ 1 mod 6 within 36..=95 s: 37 only.
        assert_eq!(f64s(&timed, "pair_sum_1m")[1], Some(37.0));
        assert_eq!(f64s(&timed, "pair_sum_1m")[2], f64s(&got, "pair_sum_1m")[2]);

        // The backfill of the same rows and times gives the same columns.
        let spine = request(Some(vec![
            Some(39_000),
            Some(95_000),
            Some(39_000),
            Some(50_000),
        ]));
        let file = FeatureFile::parse(FEATURES, "services.toml").unwrap();
        let options = BackfillOptions {
            at_column: "at".into(),
            progress: false,
            ..Default::default()
        };
        let (_, batches, report) = backfill_service(
            &file,
            "s",
            &[events()],
            &spine.schema(),
            std::slice::from_ref(&spine),
            backend.create().unwrap(),
            &options,
        )
        .unwrap();
        let online = e.read_service("s", &spine, "at").unwrap();
        for name in ["card_count_3", "pair_sum_1m", "pair_last", "share", "twice"] {
            assert_eq!(
                f64s(&batches[0], name),
                f64s(&online, name),
                "{backend}: {name}"
            );
        }
        assert_eq!(report.on_demand_errors, 1, "one division by zero");
        assert_eq!(batches[0].num_columns(), spine.num_columns() + 5);
    }
}

#[test]
fn service_errors_say_what_is_wrong() {
    let e = engine(BackendKind::Cpu);
    let err = |r: Result<RecordBatch, PanesError>| r.unwrap_err().to_string();
    let e1 = err(e.read_service("t", &request(None), "at"));
    assert!(
        e1.contains("unknown service \"t\"; the services are s"),
        "{e1}"
    );
    let no_merchant = request(None).project(&[1, 2]).unwrap();
    let e2 = err(e.read_service("s", &no_merchant, "at"));
    assert!(
        e2.contains("needs key column(s) merchant of view \"pairs\""),
        "{e2}"
    );
    let no_limit = request(None).project(&[0, 1]).unwrap();
    let e3 = err(e.read_service("s", &no_limit, "at"));
    assert!(
        e3.contains("on_demand.share.expr") && e3.contains("limit_amount"),
        "{e3}"
    );
    let bad_time = RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("merchant", Arc::new(StringArray::from(vec!["m1"])) as _),
        ("limit_amount", Arc::new(Float64Array::from(vec![1.0])) as _),
        ("at", Arc::new(StringArray::from(vec!["yesterday"])) as _),
    ])
    .unwrap();
    let e4 = err(e.read_service("s", &bad_time, "at"));
    assert!(e4.contains("request time column \"at\", row 0"), "{e4}");
    let clash = RecordBatch::try_from_iter([
        ("card", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
        ("merchant", Arc::new(StringArray::from(vec!["m1"])) as _),
        ("limit_amount", Arc::new(Float64Array::from(vec![1.0])) as _),
        ("share", Arc::new(Float64Array::from(vec![1.0])) as _),
    ])
    .unwrap();
    let e5 = err(e.read_service("s", &clash, "at"));
    assert!(e5.contains("the request has a column \"share\""), "{e5}");
    let bad = |text: &str| FeatureFile::parse(text, "f.toml").unwrap_err().to_string();
    let e6 = bad(&FEATURES.replace("\"pair_last\"]", "\"pair_last\", \"nope\"]"));
    assert!(
        e6.contains("service \"s\"") && e6.contains("unknown feature \"nope\""),
        "{e6}"
    );
    let e7 = bad(&FEATURES.replace("share * 2", "card_mean_1m * 2"));
    assert!(
        e7.contains("names feature \"card_mean_1m\", which is not in the service's features"),
        "{e7}"
    );
    let e8 = bad(&FEATURES.replace("name = \"twice\"", "name = \"pair_last\""));
    assert!(e8.contains("has the name of a feature"), "{e8}");
    let e9 = bad(&FEATURES.replace("share * 2", "share *"));
    assert!(e9.contains("on_demand \"twice\""), "{e9}");
    let e10 = bad(&format!(
        "{FEATURES}\n[[services]]\nname = \"s\"\nfeatures = [\"pair_last\"]\n"
    ));
    assert!(e10.contains("duplicate service name"), "{e10}");
    // Round trip through TOML.
    let file = FeatureFile::parse(FEATURES, "f.toml").unwrap();
    assert_eq!(FeatureFile::parse(&file.to_toml(), "again").unwrap(), file);
}

/// The same service read through gRPC (typed columns and Arrow IPC) and Flight equals
/// the in-process read of the same rows (which equals their backfill: see
/// `a_service_reads_several_views_and_computes_on_demand_features`), on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_flight_service_reads_equal_the_in_process_read() {
    use futures::TryStreamExt;
    use panes_engine::serve::proto::features_client::FeaturesClient;
    use panes_engine::serve::proto::request_column::Values;
    use panes_engine::serve::proto::{
        DoubleValues, GetFeaturesRequest, IntKeys, RequestColumn, RequestColumns, ServiceRequest,
        StringKeys, service_request,
    };
    use panes_engine::serve::{ServeOptions, Server};

    let mut backends = vec![BackendKind::Cpu];
    if crate::common::gpu_available() {
        backends.push(BackendKind::Gpu);
    }
    for backend in backends {
        let e = Arc::new(engine(backend));
        e.flush().unwrap();
        let rows = request(Some(vec![Some(39_000), Some(95_000), None, Some(50_000)]));
        let want = e.read_service("s", &rows, "at").unwrap();
        let server = Server::bind(
            e.clone(),
            ServeOptions::default(),
            "127.0.0.1:0".parse().unwrap(),
            None,
        )
        .await
        .unwrap();
        let addr = server.grpc_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = FeaturesClient::new(channel.clone());

        // Typed columns.
        let column = |name: &str, values: Values, nulls: Vec<u32>| RequestColumn {
            name: name.into(),
            values: Some(values),
            nulls,
        };
        let typed = ServiceRequest {
            data: Some(service_request::Data::Columns(RequestColumns {
                columns: vec![
                    column(
                        "merchant",
                        Values::Strings(StringKeys {
                            keys: vec!["m0".into(), "m1".into(), "m1".into(), "m0".into()],
                        }),
                        vec![],
                    ),
                    column(
                        "card",
                        Values::Ints(IntKeys {
                            keys: vec![0, 1, 2, 7],
                        }),
                        vec![],
                    ),
                    column(
                        "limit_amount",
                        Values::Doubles(DoubleValues {
                            values: vec![100.0, 0.0, 0.0, 50.0],
                        }),
                        vec![2],
                    ),
                    column(
                        "at",
                        Values::Ints(IntKeys {
                            keys: vec![39_000, 95_000, 0, 50_000],
                        }),
                        vec![2],
                    ),
                ],
            })),
            at_column: "at".into(),
        };
        let ask = |request: ServiceRequest| GetFeaturesRequest {
            service: "s".into(),
            request: Some(request),
            ..Default::default()
        };
        let r = client
            .get_features(ask(typed.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.features,
            ["card_count_3", "pair_sum_1m", "pair_last", "share", "twice"]
        );
        assert_eq!(r.rows, 4);
        let cell = |r: &panes_engine::serve::proto::GetFeaturesResponse, row: usize, f: usize| {
            let i = row * r.features.len() + f;
            (r.validity[i / 8] >> (i % 8) & 1 == 1).then(|| r.values[i])
        };
        for (f, name) in r.features.iter().enumerate() {
            let w = f64s(&want, name);
            for (row, w) in w.iter().enumerate() {
                assert_eq!(
                    cell(&r, row, f),
                    *w,
                    "{backend} gRPC typed: {name} row {row}"
                );
            }
        }

        // Arrow IPC.
        let mut ipc = Vec::new();
        {
            let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut ipc, &rows.schema()).unwrap();
            w.write(&rows).unwrap();
            w.finish().unwrap();
        }
        let as_ipc = ServiceRequest {
            data: Some(service_request::Data::ArrowIpc(ipc)),
            at_column: "at".into(),
        };
        let r2 = client.get_features(ask(as_ipc)).await.unwrap().into_inner();
        assert_eq!(
            (r2.values.len(), &r2.validity),
            (r.values.len(), &r.validity)
        );
        assert!(
            r2.values
                .iter()
                .zip(&r.values)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );

        // Flight.
        let mut flight = arrow_flight::FlightClient::new(channel.clone());
        let ticket = r#"{"service": "s", "at_column": "at", "request": {"merchant": ["m0", "m1", "m1", "m0"], "card": [0, 1, 2, 7], "limit_amount": [100.0, 0, null, 50], "at": [39000, 95000, null, 50000]}}"#;
        let got: Vec<RecordBatch> = flight
            .do_get(arrow_flight::Ticket::new(ticket))
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        for name in ["card_count_3", "pair_sum_1m", "pair_last", "share", "twice"] {
            assert_eq!(
                f64s(&got[0], name),
                f64s(&want, name),
                "{backend} Flight: {name}"
            );
        }

        // Errors: a view with a service, an unknown service, a missing key column, a
        // malformed ticket.
        let mixed = GetFeaturesRequest {
            view: "cards".into(),
            ..ask(typed.clone())
        };
        let s = client.get_features(mixed).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let unknown = GetFeaturesRequest {
            service: "nope".into(),
            ..ask(typed.clone())
        };
        let s = client.get_features(unknown).await.unwrap_err();
        assert!(s.message().contains("unknown service \"nope\""), "{s:?}");
        let mut no_merchant = typed.clone();
        if let Some(service_request::Data::Columns(c)) = &mut no_merchant.data {
            c.columns.remove(0);
        }
        let s = client.get_features(ask(no_merchant)).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(
            s.message().contains("needs key column(s) merchant"),
            "{s:?}"
        );
        let s = flight
            .do_get(arrow_flight::Ticket::new(
                r#"{"service": "s", "request": {"card": [1, "x"]}}"#,
            ))
            .await
            .unwrap_err();
        assert!(s.to_string().contains("ticket.request.card"), "{s}");
        let _ = tx.send(());
        done.await.unwrap().unwrap();
    }
}
