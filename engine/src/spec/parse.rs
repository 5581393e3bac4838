//! Parsing a feature file: TOML into raw tables, then every field validated with all
//! problems collected (a file with five mistakes reports five, each with its view,
//! feature and field), then the typed [`FeatureFile`].

use std::collections::HashSet;

use panes_kernels::events::MAX_COUNT_WINDOW;
use panes_kernels::{Agg, AggParams};
use serde::Deserialize;

use super::{
    CompiledView, FeatureFile, FeatureSpec, MAX_KEY_PARTS, MAX_PANES, PayloadFormat, ReadTime,
    ServiceSpec, SinkKind, SinkSpec, SourceSpec, ViewSpec, Window, format_duration, parse_duration,
};
use crate::error::{Result, SpecError, SpecIssue};
use crate::expr::Derived;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    views: Option<Vec<RawView>>,
    services: Option<Vec<RawService>>,
    sinks: Option<Vec<RawSink>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    name: Option<String>,
    view: Option<String>,
    kind: Option<String>,
    features: Option<Vec<String>>,
    interval: Option<String>,
    path: Option<String>,
    changed_only: Option<bool>,
    brokers: Option<String>,
    topic: Option<String>,
    format: Option<String>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    features: Option<Vec<String>>,
    on_demand: Option<Vec<RawColumn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawView {
    name: Option<String>,
    key: Option<toml::Value>,
    time: Option<String>,
    pane: Option<String>,
    allowed_lateness: Option<String>,
    read_time: Option<String>,
    max_keys: Option<i64>,
    source: Option<RawSource>,
    filter: Option<String>,
    columns: Option<Vec<RawColumn>>,
    features: Option<Vec<RawFeature>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: Option<String>,
    expr: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    kind: Option<String>,
    brokers: Option<String>,
    topic: Option<String>,
    group: Option<String>,
    format: Option<String>,
    key_column: Option<toml::Value>,
    dead_letter_topic: Option<String>,
    #[serde(default)]
    properties: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    name: Option<String>,
    agg: Option<String>,
    column: Option<String>,
    window: Option<String>,
    session_gap: Option<String>,
    hop: Option<String>,
    half_life: Option<String>,
    precision: Option<i64>,
    q: Option<f64>,
    relative_accuracy: Option<f64>,
    n: Option<i64>,
    k: Option<i64>,
    capacity: Option<i64>,
    filter: Option<String>,
}
/// Parses and validates feature definitions; `origin` names them in errors.
pub(super) fn parse(text: &str, origin: &str) -> Result<FeatureFile> {
    let raw: RawFile = toml::from_str(text).map_err(|e| SpecError {
        origin: origin.to_string(),
        issues: vec![SpecIssue {
            location: String::new(),
            field: String::new(),
            message: format!("not a valid feature file: {}", e.to_string().trim_end()),
        }],
    })?;
    let mut c = Collector::default();
    let raw_views = raw.views.unwrap_or_default();
    if raw_views.is_empty() {
        c.push(
            "",
            "views",
            "the file defines no view; add a [[views]] table",
        );
    }
    let views: Vec<ViewSpec> = raw_views
        .into_iter()
        .enumerate()
        .map(|(vi, rv)| c.view(vi, rv))
        .collect();
    let mut service_names = HashSet::new();
    let services = raw
        .services
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(si, rs)| c.service(si, rs, &views, &mut service_names))
        .collect();
    let mut sink_names = HashSet::new();
    let sinks = raw
        .sinks
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(si, rs)| c.sink(si, rs, &views, &mut sink_names))
        .collect();
    if !c.issues.is_empty() {
        return Err(SpecError {
            origin: origin.to_string(),
            issues: c.issues,
        }
        .into());
    }
    Ok(FeatureFile {
        views,
        services,
        sinks,
    })
}

/// The least interval of a sink.
const MIN_SINK_INTERVAL_MS: i64 = 10;

/// The problems found so far, and the names taken (unique per file).
#[derive(Default)]
struct Collector {
    issues: Vec<SpecIssue>,
    view_names: HashSet<String>,
    feature_names: HashSet<String>,
}

impl Collector {
    fn push(&mut self, location: &str, field: &str, message: impl Into<String>) {
        self.issues.push(SpecIssue {
            location: location.to_string(),
            field: field.to_string(),
            message: message.into(),
        });
    }

