//! Kafka ingest throughput: a Panes Kafka view consuming JSON messages from librdkafka's
//! in-process mock cluster, against a bare librdkafka consumer that only polls each
//! message and parses its JSON (the ceiling of any JSON consumer here), in one run.
//!
//! ```sh
//! cargo run --release -p panes-bench --features kafka --bin kafka_ingest -- --events 300000
//! ```
//!
//! librdkafka's mock broker keeps a bounded log per partition: beyond a few hundred
//! thousand messages of this size it stops delivering the oldest, and the run says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use panes_engine::sources::kafka::KafkaView;
use panes_engine::sources::{Source, SourceOptions};
use panes_engine::{BackendKind, EngineOptions, FeatureFile};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 6;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

fn features(brokers: &str) -> String {
    format!(
        r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
allowed_lateness = "1m"

[views.source]
kind = "kafka"
brokers = "{brokers}"
topic = "events"
group = "bench"

[[views.features]]
name = "n_1h"
agg = "count"
window = "1h"
hop = "1m"

[[views.features]]
name = "amount_sum_5m"
agg = "sum"
column = "amount"
window = "5m"
hop = "10s"

[[views.features]]
name = "amount_mean_1d"
agg = "mean"
column = "amount"
window = "1d"
hop = "1h"
"#
    )
}

fn main() {
    let events = arg("--events", 300_000);
    let keys = arg("--keys", 100_000);
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster
        .create_topic("events", PARTITIONS, 1)
        .expect("topic");
    let brokers = cluster.bootstrap_servers();

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .expect("producer");
    let mut rng = StdRng::seed_from_u64(1);
    let t0 = 1_700_000_000_000i64;
    let mut bytes = 0usize;
    for i in 0..events {
        let key = format!("card-{}", rng.random_range(0..keys));
        let payload = format!(
            r#"{{"card":"{key}","ts":{},"amount":{:.2},"merchant":"m-{}"}}"#,
            t0 + i as i64,
            rng.random_range(0.0..500.0),
            i % 977
        );
        bytes += payload.len();
        while producer
            .send(BaseRecord::to("events").key(&key).payload(&payload))
            .is_err()
        {
            producer.poll(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(300)).expect("flush");
    println!(
        "produced {events} JSON messages ({:.0} bytes each) over {keys} keys to {PARTITIONS} partitions",
        bytes as f64 / events as f64
    );

    // The peer: poll every message and parse its JSON, nothing else.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "bare")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset("events", p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let started = Instant::now();
    let (mut seen, mut sum) = (0usize, 0.0f64);
    let mut idle = Instant::now();
    while seen < events {
        assert!(
            idle.elapsed() < Duration::from_secs(10),
            "the mock cluster delivered {seen} of {events} messages; use fewer --events"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            idle = Instant::now();
            let v: serde_json::Value =
                serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON");
            sum += v["amount"].as_f64().unwrap_or(0.0);
            seen += 1;
        }
    }
    let bare = started.elapsed();
    std::hint::black_box(sum);

    // Panes: decode, key index, micro-batches, fold, per-partition engines.
    let text = features(&brokers);
    let file = FeatureFile::parse(&text, "kafka bench").expect("features");
    let options = EngineOptions {
        backend: Some(BackendKind::Cpu),
        ..EngineOptions::default()
    };
    let backend = options.create_backend().expect("backend");
    let dir = std::env::temp_dir().join(format!("panes-kafka-bench-{}", std::process::id()));
    let view = Arc::new(
        KafkaView::new(
            &file.views[0],
            options,
            backend,
            &SourceOptions {
                checkpoint_root: dir.clone().into(),
                checkpoint_every: Duration::from_secs(3600),
                advertise: "127.0.0.1:1".into(),
            },
        )
        .expect("view"),
    );
    let handle = view.clone().start().expect("start");
    // The clock starts once the group gave this consumer every partition.
    while view.owned().len() < PARTITIONS as usize {
        std::thread::sleep(Duration::from_millis(1));
    }
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "Panes did not ingest every message"
        );
        let m = view.metrics().expect("metrics");
        if m.counters.accepted as usize >= events && m.pending == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let panes = started.elapsed();
    let stopped = handle.stop(Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(&dir);

    let rate = |d: Duration| events as f64 / d.as_secs_f64();
    println!("| consumer | time | events/s | vs bare |");
    println!("|---|---:|---:|---:|");
    println!(
        "| bare librdkafka poll + serde_json parse | {:.2} s | {:.0} | 1.00 |",
        bare.as_secs_f64(),
        rate(bare)
    );
    println!(
        "| Panes Kafka view (decode, fold, 3 features) | {:.2} s | {:.0} | {:.2} |",
        panes.as_secs_f64(),
        rate(panes),
        bare.as_secs_f64() / panes.as_secs_f64()
    );
    assert!(stopped, "the final checkpoint did not finish");
}
