//! Where checkpoints live: a directory or an object-store prefix of numbered objects
//! per view (or partition), each written whole, restored newest first, and the
//! ownership records that fence a writer that lost its partition.
//!
//! # Ownership and fencing
//! Whoever takes a checkpoint location (a Kafka partition, a pushed view) claims it by
//! *creating* the object `owner-<generation>` one above the highest generation present,
//! with an atomic create (`PutMode::Create` on object stores, a hard link on a
//! directory): of two claimants of the same generation one fails and tries the next.
//! Before each checkpoint write the writer lists the owner records; when a higher
//! generation exists it has been fenced: the write is refused ([`PanesError::Fenced`])
//! and the caller gives the location up. Checkpoint objects carry their writer's
//! generation in their name and rank by (generation, number), so a write that passed
//! its check just before a new owner's claim (the window between the check and the
//! write) ranks below every checkpoint of the new owner and is never restored by it.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{PanesError, Result};

/// File name extension of checkpoints.
const EXT: &str = "panes";
/// Prefix of ownership records.
const OWNER: &str = "owner-";

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// a temporary file beside it, fsynced, renamed over it, then the directory fsynced.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    put_local(path, bytes, false).map(|_| ())
}

/// [`write_atomic`], or with `exclusive` an atomic create: `Ok(false)` when `path`
/// exists (a hard link, unlike a rename, never replaces its target).
fn put_local(path: &Path, bytes: &[u8], exclusive: bool) -> Result<bool> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<bool> {
        fs::create_dir_all(dir)?;
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        let created = if exclusive {
            let linked = fs::hard_link(&tmp, path);
            fs::remove_file(&tmp)?;
            match linked {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            }
        } else {
            fs::rename(&tmp, path)?;
            true
        };
        File::open(dir)?.sync_all()?;
        Ok(created)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        PanesError::file(path, e)
    })
}

/// Where checkpoints are kept: a local directory, or a prefix in an object store
/// (`s3://bucket/prefix`, `gs://…`, `az://container/prefix`; `file:///path` is the
/// directory `/path`).
#[derive(Clone, Debug)]
pub struct CheckpointRoot {
    backing: Backing,
}

#[derive(Clone, Debug)]
enum Backing {
    Dir(PathBuf),
    #[cfg(feature = "cloud")]
    Object(super::remote::Remote),
}

impl CheckpointRoot {
    /// The local directory `path`.
    pub fn dir(path: impl Into<PathBuf>) -> Self {
        CheckpointRoot {
            backing: Backing::Dir(path.into()),
        }
    }

