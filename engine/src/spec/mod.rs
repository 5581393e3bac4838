//! Feature files: views and their features, parsed from TOML and validated.
//!
//! ```toml
//! [[views]]
//! name = "flights"
//! key = "tailnum"
//! time = "ts"
//! pane = "1m"
//! allowed_lateness = "10m"
//!
//! [[views.features]]
//! name = "dep_delay_mean_3h"
//! agg = "mean"
//! column = "dep_delay"
//! window = "3h"
//! hop = "5m"
//! ```

mod compile;
mod parse;

use std::fmt::Write as _;
use std::path::Path;

use panes_kernels::Agg;

pub(crate) use compile::state_values;
pub use compile::{CompiledView, Decode, reads_strings, string_valued};

use crate::error::{Result, SpecError, SpecIssue};

/// Largest feature file read, bytes.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// Reads the UTF-8 text file at `path`, refusing one larger than `max` bytes without
/// reading past them (`/dev/zero` must not grow without bound); `typical` says what size
/// to expect, in the error.
///
/// # Errors
/// Why the file cannot be read: missing, unreadable, too large, not UTF-8.
pub(crate) fn read_text(
    path: &Path,
    max: u64,
    typical: &str,
) -> std::result::Result<String, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot be read: {e}"))?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than {max} bytes; {typical}"));
    }
    String::from_utf8(bytes).map_err(|e| format!("is not UTF-8 text: {e}"))
}

/// `v` as a TOML string (Rust's `{:?}` escapes are not TOML: `\u{35b}`).
fn q(v: &str) -> String {
    toml::Value::String(v.to_string()).to_string()
}

/// Key columns as TOML: a string for one column, an array for a composite key.
fn key_toml(key: &[String]) -> String {
    match key {
        [one] => q(one),
        parts => format!(
            "[{}]",
            parts.iter().map(|p| q(p)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Most parts a composite key may have.
pub const MAX_KEY_PARTS: usize = 8;

impl ViewSpec {
    /// Whether the key has more than one column.
    pub fn is_composite(&self) -> bool {
        self.key.len() > 1
    }

    /// The key columns for messages: `"card"`, or `["card", "merchant"]`.
    pub fn key_label(&self) -> String {
        match self.key.as_slice() {
            [one] => format!("{one:?}"),
            parts => format!("{parts:?}"),
        }
    }
}

/// Largest number of panes a window (or the lateness bound) may span at its hop.
/// Each pane costs `fields × 8` bytes per key, so larger rings are almost always a
/// mistake (a 30-day window with a 1 s hop); use a coarser hop.
pub const MAX_PANES: i64 = 100_000;

/// How a view chooses the default time of a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadTime {
    /// The latest event time accepted by the view.
    EventTime,
    /// The machine's clock.
    WallClock,
}

/// A feature's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The last `n` ms, in panes of the feature's hop (see DESIGN §3).
    Duration(i64),
    /// Every event up to the read time.
    Lifetime,
    /// `window = "N events"`: the up to `N` accepted events of the key with the
    /// greatest (time, arrival) at or before the read time (DESIGN §3b).
    Events(u32),
    /// `session_gap = "30m"`: the key's session at the read time, events at most this
    /// many ms apart (DESIGN §3b).
    Session(i64),
}

impl Window {
    /// Whether the window is kept beside the panes (count and session windows), not
    /// in them.
    pub fn is_event_window(self) -> bool {
        matches!(self, Window::Events(_) | Window::Session(_))
    }
}

/// As in feature files: `5m`, `lifetime`, `100 events`, `session 30m`.
impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Window::Duration(ms) => f.write_str(&format_duration(ms)),
            Window::Lifetime => f.write_str("lifetime"),
            Window::Events(n) => write!(f, "{n} events"),
            Window::Session(gap) => write!(f, "session {}", format_duration(gap)),
        }
    }
}

/// One feature of a view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureSpec {
    /// Unique name across the file; the output column name.
    pub name: String,
    /// The aggregation.
    pub agg: Agg,
    /// Value column; `None` only for `count` of rows.
    pub column: Option<String>,
    /// The window.
    pub window: Window,
    /// Hop in ms (defaults to the view's pane).
    pub hop: i64,
    /// Only rows where this SQL condition is true are aggregated into this feature
    /// (DESIGN §3b); the others still count for the view.
    pub filter: Option<String>,
}

