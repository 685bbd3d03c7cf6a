//! Whom a site believes when it imports a global (issue 15 §2, §3, §4).
//!
//! [`SiteState::prepare_import`] turns what the operator gave (`--trust`, `--revocations`, `--root`, `--hq-keys`,
//! `--federation`) and what the state already holds (the pin, the stored HQ key list, the stored revocation
//! lists) into [`PreparedTrust`]: the keyring the global must verify under and what the import would store.
//! Nothing is written until [`SiteState::import`] has checked the global too, so a refused import leaves the
//! state byte for byte as it was.
//!
//! - **Pin.** The first import pins the federation (`--federation`) and either HQ's key (`--trust`) or the
//!   federation's root key (`--root` with a root-signed HQ key list, `--hq-keys`). Later imports accept globals
//!   only from the pinned federation and from pinned HQ keys, or from HQ keys named by the newest list the pinned
//!   root signed. An HQ key given with `--trust` that the pin does not cover is refused, not added.
//! - **Revocation lists** given with `--revocations` are verified under the pinned HQ keys (with the stored
//!   lists applied), must be of the site's federation, and are stored; stored lists apply to every later import.
//! - **Expiry** of HQ key lists (and of globals, [`SiteState::check_import`]) warns, or refuses with
//!   `refuse_expired`.

use std::collections::BTreeMap;

use ferry_bundle::keylist::{self, HqKeyList, KeyListError};
use ferry_bundle::revocation::{self, Verified};
use ferry_bundle::{escape, Keyring, PublicKey, Role};

use crate::state::{SitePin, SiteState};
use crate::{ImportPolicy, SiteError};

/// What the operator gave an import to decide whom to believe. Nothing here is trusted until
/// [`SiteState::prepare_import`] has checked it against the state.
#[derive(Debug, Clone, Default)]
pub struct ImportTrust {
    /// Keys named with `--trust`. Only their HQ keys matter to an import: on the first import they are pinned;
    /// later they must be keys the pin already covers.
    pub keys: Keyring,
    /// Revocation lists given with `--revocations`: (file name for messages, bytes).
    pub revocations: Vec<(String, Vec<u8>)>,
    /// A list of HQ keys signed by the root (`--hq-keys`): (file name, bytes).
    pub hq_keys: Option<(String, Vec<u8>)>,
    /// The federation's root key (`--root`), for the first import or to add a root to a site pinned to an HQ key.
    pub root: Option<PublicKey>,
    /// The federation (`--federation`): required on the first import, checked afterwards.
    pub federation: Option<String>,
}

/// The trust an import works under: the keyring a global must verify with (pinned HQ keys, revocations applied)
/// and the records the import will store once the global is accepted.
#[derive(Debug, Clone)]
pub struct PreparedTrust {
    keyring: Keyring,
    pub(crate) pin: SitePin,
    pub(crate) pin_changed: bool,
    pub(crate) new_lists: Vec<Verified>,
    pub(crate) new_hq_keys: Option<Vec<u8>>,
    /// Every list held after the import: hash → serial.
    held: BTreeMap<String, u64>,
    hq_key_ids: Vec<String>,
    pub(crate) warnings: Vec<String>,
}

impl PreparedTrust {
    /// The keyring the global must verify under.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }
    /// The keyring, to add the site's decryption identities to (an encrypted global, issue 15 §5).
    pub fn keyring_mut(&mut self) -> &mut Keyring {
        &mut self.keyring
    }
    /// The federation the site is (or will be) pinned to.
    pub fn federation(&self) -> &str {
        &self.pin.federation
    }
    /// The HQ key ids a global may be signed with, for messages.
    pub fn hq_key_ids(&self) -> String {
        self.hq_key_ids.join(", ")
    }
    /// Warnings so far (an expired HQ key list).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
    /// Whether the site holds (or is being given) the list with this hash and serial.
    pub(crate) fn holds_list(&self, sha256: &str, serial: u64) -> bool {
        self.held.get(sha256) == Some(&serial)
    }
}

fn key_list_err(name: &str) -> impl Fn(KeyListError) -> SiteError + '_ {
    move |source| SiteError::KeyList {
        source_name: escape(name),
        source,
    }
}

/// What to do about something signed that has expired: a warning, or with `refuse_expired` a refusal.
pub(crate) fn expired(
    policy: &ImportPolicy,
    what: String,
    warnings: &mut Vec<String>,
) -> Result<(), SiteError> {
    if policy.refuse_expired {
        return Err(SiteError::Expired(what));
    }
    warnings.push(format!(
        "{what}; ask HQ for a fresh one (air-gapped clocks drift: check this machine's date too)"
    ));
    Ok(())
}

