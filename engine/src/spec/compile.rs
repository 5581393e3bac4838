//! A view compiled to its pane-state shape: which value columns it reads, one state
//! level per distinct hop, each ring long enough for the longest window and the
//! lateness bound, and how each feature merges its panes.
//!
//! Part of `spec/` because it is a pure function of the definition: ingest, the
//! engine, backfill, checkpoints and sources all read it, and none of them changes it.

use panes_kernels::{
    Agg, Backend, ColumnFields, EventMerge, EventSpec, EventWindow, FeatureMerge, KernelError,
    LevelSpec, Merge, MergeOutput, ReadStatus, SessionSpec, StateSpec,
};

use super::{ViewSpec, Window, format_duration};
use crate::error::{PanesError, Result};

/// One decoded column: a value column as numbers, or as hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decode {
    /// Index in [`CompiledView::columns`].
    pub column: usize,
    /// Whether each value is hashed (`panes_kernels::hll::value`, for
    /// `approx_distinct`: integers, floats, decimals and strings) rather than taken as
    /// an f64 (numbers only).
    pub hashed: bool,
}

/// A view with its state layout: one level per distinct hop.
#[derive(Clone, Debug)]
pub struct CompiledView {
    /// The definition.
    pub spec: ViewSpec,
    /// Distinct value columns the view reads, in order of first use.
    pub columns: Vec<String>,
    /// What ingest decodes from them into a micro-batch, in order (`Decoded::values`).
    pub decoded: Vec<Decode>,
    /// The state's value columns (a fold batch's `values`): for each, the index in
    /// `decoded` of the column it reads, or `None` for a column of ones (the rows a
    /// `decayed_count` without a column counts). A state column keeps one half-life
    /// and one sketch precision, so each has a state column of its own; without
    /// decayed or sketch features, `columns`, `decoded` and `sources` line up one to
    /// one.
    pub sources: Vec<Option<usize>>,
    /// Per feature of `spec.features`: the index in `decoded` of the column it reads.
    pub feature_decoded: Vec<Option<usize>>,
    /// The pane-state shape (the time windows' state).
    pub state: StateSpec,
    /// The count and session windows' state, beside the panes.
    pub events: EventSpec,
    /// How to compute each feature of `spec.features` (same order).
    pub merges: Vec<Merge>,
    /// The view's derived columns and filters, applied to each batch before decoding.
    pub exprs: std::sync::Arc<crate::expr::Program>,
}

/// The column a feature reads from a batch once the view's expressions are applied:
/// its own column, or for a feature with a filter the copy of it (or, counting rows,
/// a column of ones) that is null where the filter does not hold.
pub fn read_column(f: &super::FeatureSpec) -> Option<String> {
    match &f.filter {
        Some(_) => Some(format!("{}[filter]", f.name)),
        None => f.column.clone(),
    }
}

