//! The Parquet sink: a file per write under a directory or an object-store prefix,
//! `<path>/view=<view>/date=<YYYY-MM-DD of the read time, UTC>/<read time ms>-<written
//! ms>-<publishes>.parquet`, each written whole (a local file is written beside its name, fsynced
//! and renamed; an object is one PUT), so a reader never sees part of one.
//!
//! A file holds the key columns, the features (typed as every other output of the
//! view), and `at_ms`, the read time its vectors were read at; its key-value metadata
//! says `panes.view`, `panes.at_ms`, `panes.state_version` and `panes.rows` (`every_key`,
//! or `changed` for the keys whose vector changed since the previous file).

use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue as Meta;
use parquet::file::properties::WriterProperties;

use super::{Round, Writer};
use crate::checkpoint::CheckpointRoot;
use crate::error::{PanesError, Result};
use crate::spec::SinkSpec;

/// Writes each round to a Parquet file of its own.
#[derive(Debug)]
pub(crate) struct ParquetSink {
    name: String,
    /// `<path>/view=<view>`.
    root: CheckpointRoot,
    changed_only: bool,
}

impl ParquetSink {
    /// The sink of `spec`, writing under `path`.
    ///
    /// # Errors
    /// A path that does not parse, or where a probe object cannot be written.
    pub(crate) fn open(spec: &SinkSpec, path: &str, changed_only: bool) -> Result<Self> {
        let root = CheckpointRoot::parse(path)
            .map_err(|e| PanesError::Invalid(format!("sink {:?}: path: {e}", spec.name)))?
            .join(&format!("view={}", spec.view));
        root.probe_writable().map_err(|e| {
            PanesError::Invalid(format!(
                "sink {:?}: {}",
                spec.name,
                e.to_string().replace("--checkpoint-dir", "path")
            ))
        })?;
        Ok(ParquetSink {
            name: spec.name.clone(),
            root,
            changed_only,
        })
    }
}

impl Writer for ParquetSink {
    fn changes_only(&self) -> bool {
        self.changed_only
    }

    fn write(&mut self, round: &Round<'_>) -> Result<u64> {
        let bytes = encode(round)?;
        let date = arrow_array::temporal_conversions::timestamp_ms_to_datetime(round.at)
            .map_or_else(|| "unknown".to_string(), |t| t.date().to_string());
        let written = super::now_ms();
        let name = format!("{}-{written}-{}.parquet", round.at, round.version);
        self.root
            .join(&format!("date={date}"))
            .put(&name, &bytes)
            .map_err(|e| PanesError::Invalid(format!("sink {:?}: {e}", self.name)))?;
        Ok(bytes.len() as u64)
    }
}

/// A round as Parquet bytes: its batch, plus the read time as column `at_ms`.
pub(crate) fn encode(round: &Round<'_>) -> Result<Vec<u8>> {
    let batch = round.with_read_time()?;
    let meta = |k: &str, v: String| Meta::new(k.to_string(), v);
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_key_value_metadata(Some(vec![
            meta("panes.view", round.view.to_string()),
            meta("panes.at_ms", round.at.to_string()),
            meta("panes.state_version", round.version.to_string()),
            meta(
                "panes.rows",
                if round.every_key {
                    "every_key"
                } else {
                    "changed"
                }
                .to_string(),
            ),
        ]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .map_err(|e| PanesError::Internal(format!("parquet: {e}")))?;
    w.write(&batch)
        .map_err(|e| PanesError::Internal(format!("parquet: {e}")))?;
    w.close()
        .map_err(|e| PanesError::Internal(format!("parquet: {e}")))?;
    Ok(out)
}