    /// Key columns: a column name, or a list of 1 to [`MAX_KEY_PARTS`] distinct names.
    fn key_columns(&mut self, location: &str, field: &str, v: Option<toml::Value>) -> Vec<String> {
        let expected = "expected a column name or a list of column names (a composite key)";
        let parts = match v {
            None => {
                self.push(location, field, "is required");
                return Vec::new();
            }
            Some(toml::Value::String(s)) => vec![s],
            Some(toml::Value::Array(a)) => {
                let mut parts = Vec::with_capacity(a.len());
                for v in a {
                    match v {
                        toml::Value::String(s) => parts.push(s),
                        other => {
                            self.push(location, field, format!("{expected}; got {other}"));
                            return Vec::new();
                        }
                    }
                }
                parts
            }
            Some(other) => {
                self.push(location, field, format!("{expected}; got {other}"));
                return Vec::new();
            }
        };
        if parts.is_empty() || parts.len() > MAX_KEY_PARTS {
            self.push(
                location,
                field,
                format!(
                    "has {} columns; a key has 1 to {MAX_KEY_PARTS}",
                    parts.len()
                ),
            );
            return Vec::new();
        }
        if parts.iter().any(|p| p.trim().is_empty()) {
            self.push(location, field, "a key column name must not be empty");
            return Vec::new();
        }
        let mut seen = HashSet::new();
        if let Some(dup) = parts.iter().find(|p| !seen.insert(p.as_str())) {
            self.push(
                location,
                field,
                format!("column {dup:?} appears twice in the key"),
            );
            return Vec::new();
        }
        parts
    }

    fn required(&mut self, location: &str, field: &str, v: Option<String>) -> String {
        match v {
            Some(v) if !v.trim().is_empty() => v,
            Some(_) => {
                self.push(location, field, "must not be empty");
                String::new()
            }
            None => {
                self.push(location, field, "is required");
                String::new()
            }
        }
    }

    fn duration(
        &mut self,
        location: &str,
        field: &str,
        v: Option<&str>,
        default: i64,
        positive: bool,
    ) -> i64 {
        let Some(v) = v else { return default };
        match parse_duration(v) {
            Ok(0) if positive => {
                self.push(location, field, format!("must be positive, got {v:?}"));
                default
            }
            Ok(ms) => ms,
            Err(e) => {
                self.push(location, field, e);
                default
            }
        }
    }

    /// Service number `si` (from 0) of the file, checked against the file's `views`.
    fn sink(
        &mut self,
        si: usize,
        rs: RawSink,
        views: &[ViewSpec],
        names: &mut HashSet<String>,
    ) -> Option<SinkSpec> {
        let loc = match &rs.name {
            Some(n) => format!("sink {n:?}"),
            None => format!("sink #{}", si + 1),
        };
        let name = self.required(&loc, "name", rs.name);
        if !name.is_empty() && !names.insert(name.clone()) {
            self.push(&loc, "name", "duplicate sink name");
        }
        let view_name = self.required(&loc, "view", rs.view);
        let view = views.iter().find(|v| v.name == view_name);
        if view.is_none() && !view_name.is_empty() {
            let known: Vec<&str> = views.iter().map(|v| v.name.as_str()).collect();
            self.push(
                &loc,
                "view",
                format!(
                    "unknown view {view_name:?}; the views are {}",
                    known.join(", ")
                ),
            );
        }
        let features = rs.features.unwrap_or_default();
        if let Some(view) = view {
            let mut seen = HashSet::new();
            for f in &features {
                if !view.features.iter().any(|vf| &vf.name == f) {
                    self.push(
                        &loc,
                        "features",
                        format!("view {view_name:?} has no feature {f:?}"),
                    );
                } else if !seen.insert(f.as_str()) {
                    self.push(&loc, "features", format!("feature {f:?} appears twice"));
                }
            }
        }
        let interval_ms = self.duration(&loc, "interval", rs.interval.as_deref(), 60_000, true);
        if interval_ms < MIN_SINK_INTERVAL_MS {
            self.push(
                &loc,
                "interval",
                format!("{interval_ms} ms; the least is {MIN_SINK_INTERVAL_MS} ms"),
            );
        }
        let misplaced = |c: &mut Self, field: &str, set: bool, kind: &str| {
            if set {
                c.push(&loc, field, format!("does not apply to a {kind} sink"));
            }
        };
        let kind = match rs.kind.as_deref() {
            Some("parquet") => {
                misplaced(self, "brokers", rs.brokers.is_some(), "parquet");
                misplaced(self, "topic", rs.topic.is_some(), "parquet");
                misplaced(self, "format", rs.format.is_some(), "parquet");
                misplaced(self, "properties", !rs.properties.is_empty(), "parquet");
                let path = self.required(&loc, "path", rs.path);
                SinkKind::Parquet {
                    path,
                    changed_only: rs.changed_only.unwrap_or(false),
                }
            }
            Some("kafka") => {
                misplaced(self, "path", rs.path.is_some(), "kafka");
                misplaced(self, "changed_only", rs.changed_only.is_some(), "kafka");
                let format = match rs.format.as_deref() {
                    None | Some("json") => PayloadFormat::Json,
                    Some("arrow-ipc") => PayloadFormat::ArrowIpc,
                    Some(other) => {
                        self.push(
                            &loc,
                            "format",
                            format!("unknown format {other:?}; expected \"json\" or \"arrow-ipc\""),
                        );
                        PayloadFormat::Json
                    }
                };
                SinkKind::Kafka {
                    brokers: self.required(&loc, "brokers", rs.brokers),
                    topic: self.required(&loc, "topic", rs.topic),
                    format,
                    properties: rs.properties,
                }
            }
            Some(other) => {
                self.push(
                    &loc,
                    "kind",
                    format!("unknown sink kind {other:?}; expected \"parquet\" or \"kafka\""),
                );
                return None;
            }
            None => {
                self.push(&loc, "kind", "is required: \"parquet\" or \"kafka\"");
                return None;
            }
        };
        Some(SinkSpec {
            name,
            view: view_name,
            features,
            interval_ms,
            kind,
        })
    }

