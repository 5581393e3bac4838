//! Reading and writing event, spine and output files: Parquet, CSV and Arrow IPC,
//! chosen by extension.

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

use arrow_array::{Int64Array, RecordBatch};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};
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
                w.write(&csv_safe(b).map_err(|e| err(&e))?)
                    .map_err(|e| err(&e))?;
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

/// CSV renders times as text, and arrow-csv fails on a value beyond chrono's range:
/// exactly the out-of-range times a dead-letter file exists to record. A temporal
/// column with such a value is written as text, each unrenderable value as its raw
/// integer (lossless); other columns, and temporal ones that render, are unchanged.
fn csv_safe(batch: &RecordBatch) -> std::result::Result<RecordBatch, ArrowError> {
    use arrow_array::{Array, StringArray};
    use arrow_cast::display::{ArrayFormatter, FormatOptions};
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let temporal = matches!(
            column.data_type(),
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
        );
        if !temporal {
            fields.push(field.clone());
            columns.push(column.clone());
            continue;
        }
        let formatter = ArrayFormatter::try_new(column.as_ref(), &FormatOptions::default())?;
        let renders = |i: usize| column.is_null(i) || formatter.value(i).try_to_string().is_ok();
        if (0..column.len()).all(renders) {
            fields.push(field.clone());
            columns.push(column.clone());
            continue;
        }
        let raw = arrow_cast::cast(column, &DataType::Int64)?;
        let raw = raw
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("cast to Int64");
        let text: StringArray = (0..column.len())
            .map(|i| {
                (!column.is_null(i)).then(|| {
                    formatter
                        .value(i)
                        .try_to_string()
                        .unwrap_or_else(|_| raw.value(i).to_string())
                })
            })
            .collect();
        fields.push(Arc::new(Field::new(field.name(), DataType::Utf8, true)));
        columns.push(Arc::new(text) as _);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

#[cfg(test)]
mod tests {
    use arrow_array::{ArrayRef, TimestampSecondArray};

    use super::*;

    #[test]
    fn r17_csv_files_hold_times_beyond_chrono_s_range_as_raw_integers() {
        let times = TimestampSecondArray::from(vec![Some(i64::MAX), Some(1_767_225_600), None]);
        let batch = RecordBatch::try_from_iter([("ts", Arc::new(times) as ArrayRef)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.csv");
        write_file(&path, &batch.schema(), std::slice::from_ref(&batch)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        // The null row is written as an empty field.
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..3],
            ["ts", "9223372036854775807", "2026-01-01T00:00:00"],
            "{text}"
        );
    }
}
