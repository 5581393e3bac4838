//! The consumer thread: polls the topic, decodes messages into per-partition buffers,
//! pushes them into the partitions' engines in message order, folds, checkpoints on a
//! timer, and restores or checkpoints partitions when the group rebalances.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::BaseRecord;
use rdkafka::types::RDKafkaRespErr;

use super::KafkaView;
use crate::error::{PanesError, Result};
use crate::sources::Source;
use crate::sources::decode::{JsonRows, Payload, decode_ipc, decode_json, json_batches};
use crate::sources::{BadMessage, SourceHandle};
use crate::spec::PayloadFormat;

/// The message key of the header names used in dead-letter messages.
const DLQ_HEADERS: [&str; 5] = [
    "panes.reason",
    "panes.error",
    "panes.topic",
    "panes.partition",
    "panes.offset",
];

/// The consumer's context: restores partitions on assignment and checkpoints them on
/// revocation, inside the consumer's own poll (so never concurrently with ingest).
#[derive(Debug)]
pub struct SourceContext {
    view: Arc<KafkaView>,
}

impl ClientContext for SourceContext {
    /// Keeps each partition's end (high watermark) for the consumer lag.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.view.source.topic) else {
            return;
        };
        let mut ends = self.view.ends.lock().unwrap_or_else(|p| p.into_inner());
        for (&p, part) in &topic.partitions {
            // librdkafka lists an internal partition -1, and -1001 for an unknown end.
            if p >= 0 && part.hi_offset >= 0 {
                ends.insert(p, part.hi_offset);
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let view = &self.view;
        view.stats.rebalances.fetch_add(1, Ordering::Relaxed);
        view.epoch.fetch_add(1, Ordering::AcqRel);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let topic = view.source.topic.clone();
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                for (p, offset) in view.assign_all(&parts) {
                    let _ = tpl.set_partition_offset(&topic, p, offset);
                }
                tracing::info!(
                    view = %view.spec.name,
                    partitions = ?view.owned(),
                    "rebalance: assigned partitions"
                );
                if let Err(e) = consumer.assign(tpl) {
                    tracing::error!(view = %view.spec.name, error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                tracing::info!(
                    view = %view.spec.name,
                    partitions = ?revoked,
                    "rebalance: revoked partitions"
                );
                view.revoke(consumer, tpl);
                let _ = consumer.unassign();
            }
            e => {
                tracing::error!(view = %view.spec.name, error = ?e, "rebalance error");
                let all = {
                    let mut t = TopicPartitionList::new();
                    for p in view.owned() {
                        t.add_partition(&view.source.topic, p);
                    }
                    t
                };
                view.revoke(consumer, &all);
                let _ = consumer.unassign();
            }
        }
    }
}

/// What the consumer thread holds for one partition between pushes.
#[derive(Debug)]
struct Buffer {
    epoch: u64,
    json: JsonRows,
    batches: Vec<RecordBatch>,
    /// Offset after the last message taken.
    next_offset: i64,
}

/// Starts consuming `view`'s topic on a thread of its own.
///
/// # Errors
/// The consumer cannot be built, the topic's metadata cannot be fetched or the
/// subscription fails.
pub(super) fn start(view: Arc<KafkaView>) -> Result<SourceHandle> {
    let s = &view.source;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &s.brokers)
        .set("group.id", &s.group)
        .set("client.id", &view.advertise)
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        // Statistics every 5 s: each partition's end, for the consumer lag.
        .set("statistics.interval.ms", "5000")
        // Bounded prefetch: with folds behind, the consumer stops fetching.
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &s.properties {
        c.set(k, v);
    }
    // Never auto-commit (offsets follow checkpoints) and assign eagerly (the rebalance
    // handler restores whole partitions).
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("partition.assignment.strategy", "range");
    let err = |what: &str, e: rdkafka::error::KafkaError| {
        PanesError::Invalid(format!("view {:?}: Kafka {what}: {e}", view.spec.name))
    };
    let consumer: BaseConsumer<SourceContext> = c
        .create_with_context(SourceContext { view: view.clone() })
        .map_err(|e| err("consumer", e))?;
    let metadata = consumer
        .fetch_metadata(Some(&s.topic), Duration::from_secs(30))
        .map_err(|e| err("metadata", e))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == s.topic)
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len() as i32);
    if partitions == 0 {
        return Err(PanesError::Invalid(format!(
            "view {:?}: topic {:?} does not exist or has no partitions on {}",
            view.spec.name, s.topic, s.brokers
        )));
    }
    view.partitions.store(partitions, Ordering::Release);
    consumer
        .subscribe(&[&s.topic])
        .map_err(|e| err("subscribe", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, done) = std::sync::mpsc::channel();
    let stopping = stop.clone();
    std::thread::Builder::new()
        .name(format!("panes-kafka-{}", view.spec.name))
        .spawn(move || {
            consume(&view, &consumer, &stopping);
            let _ = tx.send(());
            // Leave the group so that the others take the partitions now rather than
            // after the session times out: revoke (served by polls), then close.
            // Closing can hang in librdkafka, so the caller waits for it only so long.
            consumer.unsubscribe();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !view.owned().is_empty() && Instant::now() < deadline {
                let _ = consumer.poll(Duration::from_millis(50));
            }
            drop(consumer);
            let _ = tx.send(());
        })
        .map_err(|e| PanesError::Internal(format!("cannot start the Kafka thread: {e}")))?;
    Ok(SourceHandle::new(stop, done))
}

/// Messages taken between two pushes, at most.
const DRAIN: usize = 8192;

