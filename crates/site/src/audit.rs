//! The site's audit log (`audit.jsonl`, issue 16): one JSON line for every bundle that entered the site (an
//! imported global) or left it (an exported update), for the privacy officer who must show what left the
//! building. Each line names the file, its SHA-256 and size, the signer, federation and round, and the tensor
//! list (names, dtypes, shapes) — the proof that only weights left.
//!
//! Append-only: a line is appended (and synced) after the step it records has been committed, and never
//! rewritten. A crash while appending can leave a final line without its newline: readers skip it, and the next
//! append cuts it off first (it never became an entry). A damaged line anywhere else is reported, not skipped.
//! A crash between a step's commit and its line loses that line: the state itself says what happened
//! (`global.json`, `local.json`'s `exported`).

use std::io::{Read, Seek, SeekFrom, Write};

use ferry_bundle::manifest::Manifest;
use ferry_bundle::{escape, Role};
use serde::{Deserialize, Serialize};

use crate::state::{SiteLock, SiteState};
use crate::SiteError;

/// File name of the log inside the state directory.
pub(crate) const AUDIT_LOG: &str = "audit.jsonl";
/// Largest log read (about a million entries of a small model).
const MAX_LOG: u64 = 1 << 30;

/// Whether a bundle came in or went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditAction {
    /// A global was verified and installed.
    Import,
    /// An update was sealed and written to the stick.
    Export,
}

impl std::fmt::Display for AuditAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuditAction::Import => "import",
            AuditAction::Export => "export",
        })
    }
}

/// One tensor of a logged bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditTensor {
    /// Tensor name (escaped).
    pub name: String,
    /// Dtype as safetensors writes it.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, in unix seconds (UTC).
    pub time: u64,
    /// In or out.
    pub action: AuditAction,
    /// The file as given or written (escaped).
    pub file: String,
    /// SHA-256 of the bundle file.
    pub sha256: String,
    /// Its size in bytes.
    pub size: u64,
    /// The federation.
    pub federation: String,
    /// The round: the global's, or the round of the global an update was trained from.
    pub round: u64,
    /// The signer's role (`hq` or `site`).
    pub signer_role: Role,
    /// The signer's id (escaped).
    pub signer: String,
    /// The signer's key id.
    pub key_id: String,
    /// Every tensor the bundle carries.
    pub tensors: Vec<AuditTensor>,
    /// For an export made again with `--again`: the hash of the update it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supersedes: Option<String>,
}

impl AuditEntry {
    /// The entry for bundle `sha256` of `size` bytes with this verified (or just sealed) manifest.
    pub(crate) fn new(
        action: AuditAction,
        file: &str,
        sha256: &str,
        size: u64,
        manifest: &Manifest,
    ) -> AuditEntry {
        AuditEntry {
            time: ferry_bundle::unix_now(),
            action,
            file: escape(file),
            sha256: sha256.to_string(),
            size,
            federation: escape(&manifest.federation),
            round: manifest.round,
            signer_role: manifest.signer.role,
            signer: escape(&manifest.signer.id),
            key_id: manifest.signer.key_id.clone(),
            tensors: manifest
                .tensors
                .iter()
                .map(|t| AuditTensor {
                    name: escape(&t.name),
                    dtype: t.dtype.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
            supersedes: None,
        }
    }
}

impl SiteState {
    /// Every entry of the audit log, oldest first (empty when nothing was logged yet).
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>, SiteError> {
        let path = self.dir().join(AUDIT_LOG);
        let Some(bytes) = crate::state::read_if_present(&path, MAX_LOG)? else {
            return Ok(Vec::new());
        };
        let mut entries = Vec::new();
        let mut lines = bytes
            .split_inclusive(|&b| b == b'\n')
            .enumerate()
            .peekable();
        while let Some((i, line)) = lines.next() {
            let complete = line.ends_with(b"\n");
            if !complete && lines.peek().is_none() {
                break; // a torn last line from a crash while appending: never an entry
            }
            let text = line.strip_suffix(b"\n").unwrap_or(line);
            if text.is_empty() {
                continue;
            }
            let e = serde_json::from_slice(text).map_err(|e| SiteError::Corrupt {
                path: path.clone(),
                why: format!("line {}: {e}", i + 1),
            })?;
            entries.push(e);
        }
        Ok(entries)
    }

    /// The last export logged for the global with this round and federation, if any.
    pub fn last_export(
        &self,
        federation: &str,
        round: u64,
    ) -> Result<Option<AuditEntry>, SiteError> {
        Ok(self.audit_log()?.into_iter().rev().find(|e| {
            e.action == AuditAction::Export
                && e.round == round
                && e.federation == escape(federation)
        }))
    }

    /// Append one line (and sync it), first cutting off a line a crash left torn.
    pub(crate) fn append_audit(
        &self,
        lock: &SiteLock<'_>,
        entry: &AuditEntry,
    ) -> Result<(), SiteError> {
        self.check_lock(lock)?;
        let path = self.dir().join(AUDIT_LOG);
        let io = |e: std::io::Error| {
            SiteError::from(ferry_bundle::fsutil::FsError::Io {
                path: path.clone(),
                source: e,
            })
        };
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.file_type().is_file()) {
            return Err(SiteError::Corrupt {
                path: path.clone(),
                why: "the audit log is not a regular file".into(),
            });
        }
        let mut line = serde_json::to_vec(entry).map_err(|e| SiteError::Corrupt {
            path: path.clone(),
            why: e.to_string(),
        })?;
        line.push(b'\n');
        let mut options = std::fs::OpenOptions::new();
        options.create(true).read(true).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // What left the building is itself worth keeping from other local users.
            options.mode(0o600);
        }
        let mut f = options.open(&path).map_err(io)?;
        // A torn last line (a crash while appending) never became an entry: cut it off, then append.
        let end = complete_end(&mut f).map_err(io)?;
        f.set_len(end).map_err(io)?;
        f.seek(SeekFrom::Start(end)).map_err(io)?;
        f.write_all(&line).map_err(io)?;
        f.sync_data().map_err(io)?;
        Ok(())
    }
}

/// Where the last complete line of the log ends (0 for an empty log).
fn complete_end(f: &mut std::fs::File) -> std::io::Result<u64> {
    let len = f.seek(SeekFrom::End(0))?;
    let mut end = len;
    let mut buf = [0u8; 4096];
    while end > 0 {
        let n = end.min(buf.len() as u64);
        f.seek(SeekFrom::Start(end - n))?;
        f.read_exact(&mut buf[..n as usize])?;
        if let Some(i) = buf[..n as usize].iter().rposition(|&b| b == b'\n') {
            return Ok(end - n + i as u64 + 1);
        }
        end -= n;
    }
    Ok(0)
}
