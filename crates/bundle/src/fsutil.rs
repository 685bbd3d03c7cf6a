//! Crash-safe file writes and bounded reads.
//!
//! Every write that matters goes through here: a temp file in the target directory, fsync, then a rename
//! (or a no-clobber link), then an fsync of the directory, so a pulled stick or a killed process leaves either
//! the old state or the new one, never half of each.
//!
//! # Failpoints (a test hook)
//!
//! The crash tests (`crates/client/tests/crash.rs`, `crates/server/tests/crash.rs`) kill a command at each of its
//! durable steps. A *durable step* is one of: writing and fsyncing a temp file, renaming or linking it to its final
//! name, and fsyncing a directory (including the parent of a directory [`ensure_dir`] creates). The steps of a
//! process are counted from 1 in the order they happen.
//! - `FERRY_FAILPOINT=<n>`: the process calls [`std::process::abort`] (as if killed with `kill -9` or by power loss)
//!   right before its n-th durable step.
//! - `FERRY_FAILPOINT_TORN=<n>`: if the n-th step is a temp-file write, only the first half of the bytes is written
//!   and fsynced, then the process aborts (a torn write); any other step aborts as with `FERRY_FAILPOINT`.
//!
//! The variables are read once per process. A value that is not a positive integer is ignored with a warning on
//! stderr. The hook exists only in builds with the `failpoints` cargo feature, which only the crash tests turn on
//! (as a dev-dependency feature of ferry-client and ferry-server); in every other build a step is an empty inline
//! function and the variables mean nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Why a file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    /// The target exists already and we never overwrite a bundle silently.
    #[error("{} already exists; refusing to overwrite it (move it away or choose another --out)", crate::escape_path(.0))]
    Exists(PathBuf),
    /// The target is a symbolic link, which could redirect the write anywhere.
    #[error("{} is a symbolic link; refusing to write through it", crate::escape_path(.0))]
    Symlink(PathBuf),
    /// The path is not a regular file (a FIFO, a device, a directory, a socket): ferry reads only regular files,
    /// so a `/dev/zero` or a named pipe on a stick cannot make a reader allocate without bound or hang (issue 15).
    #[error("{} is {kind}, not a regular file; ferry reads only regular files", crate::escape_path(.path))]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is instead ("a FIFO", "a character device", ...).
        kind: &'static str,
    },
    /// The file is larger than the reader accepts.
    #[error("{} is {size} bytes, more than the {limit}-byte limit", crate::escape_path(.path))]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// What was read back after writing differs from what was written: the medium is failing.
    #[error("{} reads back differently from what was written: the medium may be failing, use another stick", crate::escape_path(.0))]
    ReadBackMismatch(PathBuf),
    /// An operating-system error, with the path it concerned.
    #[error("{}: {source}", crate::escape_path(.path))]
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

/// A kind of durable step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Writing and fsyncing a temp file.
    TempWrite,
    /// Renaming or linking a temp file to its final name.
    Link,
    /// Fsyncing a directory.
    DirSync,
}

/// What the caller of `failpoint::step` does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
enum Action {
    /// Carry on normally.
    Go,
    /// Write half the bytes, fsync them, then call [`std::process::abort`].
    Torn,
}

/// The failpoint test hook described in the module documentation.
#[cfg(feature = "failpoints")]
mod failpoint {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    use super::{Action, Step};

    #[derive(Debug)]
    struct Config {
        abort_at: Option<usize>,
        torn_at: Option<usize>,
    }

    static CONFIG: OnceLock<Option<Config>> = OnceLock::new();
    static STEPS: AtomicUsize = AtomicUsize::new(0);

    fn parse(var: &str) -> Option<usize> {
        let raw = std::env::var_os(var)?;
        let n = raw
            .to_str()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0);
        if n.is_none() {
            eprintln!("warning: ignoring {var}={raw:?}: a failpoint is a step number (1, 2, ...)");
        }
        n
    }

    fn config() -> Option<&'static Config> {
        CONFIG
            .get_or_init(|| {
                let c = Config {
                    abort_at: parse("FERRY_FAILPOINT"),
                    torn_at: parse("FERRY_FAILPOINT_TORN"),
                };
                (c.abort_at.is_some() || c.torn_at.is_some()).then_some(c)
            })
            .as_ref()
    }

    /// Count one durable step; abort the process if it is the chosen one.
    pub(super) fn step(kind: Step) -> Action {
        let Some(c) = config() else {
            return Action::Go;
        };
        let n = STEPS.fetch_add(1, Ordering::SeqCst) + 1;
        if c.torn_at == Some(n) && kind == Step::TempWrite {
            return Action::Torn;
        }
        if c.abort_at == Some(n) || c.torn_at == Some(n) {
            std::process::abort();
        }
        Action::Go
    }
}