    fn service(
        &mut self,
        si: usize,
        rs: RawService,
        views: &[ViewSpec],
        names: &mut HashSet<String>,
    ) -> Option<ServiceSpec> {
        let sloc = match &rs.name {
            Some(n) => format!("service {n:?}"),
            None => format!("service #{}", si + 1),
        };
        let name = self.required(&sloc, "name", rs.name);
        if !name.is_empty() && !names.insert(name.clone()) {
            self.push(&sloc, "name", "duplicate service name");
        }
        if let Err(e) = check_view_name(&name) {
            self.push(
                &sloc,
                "name",
                e.replace("checkpoints", "the service's addresses"),
            );
        }
        let known: Vec<&str> = views
            .iter()
            .flat_map(|v| v.features.iter().map(|f| f.name.as_str()))
            .collect();
        let features = rs.features.unwrap_or_default();
        if features.is_empty() {
            self.push(
                &sloc,
                "features",
                "is required: a list of the names of features of any views",
            );
        }
        let mut seen = HashSet::new();
        for f in &features {
            if !known.contains(&f.as_str()) {
                let shown: Vec<&str> = known.iter().take(30).copied().collect();
                let more = if known.len() > 30 { ", ..." } else { "" };
                self.push(
                    &sloc,
                    "features",
                    format!(
                        "unknown feature {f:?}; the file's features are {}{more}",
                        shown.join(", ")
                    ),
                );
            } else if !seen.insert(f.as_str()) {
                self.push(&sloc, "features", format!("feature {f:?} appears twice"));
            }
        }
        let mut on_demand: Vec<Derived> = Vec::new();
        for (oi, rc) in rs.on_demand.unwrap_or_default().into_iter().enumerate() {
            let oloc = match &rc.name {
                Some(n) => format!("{sloc} on_demand {n:?}"),
                None => format!("{sloc} on_demand #{}", oi + 1),
            };
            let o = self.required(&oloc, "name", rc.name);
            if known.contains(&o.as_str()) {
                self.push(
                    &oloc,
                    "name",
                    "has the name of a feature; on-demand names are new columns",
                );
            } else if on_demand.iter().any(|d| d.name == o) {
                self.push(&oloc, "name", "duplicate on-demand feature name");
            }
            if rc.expr.is_none() {
                self.push(
                    &oloc,
                    "expr",
                    "is required: a SQL expression over the service's features and the request's columns",
                );
            }
            let Some(expr) = self.expression(&oloc, "expr", rc.expr) else {
                continue;
            };
            for c in crate::expr::columns_of(&expr) {
                if known.contains(&c.as_str()) && !features.contains(&c) {
                    self.push(
                        &oloc,
                        "expr",
                        format!(
                            "names feature {c:?}, which is not in the service's features; add it to `features`"
                        ),
                    );
                }
            }
            if !o.is_empty() {
                on_demand.push(Derived { name: o, expr });
            }
        }
        Some(ServiceSpec {
            name,
            features,
            on_demand,
        })
    }