impl SiteState {
    /// The HQ keys this site accepts globals from: those pinned at enrolment or the first import, or, with a
    /// pinned root, those named by the newest HQ key list the root signed. `export --encrypt` encrypts the
    /// update to them, so the operator does not name HQ's key again (issue 15 §5).
    pub fn pinned_hq_keys(&self) -> Result<Vec<PublicKey>, SiteError> {
        let Some(pin) = self.pin()? else {
            return Err(SiteError::NoPinnedHqKey);
        };
        let keys = match pin.root_key().map_err(SiteError::InvalidPin)? {
            None => pin.hq_public_keys().map_err(SiteError::InvalidPin)?,
            Some(root) => {
                let Some(bytes) = self.hq_key_list()? else {
                    return Err(SiteError::NeedsHqKeyList);
                };
                keylist::verify(&bytes, &root)
                    .map_err(|e| SiteError::Corrupt {
                        path: self.dir().join("hq-keys.ferry-keys"),
                        why: e.to_string(),
                    })?
                    .1
            }
        };
        if keys.is_empty() {
            return Err(SiteError::NoPinnedHqKey);
        }
        Ok(keys)
    }

    /// Work out whom to believe for this import, without writing anything (see the module documentation).
    pub fn prepare_import(
        &self,
        t: &ImportTrust,
        policy: &ImportPolicy,
    ) -> Result<PreparedTrust, SiteError> {
        let existing = if self.exists() { self.pin()? } else { None };
        let current = if self.exists() { self.current()? } else { None };
        let mut warnings = Vec::new();

        let federation = match (&existing, &t.federation, &current) {
            (Some(p), Some(f), _) if *f != p.federation => {
                return Err(SiteError::PinnedFederation {
                    pinned: p.federation.clone(),
                    given: escape(f),
                })
            }
            (Some(p), _, _) => p.federation.clone(),
            // A state from before pins: its federation is the one its global belongs to.
            (None, Some(f), Some(cur)) if *f != cur.federation => {
                return Err(SiteError::PinnedFederation {
                    pinned: cur.federation.clone(),
                    given: escape(f),
                })
            }
            (None, Some(f), _) => {
                ferry_bundle::keys::validate_id("federation", f)?;
                f.clone()
            }
            (None, None, Some(cur)) => cur.federation.clone(),
            (None, None, None) => return Err(SiteError::NeedsFederation),
        };
        let how = if current.is_some() {
            "first import with a pin (the state predates pins)"
        } else {
            "first import"
        };

        let pinned_root = match &existing {
            Some(p) => p.root_key().map_err(SiteError::InvalidPin)?,
            None => None,
        };
        let given_hq: Vec<PublicKey> = t
            .keys
            .keys()
            .filter(|k| k.role == Role::Hq)
            .cloned()
            .collect();
        let mut new_hq_keys = None;
        let (pin, pin_changed, hq) = match (pinned_root, &t.root) {
            (Some(root), given_root) => {
                if let Some(g) = given_root {
                    if *g != root {
                        return Err(SiteError::RootMismatch {
                            pinned: root.key_id_hex(),
                            given: g.key_id_hex(),
                        });
                    }
                }
                let held =
                    match self.hq_key_list()? {
                        Some(bytes) => Some(keylist::verify(&bytes, &root).map_err(|e| {
                            SiteError::Corrupt {
                                path: self.dir().join("hq-keys.ferry-keys"),
                                why: e.to_string(),
                            }
                        })?),
                        None => None,
                    };
                let chosen = match (&t.hq_keys, held) {
                    (Some((name, bytes)), held) => {
                        let (list, keys) =
                            keylist::verify(bytes, &root).map_err(key_list_err(name))?;
                        list.check_federation(&federation)
                            .map_err(key_list_err(name))?;
                        match held {
                            Some((h, _)) if h.serial > list.serial => {
                                return Err(key_list_err(name)(KeyListError::Rollback {
                                    held: h.serial,
                                    found: list.serial,
                                }))
                            }
                            Some((h, hk)) if h.serial == list.serial => {
                                if self.hq_key_list()?.as_deref() != Some(bytes.as_slice()) {
                                    return Err(key_list_err(name)(KeyListError::Rollback {
                                        held: h.serial,
                                        found: list.serial,
                                    }));
                                }
                                (h, hk)
                            }
                            _ => {
                                new_hq_keys = Some(bytes.clone());
                                (list, keys)
                            }
                        }
                    }
                    (None, Some(held)) => held,
                    (None, None) => return Err(SiteError::NeedsHqKeyList),
                };
                check_list_expiry(&chosen.0, policy, &mut warnings)?;
                if let Some(k) = given_hq.iter().find(|k| !chosen.1.contains(k)) {
                    return Err(SiteError::UnpinnedHqKey {
                        key: k.key_id_hex(),
                        id: k.id.clone(),
                        pinned: ids(&chosen.1),
                    });
                }
                let pin = existing.clone().ok_or(SiteError::NeedsHqKeyList)?;
                (pin, false, chosen.1)
            }
            (None, Some(root)) => {
                let Some((name, bytes)) = &t.hq_keys else {
                    return Err(SiteError::NeedsHqKeyList);
                };
                let (list, keys) = keylist::verify(bytes, root).map_err(key_list_err(name))?;
                list.check_federation(&federation)
                    .map_err(key_list_err(name))?;
                check_list_expiry(&list, policy, &mut warnings)?;
                let pin = match &existing {
                    Some(p) => {
                        // Adding a root to a site pinned to an HQ key: the root must vouch for that key.
                        let pinned = p.hq_public_keys().map_err(SiteError::InvalidPin)?;
                        if !pinned.iter().any(|k| keys.contains(k)) {
                            return Err(SiteError::RootWithoutContinuity {
                                root: root.key_id_hex(),
                                pinned: ids(&pinned),
                            });
                        }
                        let mut pin = SitePin::with_root(&federation, root, "");
                        pin.site = p.site.clone();
                        pin.how = format!("{} (root added at a later import)", p.how);
                        pin
                    }
                    None => SitePin::with_root(&federation, root, how),
                };
                new_hq_keys = Some(bytes.clone());
                (pin, true, keys)
            }
            (None, None) => {
                if t.hq_keys.is_some() {
                    return Err(SiteError::InvalidPin(
                        "--hq-keys needs the federation's root key: pin it with --root".into(),
                    ));
                }
                match &existing {
                    Some(p) => {
                        let pinned = p.hq_public_keys().map_err(SiteError::InvalidPin)?;
                        if let Some(k) = given_hq.iter().find(|k| !pinned.contains(k)) {
                            return Err(SiteError::UnpinnedHqKey {
                                key: k.key_id_hex(),
                                id: k.id.clone(),
                                pinned: ids(&pinned),
                            });
                        }
                        (p.clone(), false, pinned)
                    }
                    None => {
                        if given_hq.is_empty() {
                            return Err(SiteError::NeedsHqKey);
                        }
                        (
                            SitePin::with_hq_keys(&federation, &given_hq, how),
                            true,
                            given_hq,
                        )
                    }
                }
            }
        };

        let mut keyring = Keyring::new();
        for k in &hq {
            keyring.add(k.clone())?;
        }
        let stored = if self.exists() {
            self.revocation_lists()?
        } else {
            Vec::new()
        };
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        for v in &stored {
            v.list.apply(&mut keyring);
            held.insert(v.sha256.clone(), v.list.serial);
        }
        // Given lists are each verified against the pinned keys and the stored lists, not against each other.
        let mut new_lists: Vec<Verified> = Vec::new();
        for (name, bytes) in &t.revocations {
            let err = |source| SiteError::Revocation {
                source_name: escape(name),
                source,
            };
            let v = revocation::verify_file(bytes.clone(), &keyring).map_err(err)?;
            v.list.check_federation(&federation).map_err(err)?;
            if !held.contains_key(&v.sha256) && !new_lists.iter().any(|n| n.sha256 == v.sha256) {
                new_lists.push(v);
            }
        }
        for v in &new_lists {
            v.list.apply(&mut keyring);
            held.insert(v.sha256.clone(), v.list.serial);
        }
        Ok(PreparedTrust {
            keyring,
            pin,
            pin_changed,
            new_lists,
            new_hq_keys,
            held,
            hq_key_ids: hq
                .iter()
                .map(|k| format!("{} {}", k.id, k.key_id_hex()))
                .collect(),
            warnings,
        })
    }
}

fn check_list_expiry(
    list: &HqKeyList,
    policy: &ImportPolicy,
    warnings: &mut Vec<String>,
) -> Result<(), SiteError> {
    if list.expired(policy.now) {
        expired(
            policy,
            format!(
                "the root-signed HQ key list {} expired at {}",
                list.serial,
                ferry_bundle::utc(list.expires)
            ),
            warnings,
        )?;
    }
    Ok(())
}

fn ids(keys: &[PublicKey]) -> String {
    keys.iter()
        .map(PublicKey::key_id_hex)
        .collect::<Vec<_>>()
        .join(", ")
}