/// One view: an event stream with one entity key and its features.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViewSpec {
    /// Unique view name.
    pub name: String,
    /// Entity key columns: one, or the parts of a composite key (`key = ["card",
    /// "merchant"]`: the entity is the tuple; a null part is a null key).
    pub key: Vec<String>,
    /// Event time column.
    pub time: String,
    /// Default hop of the view's features, ms.
    pub pane: i64,
    /// How far behind the latest event time an event may be and still count, ms.
    pub allowed_lateness: i64,
    /// Default read time.
    pub read_time: ReadTime,
    /// Derived columns (`[[views.columns]]`), computed in order from each event's
    /// columns and the derived columns before them.
    pub columns: Vec<crate::expr::Derived>,
    /// Only rows where this SQL condition is true belong to the view (DESIGN §3b).
    pub filter: Option<String>,
    /// The features.
    pub features: Vec<FeatureSpec>,
    /// Where the view's events come from when not pushed (`[views.source]`).
    pub source: Option<SourceSpec>,
    /// At most this many keys (`max_keys`); rows of further new keys are rejected.
    /// Not part of the view's definition for checkpoints: it may change between runs.
    pub max_keys: Option<usize>,
}

/// How a Kafka message's payload is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadFormat {
    /// One JSON object per message; its fields are the view's columns.
    Json,
    /// An Arrow IPC stream per message (one or more record batches).
    ArrowIpc,
}

impl PayloadFormat {
    /// The name used in feature files.
    pub fn name(self) -> &'static str {
        match self {
            PayloadFormat::Json => "json",
            PayloadFormat::ArrowIpc => "arrow-ipc",
        }
    }
}

/// A view's Kafka source (`[views.source]` with `kind = "kafka"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceSpec {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// The topic; its messages must be keyed by the view's entity key.
    pub topic: String,
    /// Consumer group id: instances with the same group split the partitions.
    pub group: String,
    /// Payload format.
    pub format: PayloadFormat,
    /// When set (to the view's key columns), the entity key is the message key, not a
    /// payload field: a one-column key's UTF-8 value, or a composite key's parts as a
    /// compact JSON array (`["c1",42]`).
    pub key_column: Option<Vec<String>>,
    /// Topic that receives messages that cannot be decoded, with the reason in headers.
    pub dead_letter_topic: Option<String>,
    /// Client settings passed to librdkafka as they are (`security.protocol`,
    /// `sasl.mechanisms`, `sasl.username`, ...).
    pub properties: std::collections::BTreeMap<String, String>,
}

/// A parsed, validated feature file.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct FeatureFile {
    /// The views, in file order.
    pub views: Vec<ViewSpec>,
    /// The feature services, in file order.
    pub services: Vec<ServiceSpec>,
    /// Where `panes serve` sends features besides its readers, in file order.
    pub sinks: Vec<SinkSpec>,
}

/// A sink (`[[sinks]]`): the features of one view written somewhere else by `panes
/// serve`, every `interval`.
///
/// ```toml
/// [[sinks]]
/// name = "lake"
/// view = "cards"
/// kind = "parquet"
/// path = "s3://bucket/features"   # or a directory
/// interval = "1m"
/// changed_only = false            # every key (the default), or the keys that changed
///
/// [[sinks]]
/// name = "updates"
/// view = "cards"
/// kind = "kafka"
/// brokers = "localhost:9092"
/// topic = "card-features"
/// format = "json"                 # or "arrow-ipc"
/// interval = "1s"
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkSpec {
    /// Unique among sinks; names its metrics and logs.
    pub name: String,
    /// The view whose features are written.
    pub view: String,
    /// The features written, in order; empty: every feature of the view.
    pub features: Vec<String>,
    /// Time between two writes, ms.
    pub interval_ms: i64,
    /// Where they go.
    pub kind: SinkKind,
}

