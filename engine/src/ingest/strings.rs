//! String values of a view: what `count`, `first`, `last`, `last_n` and `top_k` read
//! from a string column.
//!
//! Pane state holds f64 values, so each distinct string a view accepts gets a dense id,
//! held as that f64 (exact: ids stay below 2^32), and reads map ids back to strings.
//! Ids count up from 0 in the order strings are first accepted; the other replica of a
//! view gives each string the same id (from the journal, as for keys), and checkpoints
//! keep the table. Strings are never dropped: the table grows with the distinct values
//! the view has accepted, and the view's state bytes count it.
//!
//! Whether a value column holds strings or numbers is fixed by the first batch that
//! carries it; a later batch with the other kind is a schema error.

use std::hash::BuildHasher;

use arrow_array::{Array, ArrayRef};
use arrow_schema::{ArrowError, DataType};
use hashbrown::{DefaultHashBuilder, HashTable};
use panes_kernels::{Agg, MergeOutput, topk};

/// Most distinct strings a view holds.
pub const MAX_STRINGS: usize = 1 << 31;

/// Most bytes of distinct strings a view holds (a test build keeps 1 MiB). A row
/// with a string the view does not hold yet is refused past it (as `key_limit`): a
/// producer could otherwise grow the table without bound, one new string per event.
pub const MAX_STRING_BYTES: usize = if cfg!(test) { 1 << 20 } else { 1 << 30 };

/// Whether a column of type `ty` holds strings (any layout, or a dictionary of them).
pub fn is_text(ty: &DataType) -> bool {
    match ty {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Dictionary(_, v) => is_text(v),
        _ => false,
    }
}

/// A column of strings ([`is_text`]) as Utf8.
///
/// # Errors
/// When it holds more than 2 GiB of strings.
pub fn as_utf8(array: &dyn Array) -> Result<ArrayRef, ArrowError> {
    arrow_cast::cast(array, &DataType::Utf8)
}

/// A view's string ids and the kind of each decoded value column.
#[derive(Clone, Debug, Default)]
pub struct StringValues {
    table: HashTable<u32>,
    hasher: DefaultHashBuilder,
    values: Vec<Box<str>>,
    bytes: usize,
    /// Per decoded column (`CompiledView::decoded`): `Some(true)` once it held
    /// strings, `Some(false)` numbers, `None` before any batch.
    kinds: Vec<Option<bool>>,
    /// The strings added since the journal was last taken, when kept.
    journal: Option<Vec<Box<str>>>,
}

impl StringValues {
    /// An empty table for `columns` decoded columns.
    pub fn new(columns: usize) -> Self {
        StringValues {
            kinds: vec![None; columns],
            ..Default::default()
        }
    }

    /// The id of `s`, added if new. A caller checks first that the table has room
    /// (see [`MAX_STRINGS`]).
    pub fn intern(&mut self, s: &str) -> u32 {
        let hash = self.hasher.hash_one(s);
        if let Some(id) = self.find(hash, s) {
            return id;
        }
        debug_assert!(self.values.len() < MAX_STRINGS);
        self.push(s.into(), hash)
    }

    /// The id of `s`, whose hash is `hash`, if it has one.
    fn find(&self, hash: u64, s: &str) -> Option<u32> {
        let values = &self.values;
        self.table
            .find(hash, |&i| &*values[i as usize] == s)
            .copied()
    }

    fn push(&mut self, s: Box<str>, hash: u64) -> u32 {
        let id = self.values.len() as u32;
        let (values, hasher) = (&self.values, &self.hasher);
        self.table
            .insert_unique(hash, id, |&i| hasher.hash_one(&*values[i as usize]));
        self.bytes += s.len();
        if let Some(j) = &mut self.journal {
            j.push(s.clone());
        }
        self.values.push(s);
        id
    }

    /// The id of `s`, if it has one.
    pub fn id(&self, s: &str) -> Option<u32> {
        self.find(self.hasher.hash_one(s), s)
    }

    /// Bytes of the strings themselves.
    pub fn string_bytes(&self) -> usize {
        self.bytes
    }

