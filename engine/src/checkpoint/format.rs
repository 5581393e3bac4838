//! The checkpoint file format (see the module docs of [`crate::checkpoint`]): encoding a
//! view's core, and decoding it with every length checked against the bytes present.

use std::time::{SystemTime, UNIX_EPOCH};

use panes_kernels::{EventState, LevelImage, PaneState};

use super::{CheckpointInfo, SourcePosition};
use crate::error::Result;
use crate::ingest::ViewCore;
use crate::ingest::keys::{KeyImage, KeyIndex};
use crate::ingest::strings::StringValues;
use crate::spec::{CompiledView, FeatureFile};

const MAGIC: &[u8; 8] = b"PANESCKP";
const END: &[u8; 8] = b"PANESEND";
/// The format version this build writes. Versions 1 (four rejection counters, before
/// `key_limit`), 2, 3 (string values), 4 (filter counters), 5 (composite keys) and 6
/// (the count and session windows' state) are read too; 7 adds the state's layout
/// fingerprint and the view's definition, so that a definition change that keeps the
/// layout keeps the state, and one that does not is explained; 8 stores what follows
/// the version as one zstd frame (its inflated length first): pane rings are mostly
/// empty cells, and a checkpoint is written whole to its store on every interval.
pub const FORMAT_VERSION: u32 = 8;

/// The zstd level of checkpoint images: level 1 compresses at memory speed and
/// already shrinks empty cells to next to nothing.
const ZSTD_LEVEL: i32 = 1;

/// No zstd frame inflates by more than this factor (a 128 KiB block is at least a
/// few bytes), so a longer inflated length is refused before anything is inflated.
const MAX_INFLATION: u64 = 65_536;

/// The view's definition as TOML, without its source and key limit (which may change
/// between runs).
fn definition(view: &CompiledView) -> String {
    let mut spec = view.spec.clone();
    spec.source = None;
    spec.max_keys = None;
    FeatureFile {
        views: vec![spec],
        services: Vec::new(),
        sinks: Vec::new(),
    }
    .to_toml()
}

/// FNV-1a over the view's definition: a checkpoint of the same definition restores.
fn fingerprint(view: &CompiledView) -> u64 {
    crate::ingest::keys::fnv1a(definition(view).as_bytes())
}

/// FNV-1a over what the state's bytes mean: the key, time, lateness, derived columns
/// and filters, the decoded and state columns, every hop level (ring length, the
/// fields of each column, lifetime) and the count and session windows. Two
/// definitions with the same layout (features added or removed whose state the other
/// already holds, renamed, reordered) read the same state the same way; the features
/// are computed from it at read time.
fn layout(view: &CompiledView) -> u64 {
    let s = &view.spec;
    let filters: Vec<(&str, &str)> = s
        .features
        .iter()
        .filter_map(|f| Some((f.name.as_str(), f.filter.as_deref()?)))
        .collect();
    let mut state = view.state.clone();
    state.shards = 0;
    let text = format!(
        "{:?}|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        s.key,
        s.time,
        s.allowed_lateness,
        s.columns,
        s.filter,
        filters,
        view.columns,
        view.decoded,
        view.sources,
        state,
        view.events
    );
    crate::ingest::keys::fnv1a(text.as_bytes())
}

/// Why a checkpoint of the definition `old` (TOML; `None` before format 7) cannot be
/// restored into `view`: the first differences found, in words.
fn why_not(view: &CompiledView, old: Option<&str>, version: u32) -> String {
    let name = &view.spec.name;
    let head = format!("written for a different definition of view {name:?}");
    let tail = "the state cannot be kept: a replay from the source rebuilds it (or restore with the old definition)";
    let Some(old) = old else {
        return format!(
            "{head} (its features, key, time, panes or lateness changed); a checkpoint of format {version} does not record its definition, so {tail}"
        );
    };
    let old = match FeatureFile::parse(old, "checkpoint").map(|f| f.views.into_iter().next()) {
        Ok(Some(v)) => v,
        _ => return format!("{head} (its recorded definition does not parse here); {tail}"),
    };
    let new = &view.spec;
    let compile = |spec: &crate::spec::ViewSpec| layout(&CompiledView::new(spec, 1));
    let mut reasons = Vec::new();
    let mut differs = |what: &str, a: String, b: String| {
        if a != b {
            reasons.push(format!("its {what} changed from {a} to {b}"));
        }
    };
    differs("key", format!("{:?}", old.key), format!("{:?}", new.key));
    differs(
        "time column",
        format!("{:?}", old.time),
        format!("{:?}", new.time),
    );
    differs(
        "allowed lateness",
        format!("{} ms", old.allowed_lateness),
        format!("{} ms", new.allowed_lateness),
    );
    differs(
        "filter",
        format!("{:?}", old.filter),
        format!("{:?}", new.filter),
    );
    differs(
        "derived columns",
        format!("{:?}", old.columns),
        format!("{:?}", new.columns),
    );
    if reasons.is_empty() {
        let base = compile(&old);
        for f in &new.features {
            if old.features.contains(f) {
                continue;
            }
            let mut with = old.clone();
            with.features.retain(|o| o.name != f.name);
            with.features.push(f.clone());
            if compile(&with) != base {
                reasons.push(format!(
                    "feature {:?} needs state the checkpoint does not hold",
                    f.name
                ));
            }
        }
        for f in &old.features {
            if new.features.contains(f) || new.features.iter().any(|n| n.name == f.name) {
                continue;
            }
            let mut without = old.clone();
            without.features.retain(|o| o.name != f.name);
            if compile(&without) != base {
                reasons.push(format!(
                    "removing feature {:?} removes state other features do not use, which changes the state's layout",
                    f.name
                ));
            }
        }
    }
    if reasons.is_empty() {
        reasons.push("the features together need a different state layout".into());
    }
    format!("{head}: {}; {tail}", reasons.join("; "))
}

