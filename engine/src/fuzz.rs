//! Entry points of the fuzz targets (`fuzz/`): each takes arbitrary bytes the way the
//! engine takes them from a socket or a file, and must return (an error is fine)
//! without panicking, aborting or allocating beyond what the bytes justify. Built only
//! under `--cfg fuzzing` (set by `cargo fuzz`), so that internal decoders can be
//! reached without making them public API.
//!
//! Each entry builds a fresh engine, so that an input reproduces alone.

use std::sync::Arc;

use arrow_array::{Int64Array, StringArray};

use crate::{BackendKind, Engine, EngineOptions, FeatureFile};

/// The view every entry point ingests into: integer or string keys, every kind of
/// aggregation, a key limit.
const FEATURES: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
pane = "1s"
allowed_lateness = "5s"
max_keys = 4096

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
name = "amount_var_10m"
agg = "var"
column = "amount"
window = "10m"
hop = "1m"

[[views.features]]
name = "amount_min_max"
agg = "max"
column = "amount"
window = "lifetime"

[[views.features]]
name = "amount_last"
agg = "last"
column = "amount"
window = "1h"
hop = "1m"
"#;

fn engine() -> Engine {
    let file = FeatureFile::parse(FEATURES, "fuzz").expect("the fuzz features parse");
    let options = EngineOptions {
        backend: Some(BackendKind::Cpu),
        batch_rows: 256,
        ..EngineOptions::default()
    };
    Engine::new(&file, options).expect("an engine")
}

/// Reads a few keys of both kinds at the view's default time and at `at`, so that a
/// fuzzed state is merged too. Errors (such as an inexact past read) are fine.
fn read_back(e: &Engine, at: Option<i64>) {
    let _ = e.flush();
    let ints = Int64Array::from(vec![0, 1, -1, i64::MAX, i64::MIN]);
    let strs = StringArray::from(vec!["", "a", "card"]);
    for at in [None, at] {
        let _ = e.read("cards", &ints, at, None);
        let _ = e.read("cards", &strs, at, None);
    }
    let _ = e.metrics("cards");
}

/// A feature file: parsing never panics, and what parses prints as TOML that parses
/// to the same definitions.
pub fn feature_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = FeatureFile::parse(text, "fuzz") {
        let again = FeatureFile::parse(&file.to_toml(), "fuzz (printed)")
            .expect("a parsed file prints as TOML that parses");
        assert_eq!(again, file, "printing and parsing changes nothing");
        for v in &file.views {
            let _ = crate::CompiledView::new(v, 4).bytes_per_key();
        }
    }
}

/// An Arrow IPC stream (an `Ingest` message, a Kafka payload, an `.arrows` file) or,
/// when it starts with `ARROW1`, an IPC file: decoded with every length checked, then
/// pushed and read.
pub fn arrow_ipc(data: &[u8]) {
    let batches = if data.starts_with(b"ARROW1") {
        crate::ingest::ipc::read_file(std::io::Cursor::new(data), data.len() as u64).map(|(_, b)| b)
    } else {
        crate::ingest::ipc::decode_stream(data)
    };
    let Ok(batches) = batches else {
        return;
    };
    let e = engine();
    for b in &batches {
        let _ = e.push("cards", b);
    }
    read_back(&e, None);
}

/// A checkpoint file: restored (refused with a reason, or taken whole), then pushed
/// into and read. Then again with its checksum recomputed: a mutation of the contents
/// otherwise never gets past the checksum to the validation of every field. Then, when
/// it is of version 7 (whose body is the image of version 8 itself), that body sealed
/// as the current version: the same fields reached through inflation.
pub fn checkpoint(data: &[u8]) {
    restore(data);
    let n = data.len();
    if n >= 24 {
        let mut sealed = data.to_vec();
        let crc = crc32fast::hash(&sealed[..n - 12]);
        sealed[n - 12..n - 8].copy_from_slice(&crc.to_le_bytes());
        restore(&sealed);
        let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
        if version == 7
            && let Ok(current) = crate::checkpoint::format::seal(&data[12..n - 12])
        {
            restore(&current);
        }
    }
}

