//! HQ's member list (issue 16): which sites are enrolled in the federation, and the key each one signs with.
//!
//! `members.json` in HQ's state directory. A site becomes a member when HQ writes its enrolment kit
//! ([`Members::enroll`]), and gets a key when HQ adds the public key the site wrote into the kit's reply folder
//! ([`Members::add_key`]). The members' keys are the keyring `ferry-server round` verifies updates under, so an
//! update from a site that is not a member, or signed by another key than the member's, is refused. Every
//! change takes the state directory's lock and replaces the file atomically.

use std::path::{Path, PathBuf};

use ferry_bundle::fsutil::{self, DirLock, FsError, LockError};
use ferry_bundle::keys::KeyRecord;
use ferry_bundle::{escape, Keyring, PublicKey, Role};
use serde::{Deserialize, Serialize};

/// The member list's file name in HQ's state directory.
pub const MEMBERS_FILE: &str = "members.json";
const FORMAT: &str = "ferry-members/1";
const MAX_LEN: u64 = 16 << 20;

/// Why the member list could not be read or changed. Nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembersError {
    /// File system.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The state directory is in use.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// `members.json` is damaged.
    #[error("{}: HQ's member list is damaged ({why}); restore it from backup", ferry_bundle::escape_path(.path))]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The site has no kit.
    #[error(
        "{0} is not a member of this federation: enrol it first (ferry-server enroll --site {0})"
    )]
    NotMember(String),
    /// The site already sent its key: a new kit would let someone else enrol under its name.
    #[error("{site} is already enrolled with key {key_id}; a new kit for it is refused (to replace a lost site key, revoke the old one first)")]
    AlreadyEnrolled {
        /// The site.
        site: String,
        /// Its key id.
        key_id: String,
    },
    /// A reply holds a key that is not a site key, or not the site's.
    #[error("{0}")]
    WrongKey(String),
    /// The site is a member with another key.
    #[error("{site} is a member with key {held}, not {given}; to replace a site's key, revoke the old one first")]
    KeyMismatch {
        /// The site.
        site: String,
        /// The key held.
        held: String,
        /// The key given.
        given: String,
    },
}

/// One enrolled site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The site's id.
    pub site: String,
    /// When its kit was written (seconds since the epoch).
    pub enrolled_at: u64,
    /// The site's public key, once HQ added its reply.
    pub key: Option<KeyRecord>,
    /// When the key was added.
    pub key_added_at: Option<u64>,
}

/// `members.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Members {
    /// `ferry-members/1`.
    pub format: String,
    /// The sites, in the order they were enrolled.
    pub members: Vec<Member>,
}

/// What [`Members::add_key`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAdded {
    /// The key is now the member's.
    Added,
    /// The member already had exactly this key.
    AlreadyThere,
}

impl Default for Members {
    fn default() -> Self {
        Members {
            format: FORMAT.into(),
            members: Vec::new(),
        }
    }
}

impl Members {
    /// The member list of the HQ state at `dir` (empty when no site was ever enrolled). Needs no lock: the file
    /// is replaced atomically.
    pub fn load(dir: &Path) -> Result<Members, MembersError> {
        let path = dir.join(MEMBERS_FILE);
        let bytes = match fsutil::read_capped(&path, MAX_LEN) {
            Ok(b) => b,
            Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Members::default())
            }
            Err(e) => return Err(e.into()),
        };
        let corrupt = |why: String| MembersError::Corrupt {
            path: path.clone(),
            why,
        };
        let m: Members = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if m.format != FORMAT {
            return Err(corrupt(format!(
                "format {:?}, expected {FORMAT:?}",
                escape(&m.format)
            )));
        }
        for (i, s) in m.members.iter().enumerate() {
            ferry_bundle::keys::validate_id("site", &s.site).map_err(|e| corrupt(e.to_string()))?;
            if m.members[..i].iter().any(|o| o.site == s.site) {
                return Err(corrupt(format!("{} is listed twice", s.site)));
            }
            if let Some(k) = &s.key {
                let pk = k.to_key().map_err(corrupt)?;
                if pk.role != Role::Site || pk.id != s.site {
                    return Err(corrupt(format!("{}'s key is not its site key", s.site)));
                }
            }
        }
        Ok(m)
    }

    fn save(&self, dir: &Path, _lock: &DirLock) -> Result<(), MembersError> {
        let mut bytes = serde_json::to_vec_pretty(self).map_err(|e| MembersError::Corrupt {
            path: dir.join(MEMBERS_FILE),
            why: e.to_string(),
        })?;
        bytes.push(b'\n');
        fsutil::write_replace(&dir.join(MEMBERS_FILE), &bytes)?;
        Ok(())
    }

    /// The member `site`, if enrolled.
    pub fn get(&self, site: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.site == site)
    }

    /// The members' keys (members without a key yet are left out).
    pub fn keyring(&self) -> Keyring {
        let mut ring = Keyring::new();
        for k in self.members.iter().filter_map(|m| m.key.as_ref()) {
            if let Ok(pk) = k.to_key() {
                // Validated on load; two members cannot share a key (their ids differ).
                let _ = ring.add(pk);
            }
        }
        ring
    }

    /// Enrol `site` in the HQ state at `dir` (a state made by `init`): add it, or renew the kit of a member that
    /// has not sent its key yet. Refuses a member whose key HQ holds.
    pub fn enroll(dir: &Path, site: &str) -> Result<Member, MembersError> {
        ferry_bundle::keys::validate_id("site", site)
            .map_err(|e| MembersError::WrongKey(e.to_string()))?;
        let lock = DirLock::acquire(dir)?;
        let mut list = Members::load(dir)?;
        let now = ferry_bundle::unix_now();
        let member = match list.members.iter_mut().find(|m| m.site == site) {
            Some(m) => {
                if let Some(k) = &m.key {
                    return Err(MembersError::AlreadyEnrolled {
                        site: site.into(),
                        key_id: k.key_id.clone(),
                    });
                }
                m.enrolled_at = now;
                m.clone()
            }
            None => {
                let m = Member {
                    site: site.into(),
                    enrolled_at: now,
                    key: None,
                    key_added_at: None,
                };
                list.members.push(m.clone());
                m
            }
        };
        list.save(dir, &lock)?;
        Ok(member)
    }

    /// Add a site's public key (from its kit's reply folder) to its member entry in the HQ state at `dir`. The key
    /// must be a site key whose id is a member without a key, or that member's key already.
    pub fn add_key(dir: &Path, key: &PublicKey) -> Result<KeyAdded, MembersError> {
        if key.role != Role::Site {
            return Err(MembersError::WrongKey(format!(
                "{} is a key of role {}; a site's reply holds its site key",
                escape(&key.id),
                key.role
            )));
        }
        let lock = DirLock::acquire(dir)?;
        let mut list = Members::load(dir)?;
        let record = KeyRecord::from(key);
        let Some(m) = list.members.iter_mut().find(|m| m.site == key.id) else {
            return Err(MembersError::NotMember(escape(&key.id)));
        };
        match &m.key {
            Some(k) if *k == record => return Ok(KeyAdded::AlreadyThere),
            Some(k) => {
                return Err(MembersError::KeyMismatch {
                    site: m.site.clone(),
                    held: k.key_id.clone(),
                    given: record.key_id,
                })
            }
            None => {
                m.key = Some(record);
                m.key_added_at = Some(ferry_bundle::unix_now());
            }
        }
        list.save(dir, &lock)?;
        Ok(KeyAdded::Added)
    }
}
