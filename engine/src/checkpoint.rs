//! Checkpoints: the state of one view, its watermark, its counters and the source
//! positions that state covers, in one self-checking file.
//!
//! # File format (version 1)
//! All integers little-endian. A file is
//!
//! ```text
//! magic    8 bytes  "PANESCKP"
//! version  u32      1
//! body     (below)
//! crc32    u32      CRC-32 (IEEE) of every byte before it, magic included
//! end      8 bytes  "PANESEND"
//! ```
//!
//! and the body, in order: the view name (`str` = u32 length + UTF-8); the definition
//! fingerprint (u64, FNV-1a of the view's features as TOML: a checkpoint is never
//! restored into a view defined differently); the creation time (i64, epoch ms); the
//! source positions (u32 count, then per partition i32 partition + i64 next offset);
//! the watermark inputs `max_ts` and `folded_max_ts` (u8 present + i64 each); events
//! folded (u64); the counters (accepted, late, four rejection reasons, null values,
//! NaN values, expired: u64 each); the key index (u32 shard count + u32 next slot per
//! shard; integer keys: u32 count + (i64 key, u32 id) each; unsigned keys above
//! `i64::MAX`: the same with u64; string keys: u32 count + (str, u32 id) each); the
//! per-key latest event time (u64 count + i64 each); the pane state (u32 level images,
//! shard-major, each u64 slots + u64 count + f64 ring cells + u64 count + f64 base cells).
//!
//! A checkpoint is written to a temporary file, fsynced, renamed into place and the
//! directory fsynced: a crash leaves either the old set of files or the new one.
//! Restoring reads the newest file and falls back to older ones when a file is
//! truncated, fails its checksum, or does not match the view's definition; each
//! skipped file is reported with the reason.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use panes_kernels::{LevelImage, PaneState};

use crate::error::{PanesError, Result};
use crate::keys::{KeyImage, KeyIndex};
use crate::spec::FeatureFile;
use crate::view::{CompiledView, ViewCore};

const MAGIC: &[u8; 8] = b"PANESCKP";
const END: &[u8; 8] = b"PANESEND";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name extension of checkpoints.
const EXT: &str = "panes";

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
}

/// FNV-1a over the view's definition (without its source): what a checkpoint must
/// match to be restored.
fn fingerprint(view: &CompiledView) -> u64 {
    let mut spec = view.spec.clone();
    spec.source = None;
    crate::keys::fnv1a(FeatureFile { views: vec![spec] }.to_toml().as_bytes())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

struct Out(Vec<u8>);

impl Out {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize) {
        self.u32(n as u32);
    }
    fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt(&mut self, v: Option<i64>) {
        self.u8(v.is_some() as u8);
        self.i64(v.unwrap_or(0));
    }
    fn f64s(&mut self, v: &[f64]) {
        self.u64(v.len() as u64);
        self.0.reserve(v.len() * 8);
        for x in v {
            self.0.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
}

struct In<'a> {
    bytes: &'a [u8],
    at: usize,
}

type Parse<T> = std::result::Result<T, String>;

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Parse<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("truncated: {n} bytes expected at byte {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Parse<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    fn u8(&mut self) -> Parse<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Parse<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn i32(&mut self) -> Parse<i32> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Parse<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Parse<i64> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// A count of items of at least `min_size` bytes each, checked against the bytes left.
    fn count(&mut self, wide: bool, min_size: usize) -> Parse<usize> {
        let n = if wide {
            self.u64()?
        } else {
            self.u32()? as u64
        };
        let left = (self.bytes.len() - self.at) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(format!(
                "truncated: {n} items announced at byte {}, {left} bytes left",
                self.at
            ));
        }
        Ok(n as usize)
    }
    fn str(&mut self) -> Parse<&'a str> {
        let n = self.count(false, 1)?;
        std::str::from_utf8(self.take(n)?).map_err(|e| format!("invalid UTF-8 string: {e}"))
    }
    fn opt(&mut self) -> Parse<Option<i64>> {
        let present = self.u8()?;
        let v = self.i64()?;
        Ok((present != 0).then_some(v))
    }
    fn f64s(&mut self) -> Parse<Vec<f64>> {
        let n = self.count(true, 8)?;
        Ok(self
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| f64::from_bits(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect())
    }
}