fn restore(data: &[u8]) {
    let e = engine();
    if e.restore("cards", data).is_ok() {
        let batch = arrow_array::RecordBatch::try_from_iter([
            (
                "card",
                Arc::new(Int64Array::from(vec![0, 1, 2])) as arrow_array::ArrayRef,
            ),
            (
                "ts",
                Arc::new(Int64Array::from(vec![0, 60_000, 3_600_000])) as _,
            ),
            (
                "amount",
                Arc::new(arrow_array::Float64Array::from(vec![1.0, -2.0, 1e300])) as _,
            ),
        ])
        .expect("a batch");
        let _ = e.push("cards", &batch);
        read_back(&e, Some(0));
        let _ = e.checkpoint("cards", &[]);
    }
}

/// A Kafka message: the first byte picks the payload format (JSON or Arrow IPC),
/// whether the key is the message's, the partition and the partition count; the
/// second and third bytes the length of the message key; the rest is key and value.
pub fn kafka_message(data: &[u8]) {
    use crate::sources::SourceStats;
    use crate::sources::decode::{
        Decoder, JsonRows, Payload, decode_ipc, decode_json, json_batches,
    };

    let [head, k0, k1, rest @ ..] = data else {
        return;
    };
    let key_len = (u16::from_le_bytes([*k0, *k1]) as usize).min(rest.len());
    let (key, value) = rest.split_at(key_len);
    let e = engine();
    let compiled = e.compiled("cards").expect("the view");
    let stats = SourceStats::default();
    let decoder = Decoder {
        spec: &compiled.spec,
        columns: &compiled.columns,
        key_from_message: head & 2 != 0,
        stats: &stats,
    };
    let partitions = 1 + (head >> 4) as i32;
    let payload = Payload {
        value,
        key: (head & 4 != 0).then_some(key),
        partition: ((head >> 2) & 3) as i32 % partitions,
    };
    let batches = if head & 1 == 0 {
        let mut rows = JsonRows::default();
        if decode_json(&decoder, &payload, partitions, &mut rows).is_err() {
            return;
        }
        json_batches(&compiled.spec, &compiled.columns, rows)
    } else {
        let mut out = Vec::new();
        if decode_ipc(&decoder, &payload, partitions, &mut out).is_err() {
            return;
        }
        out
    };
    for b in &batches {
        let _ = e.push("cards", b);
    }
    read_back(&e, None);
}

/// A gRPC `Ingest` message (protobuf): its payload (typed rows or Arrow IPC) decoded as
/// the server does, then pushed and read.
#[cfg(feature = "serve")]
pub fn ingest_request(data: &[u8]) {
    use prost::Message;

    let Ok(request) = crate::serve::proto::IngestRequest::decode(data) else {
        return;
    };
    let e = engine();
    if let Ok(batches) = crate::serve::grpc::batches_of(&e, "cards", request.payload) {
        for b in &batches {
            let _ = e.push("cards", b);
        }
    }
    read_back(&e, None);
}

/// A Flight `DoGet` ticket: parsed as the server does, then read; a service ticket's
/// rows are decoded as the server decodes them.
#[cfg(feature = "serve")]
pub fn flight_ticket(data: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data)
        && v.get("service").is_some()
    {
        let _ = crate::serve::service::ticket_request(&v);
        return;
    }
    let Ok(ticket) = crate::serve::flight::parse_ticket(data) else {
        return;
    };
    if ticket.keys.len() > 10_000 || ticket.features.as_ref().is_some_and(|f| f.len() > 1_024) {
        return;
    }
    let e = engine();
    let features: Option<Vec<&str>> = ticket
        .features
        .as_ref()
        .map(|f| f.iter().map(String::as_str).collect());
    let keys = ticket.key_column();
    if let Ok(frame) = e.read(&ticket.view, &keys, ticket.at, features.as_deref()) {
        let _ = e.frame_batch(&ticket.view, &keys, &frame);
    }
}