/// The features added and removed between the definition `old` and `view`'s, in words
/// (for the log of a restore across a definition change).
fn what_changed(view: &CompiledView, old: Option<&str>) -> String {
    let old = old
        .and_then(|t| FeatureFile::parse(t, "checkpoint").ok())
        .and_then(|f| f.views.into_iter().next());
    let Some(old) = old else {
        return "the definition changed".into();
    };
    let names = |v: &[crate::spec::FeatureSpec], w: &[crate::spec::FeatureSpec]| -> Vec<String> {
        v.iter()
            .filter(|f| !w.contains(f))
            .map(|f| format!("{:?}", f.name))
            .collect()
    };
    let (added, removed) = (
        names(&view.spec.features, &old.features),
        names(&old.features, &view.spec.features),
    );
    let mut parts = Vec::new();
    if !added.is_empty() {
        parts.push(format!("features added or changed: {}", added.join(", ")));
    }
    if !removed.is_empty() {
        parts.push(format!(
            "features removed or changed: {}",
            removed.join(", ")
        ));
    }
    if parts.is_empty() {
        parts.push("the features were reordered or their read settings changed".into());
    }
    parts.join("; ")
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
    fn u64s(&mut self, v: &[u64]) {
        self.u64(v.len() as u64);
        self.0.reserve(v.len() * 8);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
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
    fn u64s(&mut self) -> Parse<Vec<u64>> {
        let n = self.count(true, 8)?;
        Ok(self
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
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
    encode_at(view, core, positions, now_ms())
}

/// [`encode`], stamped with `created_ms` as the checkpoint's creation time.
pub(crate) fn encode_at(
    view: &CompiledView,
    core: &ViewCore,
    positions: &[SourcePosition],
    created_ms: i64,
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
    o.str(&view.spec.name);
    o.u64(fingerprint(view));
    // Version 7: the state's layout and the definition.
    o.u64(layout(view));
    o.str(&definition(view));
    o.i64(created_ms);
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
        c.filtered,
        c.expr_errors,
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
    // Version 3: the string values and each value column's kind.
    let kinds = core.strings.kinds();
    o.len(kinds.len());
    for k in kinds {
        o.u32(k.map_or(0, |text| 1 + u32::from(text)));
    }
    o.len(core.strings.len());
    core.strings.values().iter().for_each(|v| o.str(v));
    // Version 5: composite keys, encoded.
    o.len(keys.tuples.len());
    for (k, id) in &keys.tuples {
        o.len(k.len());
        o.0.extend_from_slice(k);
        o.u32(*id);
    }
    // Version 6: count and session windows.
    o.u64s(&core.events.export());
    seal(&o.0).map_err(|e| {
        crate::error::PanesError::Internal(format!(
            "view {:?}: cannot compress the checkpoint: {e}",
            view.spec.name
        ))
    })
}

/// A checkpoint file of the current version around `image` (what follows the version
/// in versions 1 to 7): its length, the image as one zstd frame, the checksum.
pub(crate) fn seal(image: &[u8]) -> std::io::Result<Vec<u8>> {
    let frame = zstd::bulk::compress(image, ZSTD_LEVEL)?;
    let mut out = Out(Vec::with_capacity(frame.len() + 40));
    out.0.extend_from_slice(MAGIC);
    out.u32(FORMAT_VERSION);
    out.u64(image.len() as u64);
    out.0.extend_from_slice(&frame);
    let crc = crc32fast::hash(&out.0);
    out.u32(crc);
    out.0.extend_from_slice(END);
    Ok(out.0)
}

/// The image a checkpoint of format 8 or later holds after its version: `frame`
/// inflated, which must give exactly `len` bytes.
fn inflate(frame: &[u8], len: u64) -> Parse<Vec<u8>> {
    use std::io::Read;
    if len > (frame.len() as u64).saturating_mul(MAX_INFLATION) {
        return Err(format!(
            "an image of {len} bytes announced in a frame of {} bytes (at most {MAX_INFLATION} times larger)",
            frame.len()
        ));
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(frame)
        .map_err(|e| format!("cannot start inflating the image: {e}"))?;
    // Memory grows only with what actually inflates, never to a length merely announced.
    let mut image = Vec::with_capacity(frame.len().saturating_mul(4).min(len as usize));
    decoder
        .take(len.saturating_add(1))
        .read_to_end(&mut image)
        .map_err(|e| format!("the image does not inflate: {e}"))?;
    if image.len() as u64 != len {
        return Err(format!(
            "the image inflates to {}{} bytes, {len} announced",
            image.len(),
            if image.len() as u64 > len { "+" } else { "" }
        ));
    }
    Ok(image)
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
    if !(1..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "format version {version}; this build reads versions 1 to {FORMAT_VERSION}"
        ));
    }
    let image;
    if version >= 8 {
        let len = i.u64()?;
        image = inflate(&body[i.at..], len)?;
        i = In {
            bytes: &image,
            at: 0,
        };
    }
    let name = i.str()?;
    if name != view.spec.name {
        return Err(format!(
            "written for view {name:?}, not {:?}",
            view.spec.name
        ));
    }
    let same = i.u64()? == fingerprint(view);
    let (stored_layout, old) = if version >= 7 {
        (Some(i.u64()?), Some(i.str()?))
    } else {
        (None, None)
    };
    let definition_change = if same {
        None
    } else if stored_layout == Some(layout(view)) {
        Some(what_changed(view, old))
    } else {
        return Err(why_not(view, old, version));
    };
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
    // Version 1 has no key_limit counter, the last one.
    let reasons = if version == 1 { 4 } else { c.rejected.len() };
    for r in &mut c.rejected[..reasons] {
        *r = i.u64()?;
    }
    c.null_values = i.u64()?;
    c.nan_values = i.u64()?;
    c.expired = i.u64()?;
    // Versions before 4 have no filters nor derived columns.
    if version >= 4 {
        c.filtered = i.u64()?;
        c.expr_errors = i.u64()?;
    }
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
    if version >= 3 {
        let n = i.count(false, 4)?;
        let kinds = (0..n)
            .map(|_| match i.u32()? {
                0 => Ok(None),
                k @ (1 | 2) => Ok(Some(k == 2)),
                k => Err(format!("value column kind {k}")),
            })
            .collect::<Parse<Vec<_>>>()?;
        if kinds.len() != view.decoded.len() {
            return Err(format!(
                "{} value column kinds for {} value columns",
                kinds.len(),
                view.decoded.len()
            ));
        }
        let n = i.count(false, 4)?;
        let values = (0..n)
            .map(|_| i.str().map(Into::into))
            .collect::<Parse<Vec<Box<str>>>>()?;
        core.strings = StringValues::from_parts(values, kinds)?;
    }
    if version >= 5 {
        let n = i.count(false, 8)?;
        for _ in 0..n {
            let len = i.count(false, 1)?;
            keys.tuples.push((i.take(len)?.into(), i.u32()?));
        }
    }
    // Views with count or session windows have no checkpoints before version 6 (their
    // definition could not be parsed, so the fingerprint cannot match).
    let events = if version >= 6 { i.u64s()? } else { Vec::new() };
    core.keys = KeyIndex::from_image(keys, view.state.shards).map_err(|e| e.to_string())?;
    if i.at != i.bytes.len() {
        return Err(format!(
            "{} unread bytes before the checksum",
            i.bytes.len() - i.at
        ));
    }
    core.state = PaneState::import(view.state.clone(), levels).map_err(|e| e.to_string())?;
    if version >= 6 {
        core.events =
            EventState::import(view.events.clone(), &events).map_err(|e| e.to_string())?;
    }
    let info = CheckpointInfo {
        path: None,
        created_ms,
        positions,
        folded: core.folded,
        definition_change,
    };
    Ok((core, info))
}
