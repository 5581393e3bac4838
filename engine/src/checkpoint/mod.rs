//! Checkpoints: the state of one view, its watermark, its counters and the source
//! positions that state covers, in one self-checking file.
//!
//! # File format (version 8)
//! All integers little-endian. A file is
//!
//! ```text
//! magic    8 bytes  "PANESCKP"
//! version  u32      8
//! length   u64      the image's length, inflated
//! image    zstd     one zstd frame of the body (below)
//! crc32    u32      CRC-32 (IEEE) of every byte before it, magic included
//! end      8 bytes  "PANESEND"
//! ```
//!
//! Versions 1 to 7 have the body itself in place of length and image. The body, in
//! order: the view name (`str` = u32 length + UTF-8); the definition fingerprint (u64,
//! FNV-1a of the view's definition as TOML); from version 7 the state's layout
//! fingerprint (u64) and the definition (str), so that a definition whose state has
//! the same layout restores; the creation time (i64, epoch ms); the source positions
//! (u32 count, then per partition i32 partition + i64 next offset); the watermark
//! inputs `max_ts` and `folded_max_ts` (u8 present + i64 each); events folded (u64);
//! the counters (accepted, late, five rejection reasons in the order of
//! `RejectReason::ALL`, null values, NaN values, expired: u64 each; version 1 has four
//! reasons, without `key_limit`; from version 4 filtered and expression errors); the
//! key index (u32 shard count + u32 next slot per shard; integer keys: u32 count +
//! (i64 key, u32 id) each; unsigned keys above `i64::MAX`: the same with u64; string
//! keys: u32 count + (str, u32 id) each); the per-key latest event time (u64 count +
//! i64 each); the pane state (u32 level images, shard-major, each u64 slots + u64
//! count + f64 ring cells + u64 count + f64 base cells); from version 3 the value
//! columns' kinds and string values; from version 5 composite keys; from version 6 the
//! count and session windows' state (u64 count + u64 words). An image may not announce
//! more than 65 536 times its frame's length (no zstd frame inflates further), and
//! inflating allocates only what actually inflates.
//!
//! A checkpoint is written to a temporary file, fsynced, renamed into place and the
//! directory fsynced: a crash leaves either the old set of files or the new one.
//! Restoring reads the newest file and falls back to older ones when a file is
//! truncated, fails its checksum, or does not match the view's definition; each
//! skipped file is reported with the reason.

pub(crate) mod format;
#[cfg(feature = "cloud")]
mod remote;
mod store;

use std::path::PathBuf;

pub use format::FORMAT_VERSION;
pub(crate) use format::{decode, encode};
pub use store::{CheckpointDir, CheckpointRoot, Listed};

/// Where a source stood when a checkpoint was taken: the next offset to read from
/// each partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourcePosition {
    /// Partition number.
    pub partition: i32,
    /// Offset of the first message the checkpoint does not contain.
    pub next_offset: i64,
}

/// What a restored checkpoint says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// The file restored.
    pub path: Option<PathBuf>,
    /// When it was written, epoch ms.
    pub created_ms: i64,
    /// The source positions it covers.
    pub positions: Vec<SourcePosition>,
    /// Events folded into the state it holds.
    pub folded: u64,
    /// Set when the checkpoint was written for another definition of the view whose
    /// state has the same layout (features added or removed whose state it holds):
    /// what changed. The state was kept.
    pub definition_change: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};

    use super::*;
    use crate::{Engine, EngineOptions, FeatureFile};

    const FILE: &str = r#"
