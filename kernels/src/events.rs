//! Windows that are not time ranges: count windows (`window = "100 events"`) and
//! session windows (`session_gap = "30m"`), DESIGN §3b.
//!
//! Neither fits the pane rings: a count window's reach in time differs per key and per
//! read, and a session's bounds move as events (late ones too) extend or merge it. So
//! they keep state of their own, per key, beside the pane state:
//!
//! - **count windows**: a ring of the key's newest events by (time, arrival), as many as
//!   the view's largest count window, each with the values of the state columns the
//!   count features read. A read takes, from the newest down, the first `n` events at or
//!   before the read time and adds them, oldest first, to one cell of the same layout the
//!   panes use; the cell is then finalized by the same code as a pane window, so every
//!   aggregation (sketches, lists and decayed sums included) means the same thing.
//! - **session windows**: per distinct gap, the key's sessions as `(first time, last
//!   time, cell)`, in time order. An event joins every session it is within `gap` of
//!   (merging them, late events included) or opens one. A session that no accepted
//!   event can reach any more (`last + gap` below the watermark bound, the latest folded
//!   time minus the allowed lateness) is dropped, except that the key remembers where
//!   the dropped ones ended, so a read knows when it cannot be answered.
//!
//! Arrival order is the order of the folds (the engine folds accepted events in arrival
//! order online, and by (time, arrival) in backfill, which gives the same ties), counted
//! by the state itself, so two replicas folding the same batches stay bitwise equal.
//!
//! This state lives on the host whatever the backend: reads take at most `n` events per
//! key and feature, and sessions are one cell each. A read is exact when the state holds
//! what the window at the read time needs; otherwise the key's [`ReadStatus`] says why,
//! as for panes: a count window needs events older than the ring kept
//! ([`ReadStatus::NotRetained`]), a session at the read time also holds later events
//! ([`ReadStatus::PaneHoldsLaterEvents`]), or a dropped session might be the one at the
//! read time (`NotRetained`). Reads at the latest event time and backfill reads are
//! always exact.

use std::collections::VecDeque;

use crate::agg::{Agg, ColumnFields};
use crate::backend::Backend;
use crate::error::KernelError;
use crate::level::{Acc, EMPTY_PANE, Layout, add, merge_after, write_window};
use crate::state::{FeatureMerge, FoldBatch, MergeOutput, PaneState, ReadStatus};

/// Largest count window, events.
pub const MAX_COUNT_WINDOW: u32 = 10_000;

/// The event-window state of a view.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventSpec {
    /// Events kept per key for count windows: the largest count window (0: none).
    pub count: u32,
    /// Per state column (a fold batch's `values`), the fields count windows read
    /// from it (empty for a column they do not read).
    pub count_columns: Vec<ColumnFields>,
    /// One entry per distinct session gap.
    pub sessions: Vec<SessionSpec>,
    /// The view's allowed lateness, ms: how far below the latest folded time an event
    /// may still arrive, so how long a session stays open to merges.
    pub lateness: i64,
}

/// The sessions of one gap.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SessionSpec {
    /// Largest distance between consecutive events of one session, ms.
    pub gap: i64,
    /// Per state column, the fields the features of this gap read from it.
    pub columns: Vec<ColumnFields>,
}

impl EventSpec {
    /// Whether the view has no count nor session window.
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.sessions.is_empty()
    }
}

/// The window of an [`EventMerge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventWindow {
    /// The `n` newest events at or before the read time.
    Count(u32),
    /// The session at the read time, of [`EventSpec::sessions`]`[i]`.
    Session(usize),
}

/// One feature over an event window, to compute in a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventMerge {
    /// The window.
    pub window: EventWindow,
    /// The aggregation.
    pub agg: Agg,
    /// State column, or `None` for `count` of rows.
    pub column: Option<usize>,
}

/// A feature of a read: over the panes of a hop level, or over an event window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// A time window, computed by a [`Backend`] from the pane state.
    Panes(FeatureMerge),
    /// A count or session window, computed from the [`EventState`].
    Events(EventMerge),
}

impl Merge {
    /// The aggregation.
    pub fn agg(&self) -> Agg {
        match self {
            Merge::Panes(m) => m.agg,
            Merge::Events(m) => m.agg,
        }
    }
}

