//! The key index: entity key values → dense key ids, and decoding of key columns.
//!
//! Integer keys of any width and signedness match by value (an Int32 spine key finds
//! Int64 event keys); string keys match by value whatever their Arrow encoding
//! (Utf8, LargeUtf8, Utf8View, dictionary). Strings and integers never match each other.
//!
//! A composite key (`key = ["card", "merchant"]`) is a tuple of such values, held in the
//! index as a canonical byte encoding of its parts (see [`KeyValue::tuple_bytes`]), so
//! that its parts match by value as single keys do.
//!
//! Ids are spread over the state's key shards by a fixed hash of the key value, so the
//! shard of a key is the same in every run (checkpoints and scale-out rely on it).

use std::cell::RefCell;
use std::fmt;
use std::sync::Arc;

use arrow_array::StructArray;
use arrow_array::cast::AsArray;
use arrow_array::types::ArrowDictionaryKeyType;
use arrow_array::types::*;
use arrow_array::{
    Array, ArrayRef, Decimal128Array, DictionaryArray, Int64Array, StringArray, UInt64Array,
};
use arrow_buffer::{ArrowNativeType, NullBuffer};
use arrow_schema::{DataType, Field, Fields};
use hashbrown::HashMap;

use crate::error::{PanesError, Result};

/// An owned key value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyValue {
    /// An integer key.
    Int(i128),
    /// A string key.
    Str(String),
    /// A composite key: one value per key column, in the view's order.
    Tuple(Vec<KeyValue>),
}

impl fmt::Display for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyValue::Int(v) => write!(f, "{v}"),
            KeyValue::Str(s) => write!(f, "{s:?}"),
            KeyValue::Tuple(parts) => {
                write!(f, "(")?;
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{p}")?;
                }
                write!(f, ")")
            }
        }
    }
}

/// Tag of an integer part in a tuple's encoding: the tag, then the value as a
/// little-endian i128 (so every integer width matches by value).
const TAG_INT: u8 = 1;
/// Tag of a string part: the tag, the byte length as a little-endian u64, the UTF-8.
const TAG_STR: u8 = 2;

#[inline]
fn put_int(buf: &mut Vec<u8>, v: i128) {
    buf.push(TAG_INT);
    buf.extend_from_slice(&v.to_le_bytes());
}

#[inline]
fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.push(TAG_STR);
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// The parts of an encoded tuple, or `None` when the bytes are not one.
fn decode_tuple(mut bytes: &[u8]) -> Option<Vec<KeyValue>> {
    let mut parts = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        match tag {
            TAG_INT => {
                let (v, rest) = rest.split_first_chunk::<16>()?;
                parts.push(KeyValue::Int(i128::from_le_bytes(*v)));
                bytes = rest;
            }
            TAG_STR => {
                let (n, rest) = rest.split_first_chunk::<8>()?;
                let n = usize::try_from(u64::from_le_bytes(*n)).ok()?;
                if n > rest.len() {
                    return None;
                }
                let (text, rest) = rest.split_at(n);
                parts.push(KeyValue::Str(std::str::from_utf8(text).ok()?.to_string()));
                bytes = rest;
            }
            _ => return None,
        }
    }
    (!parts.is_empty()).then_some(parts)
}

impl KeyValue {
    /// The canonical encoding of a composite key's parts (the index's key): per part a
    /// tag byte, then an integer as a little-endian i128, or a string as its byte
    /// length (little-endian u64) and UTF-8 bytes. `None` when a part is a tuple.
    pub fn tuple_bytes(parts: &[KeyValue]) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        for p in parts {
            match p {
                KeyValue::Int(v) => put_int(&mut buf, *v),
                KeyValue::Str(s) => put_str(&mut buf, s),
                KeyValue::Tuple(_) => return None,
            }
        }
        Some(buf)
    }

    /// Whether the key is a string (`Some(true)`), an integer (`Some(false)`) or a tuple.
    fn is_text(&self) -> Option<bool> {
        match self {
            KeyValue::Int(_) => Some(false),
            KeyValue::Str(_) => Some(true),
            KeyValue::Tuple(_) => None,
        }
    }
}

thread_local! {
    /// Scratch space for encoding a composite key row by row.
    static TUPLE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Maps key values to ids `local * shards + shard`.
#[derive(Debug, Clone)]
pub struct KeyIndex {
    ints: HashMap<i64, u32>,
    big: HashMap<u64, u32>,
    strs: HashMap<Box<str>, u32>,
    /// Composite keys, by [`KeyValue::tuple_bytes`].
    tuples: HashMap<Box<[u8]>, u32>,
    /// Per part of the composite keys held: whether an integer, and a string, was seen.
    parts: Vec<[bool; 2]>,
    next_local: Vec<u32>,
    len: usize,
    /// The keys created since the journal was last taken, in order, when kept (see
    /// [`KeyIndex::keep_journal`]).
    journal: Option<Vec<NewKey>>,
}

/// A key created in an index, as its journal records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NewKey {
    /// A key that fits an i64.
    Int(i64),
    /// An unsigned key above `i64::MAX`.
    Big(u64),
    /// A string key.
    Str(Box<str>),
    /// A composite key, encoded.
    Tuple(Box<[u8]>),
}