impl CompiledView {
    /// Lays out the state of `spec` over `shards` key shards.
    ///
    /// Each level's ring holds the longest window of its hop, and at least
    /// `ceil(allowed_lateness / hop) + 1` panes so that every event the lateness rule
    /// accepts still finds its pane in the ring.
    pub fn new(spec: &ViewSpec, shards: usize) -> Self {
        let mut columns: Vec<String> = Vec::new();
        for f in &spec.features {
            if let Some(c) = read_column(f)
                && !columns.contains(&c)
            {
                columns.push(c);
            }
        }
        let decode_of = |f: &super::FeatureSpec| {
            let c = read_column(f);
            let column = columns.iter().position(|x| Some(x) == c.as_ref())?;
            let hashed = matches!(f.agg, Agg::ApproxDistinct { .. });
            Some(Decode { column, hashed })
        };
        let mut decoded: Vec<Decode> = Vec::new();
        for d in spec.features.iter().filter_map(decode_of) {
            if !decoded.contains(&d) {
                decoded.push(d);
            }
        }
        // State columns: a decoded column (or none, for rows) and the parameters that
        // shape its state (half-life, precision, accuracy).
        let state_column = |f: &super::FeatureSpec| {
            let source = decode_of(f).and_then(|d| decoded.iter().position(|x| *x == d));
            let key = (source, f.agg.fields().params());
            (key != (None, ColumnFields::default())).then_some(key)
        };
        let mut state_columns: Vec<(Option<usize>, ColumnFields)> = Vec::new();
        for f in &spec.features {
            if let Some(key) = state_column(f)
                && !state_columns.contains(&key)
            {
                state_columns.push(key);
            }
        }
        let mut hops: Vec<i64> = Vec::new();
        for f in spec.features.iter().filter(|f| !f.window.is_event_window()) {
            if !hops.contains(&f.hop) {
                hops.push(f.hop);
            }
        }
        let mut levels: Vec<LevelSpec> = hops
            .iter()
            .map(|&hop| {
                let l = spec.allowed_lateness;
                let late_panes = l / hop + i64::from(l % hop != 0) + 1;
                LevelSpec {
                    hop,
                    ring: late_panes as usize,
                    columns: vec![ColumnFields::default(); state_columns.len()],
                    lifetime: false,
                }
            })
            .collect();
        let mut merges = Vec::new();
        let mut events = EventSpec {
            count_columns: vec![ColumnFields::default(); state_columns.len()],
            lateness: spec.allowed_lateness,
            ..EventSpec::default()
        };
        for f in &spec.features {
            let column =
                state_column(f).and_then(|key| state_columns.iter().position(|k| *k == key));
            let (fields, window) = match f.window {
                Window::Events(n) => {
                    events.count = events.count.max(n);
                    (&mut events.count_columns, EventWindow::Count(n))
                }
                Window::Session(gap) => {
                    let s = match events.sessions.iter().position(|s| s.gap == gap) {
                        Some(s) => s,
                        None => {
                            events.sessions.push(SessionSpec {
                                gap,
                                columns: vec![ColumnFields::default(); state_columns.len()],
                            });
                            events.sessions.len() - 1
                        }
                    };
                    (&mut events.sessions[s].columns, EventWindow::Session(s))
                }
                Window::Duration(_) | Window::Lifetime => {
                    let level = hops.iter().position(|&h| h == f.hop).unwrap_or_default();
                    let l = &mut levels[level];
                    if let Some(c) = column {
                        l.columns[c] = l.columns[c].union(f.agg.fields());
                    }
                    let panes = match f.window {
                        Window::Duration(ms) => {
                            let n = (ms / f.hop) as u64;
                            l.ring = l.ring.max(n as usize);
                            Some(n)
                        }
                        _ => {
                            l.lifetime = true;
                            None
                        }
                    };
                    merges.push(Merge::Panes(FeatureMerge {
                        level,
                        agg: f.agg,
                        column,
                        panes,
                    }));
                    continue;
                }
            };
            if let Some(c) = column {
                fields[c] = fields[c].union(f.agg.fields());
            }
            merges.push(Merge::Events(EventMerge {
                window,
                agg: f.agg,
                column,
            }));
        }
        let feature_decoded = spec
            .features
            .iter()
            .map(|f| decode_of(f).and_then(|d| decoded.iter().position(|x| *x == d)))
            .collect();
        CompiledView {
            spec: spec.clone(),
            feature_decoded,
            sources: state_columns.iter().map(|(source, ..)| *source).collect(),
            columns,
            decoded,
            state: StateSpec { levels, shards },
            events,
            merges,
            exprs: std::sync::Arc::new(crate::expr::Program::new(
                spec.columns.clone(),
                spec.filter.clone(),
                spec.features
                    .iter()
                    .filter_map(|f| {
                        Some(crate::expr::FeatureFilter {
                            feature: f.name.clone(),
                            column: f.column.clone(),
                            filter: f.filter.clone()?,
                            column_name: read_column(f)?,
                        })
                    })
                    .collect(),
            )),
        }
    }

    /// Refuses a backend that cannot fold this view ([`Backend::refuses`]: the `Gpu`
    /// backend on a software adapter, with large sketches), naming the view; `auto`
    /// folds such a view on the CPU.
    ///
    /// # Errors
    /// [`PanesError::Kernel`] with `Unavailable`.
    pub fn check_backend(&self, backend: &dyn Backend) -> Result<()> {
        match backend.refuses(&self.state) {
            Some(why) => Err(PanesError::Kernel(KernelError::Unavailable(format!(
                "view {:?}: {why}",
                self.spec.name
            )))),
            None => Ok(()),
        }
    }