/// Computes `features` for keys `ids` at `at` into `out`: the time windows by `backend`
/// from `state` (one call, as without event windows), the count and session windows
/// from `events`, each key's status the worst of its features'.
///
/// # Errors
/// As [`Backend::merge`] and [`EventState::merge`].
pub fn merge(
    backend: &dyn Backend,
    state: &PaneState,
    events: &EventState,
    features: &[Merge],
    ids: &[Option<u32>],
    at: i64,
    out: &mut MergeOutput,
) -> Result<(), KernelError> {
    let mut panes = Vec::with_capacity(features.len());
    let mut of_events = Vec::new();
    for f in features {
        match f {
            Merge::Panes(m) => panes.push(*m),
            Merge::Events(m) => of_events.push(*m),
        }
    }
    if of_events.is_empty() {
        return backend.merge(state, &panes, ids, at, out);
    }
    let mut by_events = MergeOutput::default();
    events.merge(&of_events, ids, at, &mut by_events)?;
    if panes.is_empty() {
        *out = by_events;
        return Ok(());
    }
    let mut by_panes = MergeOutput::default();
    backend.merge(state, &panes, ids, at, &mut by_panes)?;
    let nf = features.len();
    out.reset(ids.len(), nf);
    let lists = features.iter().any(|f| f.agg().is_list());
    if lists {
        out.lists.resize(ids.len() * nf, Vec::new());
    }
    for k in 0..ids.len() {
        let (mut p, mut e) = (k * panes.len(), k * of_events.len());
        for (f, feature) in features.iter().enumerate() {
            let (src, i) = match feature {
                Merge::Panes(_) => (&mut by_panes, &mut p),
                Merge::Events(_) => (&mut by_events, &mut e),
            };
            let o = k * nf + f;
            out.values[o] = src.values[*i];
            out.valid[o] = src.valid[*i];
            if lists && !src.lists.is_empty() {
                out.lists[o] = std::mem::take(&mut src.lists[*i]);
            }
            *i += 1;
        }
        out.status[k] = by_panes.status[k].worst(by_events.status[k]);
    }
    Ok(())
}

/// One session: its first and last event times and its partial aggregate.
#[derive(Clone, Debug)]
struct Session {
    start: i64,
    end: i64,
    cell: Box<[f64]>,
}

/// The sessions of one key for one gap.
#[derive(Clone, Debug, Default)]
struct Sessions {
    /// In time order, disjoint and more than the gap apart.
    list: Vec<Session>,
    /// Last time of the latest dropped session, if any was dropped.
    dropped_until: Option<i64>,
}

/// The event-window state of one key.
#[derive(Clone, Debug, Default)]
struct KeyEvents {
    /// The newest events, ascending by (time, arrival): `(ts, arrival)`.
    times: VecDeque<(i64, u64)>,
    /// Their stored values, [`EventState::stored`] per event, in the same order.
    values: VecDeque<f64>,
    /// Whether an event of the key was ever left out of `times` (so older events exist).
    dropped: bool,
    /// Per session gap (empty until the key's first event).
    sessions: Vec<Sessions>,
}

/// Count and session windows of every key of a view (see the module docs).
#[derive(Clone, Debug)]
pub struct EventState {
    spec: EventSpec,
    /// The state columns count windows read: the columns of a ring event's values.
    stored: Vec<usize>,
    count_layout: Layout,
    session_layouts: Vec<Layout>,
    keys: Vec<KeyEvents>,
    /// Events folded: the arrival number of the next one.
    arrivals: u64,
    /// Latest time folded (`EMPTY_PANE`: none).
    max_ts: i64,
}

/// Bitwise equality (NaN cells included), as replicas must be.
impl PartialEq for EventState {
    fn eq(&self, o: &Self) -> bool {
        self.spec == o.spec && self.export() == o.export()
    }
}

/// A value of `words` at `at`, or the error of a short image.
fn word(words: &[u64], at: &mut usize) -> Result<u64, KernelError> {
    let w = words
        .get(*at)
        .copied()
        .ok_or_else(|| KernelError::Shape(format!("event-window image ends at word {at}")))?;
    *at += 1;
    Ok(w)
}

/// A count of items of at least `size` words each, checked against the words left.
fn count(words: &[u64], at: &mut usize, size: usize) -> Result<usize, KernelError> {
    let n = word(words, at)?;
    let left = (words.len() - *at) as u64;
    if n.saturating_mul(size as u64) > left {
        return Err(KernelError::Shape(format!(
            "event-window image: {n} items announced at word {}, {left} words left",
            *at - 1
        )));
    }
    Ok(n as usize)
}

fn time(words: &[u64], at: &mut usize) -> Result<i64, KernelError> {
    let t = word(words, at)? as i64;
    if t.unsigned_abs() > crate::MAX_TIME_MS {
        return Err(KernelError::Shape(format!(
            "event-window image: time {t} out of range"
        )));
    }
    Ok(t)
}

impl EventState {
    /// An empty state of `spec`.
    ///
    /// # Errors
    /// [`KernelError::InvalidSpec`] for a count window over [`MAX_COUNT_WINDOW`], a gap
    /// or lateness that is not positive (lateness: negative), or column lists of
    /// different lengths.
    pub fn new(spec: EventSpec) -> Result<Self, KernelError> {
        if spec.count > MAX_COUNT_WINDOW {
            return Err(KernelError::InvalidSpec(format!(
                "count window of {} events (at most {MAX_COUNT_WINDOW})",
                spec.count
            )));
        }
        if spec.lateness < 0 || spec.sessions.iter().any(|s| s.gap <= 0) {
            return Err(KernelError::InvalidSpec(
                "a session gap must be positive and the lateness not negative".into(),
            ));
        }
        let columns = spec.count_columns.len();
        if spec.sessions.iter().any(|s| s.columns.len() != columns) {
            return Err(KernelError::InvalidSpec(
                "every event window has one field set per state column".into(),
            ));
        }
        let stored = (0..columns)
            .filter(|&c| !spec.count_columns[c].is_empty())
            .collect();
        Ok(EventState {
            count_layout: Layout::new(&spec.count_columns),
            session_layouts: spec
                .sessions
                .iter()
                .map(|s| Layout::new(&s.columns))
                .collect(),
            stored,
            spec,
            keys: Vec::new(),
            arrivals: 0,
            max_ts: EMPTY_PANE,
        })
    }