/// Where a sink writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// Parquet files under `path` (a directory or an object-store URL):
    /// `<path>/view=<view>/date=<YYYY-MM-DD>/<read time ms>-<written ms>.parquet`.
    Parquet {
        /// A directory, or an object-store URL (`s3://`, `gs://`, `az://`, `file://`).
        path: String,
        /// Only the keys whose vector changed since the last file (the first file
        /// after a start has every key).
        changed_only: bool,
    },
    /// One message per changed key to a Kafka topic (feature `kafka`).
    Kafka {
        /// Bootstrap servers, comma-separated `host:port`.
        brokers: String,
        /// The topic written; messages are keyed by the entity key.
        topic: String,
        /// Each message's value: a JSON object, or an Arrow IPC stream of one row.
        format: PayloadFormat,
        /// Client settings passed to librdkafka as they are.
        properties: std::collections::BTreeMap<String, String>,
    },
}

impl SinkKind {
    /// The name used in feature files.
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Parquet { .. } => "parquet",
            SinkKind::Kafka { .. } => "kafka",
        }
    }
}

/// A feature service (`[[services]]`, DESIGN §3b): one vector of features from any
/// views, addressed by request rows that carry every key it needs, plus on-demand
/// features computed at read time.
///
/// ```toml
/// [[services]]
/// name = "fraud_v1"
/// features = ["tx_5m", "amount_mean_1d", "merchant_fraud_rate_7d"]
/// [[services.on_demand]]
/// name = "amount_vs_mean"
/// expr = "amount / amount_mean_1d"    # the service's features and the request's columns
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Unique among services; how requests address it.
    pub name: String,
    /// Feature names, from any views, in output order.
    pub features: Vec<String>,
    /// On-demand features, in order (each may use the ones before it), after the
    /// features in the output.
    pub on_demand: Vec<crate::expr::Derived>,
}

/// Parses a duration: a positive integer and a unit (`ms`, `s`, `m`, `h`, `d`), e.g. `90s`.
///
/// # Errors
/// A message saying what was expected.
pub fn parse_duration(s: &str) -> std::result::Result<i64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let expected = "expected an integer and a unit (ms, s, m, h, d), e.g. \"5m\"";
    if num.is_empty() {
        return Err(format!("bad duration {s:?}: {expected}"));
    }
    let factor = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "bad duration {s:?}: unknown unit {unit:?}; {expected}"
            ));
        }
    };
    num.parse::<i64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("bad duration {s:?}: too large"))
}

/// Formats milliseconds with the largest unit that divides them (`300000` → `5m`).
pub fn format_duration(ms: i64) -> String {
    for (unit, f) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms != 0 && ms % f == 0 {
            return format!("{}{unit}", ms / f);
        }
    }
    format!("{ms}ms")
}