[[views]]
name = "cards"
key = "card"
time = "ts"
allowed_lateness = "5s"
[[views.features]]
name = "n"
agg = "count"
window = "lifetime"
[[views.features]]
name = "amount_mean_1m"
agg = "mean"
column = "amount"
window = "1m"
hop = "10s"
[[views.features]]
name = "amount_last"
agg = "last"
column = "amount"
window = "lifetime"
"#;

    fn engine() -> Engine {
        let file = FeatureFile::parse(FILE, "test").unwrap();
        let options = EngineOptions {
            batch_rows: 64,
            ..EngineOptions::default()
        };
        Engine::new(&file, options).unwrap()
    }

    fn batch(from: i64, n: i64) -> RecordBatch {
        let keys: Vec<String> = (from..from + n).map(|i| format!("c{}", i % 37)).collect();
        RecordBatch::try_from_iter([
            ("card", Arc::new(StringArray::from(keys)) as _),
            (
                "ts",
                Arc::new(Int64Array::from_iter_values(
                    (from..from + n).map(|i| i * 97 - (i % 5) * 1_500),
                )) as _,
            ),
            (
                "amount",
                Arc::new(Float64Array::from_iter_values(
                    (from..from + n).map(|i| (i % 13) as f64 * 1.5),
                )) as _,
            ),
        ])
        .unwrap()
    }

    fn read(e: &Engine) -> Vec<f64> {
        let keys = StringArray::from_iter_values((0..40).map(|i| format!("c{i}")));
        let f = e.read("cards", &keys, Some(2_000_000), None).unwrap();
        f.values.iter().copied().collect()
    }

    fn same(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    #[test]
    fn restore_then_replay_equals_the_uninterrupted_run() {
        let whole = engine();
        whole.push("cards", &batch(0, 5_000)).unwrap();
        whole.push("cards", &batch(5_000, 5_000)).unwrap();

        let first = engine();
        first.push("cards", &batch(0, 5_000)).unwrap();
        let bytes = first
            .checkpoint(
                "cards",
                &[SourcePosition {
                    partition: 3,
                    next_offset: 5_000,
                }],
            )
            .unwrap();
        let second = engine();
        let info = second.restore("cards", &bytes).unwrap();
        assert_eq!(info.positions[0].next_offset, 5_000);
        assert_eq!(info.folded, first.metrics("cards").unwrap().folded);
        assert!(first.metrics("cards").unwrap().counters.late > 0);
        second.push("cards", &batch(5_000, 5_000)).unwrap();
        assert!(same(&read(&whole), &read(&second)));
        assert_eq!(
            whole.metrics("cards").unwrap().counters,
            second.metrics("cards").unwrap().counters
        );
        // The same state always encodes to the same bytes (apart from the time stamp).
        let again = second.checkpoint("cards", &[]).unwrap();
        let third = engine();
        third.restore("cards", &again).unwrap();
        assert!(same(&read(&third), &read(&whole)));
    }

    /// The image a checkpoint of the current version holds, inflated.
    fn image(sealed: &[u8]) -> Vec<u8> {
        let n = sealed.len();
        let len = u64::from_le_bytes(sealed[12..20].try_into().unwrap());
        let image = zstd::bulk::decompress(&sealed[20..n - 12], len as usize).unwrap();
        assert_eq!(image.len() as u64, len);
        image
    }

    #[test]
    fn r17_a_forged_key_id_with_a_valid_checksum_is_refused() {
        let e = engine();
        e.push("cards", &batch(0, 3_000)).unwrap();
        let sealed = e.checkpoint("cards", &[]).unwrap();
        // The id after the string key "c5" (u32 length 2, the bytes), then the image
        // sealed again: only the validation of the contents can catch it.
        let mut image = image(&sealed);
        let key = [2u8, 0, 0, 0, b'c', b'5'];
        let at = image.windows(6).position(|w| w == key).expect("key c5") + key.len();
        image[at..at + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let bytes = format::seal(&image).unwrap();
        let fresh = engine();
        let err = fresh.restore("cards", &bytes).unwrap_err().to_string();
        assert!(err.contains("key \"c5\" has id 4294967280"), "{err}");
        // The engine was left as it was, and takes that key's events.
        fresh.push("cards", &batch(0, 100)).unwrap();
        fresh.flush().unwrap();
    }

    #[test]
    fn versions_1_to_7_checkpoints_restore() {
        let e = engine();
        e.push("cards", &batch(0, 3_000)).unwrap();
        let v8 = e.checkpoint("cards", &[]).unwrap();
        let recrc = |bytes: &mut Vec<u8>| {
            let n = bytes.len();
            let crc = crc32fast::hash(&bytes[..n - 12]);
            bytes[n - 12..n - 8].copy_from_slice(&crc.to_le_bytes());
        };
        // Version 7 is version 8's image, not compressed and without its length.
        let n = v8.len();
        let image = image(&v8);
        assert!(
            image.len() > 4 * v8.len(),
            "{} from {}",
            image.len(),
            v8.len()
        );
        let mut v7 = [&v8[..8], &7u32.to_le_bytes(), &image, &v8[n - 12..]].concat();
        recrc(&mut v7);
        // Version 6 is version 7 without the layout fingerprint and the definition
        // after the fingerprint.
        let at = 8 + 4 + (4 + "cards".len()) + 8;
        let definition = u32::from_le_bytes(v7[at + 8..at + 12].try_into().unwrap()) as usize;
        let mut v6 = [
            &v7[..8],
            &6u32.to_le_bytes(),
            &v7[12..at],
            &v7[at + 12 + definition..],
        ]
        .concat();
        recrc(&mut v6);
        // Version 5 is version 6 without the event windows' words (none here: a count
        // of 0) before the checksum.
        let n = v6.len();
        let mut v5 = [
            &v6[..8],
            &5u32.to_le_bytes(),
            &v6[12..n - 20],
            &v6[n - 12..],
        ]
        .concat();
        recrc(&mut v5);
        // Version 4 is version 5 without the composite keys (none here: a count of 0)
        // before the checksum.
        let n = v5.len();
        let mut v4 = [
            &v5[..8],
            &4u32.to_le_bytes(),
            &v5[12..n - 16],
            &v5[n - 12..],
        ]
        .concat();
        recrc(&mut v4);
        // Where the counters after `accepted` and `late` start: magic, version, name,
        // fingerprint, creation time, no positions, two watermarks, folded, accepted,
        // late.
        let counters = 8 + 4 + (4 + "cards".len()) + 8 + 8 + 4 + 2 * 9 + 8 + 2 * 8;
        // Version 3 is version 4 without the `filtered` and `expr_errors` counters,
        // after the five reasons, nulls, NaNs and expired.
        let at = counters + 8 * 8;
        let mut v3 = [&v4[..8], &3u32.to_le_bytes(), &v4[12..at], &v4[at + 16..]].concat();
        recrc(&mut v3);
        // Version 2 is version 3 without the string values (the kinds of the value
        // columns and no strings) before the checksum.
        let columns = e.compiled("cards").unwrap().decoded.len();
        let tail = v3.len() - 12 - (4 + 4 * columns + 4);
        let mut v2 = [
            &v3[..8],
            &2u32.to_le_bytes(),
            &v3[12..tail],
            &v3[v3.len() - 12..],
        ]
        .concat();
        recrc(&mut v2);
        // Version 1 is version 2 without the fifth rejection counter.
        let at = counters + 4 * 8;
        let mut v1 = [&v2[..8], &1u32.to_le_bytes(), &v2[12..at], &v2[at + 8..]].concat();
        recrc(&mut v1);
        for old in [v1, v2, v3, v4, v5, v6.clone(), v7.clone()] {
            let restored = engine();
            restored.restore("cards", &old).unwrap();
            assert!(same(&read(&restored), &read(&e)));
            assert_eq!(
                restored.metrics("cards").unwrap().counters,
                e.metrics("cards").unwrap().counters
            );
        }
        let mut v9 = v8.clone();
        v9[8..12].copy_from_slice(&9u32.to_le_bytes());
        recrc(&mut v9);
        let err = engine().restore("cards", &v9).unwrap_err().to_string();
        assert!(
            err.contains("format version 9; this build reads versions 1 to 8"),
            "{err}"
        );
        // An image announcing more than its frame can hold is refused before inflating,
        // and one that inflates to another length than announced is refused too.
        for (len, why) in [
            (u64::MAX, "at most 65536 times larger"),
            (image.len() as u64 + 1, "inflates to"),
        ] {
            let mut bad = v8.clone();
            bad[12..20].copy_from_slice(&len.to_le_bytes());
            recrc(&mut bad);
            let err = engine().restore("cards", &bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn r17_a_stray_checkpoint_numbered_u64_max_is_reported_not_wrapped() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointDir::new(dir.path(), 3);
        store.write(b"one").unwrap();
        let stray = dir.path().join(format!("ckpt-{}.panes", u64::MAX));
        std::fs::write(&stray, b"stray").unwrap();
        let e = store.write(b"two").unwrap_err().to_string();
        assert!(e.contains("largest there is"), "{e}");
        assert_eq!(store.list().unwrap().len(), 2, "nothing pruned");
    }

    #[test]
    fn r17_temporary_files_of_interrupted_writes_are_removed_on_restore() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointDir::new(dir.path(), 3);
        let stale = dir.path().join(".ckpt-00000000000000000007.panes.4242.tmp");
        std::fs::write(&stale, b"half a checkpoint").unwrap();
        let restored = store
            .restore_newest(|_| Ok::<_, String>(()), |_, _| {})
            .unwrap();
        assert!(restored.is_none());
        assert!(!stale.exists());
    }

    #[test]
    fn corrupt_checkpoints_are_detected_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointDir::new(dir.path(), 3);
        let e = engine();
        e.push("cards", &batch(0, 3_000)).unwrap();
        let older = e.checkpoint("cards", &[]).unwrap();
        let older_folded = e.metrics("cards").unwrap().folded;
        store.write(&older).unwrap();
        e.push("cards", &batch(3_000, 3_000)).unwrap();
        let newer = e.checkpoint("cards", &[]).unwrap();

        let mut truncated = newer.clone();
        truncated.truncate(newer.len() / 2);
        let mut flipped = newer.clone();
        let i = newer.len() / 3;
        flipped[i] ^= 0x10;
        let other_view = newer.clone();
        for (bad, want) in [
            (truncated, "truncated"),
            (flipped, "checksum mismatch"),
            (b"PANESCKP".to_vec(), "too short"),
        ] {
            let path = store.write(&bad).unwrap();
            let mut skipped = Vec::new();
            let fresh = engine();
            let (info, used) = store
                .restore_newest(
                    |b| fresh.restore("cards", b).map_err(|e| e.to_string()),
                    |p, why| skipped.push((p.to_string(), why.to_string())),
                )
                .unwrap()
                .expect("the older checkpoint is used");
            assert_eq!(skipped.len(), 1, "{skipped:?}");
            assert_eq!(skipped[0].0, path);
            assert!(skipped[0].1.contains(want), "{want}: {}", skipped[0].1);
            assert_ne!(used, path);
            assert_eq!(info.folded, older_folded);
            std::fs::remove_file(&path).unwrap();
        }
        // A checkpoint of another definition is refused with the reason.
        let file = FeatureFile::parse(&FILE.replace("\"5s\"", "\"6s\""), "test").unwrap();
        let changed = Engine::new(&file, EngineOptions::default()).unwrap();
        let err = changed
            .restore("cards", &other_view)
            .unwrap_err()
            .to_string();
        assert!(err.contains("different definition"), "{err}");
    }

    #[test]
    fn a_restored_view_keeps_the_engine_s_read_copy_setting() {
        let file = FeatureFile::parse(FILE, "test").unwrap();
        let engine_with = |read_copy| {
            let options = EngineOptions {
                batch_rows: 64,
                read_copy,
                ..EngineOptions::default()
            };
            Engine::new(&file, options).unwrap()
        };
        let state_bytes = |e: &Engine| e.metrics("cards").unwrap().state_bytes;
        let first = engine();
        first.push("cards", &batch(0, 5_000)).unwrap();
        let bytes = first.checkpoint("cards", &[]).unwrap();
        let uninterrupted = engine_with(false);
        uninterrupted.push("cards", &batch(0, 10_000)).unwrap();
        let (without, with) = (engine_with(false), engine_with(true));
        for e in [&without, &with] {
            e.restore("cards", &bytes).unwrap();
            e.push("cards", &batch(5_000, 5_000)).unwrap();
            assert!(same(&read(e), &read(&uninterrupted)));
        }
        assert_eq!(state_bytes(&without), state_bytes(&uninterrupted));
        assert!(state_bytes(&with) > state_bytes(&without));
    }

    #[test]
    fn only_the_newest_few_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointDir::new(dir.path(), 3);
        let e = engine();
        for i in 0..5 {
            e.push("cards", &batch(i * 100, 100)).unwrap();
            store.write(&e.checkpoint("cards", &[]).unwrap()).unwrap();
        }
        let seqs: Vec<u64> = store.list().unwrap().into_iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![5, 4, 3]);
    }

    /// `FILE` with `extra` features (TOML) after its own, and without the features
    /// named in `drop`.
    fn engine_with(extra: &str, drop: &[&str]) -> Engine {
        let mut file = FeatureFile::parse(&format!("{FILE}{extra}"), "test").unwrap();
        file.views[0]
            .features
            .retain(|f| !drop.contains(&f.name.as_str()));
        let options = EngineOptions {
            batch_rows: 64,
            ..EngineOptions::default()
        };
        Engine::new(&file, options).unwrap()
    }

    /// Values of `features` for 40 keys (row-major).
    fn read_features(e: &Engine, features: &[&str]) -> Vec<f64> {
        let keys = StringArray::from_iter_values((0..40).map(|i| format!("c{i}")));
        let f = e
            .read("cards", &keys, Some(2_000_000), Some(features))
            .unwrap();
        f.values.iter().copied().collect()
    }

    const ADDED: &str = r#"