    /// The string of id `id` (a state value), if it is one.
    pub fn get(&self, id: f64) -> Option<&str> {
        (id >= 0.0 && id.fract() == 0.0)
            .then(|| self.values.get(id as usize))
            .flatten()
            .map(|s| &**s)
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether no string was added.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Bytes held: the strings and their index.
    pub fn bytes(&self) -> usize {
        self.bytes + self.values.capacity() * 16 + self.table.capacity() * 5
    }

    /// Whether decoded column `d` holds strings (`Some(true)`), numbers, or has not
    /// been seen.
    pub fn kind(&self, d: usize) -> Option<bool> {
        self.kinds.get(d).copied().flatten()
    }

    /// The kinds of every decoded column (see [`StringValues::kind`]).
    pub fn kinds(&self) -> &[Option<bool>] {
        &self.kinds
    }

    /// Whether decoded column `d` may take strings (`text`) or numbers.
    ///
    /// # Errors
    /// A message when it held the other kind.
    pub fn check_kind(&self, d: usize, text: bool) -> Result<(), String> {
        match self.kind(d) {
            Some(k) if k != text => Err(format!(
                "earlier batches gave this column {}; this one gives {}",
                if k { "strings" } else { "numbers" },
                if text { "strings" } else { "numbers" }
            )),
            _ => Ok(()),
        }
    }

    /// Fixes decoded column `d` to strings (`text`) or numbers, if it is not yet.
    ///
    /// # Errors
    /// A message when the column held the other kind.
    pub fn fix_kind(&mut self, d: usize, text: bool) -> Result<(), String> {
        self.check_kind(d, text)?;
        if d >= self.kinds.len() {
            self.kinds.resize(d + 1, None);
        }
        self.kinds[d] = Some(text);
        Ok(())
    }

    /// Records the strings added from now on, for [`StringValues::take_journal`].
    pub(crate) fn keep_journal(&mut self, keep: bool) {
        self.journal = keep.then(Vec::new);
    }

    /// The strings added since the last call, in order.
    pub(crate) fn take_journal(&mut self) -> Vec<Box<str>> {
        self.journal
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Adds the strings another table added (its journal), giving them the same ids
    /// that table gave them, and takes its kinds.
    ///
    /// # Errors
    /// When one of them is here already: the tables were not equal.
    pub(crate) fn replay(
        &mut self,
        added: &[Box<str>],
        kinds: &[Option<bool>],
    ) -> Result<(), String> {
        for s in added {
            let hash = self.hasher.hash_one(&**s);
            if self.find(hash, s).is_some() {
                return Err(format!("string {s:?} is in both replicas already"));
            }
            self.push(s.clone(), hash);
        }
        self.kinds = kinds.to_vec();
        Ok(())
    }

    /// Turns the string ids in `out`, a merge of features of `aggs`, into indices of the
    /// strings returned, which holds each of them once: the values of the features
    /// `text` marks, or their list items.
    pub(crate) fn localize(
        &self,
        aggs: &[Agg],
        text: &[bool],
        out: &mut MergeOutput,
    ) -> Vec<String> {
        if !text.contains(&true) {
            return Vec::new();
        }
        let mut local: Vec<String> = Vec::new();
        let mut index: hashbrown::HashMap<u64, f64> = hashbrown::HashMap::new();
        let mut map = |id: &mut f64| {
            *id = *index.entry(id.to_bits()).or_insert_with(|| {
                local.push(self.get(*id).unwrap_or_default().to_string());
                (local.len() - 1) as f64
            });
        };
        let f = aggs.len();
        for (i, v) in out.values.iter_mut().enumerate() {
            let c = i % f;
            if !text[c] {
                continue;
            }
            if aggs[c].is_list() {
                out.lists[i].iter_mut().for_each(&mut map);
            } else if out.valid[i] {
                map(v);
            }
        }
        local
    }

    /// The strings, in id order (for checkpoints).
    pub fn values(&self) -> &[Box<str>] {
        &self.values
    }

    /// A table of `values` (ids in order) and `kinds`, as [`StringValues::values`] and
    /// [`StringValues::kinds`] gave them.
    ///
    /// # Errors
    /// A string given twice, or more than [`MAX_STRINGS`].
    pub fn from_parts(values: Vec<Box<str>>, kinds: Vec<Option<bool>>) -> Result<Self, String> {
        if values.len() > MAX_STRINGS {
            return Err(format!("{} strings, more than {MAX_STRINGS}", values.len()));
        }
        let mut t = StringValues {
            kinds,
            ..Default::default()
        };
        t.replay(&values, &t.kinds.clone())?;
        Ok(t)
    }
}

/// Finishes the lists of a merge of features of `aggs` into `out`: each `top_k` list, ranked
/// pairs (`panes_kernels::topk::ranked`), becomes its `k` values, ties of equal count
/// in the order of their values, by text where `text` says the feature's values are
/// strings (ids in `strings`).
pub(crate) fn finish_lists(
    aggs: &[Agg],
    text: &[bool],
    strings: &StringValues,
    out: &mut MergeOutput,
) {
    if out.lists.is_empty() {
        return;
    }
    let f = aggs.len();
    for (c, agg) in aggs.iter().enumerate() {
        let Agg::TopK { k, .. } = *agg else {
            continue;
        };
        for list in out.lists.iter_mut().skip(c).step_by(f) {
            *list = if text[c] {
                topk::top_of(list, k, |a, b| strings.get(*a).cmp(&strings.get(*b)))
            } else {
                topk::top_of(list, k, f64::total_cmp)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_count_up_and_replay_gives_the_same_ones() {
        let mut a = StringValues::new(2);
        a.keep_journal(true);
        assert_eq!(a.intern("b"), 0);
        assert_eq!(a.intern("a"), 1);
        assert_eq!(a.intern("b"), 0);
        assert_eq!(a.intern(""), 2);
        assert_eq!(a.get(1.0), Some("a"));
        assert_eq!(a.get(2.0), Some(""));
        assert_eq!(a.get(3.0), None);
        assert_eq!(a.get(0.5), None);
        assert_eq!(a.get(-1.0), None);
        a.fix_kind(1, true).unwrap();
        let mut b = StringValues::new(2);
        b.replay(&a.take_journal(), a.kinds()).unwrap();
        assert_eq!(b.values(), a.values());
        assert_eq!(b.kind(1), Some(true));
        assert_eq!(b.intern("a"), 1);
        assert!(
            b.replay(&["a".into()], b.kinds().to_vec().as_slice())
                .is_err()
        );
        assert!(a.take_journal().is_empty());
        let c = StringValues::from_parts(a.values().to_vec(), a.kinds().to_vec()).unwrap();
        assert_eq!(c.values(), a.values());
        assert!(StringValues::from_parts(vec!["x".into(), "x".into()], vec![]).is_err());
    }

    #[test]
    fn rows_with_new_strings_are_refused_once_the_table_is_full() {
        use std::sync::Arc;

        use arrow_array::{Int64Array, RecordBatch, StringArray};

        use crate::ingest::RejectReason;
        use crate::{Engine, EngineOptions, FeatureFile};

        let file = FeatureFile::parse(
            "[[views]]\nname = \"v\"\nkey = \"k\"\ntime = \"ts\"\n\
             [[views.features]]\nname = \"f\"\nagg = \"first\"\ncolumn = \"s\"\nwindow = \"lifetime\"\n",
            "test",
        )
        .unwrap();
        let e = Engine::new(&file, EngineOptions::default()).unwrap();
        // 1 000-byte strings: the test build's table holds 1 MiB, about 1 048 of them.
        let batch = |from: usize, n: usize| {
            RecordBatch::try_from_iter([
                ("k", Arc::new(Int64Array::from(vec![1; n])) as _),
                ("ts", Arc::new(Int64Array::from(vec![1_000; n])) as _),
                (
                    "s",
                    Arc::new(StringArray::from_iter_values(
                        (from..from + n).map(|i| format!("{i:0>1000}")),
                    )) as _,
                ),
            ])
            .unwrap()
        };
        let r = e.push("v", &batch(0, 1_000)).unwrap();
        assert_eq!((r.accepted, r.rejected), (1_000, 0));
        let r = e.push("v", &batch(1_000, 100)).unwrap();
        assert_eq!(r.accepted, 48, "up to the limit");
        assert_eq!(r.rejected, 52);
        assert_eq!(r.rejections[0].reason, RejectReason::KeyLimit);
        assert!(
            r.rejections[0]
                .message
                .contains("row 48: a new string value"),
            "{}",
            r.rejections[0].message
        );
        // Known strings are still taken.
        let r = e.push("v", &batch(0, 100)).unwrap();
        assert_eq!((r.accepted, r.rejected), (100, 0));
        let m = e.metrics("v").unwrap();
        assert_eq!(m.counters.rejected(RejectReason::KeyLimit), 52);
    }

    #[test]
    fn a_column_keeps_its_kind() {
        let mut t = StringValues::new(1);
        assert_eq!(t.kind(0), None);
        t.fix_kind(0, false).unwrap();
        t.fix_kind(0, false).unwrap();
        let e = t.fix_kind(0, true).unwrap_err();
        assert!(e.contains("gave this column numbers"), "{e}");
        assert_eq!(t.kind(0), Some(false));
    }
}
