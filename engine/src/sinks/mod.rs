//! Sinks (`[[sinks]]` in the feature file): a view's features written elsewhere by
//! `panes serve`, every interval, from the published state — Parquet snapshots
//! ([`parquet`]) and feature updates on a Kafka topic (`kafka`, feature `kafka`).
//!
//! Each sink is a thread of its own. Every interval in which its view published (every
//! interval for a view read at the wall clock), it reads every key of the view from the
//! published state, as a read would at the view's read time, and hands the writer
//! either every key or the keys whose vector changed since its last successful write
//! (a 64-bit hash per key, [`Changes`]). A write that fails is counted and logged, and
//! the next interval tries again with what changed since the last write that succeeded:
//! nothing is skipped, and a retried write may repeat rows. What was written is not
//! remembered across a restart: the first write after a start has every key, so a
//! restart leaves no gap, and may repeat vectors written before it.
//!
//! Sinks read the engine's views; views fed by a Kafka source live in per-partition
//! engines and are refused at start (see [`Sinks::start`]).

pub(crate) mod parquet;

#[cfg(feature = "kafka")]
pub(crate) mod kafka;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema};

use crate::error::{PanesError, Result};
use crate::ingest::keys::{KeyValue, key_array};
use crate::online::Engine;
use crate::online::changes::Changes;
use crate::spec::{ReadTime, SinkKind, SinkSpec};

/// The rows of one write of a sink.
pub(crate) struct Round<'a> {
    pub view: &'a str,
    /// The keys of the rows, in row order (the Kafka sink's message keys).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub keys: &'a [KeyValue],
    /// The key columns, then the features (see [`Engine::frame_batch`]).
    pub batch: RecordBatch,
    /// The read time, epoch ms.
    pub at: i64,
    /// Publishes of the view when it was read.
    pub version: u64,
    /// Whether the rows are every key of the view (else the keys that changed).
    pub every_key: bool,
}

impl Round<'_> {
    /// The round's batch with its read time as a last column, `at_ms`: what every sink
    /// writes.
    pub(crate) fn with_read_time(&self) -> Result<RecordBatch> {
        let mut fields: Vec<Field> = self
            .batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("at_ms", DataType::Int64, false));
        let mut columns: Vec<ArrayRef> = self.batch.columns().to_vec();
        columns.push(Arc::new(Int64Array::from(vec![
            self.at;
            self.batch.num_rows()
        ])));
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            columns,
        )?)
    }
}

/// What a sink writes to.
pub(crate) trait Writer: Send {
    /// Writes a round whole, or fails; returns the bytes written.
    fn write(&mut self, round: &Round<'_>) -> Result<u64>;
    /// Whether it writes only what changed since its last write.
    fn changes_only(&self) -> bool;
}

/// A sink's counters.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Writes that succeeded.
    pub writes: AtomicU64,
    /// Rows (key vectors) those writes held.
    pub rows: AtomicU64,
    /// Bytes they wrote (files, or message keys and values).
    pub bytes: AtomicU64,
    /// Writes that failed (each retried at the next interval).
    pub failures: AtomicU64,
    /// Read time of the last write that succeeded, epoch ms (`i64::MIN` before one).
    pub last_at_ms: AtomicU64,
}

/// The sinks of a server, each on a thread of its own.
///
/// [`Sinks::stop`] makes each write what is published once more; dropping them
/// instead stops them at once, as a crash would (what changed since their last write
/// is written by the next start's first write).
#[derive(Debug)]
pub struct Sinks {
    running: Vec<Running>,
    stop: Arc<(Mutex<Stop>, Condvar)>,
}

/// What the sinks' threads are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Run,
    /// Write once more, then stop.
    AfterWrite,
    /// Stop now.
    Now,
}

#[derive(Debug)]
struct Running {
    spec: SinkSpec,
    stats: Arc<SinkStats>,
    thread: std::thread::JoinHandle<()>,
}

impl Sinks {
    /// Starts a thread per sink of `specs`.
    ///
    /// # Errors
    /// A sink of a view fed by a Kafka source; a location that cannot be written; a
    /// Kafka sink in a build without feature `kafka`, or whose producer cannot be made.
    pub fn start(engine: &Arc<Engine>, specs: &[SinkSpec]) -> Result<Sinks> {
        // (On an error, the sinks started so far stop as they are dropped.)
        let mut sinks = Sinks {
            running: Vec::with_capacity(specs.len()),
            stop: Arc::new((Mutex::new(Stop::Run), Condvar::new())),
        };
        for spec in specs {
            let compiled = engine.compiled(&spec.view)?;
            if compiled.spec.source.is_some() {
                return Err(PanesError::Invalid(format!(
                    "sink {:?}: view {:?} takes its events from Kafka; sinks of Kafka-fed views \
                     are not supported yet",
                    spec.name, spec.view
                )));
            }
            let writer = open(spec)?;
            let stats = Arc::new(SinkStats::default());
            stats.last_at_ms.store(i64::MIN as u64, Ordering::Relaxed);
            let task = Task {
                engine: engine.clone(),
                spec: spec.clone(),
                wall_clock: compiled.spec.read_time == ReadTime::WallClock,
                writer,
                changes: Changes::default(),
                stats: stats.clone(),
            };
            let stop = sinks.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("sink-{}", spec.name))
                .spawn(move || task.run(&stop))
                .map_err(|e| PanesError::Internal(format!("sink {:?}: {e}", spec.name)))?;
            sinks.running.push(Running {
                spec: spec.clone(),
                stats,
                thread,
            });
        }
        Ok(sinks)
    }

    /// Each sink's definition and counters.
    pub fn stats(&self) -> impl Iterator<Item = (&SinkSpec, &SinkStats)> {
        self.running.iter().map(|r| (&r.spec, r.stats.as_ref()))
    }

    /// Makes every sink write what is published once more, then stop; waits for them.
    pub fn stop(mut self) {
        self.end(Stop::AfterWrite);
    }

    fn end(&mut self, how: Stop) {
        {
            let (lock, wake) = &*self.stop;
            *lock.lock().unwrap_or_else(|p| p.into_inner()) = how;
            wake.notify_all();
        }
        for r in self.running.drain(..) {
            if r.thread.join().is_err() {
                tracing::error!(sink = %r.spec.name, "a sink's thread panicked");
            }
        }
    }
}