    /// The spec.
    pub fn spec(&self) -> &EventSpec {
        &self.spec
    }

    /// Folds a batch of accepted events, in arrival order.
    ///
    /// # Errors
    /// [`KernelError::Shape`] when the batch's columns do not match the spec, and
    /// [`KernelError::TimeOutOfRange`]; nothing is folded then.
    pub fn fold(&mut self, batch: &FoldBatch<'_>) -> Result<(), KernelError> {
        if self.spec.is_empty() {
            return Ok(());
        }
        let columns = self.spec.count_columns.len();
        if batch.values.len() != columns
            || batch.values.iter().any(|v| v.len() != batch.len())
            || batch.ts.len() != batch.len()
        {
            return Err(KernelError::Shape(format!(
                "event windows over {columns} columns got a batch of {} columns",
                batch.values.len()
            )));
        }
        if let Some(&t) = batch
            .ts
            .iter()
            .find(|t| t.unsigned_abs() > crate::MAX_TIME_MS)
        {
            return Err(KernelError::TimeOutOfRange(t));
        }
        let top = batch.ids.iter().max().map_or(0, |&m| m as usize + 1);
        if top > self.keys.len() {
            self.keys.resize_with(top, KeyEvents::default);
        }
        for e in 0..batch.len() {
            let ts = batch.ts[e];
            let arrival = self.arrivals;
            self.arrivals += 1;
            self.max_ts = self.max_ts.max(ts);
            let id = batch.ids[e] as usize;
            if self.spec.count > 0 {
                self.keep_event(id, ts, arrival, batch.values, e);
            }
            let key = &mut self.keys[id];
            if key.sessions.len() < self.spec.sessions.len() {
                key.sessions
                    .resize_with(self.spec.sessions.len(), Sessions::default);
            }
            // Every event folded later has a time of at least this (see the module docs).
            let bound = self.max_ts.saturating_sub(self.spec.lateness);
            for ((sessions, spec), layout) in key
                .sessions
                .iter_mut()
                .zip(&self.spec.sessions)
                .zip(&self.session_layouts)
            {
                sessions.add(layout, spec.gap, ts, batch.values, e);
                sessions.drop_closed(spec.gap, bound);
            }
        }
        Ok(())
    }

    /// Puts event `e` of `values` into key `id`'s ring of newest events.
    fn keep_event(&mut self, id: usize, ts: i64, arrival: u64, values: &[&[f64]], e: usize) {
        let n = self.spec.count as usize;
        let width = self.stored.len();
        let key = &mut self.keys[id];
        // The newest arrival: after every kept event of its time.
        let at = key.times.partition_point(|&(t, _)| t <= ts);
        if key.times.len() == n && at == 0 {
            key.dropped = true;
            return;
        }
        key.times.insert(at, (ts, arrival));
        for (j, &c) in self.stored.iter().enumerate() {
            key.values.insert(at * width + j, values[c][e]);
        }
        if key.times.len() > n {
            key.times.pop_front();
            key.values.drain(..width);
            key.dropped = true;
        }
    }

    /// Computes `features` for keys `ids` at `at` into `out` (reset to `ids.len()` rows
    /// of `features.len()` values, statuses and lists as a pane merge gives them).
    ///
    /// # Errors
    /// [`KernelError::Shape`] when a feature does not fit the spec.
    pub fn merge(
        &self,
        features: &[EventMerge],
        ids: &[Option<u32>],
        at: i64,
        out: &mut MergeOutput,
    ) -> Result<(), KernelError> {
        for (i, f) in features.iter().enumerate() {
            let (columns, ok_window) = match f.window {
                EventWindow::Count(n) => (&self.spec.count_columns, n >= 1 && n <= self.spec.count),
                EventWindow::Session(s) => match self.spec.sessions.get(s) {
                    Some(spec) => (&spec.columns, true),
                    None => (&self.spec.count_columns, false),
                },
            };
            let stored = f.column.map_or(ColumnFields::default(), |c| {
                columns.get(c).copied().unwrap_or_default()
            });
            let fits = f.column.is_none() && f.agg == Agg::Count
                || f.column.is_some() && stored.union(f.agg.fields()) == stored;
            if !ok_window || !fits {
                return Err(KernelError::Shape(format!(
                    "event feature {i} ({} over {:?}) does not fit the event windows' spec",
                    f.agg, f.window
                )));
            }
        }
        let nf = features.len();
        out.reset(ids.len(), nf);
        if features.iter().any(|f| f.agg.is_list()) {
            out.lists.resize(ids.len() * nf, Vec::new());
        }
        let mut scratch = Scratch::default();
        for (k, id) in ids.iter().enumerate() {
            let key = id.and_then(|id| self.keys.get(id as usize));
            for (f, fm) in features.iter().enumerate() {
                let (acc, status) = match (key, fm.window) {
                    (None, _) => (Acc::EMPTY, ReadStatus::Exact),
                    (Some(key), EventWindow::Count(n)) => {
                        self.count_window(key, n as usize, fm.column, at, &mut scratch)
                    }
                    (Some(key), EventWindow::Session(s)) => match key.sessions.get(s) {
                        Some(sessions) => sessions.window(
                            &self.session_layouts[s],
                            self.spec.sessions[s].gap,
                            fm.column,
                            at,
                        ),
                        None => (Acc::EMPTY, ReadStatus::Exact),
                    },
                };
                write_window(out, k, f, fm.agg, fm.column, &acc, at, status);
            }
        }
        Ok(())
    }