    /// An expression of `field` at `location`: its syntax checked (its columns and types
    /// are checked against the events' schema, see [`crate::expr`]).
    fn expression(&mut self, location: &str, field: &str, sql: Option<String>) -> Option<String> {
        let sql = sql?;
        if sql.trim().is_empty() {
            self.push(location, field, "must not be empty");
            return None;
        }
        if sql.len() > MAX_EXPRESSION {
            self.push(
                location,
                field,
                format!(
                    "{} bytes long; at most {MAX_EXPRESSION} are allowed",
                    sql.len()
                ),
            );
            return None;
        }
        if let Err(e) = crate::expr::check_syntax(&sql) {
            self.push(location, field, format!("{e} in {sql:?}"));
            return None;
        }
        Some(sql)
    }

    /// The derived columns of the view at `vloc`.
    fn derived(
        &mut self,
        vloc: &str,
        raw: Vec<RawColumn>,
        key: &[String],
        time: &str,
    ) -> Vec<Derived> {
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for (ci, rc) in raw.into_iter().enumerate() {
            let cloc = match &rc.name {
                Some(n) => format!("{vloc} column {n:?}"),
                None => format!("{vloc} column #{}", ci + 1),
            };
            let name = self.required(&cloc, "name", rc.name);
            if name.is_empty() {
                continue;
            }
            if !names.insert(name.clone()) {
                self.push(&cloc, "name", "duplicate derived column name");
            }
            if name == time {
                self.push(
                    &cloc,
                    "name",
                    "a derived column cannot be the view's time column",
                );
            }
            if key.contains(&name) {
                self.push(
                    &cloc,
                    "name",
                    "a derived column cannot be a key column of the view",
                );
            }
            if rc.expr.is_none() {
                self.push(
                    &cloc,
                    "expr",
                    "is required: a SQL expression over the event's columns",
                );
            }
            if let Some(expr) = self.expression(&cloc, "expr", rc.expr) {
                out.push(Derived { name, expr });
            }
        }
        out
    }

    /// View number `vi` (from 0) of the file.
    fn view(&mut self, vi: usize, rv: RawView) -> ViewSpec {
        let vloc = match &rv.name {
            Some(n) => format!("view {n:?}"),
            None => format!("view #{}", vi + 1),
        };
        let name = self.required(&vloc, "name", rv.name);
        if !name.is_empty() && !self.view_names.insert(name.clone()) {
            self.push(&vloc, "name", "duplicate view name");
        }
        if let Err(e) = check_view_name(&name) {
            self.push(&vloc, "name", e);
        }
        let key = self.key_columns(&vloc, "key", rv.key);
        let time = self.required(&vloc, "time", rv.time);
        let pane = self.duration(&vloc, "pane", rv.pane.as_deref(), 1_000, true);
        let allowed_lateness = self.duration(
            &vloc,
            "allowed_lateness",
            rv.allowed_lateness.as_deref(),
            0,
            false,
        );
        let read_time = match rv.read_time.as_deref() {
            None | Some("event_time") => ReadTime::EventTime,
            Some("wall_clock") => ReadTime::WallClock,
            Some(o) => {
                self.push(
                    &vloc,
                    "read_time",
                    format!("unknown read time {o:?}; expected \"event_time\" or \"wall_clock\""),
                );
                ReadTime::EventTime
            }
        };
        let max_keys = rv.max_keys.and_then(|n| match u32::try_from(n) {
            Ok(n) if n > 0 => Some(n as usize),
            _ => {
                self.push(
                    &vloc,
                    "max_keys",
                    format!("max_keys is {n}; expected 1 to {}", u32::MAX),
                );
                None
            }
        });
        if key.contains(&time) {
            self.push(
                &vloc,
                "time",
                "the time column must differ from the key columns",
            );
        }
        let source = rv.source.map(|rs| self.source(&vloc, rs));
        let filter = self.expression(&vloc, "filter", rv.filter);
        let columns = self.derived(&vloc, rv.columns.unwrap_or_default(), &key, &time);
        let raw_features = rv.features.unwrap_or_default();
        if raw_features.is_empty() {
            self.push(
                &vloc,
                "features",
                "the view has no feature; add [[views.features]] tables",
            );
        }
        let view = ViewLimits {
            location: &vloc,
            time: &time,
            pane,
            allowed_lateness,
        };
        let features = raw_features
            .into_iter()
            .enumerate()
            .filter_map(|(fi, rf)| self.feature(&view, fi, rf))
            .collect();
        let view = ViewSpec {
            name,
            key,
            time,
            pane,
            allowed_lateness,
            read_time,
            columns,
            filter,
            features,
            source,
            max_keys,
        };
        let per_key = CompiledView::new(&view, 1).bytes_per_key();
        if per_key > MAX_STATE_PER_KEY {
            self.push(
                &vloc,
                "features",
                format!(
                    "the view's state needs {} MiB per key; at most {} MiB is allowed: use larger hops, shorter windows \
                     or smaller sketches (a lower approx_distinct precision, a coarser quantile relative_accuracy)",
                    per_key >> 20,
                    MAX_STATE_PER_KEY >> 20
                ),
            );
        }
        view
    }