impl Drop for Sinks {
    fn drop(&mut self) {
        self.end(Stop::Now);
    }
}

/// The writer of a sink.
fn open(spec: &SinkSpec) -> Result<Box<dyn Writer>> {
    match &spec.kind {
        SinkKind::Parquet { path, changed_only } => Ok(Box::new(parquet::ParquetSink::open(
            spec,
            path,
            *changed_only,
        )?)),
        #[cfg(feature = "kafka")]
        SinkKind::Kafka { .. } => Ok(Box::new(kafka::KafkaSink::open(spec)?)),
        #[cfg(not(feature = "kafka"))]
        SinkKind::Kafka { .. } => Err(PanesError::Invalid(format!(
            "sink {:?}: this build has no Kafka client (Cargo feature `kafka`)",
            spec.name
        ))),
    }
}

/// One sink's thread.
struct Task {
    engine: Arc<Engine>,
    spec: SinkSpec,
    wall_clock: bool,
    writer: Box<dyn Writer>,
    changes: Changes,
    stats: Arc<SinkStats>,
}

impl Task {
    fn run(mut self, stop: &(Mutex<Stop>, Condvar)) {
        let interval = Duration::from_millis(self.spec.interval_ms.max(1) as u64);
        // The publish count of the last write that succeeded.
        let mut written: Option<u64> = None;
        // The first write is at once: after a restart, it has every key.
        let mut first = true;
        loop {
            let stopping = {
                let (lock, wake) = stop;
                let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
                let wait = if first { Duration::ZERO } else { interval };
                let (guard, _) = wake
                    .wait_timeout_while(guard, wait, |s| *s == Stop::Run)
                    .unwrap_or_else(|p| p.into_inner());
                *guard
            };
            first = false;
            if stopping == Stop::Now {
                return;
            }
            let stopping = stopping == Stop::AfterWrite;
            let version = match self.engine.published(&self.spec.view) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(sink = %self.spec.name, error = %e, "sink stopped");
                    return;
                }
            };
            if self.wall_clock || written != Some(version) {
                match self.round() {
                    Ok(v) => written = Some(v),
                    Err(e) => {
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            sink = %self.spec.name,
                            view = %self.spec.view,
                            error = %e,
                            "sink write failed; retrying at the next interval"
                        );
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Reads the view and writes what the writer takes; returns the publish count read.
    fn round(&mut self) -> Result<u64> {
        let names: Vec<&str> = self.spec.features.iter().map(String::as_str).collect();
        let names = (!names.is_empty()).then_some(names.as_slice());
        let (keys, ids, served) = self.engine.read_all_published(&self.spec.view, names)?;
        let version = served.version;
        let changes_only = self.writer.changes_only();
        let rows: Vec<usize> = if changes_only {
            self.changes.changed(&served, |r| ids[r] as usize)
        } else {
            (0..keys.len()).collect()
        };
        if changes_only && rows.is_empty() {
            return Ok(version);
        }
        let every_key = rows.len() == keys.len();
        let keys: Vec<KeyValue> = rows.iter().map(|&r| keys[r].clone()).collect();
        let frame = if every_key {
            served.frame
        } else {
            served.frame.select(&rows)
        };
        let batch = self
            .engine
            .frame_batch(&self.spec.view, &key_array(&keys), &frame)?;
        let round = Round {
            view: &self.spec.view,
            keys: &keys,
            batch,
            at: frame.at,
            version,
            every_key,
        };
        let bytes = self.writer.write(&round)?;
        if changes_only {
            self.changes.commit();
        }
        let s = &self.stats;
        s.writes.fetch_add(1, Ordering::Relaxed);
        s.rows.fetch_add(keys.len() as u64, Ordering::Relaxed);
        s.bytes.fetch_add(bytes, Ordering::Relaxed);
        s.last_at_ms.store(frame.at as u64, Ordering::Relaxed);
        Ok(version)
    }
}

/// The wall clock, epoch ms.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
