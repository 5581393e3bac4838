//! The one decoder of Arrow IPC, for every input that carries it: `Ingest` messages,
//! Kafka payloads and `.arrows` files (the stream format), `.arrow` files (the file
//! format).
//!
//! # Hostile input
//! Every byte of a stream comes from a socket or a file, so nothing it claims is
//! trusted before it is checked against what arrived. arrow-ipc's reader allocates a
//! message's metadata and body at the sizes its header claims, before reading them:
//! a 1-row stream whose header claims a 2^44-byte body aborts the process on the failed
//! allocation, and 8 bytes of text read as a 1.3 GB length. So [`check_framing`] walks
//! the stream's framing first, reading only the small metadata blocks and skipping the
//! bodies, and refuses a message whose metadata or body length exceeds the bytes that
//! follow it. Only then does arrow-ipc decode, and a panic inside it (malformed buffer
//! offsets) is caught and reported as a malformed stream: it never takes a thread down.

use std::io::{Read, Seek, SeekFrom};

use arrow_array::{RecordBatch, RecordBatchReader};
use arrow_schema::SchemaRef;

use crate::error::catch_quietly;

/// Decodes an Arrow IPC stream of `len` bytes: its schema and every record batch in it.
///
/// # Errors
/// What is wrong with the stream: a message whose lengths exceed the bytes present
/// (with its index and byte offset), "not an Arrow IPC stream" when its schema message
/// cannot be read, "malformed Arrow IPC stream" when a later message cannot.
pub fn read_stream<R: Read + Seek>(
    mut reader: R,
    len: u64,
) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    let start = reader.stream_position().map_err(|e| e.to_string())?;
    check_framing(&mut reader, len)?;
    reader
        .seek(SeekFrom::Start(start))
        .map_err(|e| e.to_string())?;
    guarded("stream", move || {
        let reader = arrow_ipc::reader::StreamReader::try_new(reader, None)
            .map_err(|e| format!("not an Arrow IPC stream: {e}"))?;
        read_all(reader, "stream", len)
    })
}

/// Decodes an Arrow IPC file of `len` bytes (the file format: `ARROW1` magic, blocks,
/// a footer): its schema and every record batch in it.
///
/// # Errors
/// A footer or block whose lengths exceed the file, or a file that arrow-ipc cannot
/// decode, with the reason.
pub fn read_file<R: Read + Seek>(
    mut reader: R,
    len: u64,
) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    check_file_framing(&mut reader, len)?;
    guarded("file", move || {
        let reader = arrow_ipc::reader::FileReader::try_new(reader, None)
            .map_err(|e| format!("not an Arrow IPC file: {e}"))?;
        read_all(reader, "file", len)
    })
}

/// The schema and every batch of an opened IPC `what` (stream or file) of `len` bytes.
fn read_all(
    reader: impl RecordBatchReader,
    what: &str,
    len: u64,
) -> Result<(SchemaRef, Vec<RecordBatch>), String> {
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed Arrow IPC {what}: {e}"))?;
    for (i, b) in batches.iter().enumerate() {
        check_rows(b, len).map_err(|e| format!("Arrow IPC {what}, record batch {i}: {e}"))?;
    }
    Ok((schema, batches))
}

/// Refuses a record batch claiming more rows than `bytes` of input can hold: more than
/// 8 per byte (a row of any column but Null takes at least a bit). A batch without
/// columns, or of Null columns only, may otherwise claim 2^56 rows in a few bytes, and
/// any per-row work on it (a filter mask, a counter of rejected rows) would be as large.
///
/// # Errors
/// The rows claimed and the bytes they came in.
pub fn check_rows(batch: &RecordBatch, bytes: u64) -> Result<(), String> {
    let rows = batch.num_rows() as u64;
    let most = bytes.saturating_mul(8).saturating_add(64);
    if rows > most {
        return Err(format!(
            "claims {rows} rows in {bytes} bytes; at most {most} fit"
        ));
    }
    Ok(())
}

/// Runs a decode, turning a panic inside arrow-ipc into an error (without a panic
/// report in the log: see [`catch_quietly`]).
fn guarded<T>(what: &str, decode: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_quietly(decode).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        Err(format!(
            "malformed Arrow IPC {what}: the decoder failed on it ({why})"
        ))
    })
}

