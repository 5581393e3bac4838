//! Decoding Kafka messages (JSON objects or Arrow IPC streams) into rows of the view,
//! counting and explaining the ones that cannot be ingested.

use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use serde_json::Value;

use super::partitioner::{key_bytes, partition_for};
use crate::ingest::keys::{KeyColumn, KeyValue};
use crate::sources::{BadMessage, SourceStats};
use crate::spec::ViewSpec;

/// What decoding a view's messages needs to know of the view.
#[derive(Clone, Copy, Debug)]
pub struct Decoder<'a> {
    /// The view.
    pub spec: &'a ViewSpec,
    /// The value columns its features read.
    pub columns: &'a [String],
    /// Whether the entity key is the message's key (`key_column` set), else a field.
    pub key_from_message: bool,
    /// Where misrouted Arrow rows are counted.
    pub stats: &'a SourceStats,
}

/// One Kafka message, as decoding sees it.
#[derive(Clone, Copy, Debug)]
pub struct Payload<'a> {
    /// The message's value (none: empty).
    pub value: &'a [u8],
    /// The message's key.
    pub key: Option<&'a [u8]>,
    /// The partition it was read from.
    pub partition: i32,
}

/// Rows of one partition decoded from JSON messages, waiting to be pushed.
#[derive(Debug, Default)]
pub struct JsonRows {
    str_keys: Vec<Option<String>>,
    int_keys: Vec<Option<i64>>,
    /// Whether each row's key is a string (runs of one kind are pushed together).
    text: Vec<bool>,
    ts: Vec<i64>,
    values: Vec<Vec<Option<f64>>>,
}

/// Why a message was not ingested, and the message for the dead-letter header.
type Bad = (BadMessage, String);

/// Decodes one JSON message into `rows`, or says why it cannot be ingested.
///
/// # Errors
/// The reason and a message, for the counters and the dead-letter header.
pub fn decode_json(
    view: &Decoder<'_>,
    m: &Payload<'_>,
    partitions: i32,
    rows: &mut JsonRows,
) -> std::result::Result<(), Bad> {
    let spec = view.spec;
    let object: serde_json::Map<String, Value> = serde_json::from_slice(m.value).map_err(|e| {
        (
            BadMessage::Undecodable,
            format!("payload is not a JSON object: {e}"),
        )
    })?;
    let key = json_key(view, m, &object)?;
    let ts = json_time(&spec.time, &object)?;
    let columns = view.columns;
    let mut values = Vec::with_capacity(columns.len());
    for c in columns {
        values.push(match object.get(c) {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => n.as_f64(),
            Some(other) => {
                return Err((
                    BadMessage::WrongType,
                    format!("field {c:?}: expected a number, got {other}"),
                ));
            }
        });
    }
    let home = partition_for(&key_bytes(&key), partitions);
    if home != m.partition {
        return Err((
            BadMessage::Misrouted,
            format!(
                "key {key} belongs in partition {home} (murmur2), the message is in partition {}",
                m.partition
            ),
        ));
    }
    if rows.values.is_empty() {
        rows.values = vec![Vec::new(); columns.len()];
    }
    match key {
        KeyValue::Str(s) => {
            rows.str_keys.push(Some(s));
            rows.int_keys.push(None);
            rows.text.push(true);
        }
        KeyValue::Int(v) => {
            rows.str_keys.push(None);
            rows.int_keys.push(Some(v as i64));
            rows.text.push(false);
        }
    }
    rows.ts.push(ts);
    for (col, v) in rows.values.iter_mut().zip(values) {
        col.push(v);
    }
    Ok(())
}

/// The entity key of a JSON message: its Kafka key where the source maps one, else
/// the object's key field.
fn json_key(
    view: &Decoder<'_>,
    m: &Payload<'_>,
    object: &serde_json::Map<String, Value>,
) -> std::result::Result<KeyValue, Bad> {
    let spec = view.spec;
    if view.key_from_message {
        let k = m
            .key
            .ok_or((BadMessage::MissingKey, "the message has no key".to_string()))?;
        let k = std::str::from_utf8(k).map_err(|_| {
            (
                BadMessage::MissingKey,
                "the message key is not UTF-8".to_string(),
            )
        })?;
        Ok(KeyValue::Str(k.to_string()))
    } else {
        match object.get(&spec.key) {
            Some(Value::String(s)) => Ok(KeyValue::Str(s.clone())),
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                Ok(KeyValue::Int(n.as_i64().expect("checked").into()))
            }
            None | Some(Value::Null) => Err((
                BadMessage::MissingKey,
                format!("field {:?} (the key) is missing or null", spec.key),
            )),
            Some(other) => Err((
                BadMessage::WrongType,
                format!(
                    "field {:?} (the key): expected a string or an integer, got {other}",
                    spec.key
                ),
            )),
        }
    }
}