    /// The up to `n` newest events of `key` at or before `at`, accumulated.
    fn count_window(
        &self,
        key: &KeyEvents,
        n: usize,
        column: Option<usize>,
        at: i64,
        scratch: &mut Scratch,
    ) -> (Acc, ReadStatus) {
        let width = self.stored.len();
        let end = key.times.partition_point(|&(t, _)| t <= at);
        let start = end.saturating_sub(n);
        let status = if end - start < n && key.dropped {
            ReadStatus::NotRetained
        } else {
            ReadStatus::Exact
        };
        // The events as a fold batch's columns, oldest first.
        let columns = self.spec.count_columns.len();
        scratch.columns.resize_with(columns, Vec::new);
        for c in &mut scratch.columns {
            c.clear();
        }
        scratch.ts.clear();
        for i in start..end {
            scratch.ts.push(key.times[i].0);
            for (j, &c) in self.stored.iter().enumerate() {
                scratch.columns[c].push(key.values[i * width + j]);
            }
        }
        let layout = &self.count_layout;
        let values: Vec<&[f64]> = scratch.columns.iter().map(Vec::as_slice).collect();
        let mut cell = layout.identity.clone();
        for (e, &ts) in scratch.ts.iter().enumerate() {
            add(layout, &mut cell, ts, &values, e);
        }
        let mut acc = Acc::EMPTY;
        acc.add_cell(layout, &cell, column);
        (acc, status)
    }

    /// Bytes held (capacity of the per-key buffers and cells).
    pub fn memory_bytes(&self) -> usize {
        let per_key = std::mem::size_of::<KeyEvents>();
        self.keys
            .iter()
            .map(|k| {
                per_key
                    + k.times.capacity() * 16
                    + k.values.capacity() * 8
                    + k.sessions
                        .iter()
                        .map(|s| {
                            std::mem::size_of::<Sessions>()
                                + s.list.capacity() * std::mem::size_of::<Session>()
                                + s.list.iter().map(|x| x.cell.len() * 8).sum::<usize>()
                        })
                        .sum::<usize>()
            })
            .sum()
    }

    /// Bytes one key costs at most in the count ring (its sessions come on top:
    /// [`EventState::session_bytes`] each).
    pub fn count_bytes_per_key(&self) -> usize {
        self.spec.count as usize * (16 + 8 * self.stored.len())
    }

    /// Bytes of one session of each gap, in order.
    pub fn session_bytes(&self) -> Vec<usize> {
        self.session_layouts
            .iter()
            .map(|l| 8 * l.stride + std::mem::size_of::<Session>())
            .collect()
    }

    /// The state as words, for a checkpoint ([`EventState::import`] reads them back).
    pub fn export(&self) -> Vec<u64> {
        if self.spec.is_empty() {
            return Vec::new();
        }
        let mut w = vec![self.arrivals, self.max_ts as u64, self.keys.len() as u64];
        for k in &self.keys {
            w.push(k.times.len() as u64);
            w.push(u64::from(k.dropped));
            w.extend(k.values.iter().map(|v| v.to_bits()));
            for &(t, a) in &k.times {
                w.extend([t as u64, a]);
            }
            w.push(k.sessions.len() as u64);
            for s in &k.sessions {
                w.push(s.list.len() as u64);
                w.push(s.dropped_until.unwrap_or(EMPTY_PANE) as u64);
                for x in &s.list {
                    w.extend([x.start as u64, x.end as u64]);
                    w.extend(x.cell.iter().map(|v| v.to_bits()));
                }
            }
        }
        w
    }