    /// The columns a batch of this view's events must carry besides its key and time:
    /// the columns its features read and its expressions name, less the derived ones.
    /// A decoder that builds batches from fields (JSON messages, gRPC rows) builds
    /// these; without expressions they are [`CompiledView::columns`].
    pub fn input_columns(&self) -> Vec<String> {
        let spec = &self.spec;
        let mut named: Vec<String> = Vec::new();
        let exprs = spec
            .columns
            .iter()
            .map(|c| c.expr.as_str())
            .chain(spec.filter.as_deref())
            .chain(spec.features.iter().filter_map(|f| f.filter.as_deref()));
        for f in &spec.features {
            named.extend(f.column.clone());
        }
        for sql in exprs {
            named.extend(crate::expr::columns_of(sql));
        }
        let mut out: Vec<String> = Vec::new();
        for c in named {
            let derived = spec.columns.iter().any(|d| d.name == c);
            if !derived && !spec.key.contains(&c) && c != spec.time && !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }

    /// Whether decoded column `d` is a feature filter's masked column (see
    /// [`read_column`]).
    pub fn filter_column(&self, d: usize) -> bool {
        self.spec
            .features
            .iter()
            .zip(&self.feature_decoded)
            .any(|(f, c)| *c == Some(d) && f.filter.is_some())
    }

    /// The first feature reading decoded column `d` that cannot read strings (see
    /// [`reads_strings`]), if any.
    pub fn numeric_reader(&self, d: usize) -> Option<&super::FeatureSpec> {
        self.spec
            .features
            .iter()
            .zip(&self.feature_decoded)
            .find(|(f, c)| **c == Some(d) && !reads_strings(f.agg))
            .map(|(f, _)| f)
    }

    /// Per feature of `selected` (indices into `spec.features`): whether its values
    /// are strings, given whether each decoded column held strings (`kinds`, as
    /// `StringValues::kinds` has them).
    pub fn text_features(&self, selected: &[usize], kinds: &[Option<bool>]) -> Vec<bool> {
        selected
            .iter()
            .map(|&i| {
                let d = self.feature_decoded[i];
                string_valued(self.spec.features[i].agg)
                    && d.is_some_and(|d| kinds.get(d) == Some(&Some(true)))
            })
            .collect()
    }

    /// Index of the feature named `name`.
    pub fn feature_index(&self, name: &str) -> Result<usize> {
        self.spec
            .features
            .iter()
            .position(|f| f.name == name)
            .ok_or_else(|| PanesError::UnknownFeature {
                view: self.spec.name.clone(),
                name: name.to_string(),
                known: self
                    .spec
                    .features
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// State bytes per key once every ring position holds a buffer: the most a key
    /// costs (a ring position is allocated, for every key at once, when a fold first
    /// writes it).
    pub fn bytes_per_key(&self) -> usize {
        let panes: usize = self
            .state
            .levels
            .iter()
            .map(LevelSpec::bytes_per_slot)
            .sum();
        panes + self.event_bytes_per_key()
    }

    /// State bytes per key of the count and session windows: a full ring of the
    /// newest events, and one open session per gap (lateness may keep more).
    pub fn event_bytes_per_key(&self) -> usize {
        if self.events.is_empty() {
            return 0;
        }
        panes_kernels::EventState::new(self.events.clone()).map_or(0, |s| {
            s.count_bytes_per_key() + s.session_bytes().iter().sum::<usize>()
        })
    }

    /// The time-window features' merges, in feature order (for benches and tools that
    /// drive a backend directly on a view without count or session windows).
    pub fn pane_merges(&self) -> Vec<FeatureMerge> {
        self.merges
            .iter()
            .filter_map(|m| match m {
                Merge::Panes(p) => Some(*p),
                Merge::Events(_) => None,
            })
            .collect()
    }

    /// Turns non-exact read statuses of a merge into an error naming the first such
    /// key and saying why (how many panes the view keeps, or which pane cannot be split).
    pub(crate) fn check_exact(
        &self,
        out: &MergeOutput,
        at: i64,
        key_of: impl Fn(usize) -> String,
    ) -> Result<()> {
        let Some(k) = out.status.iter().position(|s| *s != ReadStatus::Exact) else {
            return Ok(());
        };
        let reason = match out.status[k] {
            ReadStatus::PaneHoldsLaterEvents => "the pane or session containing that time also holds later events of this key, \
                 so it cannot be split there; read at or after the key's latest event, or use backfill for past times"
                .to_string(),
            _ => {
                let hops: Vec<String> = self
                    .state
                    .levels
                    .iter()
                    .map(|l| format!("{} panes of {}", l.ring, format_duration(l.hop)))
                    .chain((self.events.count > 0).then(|| format!("the newest {} events", self.events.count)))
                    .chain((!self.events.sessions.is_empty()).then(|| {
                        "the sessions that late events can still reach".to_string()
                    }))
                    .collect();
                format!(
                    "the window reaches panes that were already recycled, or events no longer kept (the view keeps {} per key); \
                     use backfill for past times",
                    hops.join(", ")
                )
            }
        };
        Err(PanesError::InexactRead {
            view: self.spec.name.clone(),
            key: key_of(k),
            at,
            reason,
        })
    }
}

/// Whether `agg` reads a column of strings: `count` counts them; `first`, `last`,
/// `last_n` and `top_k` return them (see [`string_valued`]).
pub fn reads_strings(agg: Agg) -> bool {
    agg == Agg::Count || string_valued(agg)
}

/// Whether `agg` over a column of strings returns strings.
pub fn string_valued(agg: Agg) -> bool {
    matches!(
        agg,
        Agg::First | Agg::Last | Agg::LastN { .. } | Agg::TopK { .. }
    )
}

/// The state columns (a fold batch's `values`) of rows `rows` of the decoded columns
/// `decoded`, for a view whose [`CompiledView::sources`] are `sources`; `ones` holds the
/// column of ones when a state column counts rows.
pub(crate) fn state_values<'a>(
    sources: &[Option<usize>],
    decoded: &'a [Vec<f64>],
    rows: std::ops::Range<usize>,
    ones: &'a mut Vec<f64>,
) -> Vec<&'a [f64]> {
    let ones: &'a [f64] = if sources.contains(&None) {
        ones.clear();
        ones.resize(rows.len(), 1.0);
        ones
    } else {
        &[]
    };
    sources
        .iter()
        .map(|s| match s {
            Some(c) => &decoded[*c][rows.clone()],
            None => ones,
        })
        .collect()
}