/// Checks that an IPC file's footer and every block it lists lie within its `len`
/// bytes, reading only the trailer and the footer.
///
/// # Errors
/// The first length that does not fit, with what it claims and what is there.
pub fn check_file_framing(reader: &mut (impl Read + Seek), len: u64) -> Result<(), String> {
    const MAGIC: &[u8; 6] = b"ARROW1";
    // "ARROW1" + 2 bytes of padding, then the blocks, the footer, its length, "ARROW1".
    if len < 8 + 10 {
        return Err(format!(
            "not an Arrow IPC file: {len} bytes, shorter than its magic and trailer"
        ));
    }
    let io = |e: std::io::Error| format!("not an Arrow IPC file: {e}");
    let mut trailer = [0u8; 10];
    reader.seek(SeekFrom::End(-10)).map_err(io)?;
    reader.read_exact(&mut trailer).map_err(io)?;
    if &trailer[4..] != MAGIC {
        return Err("not an Arrow IPC file: it does not end with \"ARROW1\"".into());
    }
    let footer_len = i32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let room = len - 8 - 10;
    let footer_len = u64::try_from(footer_len)
        .ok()
        .filter(|&f| f <= room)
        .ok_or_else(|| {
            format!(
                "Arrow IPC file: its footer claims {footer_len} bytes; the file has room for {room}"
            )
        })?;
    let mut footer = vec![0u8; footer_len as usize];
    reader
        .seek(SeekFrom::End(-10 - footer_len as i64))
        .map_err(io)?;
    reader.read_exact(&mut footer).map_err(io)?;
    let footer = arrow_ipc::root_as_footer(&footer)
        .map_err(|e| format!("Arrow IPC file: its footer is not an IPC footer: {e}"))?;
    if footer.schema().is_none() {
        return Err("Arrow IPC file: its footer has no schema".into());
    }
    let data_end = len - 10 - footer_len;
    let blocks = footer.recordBatches().into_iter().flatten();
    let dictionaries = footer.dictionaries().into_iter().flatten();
    for (i, block) in blocks.chain(dictionaries).enumerate() {
        let (offset, meta, body) = (block.offset(), block.metaDataLength(), block.bodyLength());
        let end = u64::try_from(offset)
            .ok()
            .zip(u64::try_from(meta).ok())
            .zip(u64::try_from(body).ok())
            .and_then(|((o, m), b)| o.checked_add(m)?.checked_add(b));
        if end.is_none_or(|end| end > data_end) {
            return Err(format!(
                "Arrow IPC file: block {i} claims {meta} bytes of metadata and {body} of body at \
                 byte {offset}; the blocks end at byte {data_end}"
            ));
        }
    }
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    Ok(())
}

/// [`read_stream`] of a stream held in memory (a message payload), batches only.
///
/// # Errors
/// As [`read_stream`].
pub fn decode_stream(bytes: &[u8]) -> Result<Vec<RecordBatch>, String> {
    read_stream(std::io::Cursor::new(bytes), bytes.len() as u64).map(|(_, batches)| batches)
}

/// The marker before each message's metadata length (absent in the legacy format).
const CONTINUATION: [u8; 4] = [0xff; 4];

/// Walks the messages of a stream of `len` bytes from `reader`'s position, checking
/// that each one's metadata and body fit in the bytes that follow it, and that its
/// metadata is an IPC message. Reads the metadata blocks only; seeks over bodies.
///
/// # Errors
/// The first message that does not fit, by index and byte offset, with what it claims
/// and what is there.
pub fn check_framing(reader: &mut (impl Read + Seek), len: u64) -> Result<(), String> {
    let mut pos = 0u64;
    for index in 0u64.. {
        let remaining = len - pos;
        if remaining == 0 {
            // A stream may end without the end-of-stream marker.
            return Ok(());
        }
        let at = |what: String| format!("Arrow IPC message {index} at byte {pos}: {what}");
        let mut word = [0u8; 4];
        let mut header = 4u64;
        read(reader, &mut word, remaining, &at)?;
        if word == CONTINUATION {
            header = 8;
            read(reader, &mut word, remaining - 4, &at)?;
        }
        let meta = i32::from_le_bytes(word);
        if meta == 0 {
            return Ok(()); // the end-of-stream marker
        }
        let follow = remaining - header;
        let meta = u64::try_from(meta)
            .ok()
            .filter(|&m| m <= follow)
            .ok_or_else(|| {
                let hint = if pos == 0 && word_is_file_magic(&word, header) {
                    " (this looks like the Arrow IPC file format, which starts with \"ARROW1\"; \
                     send the stream format)"
                } else {
                    ""
                };
                at(format!(
                    "claims {meta} bytes of metadata; {follow} bytes follow{hint}"
                ))
            })?;
        let mut metadata = vec![0u8; meta as usize];
        reader
            .read_exact(&mut metadata)
            .map_err(|e| at(format!("cannot read its metadata: {e}")))?;
        let message = arrow_ipc::root_as_message(&metadata)
            .map_err(|e| at(format!("its metadata is not an Arrow IPC message: {e}")))?;
        let body = message.bodyLength();
        let follow = follow - meta;
        let body = u64::try_from(body)
            .ok()
            .filter(|&b| b <= follow)
            .ok_or_else(|| {
                at(format!(
                    "claims a body of {body} bytes; {follow} bytes follow"
                ))
            })?;
        reader
            .seek(SeekFrom::Current(body as i64))
            .map_err(|e| at(format!("cannot skip its body: {e}")))?;
        pos += header + meta + body;
    }
    Ok(())
}