    /// Rebuilds a state of `spec` from [`EventState::export`]'s words, checking every
    /// length, order and sketch header (the words come from a file).
    ///
    /// # Errors
    /// [`KernelError::Shape`] saying what does not fit.
    pub fn import(spec: EventSpec, words: &[u64]) -> Result<Self, KernelError> {
        let mut s = EventState::new(spec)?;
        if s.spec.is_empty() && words.is_empty() {
            return Ok(s);
        }
        let bad = |m: String| Err(KernelError::Shape(format!("event-window image: {m}")));
        let at = &mut 0;
        s.arrivals = word(words, at)?;
        s.max_ts = word(words, at)? as i64;
        if s.max_ts != EMPTY_PANE && s.max_ts.unsigned_abs() > crate::MAX_TIME_MS {
            return bad(format!("latest time {} out of range", s.max_ts));
        }
        let width = s.stored.len();
        let nkeys = count(words, at, 3)?;
        s.keys.reserve(nkeys);
        for id in 0..nkeys {
            let mut k = KeyEvents::default();
            let n = count(words, at, 2 + width)?;
            if n > s.spec.count as usize {
                return bad(format!(
                    "key {id} keeps {n} events, more than {}",
                    s.spec.count
                ));
            }
            k.dropped = match word(words, at)? {
                0 => false,
                1 => true,
                d => return bad(format!("key {id}: dropped flag {d}")),
            };
            for _ in 0..n * width {
                k.values.push_back(f64::from_bits(word(words, at)?));
            }
            for _ in 0..n {
                let t = time(words, at)?;
                let a = word(words, at)?;
                if a >= s.arrivals || k.times.back().is_some_and(|&b| b >= (t, a)) {
                    return bad(format!("key {id}: events out of order"));
                }
                k.times.push_back((t, a));
            }
            let families = count(words, at, 2)?;
            if families != 0 && families != s.spec.sessions.len() {
                return bad(format!("key {id}: {families} session gaps"));
            }
            for f in 0..families {
                let layout = &s.session_layouts[f];
                let gap = s.spec.sessions[f].gap;
                let mut sessions = Sessions::default();
                let n = count(words, at, 2 + layout.stride)?;
                let until = word(words, at)? as i64;
                sessions.dropped_until = (until != EMPTY_PANE).then_some(until);
                for _ in 0..n {
                    let (start, end) = (time(words, at)?, time(words, at)?);
                    let cell: Box<[f64]> = (0..layout.stride)
                        .map(|_| word(words, at).map(f64::from_bits))
                        .collect::<Result<_, _>>()?;
                    let after = sessions
                        .list
                        .last()
                        .map_or(sessions.dropped_until, |p| Some(p.end));
                    if start > end || after.is_some_and(|p| start.saturating_sub(p) <= gap) {
                        return bad(format!("key {id}: sessions out of order"));
                    }
                    if !layout.sketches_valid(&cell) {
                        return bad(format!("key {id}: a sketch's header is out of range"));
                    }
                    sessions.list.push(Session { start, end, cell });
                }
                k.sessions.push(sessions);
            }
            s.keys.push(k);
        }
        if *at != words.len() {
            return bad(format!("{} words left over", words.len() - *at));
        }
        Ok(s)
    }
}

/// Buffers reused across the keys of a read.
#[derive(Default)]
struct Scratch {
    ts: Vec<i64>,
    columns: Vec<Vec<f64>>,
}

impl Sessions {
    /// Adds event `e` (time `ts`) of `values`: into the session(s) it is within `gap`
    /// of, merged into one, or into a new session.
    fn add(&mut self, layout: &Layout, gap: i64, ts: i64, values: &[&[f64]], e: usize) {
        let i = self
            .list
            .partition_point(|s| s.end.saturating_add(gap) < ts);
        let j = i + self.list[i..].partition_point(|s| s.start.saturating_sub(gap) <= ts);
        if i == j {
            let mut cell: Box<[f64]> = layout.identity.clone().into();
            add(layout, &mut cell, ts, values, e);
            self.list.insert(
                i,
                Session {
                    start: ts,
                    end: ts,
                    cell,
                },
            );
            return;
        }
        // Sessions hold disjoint times, so the order of their merge breaks no tie.
        let merged: Vec<Session> = self.list.drain(i + 1..j).collect();
        let s = &mut self.list[i];
        for m in merged {
            merge_after(layout, &mut s.cell, &m.cell);
            s.end = s.end.max(m.end);
        }
        s.start = s.start.min(ts);
        s.end = s.end.max(ts);
        add(layout, &mut s.cell, ts, values, e);
    }

    /// Drops the sessions no event of time `bound` or later can join.
    fn drop_closed(&mut self, gap: i64, bound: i64) {
        let k = self
            .list
            .partition_point(|s| s.end.saturating_add(gap) < bound);
        if k > 0 {
            let end = self.list[k - 1].end;
            self.dropped_until = Some(self.dropped_until.map_or(end, |d| d.max(end)));
            self.list.drain(..k);
        }
    }

