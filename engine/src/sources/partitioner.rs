//! Kafka's default partitioner: which partition an entity key's messages go to, so
//! that a read finds the partition (and the instance) that holds the key.

use crate::ingest::keys::KeyValue;

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`), which its default
/// partitioner and librdkafka's `murmur2_random` use.
pub fn murmur2(data: &[u8]) -> u32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}

/// The partition Kafka's default partitioner puts a message with key bytes `key` in.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

/// The message-key bytes of an entity key: a string's UTF-8, an integer's decimal text;
/// a composite key's parts as a compact JSON array (`["c1",42]`: no spaces, strings as
/// JSON strings with non-ASCII characters as they are, as Python's
/// `json.dumps(parts, separators=(",", ":"), ensure_ascii=False)` writes them).
pub fn key_bytes(key: &KeyValue) -> Vec<u8> {
    match key {
        KeyValue::Str(s) => s.as_bytes().to_vec(),
        KeyValue::Int(i) => i.to_string().into_bytes(),
        KeyValue::Tuple(parts) => {
            let mut out = vec![b'['];
            for (n, p) in parts.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                match p {
                    KeyValue::Str(s) => out.extend(
                        serde_json::to_string(s)
                            .expect("a string serializes")
                            .bytes(),
                    ),
                    other => out.extend(key_bytes(other)),
                }
            }
            out.push(b']');
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Expected values from Kafka's own `UtilsTest.testMurmur2`.
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, want) in cases {
            assert_eq!(
                murmur2(data) as i32,
                want,
                "{:?}",
                std::str::from_utf8(data)
            );
        }
    }

    #[test]
    fn partitions_are_in_range() {
        for i in 0..1000 {
            let p = partition_for(format!("card-{i}").as_bytes(), 6);
            assert!((0..6).contains(&p));
        }
        assert_eq!(key_bytes(&KeyValue::Int(-42)), b"-42");
        let tuple = KeyValue::Tuple(vec![
            KeyValue::Str("caf\u{e9} \"1\"\n".into()),
            KeyValue::Int(42),
        ]);
        assert_eq!(
            String::from_utf8(key_bytes(&tuple)).unwrap(),
            "[\"caf\u{e9} \\\"1\\\"\\n\",42]"
        );
    }
}