/// Reads `buf.len()` bytes when at least that many of the stream's `remaining` are left.
fn read(
    reader: &mut impl Read,
    buf: &mut [u8],
    remaining: u64,
    at: &impl Fn(String) -> String,
) -> Result<(), String> {
    if remaining < buf.len() as u64 {
        return Err(at(format!(
            "{remaining} stray bytes where a message length of 4 bytes was expected"
        )));
    }
    reader
        .read_exact(buf)
        .map_err(|e| at(format!("cannot read its length: {e}")))
}

/// Whether the first word of a stream is the start of `ARROW1`, the file format's magic.
fn word_is_file_magic(word: &[u8; 4], header: u64) -> bool {
    header == 4 && word == b"ARRO"
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};

    use super::*;

    fn stream() -> Vec<u8> {
        let batch =
            RecordBatch::try_from_iter([("k", Arc::new(Int64Array::from(vec![1, 2, 3])) as _)])
                .unwrap();
        let mut out = Vec::new();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        drop(w);
        out
    }

    /// Byte offset of the second message (the record batch) and of its metadata.
    fn batch_message(bytes: &[u8]) -> (usize, usize) {
        let meta = i32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
        let second = 8 + meta;
        (second, second + 8)
    }

    #[test]
    fn a_valid_stream_decodes() {
        let batches = decode_stream(&stream()).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].num_rows(), 3);
    }

    #[test]
    fn r17_a_batch_claiming_more_rows_than_its_bytes_hold_is_refused() {
        // Found by the kafka_message fuzz target: a batch without columns may claim
        // 2^56 rows; the Kafka decoder then built a per-row mask of that size.
        let schema = Arc::new(arrow_schema::Schema::empty());
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(1 << 56));
        let batch = RecordBatch::try_new_with_options(schema.clone(), vec![], &options).unwrap();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema).unwrap();
        w.write(&batch).unwrap();
        let bytes = w.into_inner().unwrap();
        let e = decode_stream(&bytes).unwrap_err();
        assert!(
            e.contains("record batch 0: claims 72057594037927936 rows"),
            "{e}"
        );
        // A batch of as many rows as its bytes can hold is fine.
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(3));
        let small = RecordBatch::try_new_with_options(schema.clone(), vec![], &options).unwrap();
        let mut w = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema).unwrap();
        w.write(&small).unwrap();
        assert_eq!(
            decode_stream(&w.into_inner().unwrap()).unwrap()[0].num_rows(),
            3
        );
    }

    #[test]
    fn r17_a_body_length_beyond_the_bytes_is_refused_before_allocating() {
        let mut bytes = stream();
        let (second, meta_at) = batch_message(&bytes);
        let meta_len = i32::from_le_bytes(bytes[second + 4..second + 8].try_into().unwrap());
        // Find the body length (an i64 of the flatbuffer) by its value and claim 2^44.
        let body = arrow_ipc::root_as_message(&bytes[meta_at..meta_at + meta_len as usize])
            .unwrap()
            .bodyLength();
        // The first 8-byte window holding that value that is the body length (a buffer
        // length may hold the same value).
        let meta_range = meta_at..meta_at + meta_len as usize;
        let found = (0..meta_len as usize - 8).find(|&at| {
            let mut trial = bytes.clone();
            let w = &mut trial[meta_range.clone()][at..at + 8];
            if i64::from_le_bytes((&*w).try_into().unwrap()) != body {
                return false;
            }
            w.copy_from_slice(&(1i64 << 44).to_le_bytes());
            arrow_ipc::root_as_message(&trial[meta_range.clone()])
                .is_ok_and(|m| m.bodyLength() == 1 << 44)
        });
        let at = found.expect("the body length is in the metadata");
        bytes[meta_range][at..at + 8].copy_from_slice(&(1i64 << 44).to_le_bytes());
        let e = decode_stream(&bytes).unwrap_err();
        assert!(
            e.contains("message 1") && e.contains("claims a body of 17592186044416 bytes"),
            "{e}"
        );
    }

    #[test]
    fn r17_a_metadata_length_beyond_the_bytes_is_refused() {
        let mut bytes = stream();
        bytes[4..8].copy_from_slice(&(2_000_000_000i32).to_le_bytes());
        let e = decode_stream(&bytes).unwrap_err();
        assert!(
            e.contains("message 0 at byte 0: claims 2000000000 bytes of metadata"),
            "{e}"
        );
    }

    #[test]
    fn r17_garbage_json_and_the_file_format_are_refused_with_a_reason() {
        let e = decode_stream(b"\x01\x02\x03\x04\x05\x06\x07\x08").unwrap_err();
        assert!(e.contains("bytes of metadata"), "{e}");
        let e = decode_stream(br#"{"card": 1, "ts": 2}"#).unwrap_err();
        assert!(e.contains("bytes of metadata"), "{e}");
        let mut file = Vec::new();
        let batch =
            RecordBatch::try_from_iter([("k", Arc::new(Int64Array::from(vec![1])) as _)]).unwrap();
        let mut w = arrow_ipc::writer::FileWriter::try_new(&mut file, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        drop(w);
        let e = decode_stream(&file).unwrap_err();
        assert!(e.contains("Arrow IPC file format"), "{e}");
        assert!(
            decode_stream(&[0xff, 0xff])
                .unwrap_err()
                .contains("stray bytes")
        );
    }

    fn file() -> Vec<u8> {
        let batch =
            RecordBatch::try_from_iter([("k", Arc::new(Int64Array::from(vec![1, 2])) as _)])
                .unwrap();
        let mut out = Vec::new();
        let mut w = arrow_ipc::writer::FileWriter::try_new(&mut out, &batch.schema()).unwrap();
        w.write(&batch).unwrap();
        w.finish().unwrap();
        drop(w);
        out
    }

    fn decode_file(bytes: &[u8]) -> Result<Vec<RecordBatch>, String> {
        read_file(std::io::Cursor::new(bytes), bytes.len() as u64).map(|(_, b)| b)
    }

    #[test]
    fn r17_ipc_files_with_lengths_beyond_the_file_are_refused() {
        let good = file();
        assert_eq!(decode_file(&good).unwrap()[0].num_rows(), 2);
        let n = good.len();
        let mut huge_footer = good.clone();
        huge_footer[n - 10..n - 6].copy_from_slice(&i32::MAX.to_le_bytes());
        let e = decode_file(&huge_footer).unwrap_err();
        assert!(e.contains("footer claims 2147483647 bytes"), "{e}");
        assert!(decode_file(&good[..n - 1]).unwrap_err().contains("ARROW1"));
        assert!(decode_file(b"ARROW1").unwrap_err().contains("shorter"));
        // Every single-byte mutation and truncation is an error or a valid decode.
        for i in 0..n {
            for v in [0x00, 0x7f, 0xff, good[i] ^ 0x01] {
                let mut bytes = good.clone();
                bytes[i] = v;
                let _ = decode_file(&bytes);
            }
        }
        for k in 0..n {
            let _ = decode_file(&good[..k]);
        }
    }

    #[test]
    fn r17_every_single_byte_mutation_is_an_error_or_a_valid_decode() {
        // The random search that found the crash, made exhaustive for one stream: no
        // mutation of any byte may abort or panic.
        let good = stream();
        for i in 0..good.len() {
            for v in [0x00, 0x7f, 0x80, 0xff, good[i] ^ 0x01, good[i] ^ 0x40] {
                let mut bytes = good.clone();
                bytes[i] = v;
                let _ = decode_stream(&bytes);
            }
        }
        // Truncations too.
        for n in 0..good.len() {
            let _ = decode_stream(&good[..n]);
        }
    }
}