    /// The session at `at`, accumulated for `column`.
    fn window(
        &self,
        layout: &Layout,
        gap: i64,
        column: Option<usize>,
        at: i64,
    ) -> (Acc, ReadStatus) {
        let mut acc = Acc::EMPTY;
        let i = self.list.partition_point(|s| s.start <= at);
        let status = match i.checked_sub(1).map(|i| &self.list[i]) {
            // Events after `at` are in the session's partial: it cannot be split.
            Some(s) if s.end > at => ReadStatus::PaneHoldsLaterEvents,
            Some(s) => {
                if at - s.end <= gap {
                    acc.add_cell(layout, &s.cell, column);
                }
                ReadStatus::Exact
            }
            None => match self.dropped_until {
                // A dropped session may be the one at `at`.
                Some(d) if at.saturating_sub(d) <= gap => ReadStatus::NotRetained,
                _ => ReadStatus::Exact,
            },
        };
        (acc, status)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{LevelSpec, Scalar, StateSpec};

    /// One state column per aggregation of [`Agg::ALL`], each storing that aggregation.
    fn columns() -> Vec<ColumnFields> {
        Agg::ALL.iter().map(|a| a.fields()).collect()
    }

    /// Every aggregation over its own column, plus `count` of rows.
    fn features(window: EventWindow) -> Vec<EventMerge> {
        let mut f: Vec<EventMerge> = Agg::ALL
            .iter()
            .enumerate()
            .map(|(c, &agg)| EventMerge {
                window,
                agg,
                column: Some(c),
            })
            .collect();
        f.push(EventMerge {
            window,
            agg: Agg::Count,
            column: None,
        });
        f
    }

    /// An accepted event: key, time, value (null as NaN), arrival.
    #[derive(Clone, Copy, Debug)]
    struct Ev {
        id: u32,
        ts: i64,
        x: f64,
        arrival: usize,
    }

    /// Random events of `keys` keys with disorder, filtered by the lateness rule in
    /// arrival order (as ingest decides it).
    fn accepted(rng: &mut StdRng, keys: u32, n: usize, lateness: i64) -> Vec<Ev> {
        let mut max_ts = i64::MIN;
        let mut out = Vec::new();
        for i in 0..n {
            // Multiples of 5: many distances equal a gap exactly.
            let ts = i as i64 * 10 - 5 * rng.random_range(0..80);
            let x = match rng.random_range(0..10) {
                0 => f64::NAN,
                1 => -0.0,
                2 => 0.0,
                _ => f64::from(rng.random_range(-20..20)) * 0.5,
            };
            if max_ts != i64::MIN && ts < max_ts - lateness {
                continue;
            }
            max_ts = max_ts.max(ts);
            let arrival = out.len();
            out.push(Ev {
                id: rng.random_range(0..keys),
                ts,
                x,
                arrival,
            });
        }
        out
    }

    /// Folds `events` into `state` in random batches.
    fn fold_all(rng: &mut StdRng, state: &mut EventState, events: &[Ev]) {
        let mut at = 0;
        while at < events.len() {
            let end = (at + rng.random_range(1..40)).min(events.len());
            let part = &events[at..end];
            let ids: Vec<u32> = part.iter().map(|e| e.id).collect();
            let ts: Vec<i64> = part.iter().map(|e| e.ts).collect();
            let xs: Vec<f64> = part.iter().map(|e| e.x).collect();
            let values: Vec<&[f64]> = vec![&xs; Agg::ALL.len()];
            state
                .fold(&FoldBatch {
                    ids: &ids,
                    ts: &ts,
                    values: &values,
                })
                .unwrap();
            at = end;
        }
    }

    /// The features over exactly `window` (events in arrival order), at `at`: the
    /// scalar backend over a lifetime level that holds only them.
    fn oracle(window: &[Ev], features: &[EventMerge], at: i64) -> MergeOutput {
        let mut sorted = window.to_vec();
        sorted.sort_by_key(|e| (e.ts, e.arrival));
        let spec = StateSpec {
            levels: vec![LevelSpec {
                hop: 1_000_000,
                ring: 1,
                columns: columns(),
                lifetime: true,
            }],
            shards: 1,
        };
        let mut state = PaneState::new(spec).unwrap();
        let ids = vec![0; sorted.len()];
        let ts: Vec<i64> = sorted.iter().map(|e| e.ts).collect();
        let xs: Vec<f64> = sorted.iter().map(|e| e.x).collect();
        let values: Vec<&[f64]> = vec![&xs; Agg::ALL.len()];
        Scalar
            .fold(
                &mut state,
                &FoldBatch {
                    ids: &ids,
                    ts: &ts,
                    values: &values,
                },
            )
            .unwrap();
        let merges: Vec<FeatureMerge> = features
            .iter()
            .map(|f| FeatureMerge {
                level: 0,
                agg: f.agg,
                column: f.column,
                panes: None,
            })
            .collect();
        let mut out = MergeOutput::default();
        let id = (!sorted.is_empty()).then_some(0);
        Scalar.merge(&state, &merges, &[id], at, &mut out).unwrap();
        out
    }

    fn assert_same(
        got: &MergeOutput,
        k: usize,
        want: &MergeOutput,
        features: &[EventMerge],
        what: &str,
    ) {
        let nf = features.len();
        for (f, fm) in features.iter().enumerate() {
            let (g, w) = (got.values[k * nf + f], want.values[f]);
            assert_eq!(
                got.valid[k * nf + f],
                want.valid[f],
                "{what}: {} validity",
                fm.agg
            );
            let same = if fm.agg.bitwise() {
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
            } else {
                (g.is_nan() && w.is_nan()) || (g - w).abs() <= 1e-9 * w.abs().max(1.0)
            };
            assert!(same, "{what}: {} gives {g}, expected {w}", fm.agg);
            if fm.agg.is_list() {
                assert_eq!(
                    got.lists[k * nf + f],
                    want.lists[f],
                    "{what}: {} list",
                    fm.agg
                );
            }
        }
    }

    fn spec(count: u32, gaps: &[i64], lateness: i64) -> EventSpec {
        EventSpec {
            count,
            count_columns: if count > 0 {
                columns()
            } else {
                vec![ColumnFields::default(); Agg::ALL.len()]
            },
            sessions: gaps
                .iter()
                .map(|&gap| SessionSpec {
                    gap,
                    columns: columns(),
                })
                .collect(),
            lateness,
        }
    }

    #[test]
    fn count_windows_take_the_newest_events_at_or_before_the_read_time() {
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..20 {
            let lateness = [0, 50, 300][round % 3];
            let (n, keep) = [(1, 1), (5, 5), (20, 30), (7, 200)][round % 4];
            let events = accepted(&mut rng, 4, 300, lateness);
            let mut state = EventState::new(spec(keep, &[], lateness)).unwrap();
            fold_all(&mut rng, &mut state, &events);
            let features = features(EventWindow::Count(n));
            let max_ts = events.iter().map(|e| e.ts).max().unwrap();
            for at in [max_ts, max_ts + 1000, max_ts - 30, max_ts - 200] {
                let ids = [Some(0), Some(1), Some(2), Some(3), None];
                let mut out = MergeOutput::default();
                state.merge(&features, &ids, at, &mut out).unwrap();
                for (k, id) in ids.iter().enumerate() {
                    let mut of_key: Vec<Ev> = events
                        .iter()
                        .filter(|e| Some(e.id) == *id && e.ts <= at)
                        .copied()
                        .collect();
                    of_key.sort_by_key(|e| (e.ts, e.arrival));
                    let window = &of_key[of_key.len().saturating_sub(n as usize)..];
                    let what = format!("round {round}, key {id:?}, at {at}");
                    if at >= max_ts {
                        assert_eq!(out.status[k], ReadStatus::Exact, "{what}");
                    }
                    if out.status[k] == ReadStatus::Exact {
                        assert_same(&out, k, &oracle(window, &features, at), &features, &what);
                    }
                }
            }
        }
    }

    /// The session of a key at `at` by the definition: the longest suffix of its events
    /// at or before `at`, in time order, with consecutive gaps of at most `gap`; none
    /// when the last is more than `gap` before `at`.
    fn session_at(events: &[Ev], id: u32, gap: i64, at: i64) -> Vec<Ev> {
        let mut of_key: Vec<Ev> = events
            .iter()
            .filter(|e| e.id == id && e.ts <= at)
            .copied()
            .collect();
        of_key.sort_by_key(|e| (e.ts, e.arrival));
        let Some(last) = of_key.last() else {
            return of_key;
        };
        if at - last.ts > gap {
            return Vec::new();
        }
        let mut start = of_key.len() - 1;
        while start > 0 && of_key[start].ts - of_key[start - 1].ts <= gap {
            start -= 1;
        }
        of_key[start..].to_vec()
    }

    #[test]
    fn sessions_follow_the_definition_with_late_events_joining_and_merging_them() {
        let mut rng = StdRng::seed_from_u64(11);
        for round in 0..20 {
            let lateness = [0, 100, 400][round % 3];
            let gaps = [25, 60, 5];
            let events = accepted(&mut rng, 3, 300, lateness);
            let mut state = EventState::new(spec(0, &gaps, lateness)).unwrap();
            fold_all(&mut rng, &mut state, &events);
            let max_ts = events.iter().map(|e| e.ts).max().unwrap();
            for (s, &gap) in gaps.iter().enumerate() {
                let features = features(EventWindow::Session(s));
                for at in [max_ts, max_ts + 20, max_ts + 100, max_ts - 40] {
                    let ids = [Some(0), Some(1), Some(2), None];
                    let mut out = MergeOutput::default();
                    state.merge(&features, &ids, at, &mut out).unwrap();
                    for (k, id) in ids.iter().enumerate() {
                        let window = id.map_or(Vec::new(), |id| session_at(&events, id, gap, at));
                        let what = format!("round {round}, gap {gap}, key {id:?}, at {at}");
                        if at >= max_ts {
                            assert_eq!(out.status[k], ReadStatus::Exact, "{what}");
                        }
                        if out.status[k] == ReadStatus::Exact {
                            assert_same(&out, k, &oracle(&window, &features, at), &features, &what);
                        }
                    }
                }
            }
        }
    }

    /// Backfill folds in time order and reads between folds: every read is exact.
    #[test]
    fn reads_between_folds_in_time_order_are_exact() {
        let mut rng = StdRng::seed_from_u64(3);
        let events = accepted(&mut rng, 2, 200, 200);
        let mut sorted = events.clone();
        sorted.sort_by_key(|e| e.ts);
        let mut state = EventState::new(spec(4, &[30], 200)).unwrap();
        let count = features(EventWindow::Count(3));
        let session = features(EventWindow::Session(0));
        for (i, e) in sorted.iter().enumerate() {
            fold_all(&mut rng, &mut state, std::slice::from_ref(e));
            if sorted.get(i + 1).is_some_and(|n| n.ts == e.ts) {
                continue;
            }
            let folded = &sorted[..=i];
            for id in 0..2 {
                let mut out = MergeOutput::default();
                state.merge(&count, &[Some(id)], e.ts, &mut out).unwrap();
                assert_eq!(out.status[0], ReadStatus::Exact);
                let of_key: Vec<Ev> = folded.iter().filter(|x| x.id == id).copied().collect();
                let window = &of_key[of_key.len().saturating_sub(3)..];
                assert_same(&out, 0, &oracle(window, &count, e.ts), &count, "count");
                state.merge(&session, &[Some(id)], e.ts, &mut out).unwrap();
                assert_eq!(out.status[0], ReadStatus::Exact);
                let window = session_at(folded, id, 30, e.ts);
                assert_same(
                    &out,
                    0,
                    &oracle(&window, &session, e.ts),
                    &session,
                    "session",
                );
            }
        }
    }

    #[test]
    fn reads_the_state_cannot_answer_are_reported() {
        let mut state = EventState::new(spec(2, &[10], 0)).unwrap();
        let xs = [1.0, 2.0, 3.0, 4.0];
        let values: Vec<&[f64]> = vec![&xs; Agg::ALL.len()];
        let batch = FoldBatch {
            ids: &[0, 0, 0, 0],
            ts: &[0, 100, 200, 205],
            values: &values,
        };
        state.fold(&batch).unwrap();
        let read = |window, at| {
            let mut out = MergeOutput::default();
            let f = [EventMerge {
                window,
                agg: Agg::Sum,
                column: Some(1),
            }];
            state.merge(&f, &[Some(0)], at, &mut out).unwrap();
            (out.values[0], out.status[0])
        };
        assert_eq!(read(EventWindow::Count(2), 205), (7.0, ReadStatus::Exact));
        assert_eq!(read(EventWindow::Count(1), 202), (3.0, ReadStatus::Exact));
        // Two events before 150, but the ring kept only the two newest.
        assert_eq!(read(EventWindow::Count(2), 150).1, ReadStatus::NotRetained);
        assert_eq!(read(EventWindow::Session(0), 205), (7.0, ReadStatus::Exact));
        assert_eq!(read(EventWindow::Session(0), 215), (7.0, ReadStatus::Exact));
        assert_eq!(read(EventWindow::Session(0), 216), (0.0, ReadStatus::Exact));
        // The session 200–205 also holds 205.
        assert_eq!(
            read(EventWindow::Session(0), 202).1,
            ReadStatus::PaneHoldsLaterEvents
        );
        // The sessions at 0 and 100 were dropped (lateness 0).
        assert_eq!(
            read(EventWindow::Session(0), 105).1,
            ReadStatus::NotRetained
        );
        assert_eq!(read(EventWindow::Session(0), 150), (0.0, ReadStatus::Exact));
    }

    #[test]
    fn a_feature_that_does_not_fit_the_spec_is_refused() {
        let state = EventState::new(spec(5, &[10], 0)).unwrap();
        let mut out = MergeOutput::default();
        for window in [
            EventWindow::Count(6),
            EventWindow::Count(0),
            EventWindow::Session(1),
        ] {
            let f = [EventMerge {
                window,
                agg: Agg::Count,
                column: None,
            }];
            assert!(state.merge(&f, &[None], 0, &mut out).is_err(), "{window:?}");
        }
        let f = [EventMerge {
            window: EventWindow::Count(5),
            agg: Agg::Var,
            column: Some(1),
        }];
        assert!(
            state.merge(&f, &[None], 0, &mut out).is_err(),
            "var from a sum column"
        );
    }

    #[test]
    fn export_and_import_round_trip_and_damaged_images_are_refused() {
        let mut rng = StdRng::seed_from_u64(5);
        let events = accepted(&mut rng, 5, 200, 100);
        let mut state = EventState::new(spec(6, &[20, 50], 100)).unwrap();
        fold_all(&mut rng, &mut state, &events);
        let words = state.export();
        let back = EventState::import(state.spec().clone(), &words).unwrap();
        assert!(back == state);
        assert!(back.export() == words);
        for cut in [0, 1, 3, words.len() / 2, words.len() - 1] {
            assert!(
                EventState::import(state.spec().clone(), &words[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = words.clone();
        longer.push(0);
        assert!(EventState::import(state.spec().clone(), &longer).is_err());
        let mut rng = StdRng::seed_from_u64(9);
        for _ in 0..2000 {
            let mut bad = words.clone();
            let i = rng.random_range(0..bad.len());
            bad[i] = [u64::MAX, 1 << 40, rng.random(), 0][rng.random_range(0..4)];
            // Any outcome but a panic; an accepted image must read back the same.
            if let Ok(s) = EventState::import(state.spec().clone(), &bad) {
                assert!(s.export() == bad, "an accepted image reads back the same");
            }
        }
    }
}
