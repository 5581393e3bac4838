//! The Kafka sink: one message per key whose vector changed, to a topic, after each
//! interval in which the view published. At least once: a write counts only when the
//! broker acknowledged every message of it; otherwise its keys are sent again at the
//! next interval (so some may arrive twice), and after a restart every key is sent.
//!
//! A message's key is the entity key: a string key's UTF-8 bytes, an integer key's
//! decimal digits, or a composite key's parts as a compact JSON array (`["c1",42]`),
//! as Kafka sources read keys. Its value, by `format`:
//! - `json`: `{"view": ..., "key": ..., "at_ms": ..., "state_version": ...,
//!   "features": {"name": value, ...}}`, with null for a null value, lists as arrays,
//!   and infinities as the strings `"Infinity"` and `"-Infinity"` (JSON has no number
//!   for them);
//! - `arrow-ipc`: an Arrow IPC stream of one record batch of one row: the key columns,
//!   the features and `at_ms`.

use std::sync::Mutex;
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::util::Timeout;
use serde_json::{Map, Value, json};

use super::{Round, Writer};
use crate::error::{PanesError, Result};
use crate::ingest::keys::KeyValue;
use crate::spec::{PayloadFormat, SinkKind, SinkSpec};

/// How long a write waits for the broker to acknowledge its messages.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes the rows of each round as messages.
pub(crate) struct KafkaSink {
    name: String,
    topic: String,
    format: PayloadFormat,
    producer: BaseProducer<Deliveries>,
}

/// Counts the broker's acknowledgements and keeps the first failure of a write.
#[derive(Default)]
struct Deliveries {
    state: Mutex<(u64, Option<String>)>,
}

impl rdkafka::ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(_) => s.0 += 1,
            Err((e, _)) => {
                s.1.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

impl KafkaSink {
    /// The producer of sink `spec`.
    ///
    /// # Errors
    /// A producer librdkafka refuses to make (a bad property).
    pub(crate) fn open(spec: &SinkSpec) -> Result<Self> {
        let SinkKind::Kafka {
            brokers,
            topic,
            format,
            properties,
        } = &spec.kind
        else {
            return Err(PanesError::Internal(format!(
                "sink {:?} is not a Kafka sink",
                spec.name
            )));
        };
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", brokers)
            .set("client.id", format!("panes-sink-{}", spec.name))
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            );
        for (k, v) in properties {
            c.set(k, v);
        }
        let producer = c.create_with_context(Deliveries::default()).map_err(|e| {
            PanesError::Invalid(format!("sink {:?}: Kafka producer: {e}", spec.name))
        })?;
        Ok(KafkaSink {
            name: spec.name.clone(),
            topic: topic.clone(),
            format: *format,
            producer,
        })
    }
}

impl Writer for KafkaSink {
    fn changes_only(&self) -> bool {
        true
    }

    fn write(&mut self, round: &Round<'_>) -> Result<u64> {
        let err = |what: String| PanesError::Invalid(format!("sink {:?}: {what}", self.name));
        *self
            .producer
            .context()
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = (0, None);
        let batch = round.with_read_time()?;
        let mut bytes = 0u64;
        for (r, key) in round.keys.iter().enumerate() {
            let key_bytes = message_key(key);
            let value = match self.format {
                PayloadFormat::Json => json_value(round, &batch, r, key)?,
                PayloadFormat::ArrowIpc => ipc_value(&batch.slice(r, 1))?,
            };
            bytes += (key_bytes.len() + value.len()) as u64;
            let mut record = BaseRecord::to(&self.topic).key(&key_bytes).payload(&value);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        self.producer.poll(Duration::from_millis(50));
                    }
                    Err((e, _)) => return Err(err(format!("Kafka send: {e}"))),
                }
            }
            self.producer.poll(Duration::ZERO);
        }
        self.producer
            .flush(Timeout::After(DELIVERY_TIMEOUT))
            .map_err(|e| err(format!("Kafka flush: {e}")))?;
        let (acked, failed) = self
            .producer
            .context()
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(e) = failed {
            return Err(err(format!("Kafka delivery: {e}")));
        }
        if acked != round.keys.len() as u64 {
            return Err(err(format!(
                "{acked} of {} messages acknowledged",
                round.keys.len()
            )));
        }
        Ok(bytes)
    }
}

/// The entity key as message key bytes.
pub(crate) fn message_key(key: &KeyValue) -> Vec<u8> {
    match key {
        KeyValue::Str(s) => s.as_bytes().to_vec(),
        KeyValue::Int(v) => v.to_string().into_bytes(),
        KeyValue::Tuple(_) => key_json(key).to_string().into_bytes(),
    }
}

fn key_json(key: &KeyValue) -> Value {
    match key {
        KeyValue::Str(s) => Value::String(s.clone()),
        KeyValue::Int(v) => match i64::try_from(*v) {
            Ok(i) => json!(i),
            Err(_) => match u64::try_from(*v) {
                Ok(u) => json!(u),
                Err(_) => Value::String(v.to_string()),
            },
        },
        KeyValue::Tuple(parts) => Value::Array(parts.iter().map(key_json).collect()),
    }
}

/// Row `r` as the JSON message value.
fn json_value(round: &Round<'_>, batch: &RecordBatch, r: usize, key: &KeyValue) -> Result<Vec<u8>> {
    let keys = match key {
        KeyValue::Tuple(parts) => parts.len(),
        _ => 1,
    };
    let schema = batch.schema();
    let mut features = Map::new();
    // The feature columns: after the key columns, before `at_ms`.
    for c in keys..batch.num_columns() - 1 {
        features.insert(schema.field(c).name().clone(), cell(batch.column(c), r));
    }
    let value = json!({
        "view": round.view,
        "key": key_json(key),
        "at_ms": round.at,
        "state_version": round.version,
        "features": Value::Object(features),
    });
    serde_json::to_vec(&value).map_err(|e| PanesError::Internal(format!("JSON: {e}")))
}

/// One value of a feature column as JSON.
fn cell(a: &ArrayRef, r: usize) -> Value {
    if a.is_null(r) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Int64 => json!(a.as_primitive::<Int64Type>().value(r)),
        DataType::UInt64 => json!(a.as_primitive::<UInt64Type>().value(r)),
        DataType::Float64 => number(a.as_primitive::<Float64Type>().value(r)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(r).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(r).to_string()),
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(r);
            Value::Array((0..items.len()).map(|i| cell(&items, i)).collect())
        }
        other => Value::String(format!("<{other}>")),
    }
}

fn number(v: f64) -> Value {
    match serde_json::Number::from_f64(v) {
        Some(n) => Value::Number(n),
        None if v > 0.0 => Value::String("Infinity".into()),
        None if v < 0.0 => Value::String("-Infinity".into()),
        None => Value::Null,
    }
}

/// A one-row batch as an Arrow IPC stream.
fn ipc_value(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(out)
}