/// Encodes a settled core (nothing pending) of `view` with the source `positions`.
pub(crate) fn encode(
    view: &CompiledView,
    core: &ViewCore,
    positions: &[SourcePosition],
) -> Result<Vec<u8>> {
    crate::error::ensure!(
        core.pending.is_empty(),
        "view {:?}: a checkpoint needs a settled view",
        view.spec.name
    );
    let levels = core.state.export()?;
    let mut o = Out(Vec::with_capacity(
        64 + levels
            .iter()
            .map(|l| 8 * (l.ring.len() + l.base.len()))
            .sum::<usize>(),
    ));
    o.0.extend_from_slice(MAGIC);
    o.u32(FORMAT_VERSION);
    o.str(&view.spec.name);
    o.u64(fingerprint(view));
    o.i64(now_ms());
    o.len(positions.len());
    for p in positions {
        o.0.extend_from_slice(&p.partition.to_le_bytes());
        o.i64(p.next_offset);
    }
    o.opt(core.max_ts);
    o.opt(core.folded_max_ts);
    o.u64(core.folded);
    let c = &core.counters;
    for v in [c.accepted, c.late].into_iter().chain(c.rejected).chain([
        c.null_values,
        c.nan_values,
        c.expired,
    ]) {
        o.u64(v);
    }
    let keys = core.keys.image();
    o.len(keys.next_local.len());
    keys.next_local.iter().for_each(|&n| o.u32(n));
    o.len(keys.ints.len());
    for &(k, id) in &keys.ints {
        o.i64(k);
        o.u32(id);
    }
    o.len(keys.big.len());
    for &(k, id) in &keys.big {
        o.u64(k);
        o.u32(id);
    }
    o.len(keys.strs.len());
    for (k, id) in &keys.strs {
        o.str(k);
        o.u32(*id);
    }
    o.u64(core.latest.len() as u64);
    core.latest.iter().for_each(|&t| o.i64(t));
    o.len(levels.len());
    for l in &levels {
        o.u64(l.slots as u64);
        o.f64s(&l.ring);
        o.f64s(&l.base);
    }
    let crc = crc32fast::hash(&o.0);
    o.u32(crc);
    o.0.extend_from_slice(END);
    Ok(o.0)
}

/// Decodes a checkpoint of `view` into a fresh core, or says what is wrong with it.
pub(crate) fn decode(view: &CompiledView, bytes: &[u8]) -> Parse<(ViewCore, CheckpointInfo)> {
    let tail = MAGIC.len() + 4;
    if bytes.len() < MAGIC.len() + 4 + tail || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a Panes checkpoint (bad magic or too short)".into());
    }
    if &bytes[bytes.len() - END.len()..] != END {
        return Err("truncated: the end marker is missing".into());
    }
    let body = &bytes[..bytes.len() - tail];
    let stored = u32::from_le_bytes(
        bytes[body.len()..body.len() + 4]
            .try_into()
            .expect("4 bytes"),
    );
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let mut i = In {
        bytes: body,
        at: MAGIC.len(),
    };
    let version = i.u32()?;
    if version != FORMAT_VERSION {
        return Err(format!(
            "format version {version}; this build reads version {FORMAT_VERSION}"
        ));
    }
    let name = i.str()?;
    if name != view.spec.name {
        return Err(format!(
            "written for view {name:?}, not {:?}",
            view.spec.name
        ));
    }
    if i.u64()? != fingerprint(view) {
        return Err(format!(
            "written for a different definition of view {name:?} (its features, key, time, panes or lateness changed)"
        ));
    }
    let created_ms = i.i64()?;
    let n = i.count(false, 12)?;
    let mut positions = Vec::with_capacity(n);
    for _ in 0..n {
        positions.push(SourcePosition {
            partition: i.i32()?,
            next_offset: i.i64()?,
        });
    }
    let mut core = ViewCore::new(view).map_err(|e| e.to_string())?;
    core.max_ts = i.opt()?;
    core.folded_max_ts = i.opt()?;
    core.folded = i.u64()?;
    let c = &mut core.counters;
    c.accepted = i.u64()?;
    c.late = i.u64()?;
    for r in &mut c.rejected {
        *r = i.u64()?;
    }
    c.null_values = i.u64()?;
    c.nan_values = i.u64()?;
    c.expired = i.u64()?;
    let mut keys = KeyImage::default();
    let n = i.count(false, 4)?;
    for _ in 0..n {
        keys.next_local.push(i.u32()?);
    }
    let n = i.count(false, 12)?;
    for _ in 0..n {
        keys.ints.push((i.i64()?, i.u32()?));
    }
    let n = i.count(false, 12)?;
    for _ in 0..n {
        keys.big.push((i.u64()?, i.u32()?));
    }
    let n = i.count(false, 8)?;
    for _ in 0..n {
        keys.strs.push((i.str()?.into(), i.u32()?));
    }
    core.keys = KeyIndex::from_image(keys, view.state.shards).map_err(|e| e.to_string())?;
    let n = i.count(true, 8)?;
    core.latest = (0..n).map(|_| i.i64()).collect::<Parse<_>>()?;
    let n = i.count(false, 24)?;
    let mut levels = Vec::with_capacity(n);
    for _ in 0..n {
        levels.push(LevelImage {
            slots: i.u64()? as usize,
            ring: i.f64s()?,
            base: i.f64s()?,
        });
    }
    if i.at != body.len() {
        return Err(format!(
            "{} unread bytes before the checksum",
            body.len() - i.at
        ));
    }
    core.state = PaneState::import(view.state.clone(), levels).map_err(|e| e.to_string())?;
    let info = CheckpointInfo {
        path: None,
        created_ms,
        positions,
        folded: core.folded,
    };
    Ok((core, info))
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// a temporary file beside it, fsynced, renamed over it, then the directory fsynced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PanesError::file(path, e)
    })
}