/// Without the `failpoints` feature a durable step is just a step.
#[cfg(not(feature = "failpoints"))]
mod failpoint {
    use super::{Action, Step};

    #[inline(always)]
    pub(super) fn step(_: Step) -> Action {
        Action::Go
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
///
/// On Windows this is a no-op: a directory cannot be opened as a file there, and NTFS journals the metadata of a
/// rename (`MoveFileEx`) itself, so there is nothing to flush (issue 17).
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    failpoint::step(Step::DirSync);
    #[cfg(not(windows))]
    {
        let d = File::open(dir).map_err(|e| FsError::io(dir, e))?;
        d.sync_all().map_err(|e| FsError::io(dir, e))?;
    }
    #[cfg(windows)]
    let _ = dir;
    Ok(())
}

/// Write `bytes` to a new temp file in `dir` and fsync it. Errors name `target`, the file the temp file is for
/// (the temp file itself is removed when the error drops it).
fn write_temp(
    dir: &Path,
    target: &Path,
    bytes: &[u8],
    private: bool,
) -> Result<tempfile::NamedTempFile, FsError> {
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
    let torn = failpoint::step(Step::TempWrite) == Action::Torn;
    let bytes = if torn {
        &bytes[..bytes.len() / 2]
    } else {
        bytes
    };
    tmp.write_all(bytes).map_err(|e| FsError::io(target, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| FsError::io(target, e))?;
    if torn {
        std::process::abort();
    }
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
    let tmp = write_temp(dir, path, bytes, private)?;
    failpoint::step(Step::Link);
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            FsError::Exists(path.to_path_buf())
        } else {
            FsError::io(path, e.error)
        }
    })?;
    sync_dir(dir)
}

/// [`write_new`] for output produced as a stream: `fill` writes the file's contents into a new temp file in the
/// target directory; only when it succeeds is the file fsynced and linked under its final name (never replacing
/// anything). When `fill` fails, the temp file is removed and nothing appears at `path`. For outputs too large to
/// hold in memory (`unpack` of a big model), and for outputs that must not appear before a check that ends with
/// the stream (the payload verifies only once it has been read whole).
pub fn write_new_with<T, E: From<FsError>>(
    path: &Path,
    fill: impl FnOnce(&mut File) -> Result<T, E>,
) -> Result<T, E> {
    if refuse_symlink(path)? {
        return Err(FsError::Exists(path.to_path_buf()).into());
    }
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".ferry-tmp-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o644));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(|e| FsError::io(dir, e))?;
    let torn = failpoint::step(Step::TempWrite) == Action::Torn;
    let value = fill(tmp.as_file_mut())?;
    if torn {
        let len = tmp.as_file().metadata().map(|m| m.len()).unwrap_or(0);
        let _ = tmp.as_file().set_len(len / 2);
        let _ = tmp.as_file().sync_all();
        std::process::abort();
    }
    tmp.as_file().sync_all().map_err(|e| FsError::io(path, e))?;
    failpoint::step(Step::Link);
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            FsError::Exists(path.to_path_buf())
        } else {
            FsError::io(path, e.error)
        }
    })?;
    sync_dir(dir)?;
    Ok(value)
}

/// [`write_new`], but a file already there with exactly these bytes counts as success: for content-addressed
/// files that a crashed run may have written already.
pub fn write_new_or_same(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    match write_new(path, bytes) {
        Err(FsError::Exists(p)) => match open_regular(&p) {
            Ok((f, len))
                if len == bytes.len() as u64 && file_equals(&f, bytes).unwrap_or(false) =>
            {
                Ok(())
            }
            _ => Err(FsError::Exists(p)),
        },
        r => r,
    }
}

/// Write `bytes` to `path`, atomically replacing what is there. Used for state files, never for bundles.
pub fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_replace_mode(path, bytes, false)
}

/// [`write_replace`] for a file that holds weights or other private data (issue 15 §5): mode 0600, also when it
/// replaces a file that had wider permissions.
pub fn write_replace_private(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_replace_mode(path, bytes, true)
}

fn write_replace_mode(path: &Path, bytes: &[u8], private: bool) -> Result<(), FsError> {
    refuse_symlink(path)?;
    let dir = parent_dir(path);
    let tmp = write_temp(dir, path, bytes, private)?;
    failpoint::step(Step::Link);
    tmp.persist(path).map_err(|e| FsError::io(path, e.error))?;
    sync_dir(dir)
}

/// Write a new file like [`write_new`], then drop it from the page cache and read it back from the medium,
/// so a failing stick is caught where the file was written rather than where it is read. When the read-back
/// fails or differs, the file is removed again (best effort), so no damaged file is left under the final name.
pub fn write_new_verified(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_new_verified_mode(path, bytes, false)
}