    /// A directory path or a URL: `s3://`, `gs://` and `az://` (credentials from each
    /// cloud's usual chain: environment, profile or instance metadata), or `file://`.
    ///
    /// # Errors
    /// An unknown scheme, a URL without a bucket, a store that cannot be configured
    /// from the environment, or an object-store URL in a build without `cloud`.
    pub fn parse(s: &str) -> Result<Self> {
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(Self::dir(s));
        };
        match scheme {
            "file" => {
                if !rest.starts_with('/') {
                    return Err(PanesError::Invalid(format!(
                        "checkpoint URL {s:?}: a file URL needs an absolute path (file:///var/panes)"
                    )));
                }
                Ok(Self::dir(rest))
            }
            #[cfg(feature = "cloud")]
            "s3" | "gs" | "az" => Ok(CheckpointRoot {
                backing: Backing::Object(super::remote::Remote::parse(scheme, rest, s)?),
            }),
            #[cfg(not(feature = "cloud"))]
            "s3" | "gs" | "az" => Err(PanesError::Invalid(format!(
                "checkpoint URL {s:?}: this build has no object-store support (Cargo feature `cloud`)"
            ))),
            other => Err(PanesError::Invalid(format!(
                "checkpoint URL {s:?}: unknown scheme {other:?} (expected a directory, file://, s3://, gs:// or az://)"
            ))),
        }
    }

    /// The location `name` inside this one.
    pub fn join(&self, name: &str) -> Self {
        let backing = match &self.backing {
            Backing::Dir(p) => Backing::Dir(p.join(name)),
            #[cfg(feature = "cloud")]
            Backing::Object(r) => Backing::Object(r.join(name)),
        };
        CheckpointRoot { backing }
    }

    /// The local directory, for a root that is one.
    pub fn local_path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Dir(p) => Some(p),
            #[cfg(feature = "cloud")]
            Backing::Object(_) => None,
        }
    }

    /// Where object `name` of this location is, for messages (a path or a URL).
    pub fn location(&self, name: &str) -> String {
        match &self.backing {
            Backing::Dir(p) => p.join(name).display().to_string(),
            #[cfg(feature = "cloud")]
            Backing::Object(r) => r.url(name),
        }
    }

    /// Checks that objects can be written here and removed (a probe object).
    ///
    /// # Errors
    /// [`PanesError::Invalid`] naming the location and the cause.
    pub fn probe_writable(&self) -> Result<()> {
        let name = format!(".panes-probe-{}", std::process::id());
        self.put(&name, b"probe")
            .and_then(|()| self.remove(&name))
            .map_err(|e| {
                PanesError::Invalid(format!(
                    "--checkpoint-dir {self}: checkpoints cannot be written there: {e}"
                ))
            })
    }

    /// Names of the objects directly in this location (none when it does not exist).
    pub(crate) fn names(&self) -> Result<Vec<String>> {
        match &self.backing {
            Backing::Dir(path) => {
                let entries = match fs::read_dir(path) {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(PanesError::file(path, e)),
                };
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(|e| PanesError::file(path, e))?;
                    if let Some(name) = entry.file_name().to_str() {
                        names.push(name.to_string());
                    }
                }
                Ok(names)
            }
            #[cfg(feature = "cloud")]
            Backing::Object(r) => r.names(),
        }
    }

    /// The bytes of object `name`; `None` when it does not exist.
    pub(crate) fn get(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match &self.backing {
            Backing::Dir(path) => match fs::read(path.join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(PanesError::file(path.join(name), e)),
            },
            #[cfg(feature = "cloud")]
            Backing::Object(r) => r.get(name),
        }
    }

    /// Writes object `name` whole: readers see the old object or the new one.
    pub(crate) fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        match &self.backing {
            Backing::Dir(path) => write_atomic(&path.join(name), bytes),
            #[cfg(feature = "cloud")]
            Backing::Object(r) => r.put(name, bytes, false).map(|_| ()),
        }
    }

    /// Creates object `name` unless it exists, atomically: `Ok(false)` when it did.
    pub(crate) fn create(&self, name: &str, bytes: &[u8]) -> Result<bool> {
        match &self.backing {
            Backing::Dir(path) => put_local(&path.join(name), bytes, true),
            #[cfg(feature = "cloud")]
            Backing::Object(r) => r.put(name, bytes, true),
        }
    }

    /// Removes object `name` (absent is fine).
    pub(crate) fn remove(&self, name: &str) -> Result<()> {
        match &self.backing {
            Backing::Dir(path) => match fs::remove_file(path.join(name)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(PanesError::file(path.join(name), e)),
            },
            #[cfg(feature = "cloud")]
            Backing::Object(r) => r.remove(name),
        }
    }
}

impl std::fmt::Display for CheckpointRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.backing {
            Backing::Dir(p) => write!(f, "{}", p.display()),
            #[cfg(feature = "cloud")]
            Backing::Object(r) => f.write_str(&r.url("")),
        }
    }
}

impl From<&Path> for CheckpointRoot {
    fn from(p: &Path) -> Self {
        Self::dir(p)
    }
}

impl From<PathBuf> for CheckpointRoot {
    fn from(p: PathBuf) -> Self {
        Self::dir(p)
    }
}

impl From<&PathBuf> for CheckpointRoot {
    fn from(p: &PathBuf) -> Self {
        Self::dir(p)
    }
}

/// One checkpoint present in a location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Generation of the owner that wrote it (0: written without a claim).
    pub generation: u64,
    /// Its number.
    pub seq: u64,
    /// Its object name.
    pub name: String,
}

/// Parses a checkpoint object name: `ckpt-<seq>.panes` (generation 0) or
/// `ckpt-g<generation>-<seq>.panes`.
fn parse_name(name: &str) -> Option<(u64, u64)> {
    let body = name
        .strip_prefix("ckpt-")?
        .strip_suffix(&format!(".{EXT}"))?;
    match body.strip_prefix('g') {
        Some(rest) => {
            let (g, s) = rest.split_once('-')?;
            Some((g.parse().ok()?, s.parse().ok()?))
        }
        None => Some((0, body.parse().ok()?)),
    }
}

/// The numbered checkpoints of one view (or one partition of it), the highest
/// (generation, number) the newest.
#[derive(Clone, Debug)]
pub struct CheckpointDir {
    root: CheckpointRoot,
    keep: usize,
    /// The generation this writer claimed ([`Self::claim`]); its writes are fenced.
    generation: Option<u64>,
}

impl CheckpointDir {
    /// The location `root` (created on the first write), keeping the newest `keep`
    /// checkpoints (at least 2, so that a corrupt newest one has a predecessor).
    pub fn new(root: impl Into<CheckpointRoot>, keep: usize) -> Self {
        CheckpointDir {
            root: root.into(),
            keep: keep.max(2),
            generation: None,
        }
    }

    /// The location.
    pub fn root(&self) -> &CheckpointRoot {
        &self.root
    }

