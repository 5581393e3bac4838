//! The served-feature log (`--log-reads DIR`): one `GetFeatures` view read in every
//! `--log-reads-every N`, its keys, read time and the values it returned, written to
//! Parquet for `panes skew` to recompute through backfill.
//!
//! The network thread that answered the read hands it to a logging thread over a
//! bounded queue and never waits: when the queue is full the read is not logged, and
//! counted (`panes_read_log_dropped_total`). The thread gathers rows per view and
//! writes a file when a view holds [`ROWS_PER_FILE`] rows, every flush interval, and at
//! shutdown: `<dir>/view=<view>/date=<YYYY-MM-DD>/<first served ms>-<rows>.parquet`,
//! each written whole as sink files are.
//!
//! A file has the view's key column(s), `at_ms` (the read time the values are as of),
//! `served_at_ms` (the wall clock when it was answered), `features` (the names of the
//! features that read returned, comma-separated), then one column per feature of the
//! view, typed as every other output, null for the features the read did not return.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray, new_null_array};
use arrow_schema::{Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::checkpoint::CheckpointRoot;
use crate::error::{PanesError, Result};
use crate::ingest::keys::{KeyValue, key_array};
use crate::online::{Engine, ServedFrame, feature_field};

/// Reads waiting for the logging thread; more are dropped and counted.
const QUEUE: usize = 4_096;

/// Rows of a view gathered before a file is written.
pub(crate) const ROWS_PER_FILE: usize = 100_000;

/// Where and how often reads are logged.
#[derive(Clone, Debug)]
pub struct ReadLogOptions {
    /// Where the files go (a directory or an object-store URL).
    pub root: CheckpointRoot,
    /// One read in this many is logged (1: every read).
    pub every: u64,
    /// Most time rows wait before a file is written.
    pub flush: Duration,
}

/// One read to log.
struct Entry {
    view: String,
    keys: Vec<KeyValue>,
    served: ServedFrame,
    served_at_ms: i64,
}

/// The server's side: the queue to the logging thread, the sampling counter and the
/// counters.
#[derive(Debug)]
pub(crate) struct ReadLog {
    every: u64,
    seen: AtomicU64,
    queue: Mutex<Option<SyncSender<Entry>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub stats: Arc<ReadLogStats>,
}

/// Counters of the served-feature log.
#[derive(Debug, Default)]
pub(crate) struct ReadLogStats {
    /// Reads logged (queued), and their rows.
    pub reads: AtomicU64,
    pub rows: AtomicU64,
    /// Reads not logged because the queue was full.
    pub dropped: AtomicU64,
    /// Files written, and files that failed (their rows are lost, and counted here).
    pub files: AtomicU64,
    pub failures: AtomicU64,
    pub lost_rows: AtomicU64,
}

impl ReadLog {
    /// Starts the logging thread.
    ///
    /// # Errors
    /// A location where a probe object cannot be written.
    pub(crate) fn start(engine: Arc<Engine>, options: ReadLogOptions) -> Result<ReadLog> {
        options.root.probe_writable().map_err(|e| {
            PanesError::Invalid(e.to_string().replace("--checkpoint-dir", "--log-reads"))
        })?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let stats = Arc::new(ReadLogStats::default());
        let writer = Files {
            engine,
            root: options.root,
            stats: stats.clone(),
            pending: BTreeMap::new(),
        };
        let flush = options.flush;
        let thread = std::thread::Builder::new()
            .name("read-log".into())
            .spawn(move || writer.run(&rx, flush))
            .map_err(|e| PanesError::Internal(format!("read log: {e}")))?;
        Ok(ReadLog {
            every: options.every.max(1),
            seen: AtomicU64::new(0),
            queue: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    /// Whether the next read is one to log (one in `every`).
    pub(crate) fn sample(&self) -> bool {
        self.seen
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(self.every)
    }

    /// Queues a read for the log; never waits.
    pub(crate) fn log(&self, view: String, keys: Vec<KeyValue>, served: ServedFrame) {
        let rows = keys.len() as u64;
        let entry = Entry {
            view,
            keys,
            served,
            served_at_ms: crate::sinks::now_ms(),
        };
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = queue.as_ref() else { return };
        match tx.try_send(entry) {
            Ok(()) => {
                self.stats.reads.fetch_add(1, Ordering::Relaxed);
                self.stats.rows.fetch_add(rows, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes what is gathered and stops the thread (at shutdown).
    pub(crate) fn stop(&self) {
        drop(self.queue.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread
            && t.join().is_err()
        {
            tracing::error!("the read log's thread panicked");
        }
    }
}

/// The logging thread: rows gathered per view, and where files go.
struct Files {
    engine: Arc<Engine>,
    root: CheckpointRoot,
    stats: Arc<ReadLogStats>,
    /// Per view: its batches so far, their rows, and when the first came.
    pending: BTreeMap<String, (Vec<RecordBatch>, usize, Instant, i64)>,
}

impl Files {
    fn run(mut self, rx: &Receiver<Entry>, flush: Duration) {
        loop {
            match rx.recv_timeout(flush.min(Duration::from_secs(1))) {
                Ok(e) => {
                    let view = e.view.clone();
                    match self.rows(e) {
                        Ok((batch, served_at)) => {
                            let p = self
                                .pending
                                .entry(view.clone())
                                .or_insert_with(|| (Vec::new(), 0, Instant::now(), served_at));
                            p.1 += batch.num_rows();
                            p.0.push(batch);
                            if p.1 >= ROWS_PER_FILE {
                                self.write(&view);
                            }
                        }
                        Err(err) => {
                            tracing::warn!(view = %view, error = %err, "a read could not be logged");
                            self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let views: Vec<String> = self.pending.keys().cloned().collect();
                    for v in views {
                        self.write(&v);
                    }
                    return;
                }
            }
            let due: Vec<String> = self
                .pending
                .iter()
                .filter(|(_, p)| p.2.elapsed() >= flush)
                .map(|(v, _)| v.clone())
                .collect();
            for v in due {
                self.write(&v);
            }
        }
    }

    /// A read as rows of its view's log schema.
    fn rows(&self, e: Entry) -> Result<(RecordBatch, i64)> {
        let compiled = self.engine.compiled(&e.view)?;
        let frame = &e.served.frame;
        let keys = key_array(&e.keys);
        let served = self.engine.frame_batch(&e.view, &keys, frame)?;
        let n = e.keys.len();
        let key_columns = compiled.spec.key.len();
        let mut fields: Vec<Field> = served.schema().fields()[..key_columns]
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let mut columns: Vec<ArrayRef> = served.columns()[..key_columns].to_vec();
        fields.push(Field::new("at_ms", arrow_schema::DataType::Int64, false));
        columns.push(std::sync::Arc::new(Int64Array::from(vec![frame.at; n])));
        fields.push(Field::new(
            "served_at_ms",
            arrow_schema::DataType::Int64,
            false,
        ));
        columns.push(std::sync::Arc::new(Int64Array::from(vec![
            e.served_at_ms;
            n
        ])));
        fields.push(Field::new("features", arrow_schema::DataType::Utf8, false));
        columns.push(std::sync::Arc::new(StringArray::from(vec![
            frame
                .names
                .join(",");
            n
        ])));
        let text = self.engine.text_features(&e.view)?;
        for (i, f) in compiled.spec.features.iter().enumerate() {
            let (field, column) = match served.schema().column_with_name(&f.name) {
                Some((j, field)) => (field.clone(), served.column(j).clone()),
                None => {
                    let field =
                        feature_field(&f.name, f.agg, text.get(i).copied().unwrap_or(false));
                    let column = new_null_array(field.data_type(), n);
                    (field, column)
                }
            };
            fields.push(field);
            columns.push(column);
        }
        Ok((
            RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns)?,
            e.served_at_ms,
        ))
    }

    /// Writes a view's gathered rows as one file.
    fn write(&mut self, view: &str) {
        let Some((batches, rows, _, first)) = self.pending.remove(view) else {
            return;
        };
        if rows == 0 {
            return;
        }
        let result = (|| -> Result<()> {
            // A string feature's column type can change (a view's first string value);
            // rows of another schema go to a file of their own.
            let mut files: Vec<(arrow_schema::SchemaRef, Vec<RecordBatch>)> = Vec::new();
            for b in batches {
                match files.last_mut() {
                    Some((s, bs)) if *s == b.schema() => bs.push(b),
                    _ => files.push((b.schema(), vec![b])),
                }
            }
            for (i, (schema, batches)) in files.iter().enumerate() {
                let props = WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .build();
                let mut out = Vec::new();
                let mut w = ArrowWriter::try_new(&mut out, schema.clone(), Some(props))
                    .map_err(|e| PanesError::Internal(format!("parquet: {e}")))?;
                for b in batches {
                    w.write(b)
                        .map_err(|e| PanesError::Internal(format!("parquet: {e}")))?;
                }
                w.close()
                    .map_err(|e| PanesError::Internal(format!("parquet: {e}")))?;
                let date = arrow_array::temporal_conversions::timestamp_ms_to_datetime(first)
                    .map_or_else(|| "unknown".to_string(), |t| t.date().to_string());
                let n: usize = batches.iter().map(RecordBatch::num_rows).sum();
                self.root
                    .join(&format!("view={view}"))
                    .join(&format!("date={date}"))
                    .put(&format!("{first}-{i}-{n}.parquet"), &out)?;
                self.stats.files.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
            self.stats
                .lost_rows
                .fetch_add(rows as u64, Ordering::Relaxed);
            tracing::warn!(view = %view, error = %e, rows, "a read-log file could not be written");
        }
    }
}