/// [`write_new_verified`] with mode 0600: a bundle that holds weights (issue 15 §5).
pub fn write_new_verified_private(path: &Path, bytes: &[u8]) -> Result<(), FsError> {
    write_new_verified_mode(path, bytes, true)
}

fn write_new_verified_mode(path: &Path, bytes: &[u8], private: bool) -> Result<(), FsError> {
    write_new_mode(path, bytes, private)?;
    let checked = File::open(path)
        .map_err(|e| FsError::io(path, e))
        .and_then(|f| {
            // Best effort: on filesystems without fadvise, and on systems other than Linux, the read comes from
            // cache, which is still a check of the write path.
            #[cfg(target_os = "linux")]
            let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
            file_equals(&f, bytes).map_err(|e| FsError::io(path, e))
        })
        .and_then(|same| {
            if same {
                Ok(())
            } else {
                Err(FsError::ReadBackMismatch(path.to_path_buf()))
            }
        });
    if checked.is_err() && fs::remove_file(path).is_ok() {
        let _ = sync_dir(parent_dir(path));
    }
    checked
}

/// Open `path` for reading only if it is a regular file, and return it with its length.
///
/// The open itself must not block or have side effects on a special file: on unix it is non-blocking
/// (`O_NONBLOCK`, so opening a FIFO with no writer returns at once instead of hanging) and the type is checked on
/// the open descriptor (`fstat`), so a path swapped between the check and the open cannot slip through. A
/// symbolic link is followed: a link to a regular file is fine, a link to `/dev/zero` is refused. For a regular
/// file `O_NONBLOCK` changes nothing about reads.
pub fn open_regular(path: &Path) -> Result<(File, u64), FsError> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = options.open(path).map_err(|e| FsError::io(path, e))?;
    let meta = file.metadata().map_err(|e| FsError::io(path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        return Err(FsError::NotRegular {
            path: path.to_path_buf(),
            kind: describe_type(&ft),
        });
    }
    Ok((file, meta.len()))
}

fn describe_type(ft: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// Read a whole regular file, refusing one larger than `limit` bytes (checked both from the metadata and while
/// reading, since a file can grow under us) and anything that is not a regular file ([`open_regular`]).
pub fn read_capped(path: &Path, limit: u64) -> Result<Vec<u8>, FsError> {
    let (f, size) = open_regular(path)?;
    read_capped_file(f, size, path, limit)
}

fn read_capped_file(f: File, size: u64, path: &Path, limit: u64) -> Result<Vec<u8>, FsError> {
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

/// Whether the file `f` holds exactly `bytes`, read in bounded chunks (no second copy of the file in memory).
fn file_equals(mut f: &File, bytes: &[u8]) -> io::Result<bool> {
    let mut buf = vec![0u8; (1 << 20).min(bytes.len() + 1)];
    let mut at = 0;
    loop {
        let n = match f.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(at == bytes.len());
        }
        if bytes.get(at..at + n) != Some(&buf[..n]) {
            return Ok(false);
        }
        at += n;
    }
}

/// Create a new scratch file at `path` for reading and writing, refusing to replace anything there. Scratch
/// files (a merge's spooled payloads) are not durable steps: they are never fsynced, a crash simply leaves them
/// behind for the next run to remove, and nothing refers to them once the process ends.
pub fn create_scratch(path: &Path) -> Result<File, FsError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| FsError::io(path, e))
}

/// Create a directory (and parents) if missing. The parent of every directory created is fsynced, so the new
/// entries survive a power loss along with the files later written into them.
pub fn ensure_dir(dir: &Path) -> Result<(), FsError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.as_os_str().is_empty() && fs::symlink_metadata(p).is_err() {
        missing.push(p);
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    fs::create_dir_all(dir).map_err(|e| FsError::io(dir, e))?;
    for created in missing.iter().rev() {
        sync_dir(parent_dir(created))?;
    }
    Ok(())
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
    #[error("{} is in use by another ferry process; wait for it to finish", crate::escape_path(.0))]
    Busy(PathBuf),
    /// The lock file could not be opened.
    #[error(transparent)]
    Fs(#[from] FsError),
}

/// Tries before a held lock is reported busy (25 ms apart).
const LOCK_RETRIES: u32 = 8;

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
        // A child another thread is spawning shares this process's open files between fork and exec,
        // so a lock this process just released can look held for a moment. Another ferry process holds
        // the lock for seconds at least; a short, bounded retry tells the two apart.
        for _ in 0..LOCK_RETRIES {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(25))
                }
                Err(fs::TryLockError::Error(e)) => return Err(FsError::io(&path, e).into()),
            }
        }
        Err(LockError::Busy(dir.to_path_buf()))
    }
}