fn consume(view: &KafkaView, consumer: &BaseConsumer<SourceContext>, stop: &AtomicBool) {
    let mut buffers: BTreeMap<i32, Buffer> = BTreeMap::new();
    let mut last_checkpoint = Instant::now();
    let mut last_error: Option<Instant> = None;
    let mut bad = BadMessageLog::default();
    while !stop.load(Ordering::Acquire) {
        let mut taken = 0;
        while taken < DRAIN {
            let wait = if taken == 0 {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            };
            match consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(view = %view.spec.name, error = %e, "Kafka client error");
                        last_error = Some(Instant::now());
                    }
                    break;
                }
                Some(Ok(m)) => {
                    take(view, &m, &mut buffers, &mut bad);
                    taken += 1;
                }
            }
        }
        push_buffers(view, &mut buffers);
        bad.flush(&view.spec.name);
        for part in view.owned_map().values() {
            if let Err(e) = part.engine.fold_due() {
                tracing::error!(view = %view.spec.name, error = %e, "fold failed");
            }
        }
        if last_checkpoint.elapsed() >= view.checkpoint_every {
            view.checkpoint_all(consumer, CommitMode::Async, false);
            last_checkpoint = Instant::now();
        }
    }
    push_buffers(view, &mut buffers);
    view.checkpoint_all(consumer, CommitMode::Sync, false);
}

/// Bad messages in the log without a flood: the first of a burst at once, then at most
/// one line per [`BadMessageLog::EVERY`] with the count since the last line and the
/// latest message's reason and place. The counters count every one.
#[derive(Debug, Default)]
struct BadMessageLog {
    last_line: Option<Instant>,
    /// Bad messages since the last line, and the latest of them.
    unlogged: u64,
    latest: Option<(BadMessage, String, i32, i64)>,
}

impl BadMessageLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn bad(&mut self, view: &str, why: BadMessage, error: &str, partition: i32, offset: i64) {
        self.unlogged += 1;
        self.latest = Some((why, error.to_string(), partition, offset));
        self.flush(view);
    }

    /// Writes the line that is due, if any.
    fn flush(&mut self, view: &str) {
        if self.unlogged == 0 || self.last_line.is_some_and(|t| t.elapsed() < Self::EVERY) {
            return;
        }
        if let Some((why, error, partition, offset)) = self.latest.take() {
            tracing::warn!(
                view,
                count = self.unlogged,
                reason = why.name(),
                error,
                partition,
                offset,
                "bad messages not ingested (the latest named)"
            );
        }
        self.unlogged = 0;
        self.last_line = Some(Instant::now());
    }
}

/// Decodes message `m` into its partition's buffer, or counts (and dead-letters) it.
fn take(
    view: &KafkaView,
    m: &BorrowedMessage<'_>,
    buffers: &mut BTreeMap<i32, Buffer>,
    log: &mut BadMessageLog,
) {
    view.stats.messages.fetch_add(1, Ordering::Relaxed);
    let p = m.partition();
    let Some(part) = view.owned_map().get(&p).cloned() else {
        return;
    };
    let fresh = || Buffer {
        epoch: part.epoch,
        json: JsonRows::default(),
        batches: Vec::new(),
        next_offset: part.next_offset.load(Ordering::Acquire),
    };
    let buf = buffers.entry(p).or_insert_with(fresh);
    if buf.epoch != part.epoch {
        // Left from an earlier assignment of the partition: the new one replays it.
        *buf = fresh();
    }
    if m.offset() < buf.next_offset {
        view.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    buf.next_offset = m.offset() + 1;
    let n = view.partition_count();
    let decoder = view.decoder();
    let payload = Payload {
        value: m.payload().unwrap_or_default(),
        key: m.key(),
        partition: m.partition(),
    };
    let result = match view.source.format {
        PayloadFormat::Json => decode_json(&decoder, &payload, n, &mut buf.json),
        PayloadFormat::ArrowIpc => decode_ipc(&decoder, &payload, n, &mut buf.batches),
    };
    if let Err((why, error)) = result {
        view.stats.bad(why, 1);
        log.bad(&view.spec.name, why, &error, m.partition(), m.offset());
        view.dead_letter(m, why, &error);
    }
}

/// Pushes every partition's buffered rows into its engine, in message order.
fn push_buffers(view: &KafkaView, buffers: &mut BTreeMap<i32, Buffer>) {
    let owned = view.owned_map().clone();
    for (p, buf) in std::mem::take(buffers) {
        let Some(part) = owned.get(&p) else { continue };
        if part.epoch != buf.epoch {
            // Taken under an earlier assignment: the current one replays them.
            continue;
        }
        let name = &view.spec.name;
        let push = |batch: &RecordBatch| match part.engine.push(name, batch) {
            Ok(_) | Err(PanesError::Schema { .. }) => {}
            Err(e) => tracing::error!(view = %name, partition = p, error = %e, "push failed"),
        };
        for batch in &buf.batches {
            push(batch);
        }
        for batch in json_batches(&view.spec, &view.columns, buf.json) {
            push(&batch);
        }
        part.next_offset.store(buf.next_offset, Ordering::Release);
    }
}

impl KafkaView {
    fn dead_letter(&self, m: &BorrowedMessage<'_>, why: BadMessage, error: &str) {
        let Some(producer) = &self.dead_letters else {
            return;
        };
        let Some(topic) = &self.source.dead_letter_topic else {
            return;
        };
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        let values = [why.name(), error, m.topic(), &partition, &offset];
        let headers =
            DLQ_HEADERS
                .iter()
                .zip(values)
                .fold(OwnedHeaders::new(), |h, (key, value)| {
                    h.insert(Header {
                        key,
                        value: Some(value),
                    })
                });
        let mut record = BaseRecord::<[u8], [u8]>::to(topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        match producer.0.send(record) {
            Ok(()) => {
                self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                tracing::error!(view = %self.spec.name, error = %e, "dead-letter send failed");
            }
        }
    }
}