    /// The `[views.source]` table of the view at `vloc`.
    fn source(&mut self, vloc: &str, rs: RawSource) -> SourceSpec {
        let sloc = format!("{vloc} source");
        match rs.kind.as_deref() {
            Some("kafka") => {}
            Some(o) => self.push(
                &sloc,
                "kind",
                format!("unknown source kind {o:?}; expected \"kafka\""),
            ),
            None => self.push(&sloc, "kind", "is required (\"kafka\")"),
        }
        let format = match rs.format.as_deref() {
            None | Some("json") => PayloadFormat::Json,
            Some("arrow-ipc") => PayloadFormat::ArrowIpc,
            Some(o) => {
                self.push(
                    &sloc,
                    "format",
                    format!("unknown payload format {o:?}; expected \"json\" or \"arrow-ipc\""),
                );
                PayloadFormat::Json
            }
        };
        SourceSpec {
            brokers: self.required(&sloc, "brokers", rs.brokers),
            topic: self.required(&sloc, "topic", rs.topic),
            group: self.required(&sloc, "group", rs.group),
            format,
            key_column: rs
                .key_column
                .map(|k| self.key_columns(&sloc, "key_column", Some(k))),
            dead_letter_topic: rs.dead_letter_topic,
            properties: rs.properties,
        }
    }

    /// Feature number `fi` (from 0) of a view; `None` when its aggregation is unknown.
    fn feature(&mut self, view: &ViewLimits<'_>, fi: usize, rf: RawFeature) -> Option<FeatureSpec> {
        let floc = match &rf.name {
            Some(n) => format!("{} feature {n:?}", view.location),
            None => format!("{} feature #{}", view.location, fi + 1),
        };
        let name = self.required(&floc, "name", rf.name);
        if !name.is_empty() && !self.feature_names.insert(name.clone()) {
            self.push(
                &floc,
                "name",
                "duplicate feature name (names are unique across the file)",
            );
        }
        let agg_s = self.required(&floc, "agg", rf.agg);
        // 0: absent, or malformed (already reported).
        let half_life = self.duration(&floc, "half_life", rf.half_life.as_deref(), 0, true);
        let params = AggParams {
            half_life: (half_life > 0).then_some(half_life),
            precision: rf.precision,
            q: rf.q,
            relative_accuracy: rf.relative_accuracy,
            n: rf.n,
            k: rf.k,
            capacity: rf.capacity,
        };
        let agg = match Agg::with_params(&agg_s, &params) {
            Ok(a) => Some(a),
            Err(_) if rf.half_life.is_some() && half_life == 0 => None,
            Err((field, e)) => {
                if !agg_s.is_empty() {
                    self.push(&floc, field, e);
                }
                None
            }
        };
        let column = rf.column.filter(|s| !s.trim().is_empty());
        if let (Some(a), None) = (agg, &column)
            && a.needs_column()
        {
            self.push(&floc, "column", format!("`{a}` needs a value column"));
        }
        if let Some(col) = &column
            && col == view.time
        {
            self.push(&floc, "column", "the time column cannot be aggregated");
        }
        let hop = self.duration(&floc, "hop", rf.hop.as_deref(), view.pane, true);
        let window = match rf.session_gap.as_deref() {
            Some(gap) => {
                if rf.window.is_some() {
                    self.push(
                        &floc,
                        "session_gap",
                        "a feature has a window or a session_gap, not both",
                    );
                }
                Window::Session(self.duration(&floc, "session_gap", Some(gap), 1, true))
            }
            None => self.window(&floc, rf.window.as_deref(), hop),
        };
        if window.is_event_window() {
            if rf.hop.is_some() {
                self.push(
                    &floc,
                    "hop",
                    "applies to time windows only, not to count or session windows",
                );
            }
        } else if view.allowed_lateness / hop > MAX_PANES {
            self.push(
                &floc,
                "hop",
                format!(
                    "the view's allowed_lateness spans more than {MAX_PANES} panes of {}; use a larger hop",
                    format_duration(hop)
                ),
            );
        }
        let filter = self.expression(&floc, "filter", rf.filter);
        Some(FeatureSpec {
            name,
            agg: agg?,
            column,
            window,
            hop,
            filter,
        })
    }