/// A directory of numbered checkpoints of one view (or one partition of it):
/// `ckpt-00000000000000000042.panes`, the highest number the newest.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    path: PathBuf,
    keep: usize,
}

impl CheckpointDir {
    /// The directory at `path` (created on the first write), keeping the newest `keep`
    /// checkpoints (at least 2, so that a corrupt newest one has a predecessor).
    pub fn new(path: impl Into<PathBuf>, keep: usize) -> Self {
        CheckpointDir {
            path: path.into(),
            keep: keep.max(2),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checkpoint files present, newest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = match fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PanesError::file(&self.path, e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PanesError::file(&self.path, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let seq = name
                .strip_prefix("ckpt-")
                .and_then(|s| s.strip_suffix(&format!(".{EXT}")))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(seq) = seq {
                files.push((seq, entry.path()));
            }
        }
        files.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        Ok(files)
    }

    /// Writes `bytes` as the newest checkpoint, atomically and durably, then removes
    /// all but the newest `keep`. Returns the file written.
    pub fn write(&self, bytes: &[u8]) -> Result<PathBuf> {
        let existing = self.list()?;
        let seq = existing.first().map_or(1, |(s, _)| s + 1);
        let path = self.path.join(format!("ckpt-{seq:020}.{EXT}"));
        write_atomic(&path, bytes)?;
        for (_, old) in existing.iter().skip(self.keep - 1) {
            let _ = fs::remove_file(old);
        }
        Ok(path)
    }

    /// Reads checkpoints newest first and returns the first that `restore` accepts,
    /// reporting each one skipped to `skipped` (path and reason). `None` when there is
    /// no usable checkpoint.
    pub fn restore_newest<T>(
        &self,
        mut restore: impl FnMut(&[u8]) -> std::result::Result<T, String>,
        mut skipped: impl FnMut(&Path, &str),
    ) -> Result<Option<(T, PathBuf)>> {
        for (_, path) in self.list()? {
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    skipped(&path, &format!("cannot be read: {e}"));
                    continue;
                }
            };
            match restore(&bytes) {
                Ok(t) => return Ok(Some((t, path))),
                Err(why) => skipped(&path, &why),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, RecordBatch, StringArray};

    use super::*;
    use crate::{Engine, EngineOptions};

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
                    |p, why| skipped.push((p.to_path_buf(), why.to_string())),
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
        let seqs: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(seqs, vec![5, 4, 3]);
    }
}