impl FeatureFile {
    /// Reads and validates a feature file.
    ///
    /// # Errors
    /// [`PanesError::Spec`](crate::PanesError::Spec) listing every problem found, or saying why the file cannot be
    /// read: missing, unreadable, not UTF-8, or larger than [`MAX_FILE_BYTES`] (a
    /// feature file is a few KiB; reading `/dev/zero` must not grow without bound).
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let origin = path.display().to_string();
        let text =
            read_text(path, MAX_FILE_BYTES, "a feature file is a few KiB").map_err(|message| {
                SpecError {
                    origin: origin.clone(),
                    issues: vec![SpecIssue {
                        location: String::new(),
                        field: String::new(),
                        message,
                    }],
                }
            })?;
        Self::parse(&text, &origin)
    }

    /// Parses and validates feature definitions; `origin` names them in errors.
    ///
    /// # Errors
    /// [`PanesError::Spec`](crate::PanesError::Spec) listing every problem found.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        parse::parse(text, origin)
    }

    /// The file as TOML; parsing it gives back an equal `FeatureFile`.
    pub fn to_toml(&self) -> String {
        let mut s = String::new();
        for v in &self.views {
            let _ = writeln!(s, "[[views]]");
            let _ = writeln!(s, "name = {}", q(&v.name));
            let _ = writeln!(s, "key = {}", key_toml(&v.key));
            let _ = writeln!(s, "time = {}", q(&v.time));
            let _ = writeln!(s, "pane = {:?}", format_duration(v.pane));
            let _ = writeln!(
                s,
                "allowed_lateness = {:?}",
                format_duration(v.allowed_lateness)
            );
            let rt = match v.read_time {
                ReadTime::EventTime => "event_time",
                ReadTime::WallClock => "wall_clock",
            };
            let _ = writeln!(s, "read_time = {rt:?}");
            if let Some(n) = v.max_keys {
                let _ = writeln!(s, "max_keys = {n}");
            }
            if let Some(f) = &v.filter {
                let _ = writeln!(s, "filter = {}", q(f));
            }
            let _ = writeln!(s);
            for c in &v.columns {
                let _ = writeln!(s, "[[views.columns]]");
                let _ = writeln!(s, "name = {}", q(&c.name));
                let _ = writeln!(s, "expr = {}\n", q(&c.expr));
            }
            if let Some(src) = &v.source {
                let _ = writeln!(s, "[views.source]");
                let _ = writeln!(s, "kind = \"kafka\"");
                let _ = writeln!(s, "brokers = {}", q(&src.brokers));
                let _ = writeln!(s, "topic = {}", q(&src.topic));
                let _ = writeln!(s, "group = {}", q(&src.group));
                let _ = writeln!(s, "format = {:?}", src.format.name());
                if let Some(k) = &src.key_column {
                    let _ = writeln!(s, "key_column = {}", key_toml(k));
                }
                if let Some(d) = &src.dead_letter_topic {
                    let _ = writeln!(s, "dead_letter_topic = {}", q(d));
                }
                if !src.properties.is_empty() {
                    let _ = writeln!(s, "\n[views.source.properties]");
                    for (k, v) in &src.properties {
                        let _ = writeln!(s, "{} = {}", q(k), q(v));
                    }
                }
                let _ = writeln!(s);
            }
            for f in &v.features {
                let _ = writeln!(s, "[[views.features]]");
                let _ = writeln!(s, "name = {}", q(&f.name));
                let _ = writeln!(s, "agg = {:?}", f.agg.name());
                if let Some(h) = f.agg.half_life() {
                    let _ = writeln!(s, "half_life = {:?}", format_duration(h));
                }
                match f.agg {
                    Agg::ApproxDistinct { precision } => {
                        let _ = writeln!(s, "precision = {precision}");
                    }
                    Agg::Quantile {
                        q,
                        relative_accuracy,
                    } => {
                        let _ = writeln!(s, "q = {:?}", q.get());
                        let _ = writeln!(s, "relative_accuracy = {:?}", relative_accuracy.get());
                    }
                    Agg::LastN { n } => {
                        let _ = writeln!(s, "n = {n}");
                    }
                    Agg::TopK { k, capacity } => {
                        let _ = writeln!(s, "k = {k}\ncapacity = {capacity}");
                    }
                    _ => {}
                }
                if let Some(c) = &f.column {
                    let _ = writeln!(s, "column = {}", q(c));
                }
                if let Some(c) = &f.filter {
                    let _ = writeln!(s, "filter = {}", q(c));
                }
                match f.window {
                    Window::Session(gap) => {
                        let _ = writeln!(s, "session_gap = {:?}\n", format_duration(gap));
                    }
                    Window::Events(_) => {
                        let _ = writeln!(s, "window = \"{}\"\n", f.window);
                    }
                    _ => {
                        let _ = writeln!(s, "window = \"{}\"", f.window);
                        let _ = writeln!(s, "hop = {:?}\n", format_duration(f.hop));
                    }
                }
            }
        }
        for sk in &self.sinks {
            let _ = writeln!(s, "[[sinks]]");
            let _ = writeln!(s, "name = {}", q(&sk.name));
            let _ = writeln!(s, "view = {}", q(&sk.view));
            let _ = writeln!(s, "kind = {:?}", sk.kind.name());
            let _ = writeln!(s, "interval = {:?}", format_duration(sk.interval_ms));
            if !sk.features.is_empty() {
                let names: Vec<String> = sk.features.iter().map(|f| q(f)).collect();
                let _ = writeln!(s, "features = [{}]", names.join(", "));
            }
            match &sk.kind {
                SinkKind::Parquet { path, changed_only } => {
                    let _ = writeln!(s, "path = {}", q(path));
                    let _ = writeln!(s, "changed_only = {changed_only}\n");
                }
                SinkKind::Kafka {
                    brokers,
                    topic,
                    format,
                    properties,
                } => {
                    let _ = writeln!(s, "brokers = {}", q(brokers));
                    let _ = writeln!(s, "topic = {}", q(topic));
                    let _ = writeln!(s, "format = {:?}\n", format.name());
                    if !properties.is_empty() {
                        let _ = writeln!(s, "[sinks.properties]");
                        for (k, v) in properties {
                            let _ = writeln!(s, "{} = {}", q(k), q(v));
                        }
                        let _ = writeln!(s);
                    }
                }
            }
        }
        for sv in &self.services {
            let _ = writeln!(s, "[[services]]");
            let _ = writeln!(s, "name = {}", q(&sv.name));
            let names: Vec<String> = sv.features.iter().map(|f| q(f)).collect();
            let _ = writeln!(s, "features = [{}]\n", names.join(", "));
            for d in &sv.on_demand {
                let _ = writeln!(s, "[[services.on_demand]]");
                let _ = writeln!(s, "name = {}", q(&d.name));
                let _ = writeln!(s, "expr = {}\n", q(&d.expr));
            }
        }
        s
    }

    /// The service named `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The view named `name`.
    pub fn view(&self, name: &str) -> Option<&ViewSpec> {
        self.views.iter().find(|v| v.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[views]]
name = "flights"
key = "tailnum"
time = "ts"
pane = "1m"
allowed_lateness = "10m"

[[views.features]]
name = "dep_delay_mean_3h"
agg = "mean"
column = "dep_delay"
window = "3h"
hop = "5m"

[[views.features]]
name = "flights_total"
agg = "count"
window = "lifetime"
"#;

    fn err(text: &str) -> String {
        FeatureFile::parse(text, "f.toml").unwrap_err().to_string()
    }

    #[test]
    fn parses_and_defaults() {
        let f = FeatureFile::parse(GOOD, "f.toml").unwrap();
        let v = &f.views[0];
        assert_eq!(
            (v.pane, v.allowed_lateness, v.read_time),
            (60_000, 600_000, ReadTime::EventTime)
        );
        assert_eq!(v.features[0].window, Window::Duration(3 * 3_600_000));
        assert_eq!(v.features[0].hop, 300_000);
        assert_eq!(v.features[1].hop, 60_000, "hop defaults to the view's pane");
        assert_eq!(v.features[1].column, None);
    }

    #[test]
    fn round_trips_through_toml() {
        let f = FeatureFile::parse(GOOD, "f.toml").unwrap();
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
    }

    #[test]
    fn count_and_session_windows_parse_print_and_are_checked() {
        let text = format!(
            "{GOOD}\n[[views.features]]\nname = \"last_20\"\nagg = \"mean\"\ncolumn = \"dep_delay\"\nwindow = \"20 events\"\n\
             \n[[views.features]]\nname = \"one\"\nagg = \"last\"\ncolumn = \"dep_delay\"\nwindow = \"1 event\"\n\
             \n[[views.features]]\nname = \"visit\"\nagg = \"count\"\nsession_gap = \"30m\"\n"
        );
        let f = FeatureFile::parse(&text, "f.toml").unwrap();
        let w: Vec<Window> = f.views[0].features.iter().map(|f| f.window).collect();
        assert_eq!(
            w[2..],
            [
                Window::Events(20),
                Window::Events(1),
                Window::Session(1_800_000)
            ]
        );
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        assert_eq!(w[2].to_string(), "20 events");
        assert_eq!(w[4].to_string(), "session 30m");
        let compiled = crate::CompiledView::new(&f.views[0], 1);
        assert_eq!(compiled.events.count, 20);
        assert_eq!(compiled.events.sessions.len(), 1);
        assert!(compiled.event_bytes_per_key() >= 20 * 24);
        let bad = |feature: &str| {
            err(&format!(
                "{GOOD}\n[[views.features]]\nname = \"x\"\nagg = \"count\"\n{feature}\n"
            ))
        };
        for (feature, message) in [
            (
                "window = \"0 events\"",
                "a count window is 1 to 10000 events",
            ),
            (
                "window = \"10001 events\"",
                "a count window is 1 to 10000 events",
            ),
            (
                "window = \"many events\"",
                "a count window is 1 to 10000 events",
            ),
            (
                "window = \"-3 events\"",
                "a count window is 1 to 10000 events",
            ),
            (
                "window = \"20 events\"\nhop = \"1m\"",
                "applies to time windows only",
            ),
            (
                "session_gap = \"30m\"\nhop = \"1m\"",
                "applies to time windows only",
            ),
            (
                "session_gap = \"30m\"\nwindow = \"1h\"",
                "a window or a session_gap, not both",
            ),
            ("session_gap = \"0s\"", "must be positive"),
            ("session_gap = \"soon\"", "session_gap"),
            ("", "a count such as \"100 events\" (or give a session_gap)"),
        ] {
            let e = bad(feature);
            assert!(e.contains(message), "{feature}: {e}");
            assert!(e.contains("feature \"x\""), "{feature}: {e}");
        }
    }

    #[test]
    fn r17_names_that_rust_escapes_print_as_valid_toml() {
        // Found by the feature_file fuzz target: a combining mark printed with Rust's
        // `{:?}` (`\u{35b}`) made the printed file unparsable. Quotes, backslashes and
        // control characters as well.
        let names = [
            "amount_last_\u{35b}",
            "a \"quoted\" name",
            "back\\slash",
            "tab\there",
            "é",
        ];
        for name in names {
            let text = GOOD.replacen(
                "name = \"dep_delay_mean_3h\"",
                &format!("name = {}", q(name)),
                1,
            );
            assert!(text != GOOD);
            let f = FeatureFile::parse(&text, "f.toml").unwrap_or_else(|e| panic!("{name:?}: {e}"));
            let again = FeatureFile::parse(&f.to_toml(), "again")
                .unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!(again, f, "{name:?}");
            assert_eq!(again.views[0].features[0].name, name);
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(250));
        assert_eq!(parse_duration("7d"), Ok(7 * 86_400_000));
        assert!(
            parse_duration("5 minutes")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_duration("m")
                .unwrap_err()
                .contains("expected an integer")
        );
        assert!(parse_duration("-5m").is_err());
        assert!(
            parse_duration("99999999999999999d")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(format_duration(300_000), "5m");
        assert_eq!(format_duration(1_500), "1500ms");
    }

    #[test]
    fn r17_view_names_cannot_leave_the_checkpoint_directory() {
        for bad in ["../escaped_view", "a/b", ".hidden", "..", "c:\\x", "sp ace"] {
            let e = err(&GOOD.replace("name = \"flights\"", &format!("name = {bad:?}")));
            assert!(
                e.contains("field `name`") && e.contains("is not allowed"),
                "{bad}: {e}"
            );
        }
        let e = err(&GOOD.replace(
            "name = \"flights\"",
            &format!("name = {:?}", "v".repeat(129)),
        ));
        assert!(e.contains("at most 128"), "{e}");
        for good in ["flights", "cards_v2", "a.b-c"] {
            let text = GOOD.replace("name = \"flights\"", &format!("name = {good:?}"));
            assert!(FeatureFile::parse(&text, "f.toml").is_ok(), "{good}");
        }
    }

    #[test]
    fn r17_a_view_needing_more_than_64_mib_per_key_is_refused() {
        // 14 levels of 100 000 panes of a `var` cell each: about 70 MiB per key.
        let mut text = String::from("[[views]]\nname = \"v\"\nkey = \"k\"\ntime = \"ts\"\n");
        for h in 1..=14 {
            text += &format!(
                "[[views.features]]\nname = \"f{h}\"\nagg = \"var\"\ncolumn = \"x\"\nwindow = \"{}s\"\nhop = \"{h}s\"\n",
                100_000 * h
            );
        }
        let e = err(&text);
        assert!(
            e.contains("view \"v\", field `features`: the view's state needs"),
            "{e}"
        );
        assert!(e.contains("at most 64 MiB"), "{e}");
        // One such level is allowed.
        let one = text
            .split("[[views.features]]")
            .take(2)
            .collect::<Vec<_>>()
            .join("[[views.features]]");
        assert!(FeatureFile::parse(&one, "f.toml").is_ok());
    }

    #[test]
    fn errors_name_file_view_feature_and_field() {
        let e = err(&GOOD.replace("agg = \"mean\"", "agg = \"median\""));
        assert!(e.contains("f.toml: view \"flights\" feature \"dep_delay_mean_3h\", field `agg`: unknown aggregation \"median\""), "{e}");

        let e = err(&GOOD.replace("window = \"3h\"", "window = \"7m\""));
        assert!(
            e.contains("field `window`: window 7m is not a multiple of the hop 5m"),
            "{e}"
        );

        let e = err(&GOOD.replace("flights_total", "dep_delay_mean_3h"));
        assert!(e.contains("duplicate feature name"), "{e}");

        let e = err(&GOOD.replace("window = \"3h\"", "window = \"3 hours\""));
        assert!(
            e.contains("field `window`: bad duration \"3 hours\""),
            "{e}"
        );

        let e = err(&GOOD.replace("column = \"dep_delay\"\n", ""));
        assert!(
            e.contains("field `column`: `mean` needs a value column"),
            "{e}"
        );

        let e = err(&GOOD.replace("pane = \"1m\"", "pane = \"0s\""));
        assert!(
            e.contains("view \"flights\", field `pane`: must be positive"),
            "{e}"
        );

        let e = err(&GOOD
            .replace("read_time", "x")
            .replace("pane = \"1m\"", "pane = \"1m\"\nread_time = \"now\""));
        assert!(e.contains("unknown read time \"now\""), "{e}");

        let e = err(&GOOD.replace("window = \"lifetime\"", "window = \"30d\"\nhop = \"1s\""));
        assert!(e.contains("spans 2592000 panes"), "{e}");

        let e = err(&GOOD.replace("hop = \"5m\"", "hopp = \"5m\""));
        assert!(e.contains("unknown field `hopp`"), "{e}");
        assert!(
            e.starts_with("invalid feature definitions in f.toml: "),
            "{e}"
        );

        let e = err("");
        assert!(e.contains("defines no view"), "{e}");

        let e = err(&GOOD.replace("key = \"tailnum\"\n", ""));
        assert!(
            e.contains("view \"flights\", field `key`: is required"),
            "{e}"
        );
    }

    #[test]
    fn half_life_is_checked_and_kept() {
        let decayed = GOOD.replace(
            "agg = \"mean\"",
            "agg = \"decayed_sum\"\nhalf_life = \"90m\"",
        );
        let f = FeatureFile::parse(&decayed, "f.toml").unwrap();
        assert_eq!(
            f.views[0].features[0].agg,
            Agg::DecayedSum {
                half_life: 90 * 60_000
            }
        );
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        // Rows, without a column, as `count`.
        let rows = decayed
            .replace("decayed_sum", "decayed_count")
            .replace("column = \"dep_delay\"\n", "");
        let f = FeatureFile::parse(&rows, "f.toml").unwrap();
        assert_eq!(f.views[0].features[0].column, None);

        let field = "view \"flights\" feature \"dep_delay_mean_3h\", field `half_life`";
        let e = err(&decayed.replace("half_life = \"90m\"\n", ""));
        assert!(
            e.contains(&format!("{field}: `decayed_sum` needs a `half_life`")),
            "{e}"
        );
        let e = err(&decayed.replace("\"90m\"", "\"0s\""));
        assert!(e.contains(&format!("{field}: must be positive")), "{e}");
        let e = err(&decayed.replace("\"90m\"", "\"soon\""));
        assert!(
            e.contains(&format!("{field}: bad duration \"soon\"")),
            "{e}"
        );
        assert!(
            !e.contains("problems"),
            "one message for a bad half-life: {e}"
        );
        let e = err(&GOOD.replace("agg = \"mean\"", "agg = \"mean\"\nhalf_life = \"1h\""));
        assert!(
            e.contains(&format!(
                "{field}: `half_life` applies to decayed_sum and decayed_count, not to `mean`"
            )),
            "{e}"
        );
    }

    #[test]
    fn precision_is_checked_and_kept() {
        let distinct = GOOD.replace(
            "agg = \"mean\"",
            "agg = \"approx_distinct\"\nprecision = 14",
        );
        let f = FeatureFile::parse(&distinct, "f.toml").unwrap();
        assert_eq!(
            f.views[0].features[0].agg,
            Agg::ApproxDistinct { precision: 14 }
        );
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        let default = GOOD.replace("agg = \"mean\"", "agg = \"approx_distinct\"");
        let f = FeatureFile::parse(&default, "f.toml").unwrap();
        assert_eq!(
            f.views[0].features[0].agg,
            Agg::ApproxDistinct { precision: 12 }
        );
        let field = "view \"flights\" feature \"dep_delay_mean_3h\", field `precision`";
        let e = err(&distinct.replace("precision = 14", "precision = 19"));
        assert!(e.contains(&format!("{field}: must be from 4 to 18")), "{e}");
        let e = err(&GOOD.replace("agg = \"mean\"", "agg = \"sum\"\nprecision = 12"));
        assert!(
            e.contains("field `precision`: `precision` applies to approx_distinct, not to `sum`"),
            "{e}"
        );
        let e = err(&distinct.replace("precision = 14", "precision = \"high\""));
        assert!(e.contains("precision"), "{e}");
    }

    #[test]
    fn quantile_parameters_are_checked_and_kept() {
        let p90 = GOOD.replace(
            "agg = \"mean\"",
            "agg = \"quantile\"\nq = 0.9\nrelative_accuracy = 0.02",
        );
        let f = FeatureFile::parse(&p90, "f.toml").unwrap();
        assert_eq!(
            f.views[0].features[0].agg,
            Agg::Quantile {
                q: panes_kernels::Param::new(0.9),
                relative_accuracy: panes_kernels::Param::new(0.02)
            }
        );
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        // An integer q; the default accuracy.
        let max = GOOD.replace("agg = \"mean\"", "agg = \"quantile\"\nq = 1");
        let f = FeatureFile::parse(&max, "f.toml").unwrap();
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        let field = |name: &str| format!("feature \"dep_delay_mean_3h\", field `{name}`");
        let e = err(&p90.replace("q = 0.9", "q = 1.5"));
        assert!(
            e.contains(&format!("{}: must be in [0, 1]", field("q"))),
            "{e}"
        );
        let e = err(&p90.replace("q = 0.9\n", ""));
        assert!(
            e.contains(&format!("{}: `quantile` needs a `q`", field("q"))),
            "{e}"
        );
        let e = err(&p90.replace("0.02", "0"));
        assert!(e.contains(&field("relative_accuracy")), "{e}");
        let e = err(&GOOD.replace("agg = \"mean\"", "agg = \"mean\"\nq = 0.5"));
        assert!(e.contains("`q` applies to quantile, not to `mean`"), "{e}");
    }

    #[test]
    fn last_n_needs_n() {
        let last = GOOD.replace("agg = \"mean\"", "agg = \"last_n\"\nn = 10");
        let f = FeatureFile::parse(&last, "f.toml").unwrap();
        assert_eq!(f.views[0].features[0].agg, Agg::LastN { n: 10 });
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        let e = err(&last.replace("n = 10", "n = 0"));
        assert!(
            e.contains("field `n`: must be from 1 to 1000, got 0"),
            "{e}"
        );
        let e = err(&last.replace("n = 10\n", ""));
        assert!(e.contains("field `n`: `last_n` needs an `n`"), "{e}");
        let e = err(&GOOD.replace("agg = \"mean\"", "agg = \"max\"\nn = 3"));
        assert!(e.contains("`n` applies to last_n, not to `max`"), "{e}");
    }

    #[test]
    fn top_k_needs_k_and_keeps_a_capacity() {
        let top = GOOD.replace("agg = \"mean\"", "agg = \"top_k\"\nk = 5");
        let f = FeatureFile::parse(&top, "f.toml").unwrap();
        assert_eq!(f.views[0].features[0].agg, Agg::TopK { k: 5, capacity: 64 });
        assert_eq!(FeatureFile::parse(&f.to_toml(), "again").unwrap(), f);
        let e = err(&top.replace("k = 5", "k = 5\ncapacity = 2"));
        assert!(e.contains("field `capacity`: must be from k (5)"), "{e}");
        let e = err(&top.replace("k = 5\n", ""));
        assert!(e.contains("field `k`: `top_k` needs a `k`"), "{e}");
    }

    #[test]
    fn all_problems_are_reported_at_once() {
        let e = err(&GOOD
            .replace("agg = \"mean\"", "agg = \"median\"")
            .replace("pane = \"1m\"", "pane = \"1x\""));
        assert!(e.contains("2 problems"), "{e}");
    }
}