    /// A feature's `window` at hop `hop`.
    fn window(&mut self, floc: &str, w: Option<&str>, hop: i64) -> Window {
        let Some(w) = w else {
            self.push(
                floc,
                "window",
                "is required: a duration such as \"5m\", \"lifetime\", or a count such as \"100 events\" (or give a session_gap)",
            );
            return Window::Lifetime;
        };
        if w == "lifetime" {
            return Window::Lifetime;
        }
        if let Some(n) = w
            .trim()
            .strip_suffix("events")
            .or_else(|| w.trim().strip_suffix("event"))
        {
            return match n.trim().parse::<u32>() {
                Ok(n) if (1..=MAX_COUNT_WINDOW).contains(&n) => Window::Events(n),
                _ => {
                    self.push(
                        floc,
                        "window",
                        format!(
                            "{w:?}: a count window is 1 to {MAX_COUNT_WINDOW} events, such as \"100 events\""
                        ),
                    );
                    Window::Lifetime
                }
            };
        }
        match parse_duration(w) {
            Ok(0) => {
                self.push(floc, "window", "must be positive");
                Window::Lifetime
            }
            Ok(ms) => {
                if ms % hop != 0 {
                    self.push(
                        floc,
                        "window",
                        format!(
                            "window {w} is not a multiple of the hop {}",
                            format_duration(hop)
                        ),
                    );
                } else if ms / hop > MAX_PANES {
                    self.push(
                        floc,
                        "window",
                        format!(
                            "window {w} spans {} panes of {}; at most {MAX_PANES} are allowed: use a larger hop",
                            ms / hop,
                            format_duration(hop)
                        ),
                    );
                }
                Window::Duration(ms)
            }
            Err(e) => {
                self.push(
                    floc,
                    "window",
                    format!("{e}, or \"lifetime\", or a count such as \"100 events\""),
                );
                Window::Lifetime
            }
        }
    }
}

/// What a view's features are checked against.
struct ViewLimits<'a> {
    location: &'a str,
    time: &'a str,
    pane: i64,
    allowed_lateness: i64,
}

/// Most state bytes one key of a view may need (every ring at its length). A million
/// keys at this size would need 64 TiB: anything near it is a mistake in the hops.
pub const MAX_STATE_PER_KEY: usize = 64 << 20;

/// Longest expression (filter or derived column), bytes.
const MAX_EXPRESSION: usize = 16 * 1024;

/// Longest view name.
const MAX_VIEW_NAME: usize = 128;

/// A view's name names a directory (its checkpoints) and a metric label: ASCII letters,
/// digits, `_`, `-` and `.`, not starting with `.` (so never `..`, a path separator or
/// a hidden file), at most [`MAX_VIEW_NAME`] bytes. Empty names are reported apart.
fn check_view_name(name: &str) -> std::result::Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if name.is_empty() {
        Ok(())
    } else if name.len() > MAX_VIEW_NAME {
        Err(format!(
            "{} bytes long; at most {MAX_VIEW_NAME} are allowed",
            name.len()
        ))
    } else if name.starts_with('.') || !name.chars().all(allowed) {
        Err(format!(
            "{name:?} is not allowed: use ASCII letters, digits, '_', '-' and '.', not starting with '.' (the name is a directory of checkpoints)"
        ))
    } else {
        Ok(())
    }
}
