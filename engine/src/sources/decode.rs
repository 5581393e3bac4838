//! Decoding Kafka messages (JSON objects or Arrow IPC streams) into rows of the view,
//! counting and explaining the ones that cannot be ingested. It needs no Kafka client
//! (built without the `kafka` feature too, for the fuzz targets).

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
    /// Per row, its key's parts (one unless the view's key is composite).
    keys: Vec<Vec<KeyValue>>,
    ts: Vec<i64>,
    values: Vec<Vec<Option<f64>>>,
    /// Per value column: its strings, when its values are strings (the first
    /// non-null value of the rows decides; `first`, `last_n`, … of a string field).
    strings: Vec<Option<Vec<Option<String>>>>,
    /// Per value column: `Some(true)` once a row held a string, `Some(false)` a number.
    kinds: Vec<Option<bool>>,
}

/// One value of a JSON message.
enum JsonValue {
    Null,
    Number(f64),
    Text(String),
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
    if rows.values.is_empty() {
        rows.values = vec![Vec::new(); columns.len()];
        rows.strings = vec![None; columns.len()];
        rows.kinds = vec![None; columns.len()];
    }
    let mut values = Vec::with_capacity(columns.len());
    for (j, c) in columns.iter().enumerate() {
        // A field takes the kind of value (number or string) of the rows so far.
        let text = rows.kinds[j];
        values.push(match (object.get(c), text) {
            (None | Some(Value::Null), _) => JsonValue::Null,
            (Some(Value::Number(n)), None | Some(false)) => {
                n.as_f64().map_or(JsonValue::Null, JsonValue::Number)
            }
            (Some(Value::String(s)), None | Some(true)) => JsonValue::Text(s.clone()),
            (Some(other), _) => {
                let expected = match text {
                    Some(true) => "a string, as in the messages before it",
                    Some(false) => "a number, as in the messages before it",
                    None => "a number or a string",
                };
                return Err((
                    BadMessage::WrongType,
                    format!("field {c:?}: expected {expected}, got {other}"),
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
    rows.keys.push(match key {
        KeyValue::Tuple(parts) => parts,
        single => vec![single],
    });
    rows.ts.push(ts);
    for (j, v) in values.into_iter().enumerate() {
        let (number, text) = match v {
            JsonValue::Null => (None, None),
            JsonValue::Number(x) => (Some(x), None),
            JsonValue::Text(t) => (None, Some(t)),
        };
        if number.is_some() || text.is_some() {
            rows.kinds[j] = Some(text.is_some());
        }
        if text.is_some() && rows.strings[j].is_none() {
            // The first string of the field: the rows before it held no value of it.
            rows.strings[j] = Some(vec![None; rows.values[j].len()]);
        }
        rows.values[j].push(number);
        if let Some(strings) = &mut rows.strings[j] {
            strings.push(text);
        }
    }
    Ok(())
}

/// The entity key of a JSON message: its Kafka key where the source maps one (a
/// composite key's parts as a JSON array), else the object's key field(s).
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
        if spec.is_composite() {
            let parts: Vec<Value> = serde_json::from_slice(k).map_err(|e| {
                (
                    BadMessage::MissingKey,
                    format!(
                        "the message key is not a JSON array of the key {} ({e})",
                        spec.key_label()
                    ),
                )
            })?;
            if parts.len() != spec.key.len() {
                return Err((
                    BadMessage::MissingKey,
                    format!(
                        "the message key has {} parts; the key {} has {}",
                        parts.len(),
                        spec.key_label(),
                        spec.key.len()
                    ),
                ));
            }
            let parts = spec
                .key
                .iter()
                .zip(&parts)
                .map(|(name, v)| key_part(&format!("message key part {name:?}"), Some(v)))
                .collect::<std::result::Result<_, _>>()?;
            return Ok(KeyValue::Tuple(parts));
        }
        let k = std::str::from_utf8(k).map_err(|_| {
            (
                BadMessage::MissingKey,
                "the message key is not UTF-8".to_string(),
            )
        })?;
        Ok(KeyValue::Str(k.to_string()))
    } else {
        let mut parts = spec
            .key
            .iter()
            .map(|name| key_part(&format!("field {name:?} (the key)"), object.get(name)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            KeyValue::Tuple(parts)
        })
    }
}

/// One key value of a JSON message (a field, or a part of the message key).
fn key_part(what: &str, v: Option<&Value>) -> std::result::Result<KeyValue, Bad> {
    match v {
        Some(Value::String(s)) => Ok(KeyValue::Str(s.clone())),
        Some(Value::Number(n)) if n.as_i64().is_some() => {
            Ok(KeyValue::Int(n.as_i64().expect("checked").into()))
        }
        None | Some(Value::Null) => {
            Err((BadMessage::MissingKey, format!("{what} is missing or null")))
        }
        Some(other) => Err((
            BadMessage::WrongType,
            format!("{what}: expected a string or an integer, got {other}"),
        )),
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
        let keys = view
            .spec
            .key
            .iter()
            .map(|k| {
                batch
                    .column_by_name(k)
                    .and_then(|col| KeyColumn::new(col.as_ref()).ok())
            })
            .collect::<Option<Vec<_>>>()
            .map(|mut parts| {
                if parts.len() == 1 {
                    parts.pop().expect("one part")
                } else {
                    KeyColumn::tuple(parts)
                }
            });
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

/// Record batches of decoded JSON rows: one per run of keys of one kind (per part).
pub fn json_batches(spec: &ViewSpec, columns: &[String], rows: JsonRows) -> Vec<RecordBatch> {
    let kinds =
        |k: &[KeyValue]| -> Vec<bool> { k.iter().map(|p| matches!(p, KeyValue::Str(_))).collect() };
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.ts.len() {
        let run = kinds(&rows.keys[start]);
        let end = (start..rows.ts.len())
            .find(|&i| kinds(&rows.keys[i]) != run)
            .unwrap_or(rows.ts.len());
        let keys = &rows.keys[start..end];
        let mut fields = Vec::with_capacity(spec.key.len() + 1 + columns.len());
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(fields.capacity());
        for (p, (name, &text)) in spec.key.iter().zip(&run).enumerate() {
            let key: ArrayRef = if text {
                Arc::new(StringArray::from_iter(keys.iter().map(|k| match &k[p] {
                    KeyValue::Str(s) => Some(s.as_str()),
                    _ => None,
                })))
            } else {
                Arc::new(Int64Array::from_iter(keys.iter().map(|k| match &k[p] {
                    KeyValue::Int(v) => i64::try_from(*v).ok(),
                    _ => None,
                })))
            };
            fields.push(Field::new(name, key.data_type().clone(), true));
            arrays.push(key);
        }
        fields.push(Field::new(&spec.time, DataType::Int64, false));
        arrays.push(Arc::new(Int64Array::from(rows.ts[start..end].to_vec())));
        for (c, name) in columns.iter().enumerate() {
            let array: ArrayRef = match rows.strings.get(c).and_then(Option::as_ref) {
                Some(strings) => Arc::new(StringArray::from_iter(
                    strings[start..end].iter().map(Option::as_deref),
                )),
                None => Arc::new(Float64Array::from(rows.values[c][start..end].to_vec())),
            };
            fields.push(Field::new(name, array.data_type().clone(), true));
            arrays.push(array);
        }
        out.push(
            RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
                .expect("columns built to the schema"),
        );
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use arrow_array::cast::AsArray;

    use super::*;
    use crate::sources::SourceStats;
    use crate::spec::FeatureFile;

    #[test]
    fn json_fields_of_strings_become_string_columns() {
        let file = FeatureFile::parse(
            "[[views]]\nname = \"clicks\"\nkey = \"user\"\ntime = \"ts\"\n\
             [[views.features]]\nname = \"top\"\nagg = \"top_k\"\ncolumn = \"category\"\nk = 2\nwindow = \"lifetime\"\n\
             [[views.features]]\nname = \"spent\"\nagg = \"sum\"\ncolumn = \"amount\"\nwindow = \"lifetime\"\n",
            "test",
        )
        .unwrap();
        let spec = &file.views[0];
        let columns = vec!["category".to_string(), "amount".to_string()];
        let stats = SourceStats::default();
        let decoder = Decoder {
            spec,
            columns: &columns,
            key_from_message: false,
            stats: &stats,
        };
        let mut rows = JsonRows::default();
        let mut decode = |json: &str| {
            let m = Payload {
                value: json.as_bytes(),
                key: None,
                partition: 0,
            };
            decode_json(&decoder, &m, 1, &mut rows).map_err(|e| e.1)
        };
        decode(r#"{"user": 1, "ts": 10, "amount": 2.5}"#).unwrap();
        decode(r#"{"user": 1, "ts": 11, "category": "books", "amount": null}"#).unwrap();
        decode(r#"{"user": 2, "ts": 12, "category": "", "amount": 1}"#).unwrap();
        let e = decode(r#"{"user": 2, "ts": 13, "category": 7}"#).unwrap_err();
        assert!(
            e.contains(
                "field \"category\": expected a string, as in the messages before it, got 7"
            ),
            "{e}"
        );
        let e = decode(r#"{"user": 2, "ts": 13, "amount": "12"}"#).unwrap_err();
        assert!(
            e.contains("expected a number, as in the messages before it"),
            "{e}"
        );
        let e = decode(r#"{"user": 2, "ts": 13, "category": [1]}"#).unwrap_err();
        assert!(e.contains("got [1]"), "{e}");
        let batches = json_batches(spec, &columns, rows);
        assert_eq!(batches.len(), 1);
        let category = batches[0].column(2).as_string::<i32>();
        assert_eq!(
            category.iter().collect::<Vec<_>>(),
            [None, Some("books"), Some("")]
        );
        assert_eq!(batches[0].column(3).data_type(), &DataType::Float64);
    }

    #[test]
    fn composite_keys_come_from_fields_or_a_json_array_message_key() {
        let file = FeatureFile::parse(
            "[[views]]\nname = \"pairs\"\nkey = [\"merchant\", \"card\"]\ntime = \"ts\"\n\
             [[views.features]]\nname = \"n\"\nagg = \"count\"\nwindow = \"lifetime\"\n",
            "test",
        )
        .unwrap();
        let spec = &file.views[0];
        let stats = SourceStats::default();
        for from_message in [false, true] {
            let decoder = Decoder {
                spec,
                columns: &[],
                key_from_message: from_message,
                stats: &stats,
            };
            let mut rows = JsonRows::default();
            let mut decode = |json: &str, key: &str| {
                let m = Payload {
                    value: json.as_bytes(),
                    key: Some(key.as_bytes()),
                    partition: 0,
                };
                decode_json(&decoder, &m, 1, &mut rows).map_err(|e| e.1)
            };
            decode(r#"{"merchant": "m1", "card": 7, "ts": 1}"#, r#"["m1",7]"#).unwrap();
            decode(r#"{"merchant": "m2", "card": 8, "ts": 2}"#, r#"["m2",8]"#).unwrap();
            let e = decode(r#"{"merchant": "m2", "ts": 2}"#, r#"["m2"]"#).unwrap_err();
            if from_message {
                assert!(e.contains("the message key has 1 parts"), "{e}");
            } else {
                assert!(e.contains("field \"card\" (the key) is missing"), "{e}");
            }
            let batches = json_batches(spec, &[], rows);
            assert_eq!(batches.len(), 1);
            let b = &batches[0];
            assert_eq!(b.schema().field(0).name(), "merchant");
            assert_eq!(b.column(0).as_string::<i32>().value(1), "m2");
            assert_eq!(
                b.column(1)
                    .as_primitive::<arrow_array::types::Int64Type>()
                    .value(0),
                7
            );
        }
    }
}
