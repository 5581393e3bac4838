//! What changed since the last time: a 64-bit hash of each key's last vector, for the
//! readers that send only changes (`Subscribe`, sinks of changed keys).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::num::NonZeroU64;

use super::frame::{ServedFrame, Strings};

/// The hash of the vector last sent per slot (a request position or a key id), and
/// the hashes of a round not committed yet.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    sent: Vec<Option<NonZeroU64>>,
    /// `(slot, hash)` of the rows the last [`Changes::changed`] found.
    pending: Vec<(usize, NonZeroU64)>,
}

impl Changes {
    /// Rows of `served` whose vector differs from the one last committed for their
    /// slot (`slot_of(row)`); every row the first time. The new hashes take effect
    /// with [`Changes::commit`], once the rows were delivered.
    pub fn changed(
        &mut self,
        served: &ServedFrame,
        slot_of: impl Fn(usize) -> usize,
    ) -> Vec<usize> {
        self.pending.clear();
        let mut rows = Vec::new();
        for r in 0..served.frame.values.nrows() {
            let slot = slot_of(r);
            let h = row_hash(served, r);
            if self.sent.get(slot).copied().flatten() != Some(h) {
                self.pending.push((slot, h));
                rows.push(r);
            }
        }
        rows
    }

    /// [`Changes::changed`] for the rows of a record batch (slot: the row).
    pub fn changed_rows(&mut self, batch: &arrow_array::RecordBatch) -> Vec<usize> {
        self.pending.clear();
        let mut rows = Vec::new();
        for r in 0..batch.num_rows() {
            let mut h = DefaultHasher::new();
            for c in batch.columns() {
                hash_cell(c, r, &mut h);
            }
            let h = NonZeroU64::new(h.finish() | 1).expect("nonzero: its low bit is set");
            if self.sent.get(r).copied().flatten() != Some(h) {
                self.pending.push((r, h));
                rows.push(r);
            }
        }
        rows
    }

    /// Records the rows of the last [`Changes::changed`] as delivered.
    pub fn commit(&mut self) {
        for &(slot, h) in &self.pending {
            if slot >= self.sent.len() {
                self.sent.resize(slot + 1, None);
            }
            self.sent[slot] = Some(h);
        }
        self.pending.clear();
    }
}

/// A 64-bit hash of row `r`'s features: validity, values (their bits), strings and
/// lists. Two equal vectors hash equal; two different ones collide with probability
/// about 2^-63, the chance that a change goes unsent.
fn row_hash(served: &ServedFrame, r: usize) -> NonZeroU64 {
    let frame = &served.frame;
    let mut h = DefaultHasher::new();
    for c in 0..frame.values.ncols() {
        let ok = frame.valid[[r, c]];
        ok.hash(&mut h);
        if !ok {
            continue;
        }
        let text = frame.text.get(c) == Some(&true);
        let list = frame.is_list.get(c) == Some(&true);
        match (text, list) {
            (true, false) => frame.strings.text(frame.values[[r, c]]).hash(&mut h),
            (false, false) => frame.values[[r, c]].to_bits().hash(&mut h),
            (text, true) => {
                let items = frame.list(r, c);
                items.len().hash(&mut h);
                for &v in items {
                    if text {
                        frame.strings.text(v).hash(&mut h);
                    } else {
                        v.to_bits().hash(&mut h);
                    }
                }
            }
        }
    }
    NonZeroU64::new(h.finish() | 1).expect("nonzero: its low bit is set")
}

/// Hashes value `r` of `a`: its validity, then its bits (numbers), bytes (strings) or
/// items (lists); other types by their text.
fn hash_cell(a: &arrow_array::ArrayRef, r: usize, h: &mut DefaultHasher) {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, UInt64Type};
    use arrow_schema::DataType;
    let valid = a.is_valid(r);
    valid.hash(h);
    if !valid {
        return;
    }
    match a.data_type() {
        DataType::Float64 => a.as_primitive::<Float64Type>().value(r).to_bits().hash(h),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(r).hash(h),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(r).hash(h),
        DataType::Utf8 => a.as_string::<i32>().value(r).hash(h),
        DataType::List(_) => {
            let items = a.as_list::<i32>().value(r);
            items.len().hash(h);
            for i in 0..items.len() {
                hash_cell(&items, i, h);
            }
        }
        _ => {
            let options = arrow_cast::display::FormatOptions::default();
            if let Ok(f) = arrow_cast::display::ArrayFormatter::try_new(a.as_ref(), &options) {
                f.value(r).to_string().hash(h);
            }
        }
    }
}
