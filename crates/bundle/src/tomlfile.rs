//! Small TOML settings files (issue 16's `ferry.toml`, at a site and at HQ): one way to read them, for both
//! `ferry-site` and `ferry-merge`.
//!
//! It lives here, beside [`crate::fsutil`], because it is a file-level concern both libraries share and this is
//! the one crate both depend on; it holds no CLI concern (flags and "where did this value come from" are
//! `ferry_cli::settings`'), and the typed settings stay with their owners (`ferry_site::settings`,
//! `ferry_merge::settings`).
//!
//! - [`load`]: a bounded read (a missing file is `None`), UTF-8, serde parse; any failure is one line naming the
//!   file and, for a parse error, the line: `ferry.toml: line 3: unknown field ...`;
//! - [`parse`] / [`to_text`]: the same parse for text in hand, and the file's text for a value;
//! - [`relative_to`]: paths written relative to the file's folder made usable from anywhere.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::fsutil::{self, FsError};

/// Why a settings file could not be read. Nothing was changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TomlFileError {
    /// The file could not be read.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// Not valid settings text.
    #[error("{}: {why}", crate::escape_path(.path))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong: one line, escaped (`line N: ...` for a parse error).
        why: String,
    },
}

/// Parse settings `text`; the error is one escaped line, `line N: message` when TOML names a place.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let msg = crate::escape(e.message().trim());
        match e.span() {
            Some(s) => {
                let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {msg}")
            }
            None => msg,
        }
    })
}

/// The TOML text of `value`, or why it has none (a path that is not UTF-8): never an empty file in its place.
pub fn to_text<T: Serialize>(value: &T) -> Result<String, String> {
    toml::to_string(value).map_err(|e| crate::escape(e.to_string().trim()))
}

/// Read and parse the settings file at `path` (at most `max` bytes), or `None` when there is none.
pub fn load<T: DeserializeOwned>(path: &Path, max: u64) -> Result<Option<T>, TomlFileError> {
    let bytes = match fsutil::read_capped(path, max) {
        Ok(b) => b,
        Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    let invalid = |why: String| TomlFileError::Invalid {
        path: path.to_path_buf(),
        why,
    };
    let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
    parse(text).map(Some).map_err(invalid)
}

/// A function that makes a relative path relative to `dir` (the settings file's folder) and leaves an absolute
/// one alone.
pub fn relative_to(dir: &Path) -> impl Fn(PathBuf) -> PathBuf + '_ {
    move |p| if p.is_relative() { dir.join(p) } else { p }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize, Serialize)]
    #[serde(deny_unknown_fields)]
    struct S {
        key: Option<PathBuf>,
        n: Option<u32>,
    }

    #[test]
    fn loads_names_the_line_and_resolves_relative_paths() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("ferry.toml");
        assert_eq!(load::<S>(&path, 1024).unwrap(), None);
        std::fs::write(&path, "key = \"k/a.key\"\nn = 3\n").unwrap();
        let s: S = load(&path, 1024).unwrap().unwrap();
        assert_eq!(s.n, Some(3));
        assert_eq!(
            relative_to(d.path())(s.key.unwrap()),
            d.path().join("k/a.key")
        );
        assert_eq!(relative_to(d.path())("/abs".into()), PathBuf::from("/abs"));
        std::fs::write(&path, "\n\nm\x1b = 2\n").unwrap();
        let e = load::<S>(&path, 1024).unwrap_err().to_string();
        assert!(
            e.contains("ferry.toml: line 3:") && !e.contains('\x1b') && !e.contains('\n'),
            "{e}"
        );
        std::fs::write(&path, b"n = \xff\n").unwrap();
        let e = load::<S>(&path, 1024).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        std::fs::write(&path, "n = 1\n".repeat(400)).unwrap();
        assert!(load::<S>(&path, 1024).is_err());
        assert_eq!(
            parse::<S>(
                &to_text(&S {
                    key: None,
                    n: Some(1)
                })
                .unwrap()
            )
            .unwrap()
            .n,
            Some(1)
        );
    }
}
