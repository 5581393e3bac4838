//! Where checkpoints live: a directory of numbered files per view (or partition),
//! written atomically and durably, restored newest first.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{PanesError, Result};

/// File name extension of checkpoints.
const EXT: &str = "panes";

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// a temporary file beside it, fsynced, renamed over it, then the directory fsynced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PanesError::file(path, e)
    })
}

/// A directory of numbered checkpoints of one view (or one partition of it):
/// `ckpt-00000000000000000042.panes`, the highest number the newest.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    path: PathBuf,
    keep: usize,
}

impl CheckpointDir {
    /// The directory at `path` (created on the first write), keeping the newest `keep`
    /// checkpoints (at least 2, so that a corrupt newest one has a predecessor).
    pub fn new(path: impl Into<PathBuf>, keep: usize) -> Self {
        CheckpointDir {
            path: path.into(),
            keep: keep.max(2),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checkpoint files present, newest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let entries = match fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(PanesError::file(&self.path, e)),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| PanesError::file(&self.path, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let seq = name
                .strip_prefix("ckpt-")
                .and_then(|s| s.strip_suffix(&format!(".{EXT}")))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(seq) = seq {
                files.push((seq, entry.path()));
            }
        }
        files.sort_unstable_by_key(|f| std::cmp::Reverse(f.0));
        Ok(files)
    }

    /// Removes the temporary files `write_atomic` leaves when its process dies
    /// mid-write (`.ckpt-….tmp`); failures are ignored (the next restore retries).
    fn remove_unfinished(&self) {
        let Ok(entries) = fs::read_dir(&self.path) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".ckpt-") && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Writes `bytes` as the newest checkpoint, atomically and durably, then removes
    /// all but the newest `keep`. Returns the file written.
    pub fn write(&self, bytes: &[u8]) -> Result<PathBuf> {
        let existing = self.list()?;
        let seq = match existing.first() {
            None => 1,
            Some((s, newest)) => s.checked_add(1).ok_or_else(|| {
                PanesError::file(
                    newest,
                    "its number is the largest there is, so no newer checkpoint can be \
                     numbered after it; remove it (it was not written by Panes)",
                )
            })?,
        };
        let path = self.path.join(format!("ckpt-{seq:020}.{EXT}"));
        write_atomic(&path, bytes)?;
        for (_, old) in existing.iter().skip(self.keep - 1) {
            let _ = fs::remove_file(old);
        }
        Ok(path)
    }

    /// Reads checkpoints newest first and returns the first that `restore` accepts,
    /// reporting each one skipped to `skipped` (path and reason). `None` when there is
    /// no usable checkpoint.
    ///
    /// Temporary files of writes that never finished (a process killed mid-write) are
    /// removed first: whoever restores a directory owns it.
    pub fn restore_newest<T>(
        &self,
        mut restore: impl FnMut(&[u8]) -> std::result::Result<T, String>,
        mut skipped: impl FnMut(&Path, &str),
    ) -> Result<Option<(T, PathBuf)>> {
        self.remove_unfinished();
        for (_, path) in self.list()? {
            let bytes = match fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    skipped(&path, &format!("cannot be read: {e}"));
                    continue;
                }
            };
            match restore(&bytes) {
                Ok(t) => return Ok(Some((t, path))),
                Err(why) => skipped(&path, &why),
            }
        }
        Ok(None)
    }
}
