//! Reading and writing event, spine and output files: Parquet, CSV and Arrow IPC,
//! chosen by extension.

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{PanesError, Result};

/// Rows per batch when reading files.
pub const READ_BATCH_ROWS: usize = 64 * 1024;

/// A file format Panes reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `.parquet`, `.pq`
    Parquet,
    /// `.csv` (with a header row; types inferred)
    Csv,
    /// `.arrow`, `.ipc`, `.feather`: the Arrow IPC file format
    IpcFile,
    /// `.arrows`: the Arrow IPC stream format
    IpcStream,
}

impl Format {
    /// The format of `path`, by extension.
    ///
    /// # Errors
    /// [`PanesError::Invalid`] for an unknown extension.
    pub fn of(path: &Path) -> Result<Format> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        Ok(match ext.as_str() {
            "parquet" | "pq" => Format::Parquet,
            "csv" => Format::Csv,
            "arrow" | "ipc" | "feather" => Format::IpcFile,
            "arrows" => Format::IpcStream,
            _ => {
                return Err(PanesError::Invalid(format!(
                    "{}: unknown file extension {ext:?}; expected .parquet, .csv, .arrow (.ipc, .feather) or .arrows",
                    path.display()
                )));
            }
        })
    }
}

/// Reads every batch of a file.
///
/// # Errors
/// [`PanesError::File`] when the file cannot be opened (the file system's to fix, and
/// worth a retry); [`PanesError::Invalid`] naming the file when it opens but is not a
/// valid file of its format (the user's to fix).
pub fn read_file(path: &Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let format = Format::of(path)?;
    let file = File::open(path).map_err(|e| PanesError::file(path, e))?;
    let err = |e: &dyn std::fmt::Display| {
        let what = match format {
            Format::Parquet => "Parquet file",
            Format::Csv => "CSV file",
            Format::IpcFile => "Arrow IPC file",
            Format::IpcStream => "Arrow IPC stream",
        };
        PanesError::Invalid(format!("{}: not a valid {what}: {e}", path.display()))
    };
    let (schema, batches): (SchemaRef, std::result::Result<Vec<_>, _>) = match format {
        Format::Parquet => {
            let b = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| err(&e))?
                .with_batch_size(READ_BATCH_ROWS);
            let schema = b.schema().clone();
            let r = b.build().map_err(|e| err(&e))?;
            (schema, r.collect())
        }
        Format::Csv => {
            let mut file = file;
            let (schema, _) = arrow_csv::reader::Format::default()
                .with_header(true)
                .infer_schema(BufReader::new(&mut file), Some(10_000))
                .map_err(|e| err(&e))?;
            file.seek(SeekFrom::Start(0)).map_err(|e| err(&e))?;
            let schema = Arc::new(schema);
            let r = arrow_csv::ReaderBuilder::new(schema.clone())
                .with_header(true)
                .with_batch_size(READ_BATCH_ROWS)
                .build(BufReader::new(file))
                .map_err(|e| err(&e))?;
            (schema, r.collect())
        }
        Format::IpcFile => {
            let len = file.metadata().map_err(|e| err(&e))?.len();
            let (schema, batches) =
                crate::ingest::ipc::read_file(BufReader::new(file), len).map_err(|e| err(&e))?;
            (schema, Ok(batches))
        }
        Format::IpcStream => {
            let len = file.metadata().map_err(|e| err(&e))?.len();
            let (schema, batches) =
                crate::ingest::ipc::read_stream(BufReader::new(file), len).map_err(|e| err(&e))?;
            (schema, Ok(batches))
        }
    };
    Ok((schema, batches.map_err(|e| err(&e))?))
}

/// Writes batches to a file, creating or replacing it.
///
/// # Errors
/// [`PanesError::File`] when the file cannot be written.
pub fn write_file(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| PanesError::file(path, e);
    let format = Format::of(path)?;
    let file = BufWriter::new(File::create(path).map_err(|e| err(&e))?);
    match format {
        Format::Parquet => {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::default()))
                .build();
            let mut w =
                ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(|e| err(&e))?;
            for b in batches {
                w.write(b).map_err(|e| err(&e))?;
            }
            w.close().map_err(|e| err(&e))?;
        }
        Format::Csv => {
            let mut w = arrow_csv::WriterBuilder::new()
                .with_header(true)
                .build(file);
            for b in batches {
                w.write(b).map_err(|e| err(&e))?;
            }
        }
        Format::IpcFile => {
            let mut w =
                arrow_ipc::writer::FileWriter::try_new(file, schema).map_err(|e| err(&e))?;
            for b in batches {
                w.write(b).map_err(|e| err(&e))?;
            }
            w.finish().map_err(|e| err(&e))?;
        }
        Format::IpcStream => {
            let mut w =
                arrow_ipc::writer::StreamWriter::try_new(file, schema).map_err(|e| err(&e))?;
            for b in batches {
                w.write(b).map_err(|e| err(&e))?;
            }
            w.finish().map_err(|e| err(&e))?;
        }
    }
    Ok(())
}