/// A key index as plain lists (see [`KeyIndex::image`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct KeyImage {
    pub ints: Vec<(i64, u32)>,
    pub big: Vec<(u64, u32)>,
    pub strs: Vec<(Box<str>, u32)>,
    pub tuples: Vec<(Box<[u8]>, u32)>,
    pub next_local: Vec<u32>,
}

#[inline]
fn mix64(mut x: u64) -> u64 {
    // splitmix64 finaliser: a fixed, well-spread hash.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// FNV-1a: fixed across runs and platforms.
#[inline]
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[inline]
fn str_hash(s: &str) -> u64 {
    mix64(fnv1a(s.as_bytes()))
}

impl KeyIndex {
    /// An empty index for a state with `shards` key shards (a power of two).
    pub fn new(shards: usize) -> Self {
        KeyIndex {
            ints: HashMap::new(),
            big: HashMap::new(),
            strs: HashMap::new(),
            tuples: HashMap::new(),
            parts: Vec::new(),
            next_local: vec![0; shards],
            len: 0,
            journal: None,
        }
    }

    /// Starts (or stops) recording the keys this index creates, so that another index
    /// with the same keys can create the same ones with the same ids
    /// ([`KeyIndex::replay`]): how a view's second replica learns the keys the first one
    /// met without decoding the batches again.
    pub(crate) fn keep_journal(&mut self, keep: bool) {
        self.journal = keep.then(Vec::new);
    }

    /// The keys created since the last call, in order (empty when no journal is kept).
    pub(crate) fn take_journal(&mut self) -> Vec<NewKey> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Creates `keys` (another index's journal) in order. An index that held the same
    /// keys as that one before they were created gives each the same id.
    ///
    /// # Errors
    /// When a key is already known or an id cannot be allocated: the two indexes
    /// were not equal.
    pub(crate) fn replay(&mut self, keys: &[NewKey]) -> Result<()> {
        for key in keys {
            let before = self.len;
            match key {
                NewKey::Int(v) => self.int_id(*v)?,
                NewKey::Big(v) => self.big_id(*v)?,
                NewKey::Str(v) => self.str_id(v)?,
                NewKey::Tuple(v) => self.tuple_id(v)?,
            };
            if self.len == before {
                return Err(PanesError::Internal(format!(
                    "replaying a key journal: key {key:?} already known"
                )));
            }
        }
        Ok(())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn new_id(next_local: &mut [u32], len: &mut usize, hash: u64) -> Result<u32> {
        let shards = next_local.len();
        let shard = (hash as usize) & (shards - 1);
        let local = next_local[shard];
        let id = (local as u64) * shards as u64 + shard as u64;
        if id > u32::MAX as u64 {
            return Err(PanesError::Invalid(format!(
                "key limit reached: shard {shard} already holds {local} keys"
            )));
        }
        next_local[shard] += 1;
        *len += 1;
        Ok(id as u32)
    }

    #[inline]
    fn int_id(&mut self, v: i64) -> Result<u32> {
        if let Some(&id) = self.ints.get(&v) {
            return Ok(id);
        }
        let id = Self::new_id(&mut self.next_local, &mut self.len, mix64(v as u64))?;
        self.ints.insert(v, id);
        if let Some(j) = &mut self.journal {
            j.push(NewKey::Int(v));
        }
        Ok(id)
    }

    #[inline]
    fn big_id(&mut self, v: u64) -> Result<u32> {
        if let Some(&id) = self.big.get(&v) {
            return Ok(id);
        }
        let id = Self::new_id(&mut self.next_local, &mut self.len, mix64(v))?;
        self.big.insert(v, id);
        if let Some(j) = &mut self.journal {
            j.push(NewKey::Big(v));
        }
        Ok(id)
    }

    #[inline]
    fn str_id(&mut self, v: &str) -> Result<u32> {
        if let Some(&id) = self.strs.get(v) {
            return Ok(id);
        }
        let id = Self::new_id(&mut self.next_local, &mut self.len, str_hash(v))?;
        self.strs.insert(v.into(), id);
        if let Some(j) = &mut self.journal {
            j.push(NewKey::Str(v.into()));
        }
        Ok(id)
    }

    #[inline]
    fn tuple_id(&mut self, v: &[u8]) -> Result<u32> {
        if let Some(&id) = self.tuples.get(v) {
            return Ok(id);
        }
        let parts = decode_tuple(v)
            .ok_or_else(|| PanesError::Internal("a composite key that does not decode".into()))?;
        if !self.parts.is_empty() && self.parts.len() != parts.len() {
            return Err(PanesError::Invalid(format!(
                "a composite key of {} parts in an index of keys of {}",
                parts.len(),
                self.parts.len()
            )));
        }
        let id = Self::new_id(&mut self.next_local, &mut self.len, mix64(fnv1a(v)))?;
        self.note_parts(&parts);
        self.tuples.insert(v.into(), id);
        if let Some(j) = &mut self.journal {
            j.push(NewKey::Tuple(v.into()));
        }
        Ok(id)
    }

    /// Records the kinds of a new composite key's parts.
    fn note_parts(&mut self, parts: &[KeyValue]) {
        self.parts.resize(parts.len(), [false; 2]);
        for (seen, p) in self.parts.iter_mut().zip(parts) {
            if let Some(text) = p.is_text() {
                seen[usize::from(text)] = true;
            }
        }
    }

    /// Checks that keys of a read can match this index: string keys against a view
    /// whose keys are all integers (or the reverse), part by part for composite keys,
    /// or tuples of another length, are a mistake, not a miss. `kinds` says per key
    /// part whether the keys given are strings.
    pub(crate) fn check_kind(&self, view: &str, kinds: &[bool], given: &DataType) -> Result<()> {
        let held: Vec<[bool; 2]> = if self.tuples.is_empty() {
            let has_ints = !self.ints.is_empty() || !self.big.is_empty();
            vec![[has_ints, !self.strs.is_empty()]]
        } else {
            self.parts.clone()
        };
        if self.len == 0 {
            return Ok(());
        }
        if held.len() != kinds.len() {
            return Err(PanesError::Invalid(format!(
                "view {view:?} has keys of {} column(s); the keys given ({given}) have {}",
                held.len(),
                kinds.len()
            )));
        }
        for (p, (&[has_ints, has_strs], &text)) in held.iter().zip(kinds).enumerate() {
            let (mismatch, kind) = if text {
                (has_ints && !has_strs, "integer")
            } else {
                (has_strs && !has_ints, "string")
            };
            if mismatch {
                let what = if held.len() == 1 {
                    format!("{kind} keys")
                } else {
                    format!("{kind} values in key column {}", p + 1)
                };
                return Err(PanesError::Invalid(format!(
                    "view {view:?} has {what}; the keys given are {given}, which can never match"
                )));
            }
        }
        Ok(())
    }

    /// `"int"` or `"string"`: the kind of the keys held (`None` while empty; a view
    /// fed both reports the integer kind); for composite keys the parts' kinds, as
    /// `"(string, int)"`.
    pub fn kind(&self) -> Option<String> {
        let one = |[ints, strs]: [bool; 2]| {
            if ints {
                Some("int")
            } else if strs {
                Some("string")
            } else {
                None
            }
        };
        if !self.tuples.is_empty() {
            let parts: Vec<&str> = self
                .parts
                .iter()
                .map(|&p| one(p).unwrap_or("null"))
                .collect();
            return Some(format!("({})", parts.join(", ")));
        }
        let has_ints = !self.ints.is_empty() || !self.big.is_empty();
        one([has_ints, !self.strs.is_empty()]).map(str::to_string)
    }

    /// The index as plain lists, for checkpoints.
    pub(crate) fn image(&self) -> KeyImage {
        let mut image = KeyImage {
            ints: self.ints.iter().map(|(&k, &id)| (k, id)).collect(),
            big: self.big.iter().map(|(&k, &id)| (k, id)).collect(),
            strs: self.strs.iter().map(|(k, &id)| (k.clone(), id)).collect(),
            tuples: self.tuples.iter().map(|(k, &id)| (k.clone(), id)).collect(),
            next_local: self.next_local.clone(),
        };
        // Sorted by id: the same index always gives the same bytes.
        image.ints.sort_unstable_by_key(|e| e.1);
        image.big.sort_unstable_by_key(|e| e.1);
        image.strs.sort_unstable_by_key(|e| e.1);
        image.tuples.sort_unstable_by_key(|e| e.1);
        image
    }

    /// Rebuilds an index from [`KeyIndex::image`].
    ///
    /// # Errors
    /// When the image does not fit `shards` or holds an id twice.
    pub(crate) fn from_image(image: KeyImage, shards: usize) -> Result<Self> {
        if image.next_local.len() != shards {
            return Err(PanesError::Invalid(format!(
                "key index for {} shards, the view has {shards}",
                image.next_local.len()
            )));
        }
        let len = image.ints.len() + image.big.len() + image.strs.len() + image.tuples.len();
        // The kinds of the composite keys' parts, and one length for all of them.
        let mut probe = KeyIndex::new(1);
        for (k, _) in &image.tuples {
            let p = decode_tuple(k)
                .ok_or_else(|| PanesError::Invalid("a composite key does not decode".into()))?;
            if !probe.parts.is_empty() && probe.parts.len() != p.len() {
                return Err(PanesError::Invalid(format!(
                    "composite keys of {} and {} parts",
                    probe.parts.len(),
                    p.len()
                )));
            }
            probe.note_parts(&p);
        }
        let parts = probe.parts;
        let ids: usize = image.next_local.iter().map(|&n| n as usize).sum();
        if ids != len {
            return Err(PanesError::Invalid(format!(
                "key index holds {len} keys but allocated {ids} ids"
            )));
        }
        // Every id must be one the index allocated, once: a state slot is derived from
        // it, and an id past its shard's count would make the first event of its key
        // grow the state to that slot.
        let mut taken: Vec<Vec<bool>> = image
            .next_local
            .iter()
            .map(|&n| vec![false; n as usize])
            .collect();
        let ids = image.ints.iter().map(|(k, id)| (k.to_string(), *id));
        let ids = ids.chain(image.big.iter().map(|(k, id)| (k.to_string(), *id)));
        let ids = ids.chain(image.strs.iter().map(|(k, id)| (format!("{k:?}"), *id)));
        let ids = ids.chain(image.tuples.iter().map(|(k, id)| {
            let k = KeyValue::Tuple(decode_tuple(k).unwrap_or_default());
            (k.to_string(), *id)
        }));
        for (key, id) in ids {
            let (shard, local) = (id as usize % shards, id as usize / shards);
            match taken[shard].get_mut(local) {
                Some(t) if !*t => *t = true,
                Some(_) => {
                    return Err(PanesError::Invalid(format!(
                        "key {key} has id {id}, which another key has too"
                    )));
                }
                None => {
                    return Err(PanesError::Invalid(format!(
                        "key {key} has id {id}, but shard {shard} allocated only {} ids",
                        image.next_local[shard]
                    )));
                }
            }
        }
        Ok(KeyIndex {
            ints: image.ints.into_iter().collect(),
            big: image.big.into_iter().collect(),
            strs: image.strs.into_iter().collect(),
            tuples: image.tuples.into_iter().collect(),
            parts,
            next_local: image.next_local,
            len,
            journal: None,
        })
    }

    /// Every key with its id, ordered as the state holds them: by shard, then by slot
    /// (the order in which the shard first saw them), so that a read of all of them
    /// streams through each shard's memory.
    pub fn all(&self) -> (Vec<KeyValue>, Vec<u32>) {
        let mut all: Vec<(u32, KeyValue)> = Vec::with_capacity(self.len);
        all.extend(
            self.ints
                .iter()
                .map(|(&k, &id)| (id, KeyValue::Int(k as i128))),
        );
        all.extend(
            self.big
                .iter()
                .map(|(&k, &id)| (id, KeyValue::Int(k as i128))),
        );
        all.extend(
            self.strs
                .iter()
                .map(|(k, &id)| (id, KeyValue::Str(k.to_string()))),
        );
        all.extend(
            self.tuples
                .iter()
                .map(|(k, &id)| (id, KeyValue::Tuple(decode_tuple(k).unwrap_or_default()))),
        );
        let mask = self.next_local.len() as u32 - 1;
        all.sort_unstable_by_key(|&(id, _)| (id & mask, id));
        all.into_iter().map(|(id, k)| (k, id)).unzip()
    }

    /// The id of a key value, if known.
    pub fn get(&self, key: &KeyValue) -> Option<u32> {
        match key {
            KeyValue::Int(v) => match i64::try_from(*v) {
                Ok(v) => self.ints.get(&v).copied(),
                Err(_) => u64::try_from(*v)
                    .ok()
                    .and_then(|v| self.big.get(&v).copied()),
            },
            KeyValue::Str(s) => self.strs.get(s.as_str()).copied(),
            KeyValue::Tuple(parts) => {
                let bytes = KeyValue::tuple_bytes(parts)?;
                self.tuples.get(bytes.as_slice()).copied()
            }
        }
    }
}

/// Keys as an Arrow column: Utf8 when any key is a string (integer keys among them
/// are nulls there); else Int64 when they fit, UInt64 for keys above `i64::MAX`, and
/// Decimal128(20, 0) when those mix with negative keys.
///
/// Composite keys make a struct column with one such column per part (named `0`, `1`,
/// ...; [`Engine::frame_batch`](crate::Engine::frame_batch) names them after the view's
/// key columns). A key that is not a tuple is null there.
pub(crate) fn key_array(keys: &[KeyValue]) -> ArrayRef {
    let keys: Vec<Option<&KeyValue>> = keys.iter().map(Some).collect();
    array_of(&keys)
}

/// [`key_array`] of keys some of which are null (`None`).
fn array_of(keys: &[Option<&KeyValue>]) -> ArrayRef {
    let arity = keys.iter().flatten().find_map(|k| match k {
        KeyValue::Tuple(p) => Some(p.len()),
        _ => None,
    });
    if let Some(arity) = arity {
        let tuples: Vec<Option<&[KeyValue]>> = keys
            .iter()
            .map(|k| match k {
                Some(KeyValue::Tuple(p)) if p.len() == arity => Some(p.as_slice()),
                _ => None,
            })
            .collect();
        let children: Vec<ArrayRef> = (0..arity)
            .map(|p| {
                let part: Vec<Option<&KeyValue>> =
                    tuples.iter().map(|t| t.map(|t| &t[p])).collect();
                array_of(&part)
            })
            .collect();
        let fields: Fields = children
            .iter()
            .enumerate()
            .map(|(p, c)| Field::new(p.to_string(), c.data_type().clone(), true))
            .collect();
        let nulls = NullBuffer::from_iter(tuples.iter().map(Option::is_some));
        let nulls = (nulls.null_count() > 0).then_some(nulls);
        if arity == 0 {
            return Arc::new(StructArray::new_empty_fields(keys.len(), nulls));
        }
        return Arc::new(StructArray::new(fields, children, nulls));
    }
    if keys.iter().any(|k| matches!(k, Some(KeyValue::Str(_)))) {
        return Arc::new(StringArray::from_iter(keys.iter().map(|k| match k {
            Some(KeyValue::Str(s)) => Some(s.as_str()),
            _ => None,
        })));
    }
    let ints = || {
        keys.iter().map(|k| match k {
            Some(KeyValue::Int(i)) => Some(*i),
            _ => None,
        })
    };
    if ints().flatten().all(|i| i64::try_from(i).is_ok()) {
        Arc::new(Int64Array::from_iter(ints().map(|i| i.map(|i| i as i64))))
    } else if ints().flatten().all(|i| u64::try_from(i).is_ok()) {
        Arc::new(UInt64Array::from_iter(ints().map(|i| i.map(|i| i as u64))))
    } else {
        let decimals = Decimal128Array::from_iter(ints()).with_precision_and_scale(20, 0);
        Arc::new(decimals.expect("20 digits hold every i64 and u64"))
    }
}

/// A key column of a supported type, viewed row by row.
#[derive(Debug)]
pub(crate) enum KeyColumn<'a> {
    /// Any signed or unsigned integer up to 32 bits, and Int64, widened to i64.
    Signed(Vec<i64>, &'a dyn Array),
    UInt64(&'a arrow_array::UInt64Array),
    Utf8(&'a arrow_array::StringArray),
    LargeUtf8(&'a arrow_array::LargeStringArray),
    Utf8View(&'a arrow_array::StringViewArray),
    /// Dictionary: per-row dictionary index (None = null) and the values.
    Dict(Vec<Option<usize>>, Box<KeyColumn<'a>>),
    /// A composite key: one column per part, and the rows that are null as a whole
    /// (a struct column's own nulls).
    Tuple(Vec<KeyColumn<'a>>, Option<NullBuffer>),
}

/// What key columns may be.
pub(crate) const KEY_TYPES: &str = "Utf8, LargeUtf8, Utf8View, Dictionary(_, Utf8) or an integer type (Int8..Int64, UInt8..UInt64)";

fn dict<'a, K: ArrowDictionaryKeyType>(a: &'a dyn Array) -> (Vec<Option<usize>>, &'a dyn Array) {
    let d: &'a DictionaryArray<K> = a.as_dictionary::<K>();
    let keys = d
        .keys()
        .iter()
        .map(|k| k.and_then(|k| k.to_usize()))
        .collect();
    (keys, d.values().as_ref())
}

impl<'a> KeyColumn<'a> {
    /// Views `array` as a key column, or says why it cannot be one.
    pub(crate) fn new(array: &'a dyn Array) -> std::result::Result<Self, String> {
        fn widen<T: ArrowPrimitiveType>(a: &dyn Array) -> Vec<i64>
        where
            T::Native: Into<i64>,
        {
            a.as_primitive::<T>()
                .values()
                .iter()
                .map(|v| (*v).into())
                .collect()
        }
        Ok(match array.data_type() {
            DataType::Int8 => KeyColumn::Signed(widen::<Int8Type>(array), array),
            DataType::Int16 => KeyColumn::Signed(widen::<Int16Type>(array), array),
            DataType::Int32 => KeyColumn::Signed(widen::<Int32Type>(array), array),
            DataType::Int64 => KeyColumn::Signed(widen::<Int64Type>(array), array),
            DataType::UInt8 => KeyColumn::Signed(widen::<UInt8Type>(array), array),
            DataType::UInt16 => KeyColumn::Signed(widen::<UInt16Type>(array), array),
            DataType::UInt32 => KeyColumn::Signed(widen::<UInt32Type>(array), array),
            DataType::UInt64 => KeyColumn::UInt64(array.as_primitive::<UInt64Type>()),
            DataType::Utf8 => KeyColumn::Utf8(array.as_string::<i32>()),
            DataType::LargeUtf8 => KeyColumn::LargeUtf8(array.as_string::<i64>()),
            DataType::Utf8View => KeyColumn::Utf8View(array.as_string_view()),
            DataType::Dictionary(k, v)
                if matches!(
                    v.as_ref(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                ) =>
            {
                let (keys, values) = match k.as_ref() {
                    DataType::Int8 => dict::<Int8Type>(array),
                    DataType::Int16 => dict::<Int16Type>(array),
                    DataType::Int32 => dict::<Int32Type>(array),
                    DataType::Int64 => dict::<Int64Type>(array),
                    DataType::UInt8 => dict::<UInt8Type>(array),
                    DataType::UInt16 => dict::<UInt16Type>(array),
                    DataType::UInt32 => dict::<UInt32Type>(array),
                    DataType::UInt64 => dict::<UInt64Type>(array),
                    other => {
                        return Err(format!(
                            "has dictionary keys of type {other}, which are not supported"
                        ));
                    }
                };
                KeyColumn::Dict(keys, Box::new(KeyColumn::new(values)?))
            }
            DataType::Struct(fields) => {
                let s = array.as_struct();
                let parts = fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| {
                        KeyColumn::new(c.as_ref()).map_err(|m| format!("field {:?} {m}", f.name()))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                if parts.is_empty() {
                    return Err("is a struct without fields; a composite key has 1 or more".into());
                }
                if parts.iter().any(|p| matches!(p, KeyColumn::Tuple(..))) {
                    return Err("is a struct of structs; a composite key's parts must be strings or integers".into());
                }
                KeyColumn::Tuple(parts, s.nulls().cloned())
            }
            other => {
                return Err(format!(
                    "has type {other}; a key column must be {KEY_TYPES}"
                ));
            }
        })
    }

    /// A composite key column of `parts` (each a column that is not itself a tuple).
    pub(crate) fn tuple(parts: Vec<KeyColumn<'a>>) -> Self {
        KeyColumn::Tuple(parts, None)
    }

    /// Whether the keys are strings (else integers); a tuple is neither.
    fn is_text(&self) -> bool {
        match self {
            KeyColumn::Signed(..) | KeyColumn::UInt64(_) | KeyColumn::Tuple(..) => false,
            KeyColumn::Utf8(_) | KeyColumn::LargeUtf8(_) | KeyColumn::Utf8View(_) => true,
            KeyColumn::Dict(_, inner) => inner.is_text(),
        }
    }

    /// Per key part, whether its values are strings (one entry unless a tuple).
    pub(crate) fn kinds(&self) -> Vec<bool> {
        match self {
            KeyColumn::Tuple(parts, _) => parts.iter().map(KeyColumn::is_text).collect(),
            other => vec![other.is_text()],
        }
    }

    /// The number of key parts of a tuple column (`None` for a column of single keys).
    pub(crate) fn arity(&self) -> Option<usize> {
        match self {
            KeyColumn::Tuple(parts, _) => Some(parts.len()),
            _ => None,
        }
    }

    /// For a composite key whose row `i` is null, the first null part (from 0);
    /// `None` otherwise.
    pub(crate) fn null_part(&self, i: usize) -> Option<usize> {
        match self {
            KeyColumn::Tuple(parts, _) => parts.iter().position(|p| p.is_null(i)),
            _ => None,
        }
    }

    /// Appends row `i`'s value (not null, not a tuple) to a tuple's encoding.
    fn put(&self, i: usize, buf: &mut Vec<u8>) {
        match self {
            KeyColumn::Signed(v, _) => put_int(buf, v[i] as i128),
            KeyColumn::UInt64(a) => put_int(buf, a.value(i) as i128),
            KeyColumn::Utf8(a) => put_str(buf, a.value(i)),
            KeyColumn::LargeUtf8(a) => put_str(buf, a.value(i)),
            KeyColumn::Utf8View(a) => put_str(buf, a.value(i)),
            KeyColumn::Dict(k, inner) => inner.put(k[i].unwrap_or_default(), buf),
            KeyColumn::Tuple(..) => unreachable!("tuples of tuples are refused by `new`"),
        }
    }

    /// Calls `f` with the encoding of row `i` of a tuple column (not null).
    #[inline]
    fn with_tuple<R>(parts: &[KeyColumn<'_>], i: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        TUPLE.with_borrow_mut(|buf| {
            buf.clear();
            for p in parts {
                p.put(i, buf);
            }
            f(buf)
        })
    }

    /// Whether row `i` has no key.
    #[inline]
    pub(crate) fn is_null(&self, i: usize) -> bool {
        match self {
            KeyColumn::Signed(_, a) => a.is_null(i),
            KeyColumn::UInt64(a) => a.is_null(i),
            KeyColumn::Utf8(a) => a.is_null(i),
            KeyColumn::LargeUtf8(a) => a.is_null(i),
            KeyColumn::Utf8View(a) => a.is_null(i),
            KeyColumn::Dict(k, inner) => k[i].is_none_or(|k| inner.is_null(k)),
            KeyColumn::Tuple(parts, nulls) => {
                nulls.as_ref().is_some_and(|n| n.is_null(i)) || parts.iter().any(|p| p.is_null(i))
            }
        }
    }

    /// The id of row `i`'s key, inserting the key if new. Row `i` must not be null.
    #[inline]
    pub(crate) fn id_or_insert(&self, i: usize, index: &mut KeyIndex) -> Result<u32> {
        match self {
            KeyColumn::Signed(v, _) => index.int_id(v[i]),
            KeyColumn::UInt64(a) => {
                let v = a.value(i);
                match i64::try_from(v) {
                    Ok(v) => index.int_id(v),
                    Err(_) => index.big_id(v),
                }
            }
            KeyColumn::Utf8(a) => index.str_id(a.value(i)),
            KeyColumn::LargeUtf8(a) => index.str_id(a.value(i)),
            KeyColumn::Utf8View(a) => index.str_id(a.value(i)),
            KeyColumn::Dict(k, inner) => inner.id_or_insert(k[i].unwrap_or_default(), index),
            KeyColumn::Tuple(parts, _) => Self::with_tuple(parts, i, |b| index.tuple_id(b)),
        }
    }

    /// The id of row `i`'s key if the index knows it (`None` for null or unknown keys).
    #[inline]
    pub(crate) fn lookup(&self, i: usize, index: &KeyIndex) -> Option<u32> {
        if self.is_null(i) {
            return None;
        }
        match self {
            KeyColumn::Signed(v, _) => index.ints.get(&v[i]).copied(),
            KeyColumn::UInt64(a) => {
                let v = a.value(i);
                match i64::try_from(v) {
                    Ok(v) => index.ints.get(&v).copied(),
                    Err(_) => index.big.get(&v).copied(),
                }
            }
            KeyColumn::Utf8(a) => index.strs.get(a.value(i)).copied(),
            KeyColumn::LargeUtf8(a) => index.strs.get(a.value(i)).copied(),
            KeyColumn::Utf8View(a) => index.strs.get(a.value(i)).copied(),
            KeyColumn::Dict(k, inner) => k[i].and_then(|k| inner.lookup(k, index)),
            KeyColumn::Tuple(parts, _) => {
                Self::with_tuple(parts, i, |b| index.tuples.get(b).copied())
            }
        }
    }

    /// Row `i`'s key as an owned value (`None` when null), for messages.
    pub(crate) fn value(&self, i: usize) -> Option<KeyValue> {
        if self.is_null(i) {
            return None;
        }
        Some(match self {
            KeyColumn::Signed(v, _) => KeyValue::Int(v[i] as i128),
            KeyColumn::UInt64(a) => KeyValue::Int(a.value(i) as i128),
            KeyColumn::Utf8(a) => KeyValue::Str(a.value(i).to_string()),
            KeyColumn::LargeUtf8(a) => KeyValue::Str(a.value(i).to_string()),
            KeyColumn::Utf8View(a) => KeyValue::Str(a.value(i).to_string()),
            KeyColumn::Dict(k, inner) => return k[i].and_then(|k| inner.value(k)),
            KeyColumn::Tuple(parts, _) => {
                KeyValue::Tuple(parts.iter().map(|p| p.value(i)).collect::<Option<_>>()?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::ArrayRef;
    use arrow_array::{Int32Array, Int64Array, StringArray, StringViewArray, UInt64Array};
    use std::sync::Arc;

    #[test]
    fn integers_match_by_value_and_strings_by_text() {
        let mut idx = KeyIndex::new(4);
        let a = Int64Array::from(vec![Some(7), None, Some(-3), Some(7)]);
        let col = KeyColumn::new(&a).unwrap();
        assert!(col.is_null(1));
        let id7 = col.id_or_insert(0, &mut idx).unwrap();
        assert_eq!(col.id_or_insert(3, &mut idx).unwrap(), id7);
        let b = Int32Array::from(vec![7, 8]);
        let col = KeyColumn::new(&b).unwrap();
        assert_eq!(col.lookup(0, &idx), Some(id7));
        assert_eq!(col.lookup(1, &idx), None);
        let c = UInt64Array::from(vec![7, u64::MAX]);
        let col = KeyColumn::new(&c).unwrap();
        assert_eq!(col.lookup(0, &idx), Some(id7));
        let big = col.id_or_insert(1, &mut idx).unwrap();
        assert_eq!(idx.get(&KeyValue::Int(u64::MAX as i128)), Some(big));

        let s = StringArray::from(vec!["7", "a"]);
        let col = KeyColumn::new(&s).unwrap();
        assert_eq!(col.lookup(0, &idx), None, "strings never match integers");
        let ida = col.id_or_insert(1, &mut idx).unwrap();
        let v = StringViewArray::from(vec!["a"]);
        assert_eq!(KeyColumn::new(&v).unwrap().lookup(0, &idx), Some(ida));
        let d: arrow_array::DictionaryArray<Int32Type> =
            vec![Some("b"), None, Some("a")].into_iter().collect();
        let col = KeyColumn::new(&d).unwrap();
        assert!(col.is_null(1));
        assert_eq!(col.lookup(2, &idx), Some(ida));
        assert_eq!(idx.len(), 3);
    }

    #[test]
    fn sliced_columns_respect_offsets() {
        let mut idx = KeyIndex::new(1);
        let a: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), None, Some(3)]));
        let s = a.slice(1, 2);
        let col = KeyColumn::new(s.as_ref()).unwrap();
        assert!(col.is_null(0));
        let id = col.id_or_insert(1, &mut idx).unwrap();
        assert_eq!(idx.get(&KeyValue::Int(3)), Some(id));
    }

    #[test]
    fn unsupported_types_say_what_is_expected() {
        let f = arrow_array::Float64Array::from(vec![1.0]);
        let e = KeyColumn::new(&f).unwrap_err();
        assert!(
            e.contains("has type Float64; a key column must be Utf8"),
            "{e}"
        );
    }

    #[test]
    fn tuples_match_part_by_part_by_value_and_survive_an_image() {
        let mut idx = KeyIndex::new(4);
        let m = StringArray::from(vec![Some("a"), Some("a"), None, Some("b")]);
        let c = Int64Array::from(vec![Some(1), Some(1), Some(1), Some(-2)]);
        let col = KeyColumn::tuple(vec![
            KeyColumn::new(&m).unwrap(),
            KeyColumn::new(&c).unwrap(),
        ]);
        assert_eq!((col.is_null(2), col.null_part(2)), (true, Some(0)));
        let a1 = col.id_or_insert(0, &mut idx).unwrap();
        assert_eq!(col.id_or_insert(1, &mut idx).unwrap(), a1);
        let b2 = col.id_or_insert(3, &mut idx).unwrap();
        // Another encoding of the same values finds the same keys.
        let d: arrow_array::DictionaryArray<Int32Type> = vec!["b", "a"].into_iter().collect();
        let c32 = Int32Array::from(vec![-2, 1]);
        let other = KeyColumn::tuple(vec![
            KeyColumn::new(&d).unwrap(),
            KeyColumn::new(&c32).unwrap(),
        ]);
        assert_eq!(
            (other.lookup(0, &idx), other.lookup(1, &idx)),
            (Some(b2), Some(a1))
        );
        let key = KeyValue::Tuple(vec![KeyValue::Str("a".into()), KeyValue::Int(1)]);
        assert_eq!(idx.get(&key), Some(a1));
        assert_eq!(key.to_string(), "(\"a\", 1)");
        // ("a", 1) and ("a1",) or (1, "a") are different keys.
        let swapped = KeyValue::Tuple(vec![KeyValue::Int(1), KeyValue::Str("a".into())]);
        assert_eq!(idx.get(&swapped), None);
        assert_eq!(idx.kind().as_deref(), Some("(string, int)"));
        idx.check_kind("v", &[true, false], &DataType::Null)
            .unwrap();
        let e = idx
            .check_kind("v", &[false, false], &DataType::Null)
            .unwrap_err();
        assert!(
            e.to_string().contains("string values in key column 1"),
            "{e}"
        );
        let e = idx.check_kind("v", &[true], &DataType::Null).unwrap_err();
        assert!(e.to_string().contains("keys of 2 column(s)"), "{e}");
        let back = KeyIndex::from_image(idx.image(), 4).unwrap();
        assert_eq!(back.all(), idx.all());
        assert_eq!(back.kind(), idx.kind());
        // An image whose composite key does not decode is refused.
        let mut bad = idx.image();
        bad.tuples[0].0 = vec![TAG_STR, 9, 0, 0, 0, 0, 0, 0, 0, b'x'].into();
        assert!(KeyIndex::from_image(bad, 4).is_err());
        // A struct column is a tuple column, its own nulls null keys.
        let s = key_array(&[
            key.clone(),
            KeyValue::Tuple(vec![KeyValue::Str("b".into()), KeyValue::Int(-2)]),
        ]);
        let col = KeyColumn::new(s.as_ref()).unwrap();
        assert_eq!(
            (col.lookup(0, &idx), col.lookup(1, &idx)),
            (Some(a1), Some(b2))
        );
        assert_eq!(
            col.value(1),
            Some(KeyValue::Tuple(vec![
                KeyValue::Str("b".into()),
                KeyValue::Int(-2)
            ]))
        );
    }

    #[test]
    fn ids_spread_over_shards() {
        let mut idx = KeyIndex::new(8);
        let mut per_shard = [0; 8];
        for k in 0..8000 {
            per_shard[(idx.int_id(k).unwrap() & 7) as usize] += 1;
        }
        assert!(per_shard.iter().all(|&n| n > 800), "{per_shard:?}");
    }
}