    /// The generation claimed, if any.
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Checkpoints present, newest first.
    ///
    /// # Errors
    /// The location cannot be listed.
    pub fn list(&self) -> Result<Vec<Listed>> {
        let mut files: Vec<Listed> = self
            .root
            .names()?
            .into_iter()
            .filter_map(|name| {
                let (generation, seq) = parse_name(&name)?;
                Some(Listed {
                    generation,
                    seq,
                    name,
                })
            })
            .collect();
        files.sort_unstable_by_key(|f| std::cmp::Reverse((f.generation, f.seq)));
        Ok(files)
    }

    /// Where checkpoint `listed` is (a path or a URL).
    pub fn location(&self, listed: &Listed) -> String {
        self.root.location(&listed.name)
    }

    /// Ownership records present: (generation, owner), highest first.
    fn owners(&self) -> Result<Vec<(u64, String)>> {
        let mut owners: Vec<(u64, String)> = self
            .root
            .names()?
            .into_iter()
            .filter_map(|n| Some((n.strip_prefix(OWNER)?.parse().ok()?, n)))
            .collect();
        owners.sort_unstable_by_key(|o| std::cmp::Reverse(o.0));
        Ok(owners)
    }

    /// The current owner: the highest generation and what its record says (the
    /// address other instances route reads to). `None` when no one claimed it.
    ///
    /// # Errors
    /// The location cannot be listed or the record read.
    pub fn owner(&self) -> Result<Option<(u64, String)>> {
        for (generation, name) in self.owners()? {
            // A record pruned between the list and the read: the next one is older.
            if let Some(bytes) = self.root.get(&name)? {
                let owner = String::from_utf8_lossy(&bytes).trim().to_string();
                return Ok(Some((generation, owner)));
            }
        }
        Ok(None)
    }

    /// Claims this location for `owner` (its address): creates the ownership record of
    /// the next generation, which fences every earlier claimant's writes. Returns the
    /// generation. Records two or more generations old are removed.
    ///
    /// # Errors
    /// The store fails, or 100 claims in a row lost their race.
    pub fn claim(&mut self, owner: &str) -> Result<u64> {
        for _ in 0..100 {
            let owners = self.owners()?;
            let next = owners.first().map_or(1, |o| o.0.saturating_add(1));
            if self
                .root
                .create(&format!("{OWNER}{next:020}"), owner.as_bytes())?
            {
                self.generation = Some(next);
                for (_, name) in owners.iter().skip(1) {
                    let _ = self.root.remove(name);
                }
                return Ok(next);
            }
        }
        Err(PanesError::Unavailable(format!(
            "{}: 100 claims in a row lost to other instances",
            self.root
        )))
    }

    /// Writes `bytes` as the newest checkpoint, whole, then removes all but the newest
    /// `keep`. Returns where it was written.
    ///
    /// # Errors
    /// [`PanesError::Fenced`] when a claimed location has an owner of a higher
    /// generation (nothing is written then); the store fails.
    pub fn write(&self, bytes: &[u8]) -> Result<String> {
        let existing = self.list()?;
        if let Some(mine) = self.generation
            && let Some((theirs, owner)) = self.owner()?
            && theirs != mine
        {
            return Err(PanesError::Fenced(format!(
                "{}: this instance's claim (generation {mine}) was superseded by generation {theirs} ({owner}); the checkpoint was not written",
                self.root
            )));
        }
        let seq = match existing.iter().map(|f| f.seq).max() {
            None => 1,
            Some(s) => s.checked_add(1).ok_or_else(|| {
                PanesError::file(
                    self.location(&existing[0]),
                    "a checkpoint's number is the largest there is, so no newer checkpoint can be \
                     numbered after it; remove it (it was not written by Panes)",
                )
            })?,
        };
        let name = match self.generation {
            Some(g) => format!("ckpt-g{g:020}-{seq:020}.{EXT}"),
            None => format!("ckpt-{seq:020}.{EXT}"),
        };
        self.root.put(&name, bytes)?;
        for old in existing.iter().skip(self.keep - 1) {
            let _ = self.root.remove(&old.name);
        }
        Ok(self.root.location(&name))
    }