/// The event time of a JSON message: integer epoch ms or an RFC 3339 string.
fn json_time(time: &str, object: &serde_json::Map<String, Value>) -> std::result::Result<i64, Bad> {
    match object.get(time) {
        Some(Value::Number(n)) if n.as_i64().is_some() => Ok(n.as_i64().expect("checked")),
        Some(Value::String(s)) => arrow_cast::parse::string_to_timestamp_nanos(s)
            .map(|ns| ns.div_euclid(1_000_000))
            .map_err(|e| {
                (
                    BadMessage::MissingTime,
                    format!("field {time:?} (the time): {e}"),
                )
            }),
        None | Some(Value::Null) => Err((
            BadMessage::MissingTime,
            format!("field {time:?} (the time) is missing or null"),
        )),
        Some(other) => Err((
            BadMessage::MissingTime,
            format!(
                "field {time:?} (the time): expected integer epoch ms or an RFC 3339 string, got {other}"
            ),
        )),
    }
}

/// Decodes one Arrow IPC message into `out`; rows whose key belongs in another
/// partition are dropped and counted.
///
/// # Errors
/// The reason and a message, for the counters and the dead-letter header.
pub fn decode_ipc(
    view: &Decoder<'_>,
    m: &Payload<'_>,
    partitions: i32,
    out: &mut Vec<RecordBatch>,
) -> std::result::Result<(), Bad> {
    let batches = crate::ingest::ipc::decode_stream(m.value)
        .map_err(|e| (BadMessage::Undecodable, format!("payload: {e}")))?;
    for batch in batches {
        // Rows whose key belongs in another partition are dropped and counted. A batch
        // without a key column of a key type is pushed as it is: the engine rejects it
        // and says why.
        let keys = batch
            .column_by_name(&view.spec.key)
            .and_then(|col| KeyColumn::new(col.as_ref()).ok());
        let Some(keys) = keys else {
            out.push(batch);
            continue;
        };
        let keep: Vec<bool> = (0..batch.num_rows())
            .map(|i| {
                keys.value(i)
                    .is_none_or(|k| partition_for(&key_bytes(&k), partitions) == m.partition)
            })
            .collect();
        let misrouted = keep.iter().filter(|k| !**k).count();
        if misrouted > 0 {
            view.stats.bad(BadMessage::Misrouted, misrouted as u64);
            let mask = arrow_array::BooleanArray::from(keep);
            let kept = arrow_select::filter::filter_record_batch(&batch, &mask)
                .map_err(|e| (BadMessage::Undecodable, e.to_string()))?;
            out.push(kept);
        } else {
            out.push(batch);
        }
    }
    Ok(())
}

/// Record batches of decoded JSON rows: one per run of keys of one kind.
pub fn json_batches(spec: &ViewSpec, columns: &[String], rows: JsonRows) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.ts.len() {
        let text = rows.text[start];
        let end = (start..rows.ts.len())
            .find(|&i| rows.text[i] != text)
            .unwrap_or(rows.ts.len());
        let key: ArrayRef = if text {
            Arc::new(StringArray::from_iter(
                rows.str_keys[start..end].iter().map(Option::as_deref),
            ))
        } else {
            Arc::new(Int64Array::from(rows.int_keys[start..end].to_vec()))
        };
        let mut fields = vec![
            Field::new(&spec.key, key.data_type().clone(), true),
            Field::new(&spec.time, DataType::Int64, false),
        ];
        let mut arrays: Vec<ArrayRef> = vec![
            key,
            Arc::new(Int64Array::from(rows.ts[start..end].to_vec())),
        ];
        for (c, name) in columns.iter().enumerate() {
            fields.push(Field::new(name, DataType::Float64, true));
            arrays.push(Arc::new(Float64Array::from(
                rows.values[c][start..end].to_vec(),
            )));
        }
        out.push(
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .expect("columns built to the schema"),
        );
        start = end;
    }
    out
}