[[views.features]]
name = "amount_sum_1m"
agg = "sum"
column = "amount"
window = "1m"
hop = "10s"
[[views.features]]
name = "n_30s"
agg = "count"
window = "30s"
hop = "10s"
"#;

    #[test]
    fn r23_features_whose_state_the_checkpoint_holds_can_be_added_and_removed() {
        let old = engine();
        old.push("cards", &batch(0, 3_000)).unwrap();
        let bytes = old.checkpoint("cards", &[]).unwrap();
        let kept = ["n", "amount_mean_1m", "amount_last"];
        // Added: a sum and a count over the hop the mean already keeps.
        let added = engine_with(ADDED, &[]);
        let info = added.restore("cards", &bytes).unwrap();
        let change = info.definition_change.expect("a definition change");
        assert!(change.contains("\"amount_sum_1m\", \"n_30s\""), "{change}");
        added.push("cards", &batch(3_000, 3_000)).unwrap();
        old.push("cards", &batch(3_000, 3_000)).unwrap();
        assert!(same(
            &read_features(&added, &kept),
            &read_features(&old, &kept)
        ));
        // The new features are exact too: their state was in the checkpoint.
        let whole = engine_with(ADDED, &[]);
        whole.push("cards", &batch(0, 6_000)).unwrap();
        let new = ["amount_sum_1m", "n_30s"];
        assert!(same(
            &read_features(&added, &new),
            &read_features(&whole, &new)
        ));
        // Removed again, from the new checkpoint: the state goes back to the old
        // definition's.
        let back = engine();
        let info = back
            .restore("cards", &added.checkpoint("cards", &[]).unwrap())
            .unwrap();
        assert!(info.definition_change.is_some());
        assert!(same(
            &read_features(&back, &kept),
            &read_features(&old, &kept)
        ));
    }

    #[test]
    fn r23_a_definition_change_the_state_cannot_follow_says_why() {
        let old = engine();
        old.push("cards", &batch(0, 1_000)).unwrap();
        let bytes = old.checkpoint("cards", &[]).unwrap();
        let refused = |e: Engine| e.restore("cards", &bytes).unwrap_err().to_string();
        let max = r#"
[[views.features]]
name = "amount_max_1h"
agg = "max"
column = "amount"
window = "1h"
hop = "5m"
"#;
        let err = refused(engine_with(max, &[]));
        assert!(
            err.contains("feature \"amount_max_1h\" needs state the checkpoint does not hold")
                && err.contains("replay"),
            "{err}"
        );
        let err = refused(engine_with("", &["amount_mean_1m"]));
        assert!(
            err.contains("removing feature \"amount_mean_1m\" removes state"),
            "{err}"
        );
        let file = FeatureFile::parse(&FILE.replace("\"5s\"", "\"6s\""), "test").unwrap();
        let err = refused(Engine::new(&file, EngineOptions::default()).unwrap());
        assert!(
            err.contains("allowed lateness changed from 5000 ms to 6000 ms"),
            "{err}"
        );
    }
}
