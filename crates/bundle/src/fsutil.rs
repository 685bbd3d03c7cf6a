//! Crash-safe file writes and bounded reads.
//!
//! Every write that matters goes through here: a temp file in the target directory, fsync, then a rename
//! (or a no-clobber link), then an fsync of the directory, so a pulled stick or a killed process leaves either
//! the old state or the new one, never half of each.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// The target exists already and we never overwrite a bundle silently.
    #[error("{} already exists; refusing to overwrite it (move it away or choose another --out)", .0.display())]
    Exists(PathBuf),
    /// The target is a symbolic link, which could redirect the write anywhere.
    #[error("{} is a symbolic link; refusing to write through it", .0.display())]
    Symlink(PathBuf),
    /// The file is larger than the reader accepts.
    #[error("{} is {size} bytes, more than the {limit}-byte limit", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// What was read back after writing differs from what was written: the medium is failing.
    #[error("{} reads back differently from what was written: the medium may be failing, use another stick", .0.display())]
    ReadBackMismatch(PathBuf),
    /// An operating-system error, with the path it concerned.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl FsError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        FsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn refuse_symlink(path: &Path) -> Result<bool, FsError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(FsError::Symlink(path.to_path_buf())),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(FsError::io(path, e)),
    }
}

/// Fsync a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    let d = File::open(dir).map_err(|e| FsError::io(dir, e))?;
    d.sync_all().map_err(|e| FsError::io(dir, e))
}

fn write_temp(dir: &Path, bytes: &[u8], private: bool) -> Result<tempfile::NamedTempFile, FsError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".ferry-tmp-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // tempfile creates 0600 already; public files get the usual 0644.
        builder.permissions(std::fs::Permissions::from_mode(if private {
            0o600
        } else {
            0o644
        }));
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut tmp = builder.tempfile_in(dir).map_err(|e| FsError::io(dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| FsError::io(tmp.path(), e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| FsError::io(tmp.path(), e))?;
    Ok(tmp)
}

/// Write `bytes` to a new file at `path`, atomically, refusing to replace anything that exists there
/// (a file, a directory or a symbolic link, even a dangling one).
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_new_mode(path, bytes, false)
}

/// [`write_new`] for a secret: the file is created with mode 0600 and never has wider permissions.
pub fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_new_mode(path, bytes, true)
}

fn write_new_mode(path: &Path, bytes: &[u8], private: bool) -> Result<(), FsError> {
    if refuse_symlink(path)? {
        return Err(FsError::Exists(path.to_path_buf()));
    }
    let dir = parent_dir(path);
    let tmp = write_temp(dir, bytes, private)?;
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            FsError::Exists(path.to_path_buf())
        } else {
            FsError::io(path, e.error)
        }
    })?;
    sync_dir(dir)
}

/// Write `bytes` to `path`, atomically replacing what is there. Used for state files, never for bundles.
pub fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    refuse_symlink(path)?;
    let dir = parent_dir(path);
    let tmp = write_temp(dir, bytes, false)?;
    tmp.persist(path).map_err(|e| FsError::io(path, e.error))?;
    sync_dir(dir)
}

/// Write a new file like [`write_new`], then drop it from the page cache and read it back from the medium,
/// so a failing stick is caught where the file was written rather than where it is read.
pub fn write_new_verified(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_new(path, bytes)?;
    let f = File::open(path).map_err(|e| FsError::io(path, e))?;
    // Best effort: on filesystems without fadvise the read comes from cache, which is still a check of the
    // write path.
    let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
    let back = read_capped_file(f, path, bytes.len() as u64 + 1)?;
    if back != bytes {
        return Err(FsError::ReadBackMismatch(path.to_path_buf()));
    }
    Ok(())
}

/// Read a whole file, refusing one larger than `limit` bytes (checked both from the metadata and while reading,
/// since a file can grow under us).
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, FsError> {
    let f = File::open(path).map_err(|e| FsError::io(path, e))?;
    read_capped_file(f, path, limit)
}

fn read_capped_file(f: File, path: &Path, limit: u64) -> Result<Vec<u8>, FsError> {
    let size = f.metadata().map_err(|e| FsError::io(path, e))?.len();
    if size > limit {
        return Err(FsError::TooLarge {
            path: path.to_path_buf(),
            size,
            limit,
        });
    }
    let mut out = Vec::with_capacity(size as usize);
    f.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| FsError::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(FsError::TooLarge {
            path: path.to_path_buf(),
            size: out.len() as u64,
            limit,
        });
    }
    Ok(out)
}

/// Create a directory (and parents) if missing.
pub fn ensure_dir(dir: &Path) -> Result<(), FsError> {
    fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))
}

/// An exclusive advisory lock on `<dir>/lock`, held until dropped, so two merges (or two imports, or an import
/// and a training run) on the same state directory cannot interleave.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Why a state directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another ferry process holds the lock.
    #[error("{} is in use by another ferry process; wait for it to finish", .0.display())]
    Busy(PathBuf),
    /// The lock file could not be opened.
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl DirLock {
    /// Take the lock without waiting.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join("lock");
        refuse_symlink(&path)?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| FsError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(LockError::Busy(dir.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => Err(FsError::io(&path, e).into()),
        }
    }
}