    /// Removes the temporary files that [`write_atomic`] leaves when its process dies
    /// mid-write (`.ckpt-….tmp`) in a local directory; failures are ignored (the next
    /// restore retries).
    fn remove_unfinished(&self) {
        let Some(path) = self.root.local_path() else {
            return;
        };
        let Ok(entries) = fs::read_dir(path) else {
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

    /// Reads checkpoints newest first and returns the first that `restore` accepts,
    /// with where it was, reporting each one skipped to `skipped` (location and
    /// reason). `None` when there is no usable checkpoint.
    ///
    /// Temporary files of writes that never finished (a process killed mid-write) are
    /// removed first: whoever restores a directory owns it.
    ///
    /// # Errors
    /// The location cannot be listed.
    pub fn restore_newest<T>(
        &self,
        mut restore: impl FnMut(&[u8]) -> std::result::Result<T, String>,
        mut skipped: impl FnMut(&str, &str),
    ) -> Result<Option<(T, String)>> {
        self.remove_unfinished();
        for listed in self.list()? {
            let location = self.location(&listed);
            let bytes = match self.root.get(&listed.name) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    skipped(
                        &location,
                        "removed while restoring (pruned by a newer writer)",
                    );
                    continue;
                }
                Err(e) => {
                    skipped(&location, &format!("cannot be read: {e}"));
                    continue;
                }
            };
            match restore(&bytes) {
                Ok(t) => return Ok(Some((t, location))),
                Err(why) => skipped(&location, &why),
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_rank_by_generation_then_number() {
        assert_eq!(parse_name("ckpt-00000000000000000042.panes"), Some((0, 42)));
        assert_eq!(
            parse_name("ckpt-g00000000000000000003-00000000000000000007.panes"),
            Some((3, 7))
        );
        for bad in [
            "ckpt-.panes",
            "ckpt-g1.panes",
            "ckpt-x.panes",
            "owner-1",
            "ckpt-1.tmp",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut a = CheckpointDir::new(dir.path(), 3);
        a.write(b"unclaimed").unwrap();
        assert_eq!(a.claim("a:1").unwrap(), 1);
        a.write(b"a").unwrap();
        let names: Vec<_> = a
            .list()
            .unwrap()
            .into_iter()
            .map(|l| l.generation)
            .collect();
        assert_eq!(names, [1, 0]);
    }

    #[test]
    fn r23_a_superseded_owner_cannot_write() {
        let dir = tempfile::tempdir().unwrap();
        let root = CheckpointRoot::dir(dir.path().join("view/p0"));
        let mut zombie = CheckpointDir::new(root.clone(), 3);
        assert_eq!(zombie.claim("zombie:1").unwrap(), 1);
        zombie.write(b"old state").unwrap();
        let mut owner = CheckpointDir::new(root.clone(), 3);
        assert_eq!(owner.claim("new:2").unwrap(), 2);
        assert_eq!(owner.owner().unwrap(), Some((2, "new:2".into())));
        let before = owner.list().unwrap();
        let err = zombie.write(b"stale state").unwrap_err();
        assert!(matches!(err, PanesError::Fenced(_)), "{err}");
        assert!(err.to_string().contains("generation 2 (new:2)"), "{err}");
        assert_eq!(
            owner.list().unwrap(),
            before,
            "the refused write left nothing"
        );
        owner.write(b"new state").unwrap();
        let (bytes, _) = owner
            .restore_newest(|b| Ok::<_, String>(b.to_vec()), |_, _| {})
            .unwrap()
            .unwrap();
        assert_eq!(bytes, b"new state");
        // A write that slipped past its check just before the claim ranks below.
        root.put(
            "ckpt-g00000000000000000001-00000000000000000099.panes",
            b"raced",
        )
        .unwrap();
        let (bytes, _) = owner
            .restore_newest(|b| Ok::<_, String>(b.to_vec()), |_, _| {})
            .unwrap()
            .unwrap();
        assert_eq!(bytes, b"new state");
        // Only the two newest ownership records are kept.
        let mut third = CheckpointDir::new(root.clone(), 3);
        assert_eq!(third.claim("third:3").unwrap(), 3);
        let owners: Vec<u64> = third.owners().unwrap().iter().map(|o| o.0).collect();
        assert_eq!(owners, [3, 2]);
    }

    #[test]
    fn r23_an_atomic_create_does_not_replace() {
        let dir = tempfile::tempdir().unwrap();
        let root = CheckpointRoot::dir(dir.path());
        assert!(root.create("x", b"first").unwrap());
        assert!(!root.create("x", b"second").unwrap());
        assert_eq!(root.get("x").unwrap().unwrap(), b"first");
        assert_eq!(root.names().unwrap(), ["x"], "no temporary file is left");
    }

    #[test]
    fn r23_checkpoint_urls() {
        let d = CheckpointRoot::parse("file:///var/panes").unwrap();
        assert_eq!(d.local_path(), Some(Path::new("/var/panes")));
        assert_eq!(
            CheckpointRoot::parse("relative/dir").unwrap().local_path(),
            Some(Path::new("relative/dir"))
        );
        for (bad, says) in [
            ("file://relative", "absolute path"),
            ("ftp://host/x", "unknown scheme \"ftp\""),
        ] {
            let e = CheckpointRoot::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
