//! Reads: feature vectors of keys as of a time, merged from the published replica.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use ndarray::Array2;
use panes_kernels::{Agg, EventMerge, FeatureMerge, Merge, MergeOutput};

use super::engine::Engine;
use super::frame::{FeatureFrame, ServedFrame, feature_field};
use super::replicas::{Snapshot, View};
use crate::error::{PanesError, Result};
use crate::ingest::keys::{KeyColumn, KeyIndex, KeyValue, key_array};
use crate::ingest::strings::finish_lists;
use crate::spec::{ReadTime, ViewSpec};

impl Engine {
    /// Reads the features of `keys` (an Arrow array of any key type; for a view with a
    /// composite key, a struct array with one field per key column, in the view's
    /// order) from `view` as of `at` (epoch ms; default: the view's read time). `features` selects and orders
    /// the features; `None` returns all of the view's.
    ///
    /// Events pushed before are folded and published first, so a read sees every one
    /// of them (the server reads with [`Engine::read_snapshot`], which never folds).
    /// Unknown and null keys get the empty-window values.
    ///
    /// # Errors
    /// Unknown view or feature; keys of an unsupported type, or strings for a view
    /// whose keys are all integers (and the reverse);
    /// [`PanesError::InexactRead`] when `at` lies before the events already folded for
    /// a key in a way the panes cannot separate (use backfill for history).
    pub fn read(
        &self,
        view: &str,
        keys: &dyn Array,
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<FeatureFrame> {
        self.read_array(view, keys, at, features, true)
    }

    /// [`Engine::read`]; with `settle`, pending events are folded and published
    /// first, else the published state is read as it is (the server's way).
    pub(crate) fn read_array(
        &self,
        view: &str,
        keys: &dyn Array,
        at: Option<i64>,
        features: Option<&[&str]>,
        settle: bool,
    ) -> Result<FeatureFrame> {
        let spec = &self.compiled(view)?.spec;
        let projected;
        let keys = if matches!(keys.data_type(), DataType::Struct(_)) {
            projected = tuple_keys(spec, &arrow_array::make_array(keys.to_data()));
            projected.as_ref()
        } else {
            keys
        };
        let col = KeyColumn::new(keys)
            .map_err(|m| PanesError::Invalid(format!("view {view:?}: keys {m}")))?;
        check_arity(spec, col.arity(), keys.data_type())?;
        self.read_with(
            view,
            at,
            features,
            settle,
            |index| {
                if keys.null_count() < keys.len() {
                    index.check_kind(view, &col.kinds(), keys.data_type())?;
                }
                Ok((0..keys.len()).map(|i| col.lookup(i, index)).collect())
            },
            |k| {
                col.value(k)
                    .map_or_else(|| "null".into(), |k| k.to_string())
            },
        )
    }

    /// Like [`Engine::read`], with keys given as values.
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_keys(
        &self,
        view: &str,
        keys: &[KeyValue],
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<FeatureFrame> {
        let spec = &self.compiled(view)?.spec;
        self.read_with(
            view,
            at,
            features,
            true,
            |index| {
                check_shape(view, spec, keys, index)?;
                Ok(keys.iter().map(|k| index.get(k)).collect())
            },
            |k| keys[k].to_string(),
        )
    }

    /// Reads `keys` of `view` from the published state, without folding: the
    /// server's read. It never waits for a fold and sees all of a push or none of it.
    /// Besides the values it returns, per key, the time of the key's latest event and
    /// the number of events in the widest window read (support for a model).
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_snapshot(
        &self,
        view: &str,
        keys: &[KeyValue],
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<ServedFrame> {
        let v = self.view(view)?;
        let snap = v.snapshot()?;
        check_shape(view, &v.compiled.spec, keys, &snap.core.keys)?;
        let ids: Vec<Option<u32>> = keys.iter().map(|k| snap.core.keys.get(k)).collect();
        self.merge_at(v, &snap, &ids, at, features, true, |k| keys[k].to_string())
    }

    /// Publishes pending events, resolves key ids with `ids`, merges, and checks
    /// exactness (`key_of` names a key in errors).
    fn read_with(
        &self,
        view: &str,
        at: Option<i64>,
        features: Option<&[&str]>,
        settle: bool,
        ids: impl FnOnce(&KeyIndex) -> Result<Vec<Option<u32>>>,
        key_of: impl Fn(usize) -> String,
    ) -> Result<FeatureFrame> {
        let v = self.view(view)?;
        if settle {
            self.settle(v)?;
        }
        let snap = v.snapshot()?;
        let ids = ids(&snap.core.keys)?;
        Ok(self
            .merge_at(v, &snap, &ids, at, features, false, key_of)?
            .frame)
    }

    /// Merges `features` (all if `None`) of key `ids` from a snapshot as of `at`
    /// (default: the view's read time); with `meta`, also the per-key metadata.
    #[allow(clippy::too_many_arguments)]
    fn merge_at(
        &self,
        v: &View,
        snap: &Snapshot<'_>,
        ids: &[Option<u32>],
        at: Option<i64>,
        features: Option<&[&str]>,
        meta: bool,
        key_of: impl Fn(usize) -> String,
    ) -> Result<ServedFrame> {
        let core = &snap.core;
        let compiled = &v.compiled;
        let selected: Vec<usize> = match features {
            None => (0..compiled.merges.len()).collect(),
            Some(names) => names
                .iter()
                .map(|n| compiled.feature_index(n))
                .collect::<Result<_>>()?,
        };
        let merges: Vec<Merge> = selected.iter().map(|&i| compiled.merges[i]).collect();
        let aggs: Vec<Agg> = merges.iter().map(Merge::agg).collect();
        let at = at.unwrap_or_else(|| match compiled.spec.read_time {
            ReadTime::EventTime => core.folded_max_ts.unwrap_or(0),
            ReadTime::WallClock => self.options.clock.now_ms(),
        });
        crate::error::ensure!(
            at.unsigned_abs() <= panes_kernels::MAX_TIME_MS,
            "read time {at} ms is out of range: times must lie within ±2^60 ms of the epoch"
        );
        let backend = self.backend.as_ref();
        let mut out = MergeOutput::default();
        panes_kernels::merge(
            backend,
            &core.state,
            &core.events,
            &merges,
            ids,
            at,
            &mut out,
        )?;
        compiled.check_exact(&out, at, key_of)?;
        let text = compiled.text_features(&selected, core.strings.kinds());
        finish_lists(&aggs, &text, &core.strings, &mut out);
        let strings = core.strings.localize(&aggs, &text, &mut out);
        let (mut window_events, mut latest_event_ms) = (Vec::new(), Vec::new());
        if meta {
            // Events behind the widest window read: a count of rows over it (a time
            // window's panes, else the first count or session window).
            let widest = merges
                .iter()
                .filter_map(|m| match m {
                    Merge::Panes(p) => Some(p),
                    Merge::Events(_) => None,
                })
                .max_by_key(|m| {
                    m.panes.map_or(u128::MAX, |p| {
                        p as u128 * compiled.state.levels[m.level].hop as u128
                    })
                });
            let count = match (widest, merges.first()) {
                (Some(w), _) => Some(Merge::Panes(FeatureMerge {
                    agg: Agg::Count,
                    column: None,
                    ..*w
                })),
                (None, Some(Merge::Events(e))) => Some(Merge::Events(EventMerge {
                    agg: Agg::Count,
                    column: None,
                    ..*e
                })),
                _ => None,
            };
            window_events = match count {
                Some(count) => {
                    let mut support = MergeOutput::default();
                    panes_kernels::merge(
                        backend,
                        &core.state,
                        &core.events,
                        &[count],
                        ids,
                        at,
                        &mut support,
                    )?;
                    support.values.iter().map(|&c| c as u64).collect()
                }
                None => vec![0; ids.len()],
            };
            latest_event_ms = ids
                .iter()
                .map(|id| {
                    id.and_then(|id| core.latest.get(id as usize).copied())
                        .unwrap_or(i64::MIN)
                })
                .collect();
        }
        let shape = (ids.len(), merges.len());
        let values = Array2::from_shape_vec(shape, out.values)
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        let valid = Array2::from_shape_vec(shape, out.valid)
            .map_err(|e| PanesError::Internal(e.to_string()))?;
        Ok(ServedFrame {
            frame: FeatureFrame {
                names: selected
                    .iter()
                    .map(|&i| compiled.spec.features[i].name.clone())
                    .collect(),
                values,
                valid,
                lists: out.lists,
                at,
                text,
                strings,
                is_list: aggs.iter().map(|a| a.is_list()).collect(),
            },
            latest_event_ms,
            window_events,
            version: snap.version,
        })
    }

    /// Like [`Engine::read`], as a record batch: the keys as given (column named by
    /// the view's key), then one column per feature (see [`feature_field`]).
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_batch(
        &self,
        view: &str,
        keys: &ArrayRef,
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<(RecordBatch, i64)> {
        let keys = &tuple_keys(&self.compiled(view)?.spec, keys);
        let frame = self.read(view, keys.as_ref(), at, features)?;
        let batch = self.frame_batch(view, keys, &frame)?;
        Ok((batch, frame.at))
    }

    /// Reads the features of every key `view` holds, as of `at` (default: the view's
    /// read time), as a record batch: the keys (column named by the view's key: Int64,
    /// UInt64 or Decimal128(20, 0) for integer keys above `i64::MAX`, Utf8 for string
    /// keys), then one column per feature, and the read time. Keys come in the order
    /// the state holds them (by shard, then first sighting), which a read of all of
    /// them streams through; sort the result for another order.
    ///
    /// Pending events are folded and published first, as for [`Engine::read`].
    ///
    /// # Errors
    /// As [`Engine::read`].
    pub fn read_all(
        &self,
        view: &str,
        at: Option<i64>,
        features: Option<&[&str]>,
    ) -> Result<(RecordBatch, i64)> {
        let v = self.view(view)?;
        self.settle(v)?;
        let snap = v.snapshot()?;
        let (keys, ids) = snap.core.keys.all();
        let ids: Vec<Option<u32>> = ids.into_iter().map(Some).collect();
        let frame = self
            .merge_at(v, &snap, &ids, at, features, false, |k| keys[k].to_string())?
            .frame;
        drop(snap);
        let batch = self.frame_batch(view, &key_array(&keys), &frame)?;
        Ok((batch, frame.at))
    }

    /// Every key `view` holds, their ids, and their features (all if `None`) with the
    /// per-key metadata, read from the published state as of the view's read time
    /// (nothing is folded first: a subscription sees what publishes made visible).
    ///
    /// # Errors
    /// As [`Engine::read_snapshot`].
    pub(crate) fn read_all_published(
        &self,
        view: &str,
        features: Option<&[&str]>,
    ) -> Result<(Vec<KeyValue>, Vec<u32>, ServedFrame)> {
        let v = self.view(view)?;
        let snap = v.snapshot()?;
        let (keys, ids) = snap.core.keys.all();
        let some: Vec<Option<u32>> = ids.iter().copied().map(Some).collect();
        let served = self.merge_at(v, &snap, &some, None, features, true, |k| {
            keys[k].to_string()
        })?;
        Ok((keys, ids, served))
    }

    /// Publishes of `view` so far: a read of the published state changes only when
    /// this moves (or, for a view read at the wall clock, with time).
    ///
    /// # Errors
    /// Unknown view.
    pub fn published(&self, view: &str) -> Result<u64> {
        Ok(self
            .view(view)?
            .version
            .load(std::sync::atomic::Ordering::Acquire))
    }

    /// `frame` (read from `view` for `keys`) as a record batch: the keys as given
    /// (column named by the view's key), then one column per feature (see
    /// [`feature_field`]).
    ///
    /// # Errors
    /// Unknown view or feature; `keys` not as long as the frame.
    pub fn frame_batch(
        &self,
        view: &str,
        keys: &ArrayRef,
        frame: &FeatureFrame,
    ) -> Result<RecordBatch> {
        let compiled = self.compiled(view)?;
        let spec = &compiled.spec;
        let (mut fields, mut columns) = (Vec::new(), Vec::new());
        match (spec.key.as_slice(), keys.as_struct_opt()) {
            ([one], _) => {
                fields.push(Field::new(one, keys.data_type().clone(), true));
                columns.push(keys.clone());
            }
            (parts, Some(tuple)) if tuple.num_columns() == parts.len() => {
                for (name, part) in parts.iter().zip(tuple.columns()) {
                    // A null tuple is null in every part.
                    let part = match tuple.nulls() {
                        Some(n) if n.null_count() > 0 => arrow_select::nullif::nullif(
                            part,
                            &BooleanArray::new(!n.inner(), None),
                        )?,
                        _ => part.clone(),
                    };
                    fields.push(Field::new(name, part.data_type().clone(), true));
                    columns.push(part);
                }
            }
            (parts, _) if keys.is_empty() => {
                for name in parts {
                    fields.push(Field::new(name, DataType::Int64, true));
                    columns.push(Arc::new(arrow_array::Int64Array::from(Vec::<i64>::new())));
                }
            }
            (parts, _) => {
                return Err(PanesError::Invalid(format!(
                    "view {view:?} has a composite key of {} columns; the keys are {}",
                    parts.len(),
                    keys.data_type()
                )));
            }
        }
        crate::error::ensure!(
            frame.values.nrows() == keys.len(),
            "{} keys for a frame of {} rows",
            keys.len(),
            frame.values.nrows()
        );
        for (j, name) in frame.names.iter().enumerate() {
            let agg = compiled.spec.features[compiled.feature_index(name)?].agg;
            let text = frame.text.get(j).copied().unwrap_or(false);
            fields.push(feature_field(name, agg, text));
            columns.push(frame.column(j, agg));
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }

    /// Per feature of `view`: whether its values are strings (`first`, `last`,
    /// `last_n` and `top_k` of a column that has held strings), in its published state.
    ///
    /// # Errors
    /// Unknown view.
    pub fn text_features(&self, view: &str) -> Result<Vec<bool>> {
        let v = self.view(view)?;
        let all: Vec<usize> = (0..v.compiled.merges.len()).collect();
        Ok(v.compiled
            .text_features(&all, v.snapshot()?.core.strings.kinds()))
    }

    /// The kind of keys `view` holds in its published state: `"int"`, `"string"`, for
    /// a composite key its parts' kinds (`"(string, int)"`), or `None` before any.
    ///
    /// # Errors
    /// Unknown view.
    pub fn key_kind(&self, view: &str) -> Result<Option<String>> {
        Ok(self.view(view)?.snapshot()?.core.keys.kind())
    }
}

/// For a view with a composite key, struct `keys` whose fields include every key
/// column by name, projected onto them in the view's order (a DataFrame of key
/// columns, perhaps among others); any other array as it is (a struct is then taken
/// by position).
fn tuple_keys(spec: &ViewSpec, keys: &ArrayRef) -> ArrayRef {
    let Some(s) = keys.as_struct_opt().filter(|_| spec.is_composite()) else {
        return keys.clone();
    };
    let names = s.column_names();
    let at: Option<Vec<usize>> = spec
        .key
        .iter()
        .map(|k| names.iter().position(|n| n == k))
        .collect();
    match at {
        Some(at) => {
            let fields: Fields = at.iter().map(|&i| s.fields()[i].clone()).collect();
            let columns = at.iter().map(|&i| s.column(i).clone()).collect();
            Arc::new(StructArray::new(fields, columns, s.nulls().cloned()))
        }
        None => keys.clone(),
    }
}

/// Per key part whether a key value is a string, and the Arrow type that stands for
/// such keys in messages.
fn shape_of(key: &KeyValue) -> (Vec<bool>, DataType) {
    let kind = |k: &KeyValue| match k {
        KeyValue::Str(_) => (true, DataType::Utf8),
        KeyValue::Int(_) | KeyValue::Tuple(_) => (false, DataType::Int64),
    };
    match key {
        KeyValue::Tuple(parts) => {
            let kinds: Vec<(bool, DataType)> = parts.iter().map(kind).collect();
            let fields: Vec<Field> = kinds
                .iter()
                .enumerate()
                .map(|(i, (_, t))| Field::new(i.to_string(), t.clone(), true))
                .collect();
            (
                kinds.iter().map(|k| k.0).collect(),
                DataType::Struct(fields.into()),
            )
        }
        other => {
            let (text, ty) = kind(other);
            (vec![text], ty)
        }
    }
}

/// Keys given as values all of one shape, which fits the view: tuples of its length
/// for a composite key, single values otherwise, each part of the kind the index holds.
fn check_shape(view: &str, spec: &ViewSpec, keys: &[KeyValue], index: &KeyIndex) -> Result<()> {
    let Some((kinds, given)) = keys.first().map(shape_of) else {
        return Ok(());
    };
    crate::error::ensure!(
        keys.iter().all(|k| same_shape(k, &keys[0])),
        "view {view:?}: keys mix strings and integers, or tuples of different kinds"
    );
    let arity = matches!(keys[0], KeyValue::Tuple(_)).then_some(kinds.len());
    check_arity(spec, arity, &given)?;
    index.check_kind(view, &kinds, &given)
}

/// Whether two keys are both strings, both integers, or tuples of the same length
/// whose parts are alike.
fn same_shape(a: &KeyValue, b: &KeyValue) -> bool {
    match (a, b) {
        (KeyValue::Str(_), KeyValue::Str(_)) | (KeyValue::Int(_), KeyValue::Int(_)) => true,
        (KeyValue::Tuple(x), KeyValue::Tuple(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_shape(p, q))
        }
        _ => false,
    }
}

/// Keys that are tuples of `arity` parts (`None`: single values) for a view: a
/// composite key takes tuples of its length, a one-column key single values.
fn check_arity(spec: &ViewSpec, arity: Option<usize>, given: &DataType) -> Result<()> {
    let fits = match arity {
        Some(n) => spec.is_composite() && n == spec.key.len(),
        None => !spec.is_composite(),
    };
    if fits {
        return Ok(());
    }
    Err(PanesError::Invalid(if spec.is_composite() {
        format!(
            "view {:?} has a composite key {} of {} columns; give each key as a tuple (a struct) of {} values, not {given}",
            spec.name,
            spec.key_label(),
            spec.key.len(),
            spec.key.len()
        )
    } else {
        format!(
            "view {:?} has the one key column {}; the keys given are tuples ({given})",
            spec.name,
            spec.key_label()
        )
    }))
}
