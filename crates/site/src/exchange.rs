//! The two steps of a round that touch the stick: installing a verified global ([`SiteState::import`]) and
//! sealing the local model as an update ([`SiteState::export`]).

use std::path::{Path, PathBuf};

use ferry_bundle::tensor::all_finite;
use ferry_bundle::{
    escape, short, Bundle, BundleKind, Draft, Payload, PublicKey, Role, Sealed, SecretKey,
};

use crate::audit::{AuditAction, AuditEntry};
use crate::state::{GlobalRecord, SiteLock, SiteState};
use crate::trust::{expired, PreparedTrust};
use crate::{ExportError, SiteError};

/// Default largest round jump accepted by `import` (issue 15 §3). A site that missed more rounds than this
/// imports with a larger `--max-round-jump` on purpose: a global far ahead can otherwise be a fast-forward
/// attack by a leaked HQ key (the site would then refuse every honest global as a rollback).
pub const DEFAULT_MAX_ROUND_JUMP: u64 = 10;

/// What a site accepts on import beyond what the bundle's signature proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportPolicy {
    /// Refuse a global more than this many rounds ahead of the one held.
    pub max_round_jump: u64,
    /// Refuse (instead of warning about) an expired global or HQ key list.
    pub refuse_expired: bool,
    /// The time expiry is judged at (seconds since the epoch): now, unless a test says otherwise.
    pub now: u64,
}

impl Default for ImportPolicy {
    fn default() -> Self {
        ImportPolicy {
            max_round_jump: DEFAULT_MAX_ROUND_JUMP,
            refuse_expired: false,
            now: ferry_bundle::unix_now(),
        }
    }
}

/// What `import` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The global was installed.
    Installed {
        /// The global held before, if any.
        previous: Option<GlobalRecord>,
        /// Things the operator should know (an expired global or key list).
        warnings: Vec<String>,
    },
    /// The site already holds exactly this global: nothing to do (revocation lists given are stored).
    AlreadyCurrent {
        /// As for `Installed`.
        warnings: Vec<String>,
    },
}

impl SiteState {
    /// Check whether `bundle` (verified under `trust.keyring()`) may be installed here, without changing
    /// anything: what [`import`] checks first. Works on a directory that does not exist yet (a first import).
    /// Returns warnings (an expired global).
    ///
    /// [`import`]: SiteState::import
    pub fn check_import(
        &self,
        bundle: &Bundle,
        policy: &ImportPolicy,
        trust: &PreparedTrust,
    ) -> Result<Vec<String>, SiteError> {
        let m = &bundle.manifest;
        let mut warnings = trust.warnings.clone();
        if m.kind != BundleKind::Global {
            return Err(SiteError::NotAGlobal);
        }
        if m.federation != trust.federation() {
            return Err(SiteError::WrongFederation {
                expected: trust.federation().to_string(),
                found: escape(&m.federation),
            });
        }
        let current = if self.exists() { self.current()? } else { None };
        if let Some(cur) = &current {
            if cur.hash == bundle.hash {
                return Ok(warnings);
            }
            if m.round <= cur.round {
                return Err(SiteError::Rollback {
                    current: cur.round,
                    current_hash: short(&cur.hash).to_string(),
                    found: m.round,
                    found_hash: short(&bundle.hash).to_string(),
                });
            }
            if m.round - cur.round > policy.max_round_jump {
                return Err(SiteError::RoundJump {
                    current: cur.round,
                    found: m.round,
                    max: policy.max_round_jump,
                });
            }
            // The next round must extend the history this site holds; a parallel history (a forked HQ
            // state) is refused. Across a gap of rounds the chain cannot be checked: the jump is bounded.
            if m.round == cur.round + 1 && m.base.as_deref() != Some(cur.hash.as_str()) {
                return Err(SiteError::Fork {
                    current: cur.round,
                    current_hash: short(&cur.hash).to_string(),
                    found: m.round,
                    base: short(m.base.as_deref().unwrap_or("(none)")).to_string(),
                });
            }
            if cur.model_fingerprint != m.model_fingerprint {
                return Err(SiteError::ModelChanged {
                    expected: short(&cur.model_fingerprint).to_string(),
                    found: short(&m.model_fingerprint).to_string(),
                });
            }
        }
        if let Some(fp) = &trust.pin.model_fingerprint {
            if *fp != m.model_fingerprint {
                return Err(SiteError::ModelChanged {
                    expected: short(fp).to_string(),
                    found: short(&m.model_fingerprint).to_string(),
                });
            }
        }
        if let Some(r) = &m.revocations {
            if !trust.holds_list(&r.sha256, r.serial) {
                return Err(SiteError::MissingRevocationList {
                    serial: r.serial,
                    hash: short(&r.sha256).to_string(),
                });
            }
        }
        if let Some(e) = m.expires.filter(|_| m.expired(policy.now)) {
            expired(
                policy,
                format!(
                    "global round {} expired at {}",
                    m.round,
                    ferry_bundle::utc(e)
                ),
                &mut warnings,
            )?;
        }
        // HQ never signs non-finite weights; a global that has them came from a broken or hostile HQ.
        if let Some(t) = bundle.tensors().find(|t| !all_finite(t.dtype, t.data)) {
            return Err(SiteError::NonFinite(escape(t.name)));
        }
        Ok(warnings)
    }

    /// Install a verified global after the checks of [`SiteState::check_import`], storing what `trust` adds
    /// (the pin of a first import, new revocation lists, a newer HQ key list) before the commit. Re-importing
    /// the current global changes nothing else (it only repairs `current.safetensors`). `source` is where the
    /// file came from, for the record (escaped here).
    pub fn import(
        &self,
        lock: &SiteLock<'_>,
        bundle: &Bundle,
        source: &str,
        policy: &ImportPolicy,
        trust: &PreparedTrust,
    ) -> Result<ImportOutcome, SiteError> {
        self.check_lock(lock)?;
        let warnings = self.check_import(bundle, policy, trust)?;
        for list in &trust.new_lists {
            self.store_revocation_list(lock, list)?;
        }
        if let Some(bytes) = &trust.new_hq_keys {
            self.write_hq_key_list(lock, bytes)?;
        }
        if trust.pin_changed {
            self.write_pin(lock, &trust.pin)?;
        }
        let m = &bundle.manifest;
        let current = self.current()?;
        if current.as_ref().is_some_and(|c| c.hash == bundle.hash) {
            self.write_current_model(lock, bundle.payload())?;
            return Ok(ImportOutcome::AlreadyCurrent { warnings });
        }
        let payload_sha256 = self.store_weights(lock, bundle.payload())?;
        let rec = GlobalRecord {
            round: m.round,
            hash: bundle.hash.clone(),
            federation: m.federation.clone(),
            arch: m.arch.clone(),
            model_fingerprint: m.model_fingerprint.clone(),
            payload_sha256,
            samples: m
                .contributors
                .iter()
                .fold(0u64, |acc, c| acc.saturating_add(c.samples)),
            imported_at: ferry_bundle::unix_now(),
            source: escape(source),
            expires: m.expires,
            previous: current.clone().map(|mut c| {
                c.previous = None;
                Box::new(c)
            }),
        };
        // The commit point: until this rename the site holds the old global.
        self.commit_global(lock, &rec, bundle.payload())?;
        let entry = AuditEntry::new(
            AuditAction::Import,
            source,
            &bundle.hash,
            bundle.file_len,
            m,
        );
        self.append_audit(lock, &entry)?;
        Ok(ImportOutcome::Installed {
            previous: current,
            warnings,
        })
    }

    /// Check, create the directory if this is the site's first global, lock, and import: the whole of
    /// `ferry-client import` after verification. A refused bundle creates nothing and changes nothing.
    pub fn import_new(
        &self,
        bundle: &Bundle,
        source: &str,
        policy: &ImportPolicy,
        trust: &PreparedTrust,
    ) -> Result<ImportOutcome, SiteError> {
        self.check_import(bundle, policy, trust)?;
        let lock = if self.exists() {
            self.lock()?
        } else {
            self.create_and_lock()?
        };
        self.import(&lock, bundle, source, policy, trust)
    }

    /// Seal the local model as an update bundle for the current global, write it into `out_dir` (atomically,
    /// read back), mark the local model exported and log the export. A second, different update for a round
    /// already exported is refused unless `again` (two updates of one site in a batch make HQ refuse the whole
    /// batch); with `again` the log records which update it supersedes.
    pub fn export(
        &self,
        lock: &SiteLock<'_>,
        key: &SecretKey,
        out_dir: &Path,
        level: i32,
        again: bool,
    ) -> Result<(PathBuf, Sealed), ExportError> {
        self.export_to(lock, key, out_dir, level, again, &[])
    }

    /// [`SiteState::export`] with the update's payload encrypted to `encrypt_to` (HQ's keys, issue 15 §5), so a
    /// lost stick does not give the site's model away. Empty: in the clear. A key that is not an HQ key is
    /// refused: only HQ merges updates.
    pub fn export_to(
        &self,
        lock: &SiteLock<'_>,
        key: &SecretKey,
        out_dir: &Path,
        level: i32,
        again: bool,
        encrypt_to: &[PublicKey],
    ) -> Result<(PathBuf, Sealed), ExportError> {
        let options = ExportOptions {
            level,
            again,
            encrypt_to: encrypt_to.to_vec(),
            fisher: false,
        };
        self.export_with(lock, key, out_dir, &options)
    }

    /// [`SiteState::export`] with every option: encryption to HQ's keys, and the local model's Fisher estimate
    /// (`ferry-client fisher`) shipped next to it for HQ's `--strategy fisher` (issue 14).
    pub fn export_with(
        &self,
        lock: &SiteLock<'_>,
        key: &SecretKey,
        out_dir: &Path,
        options: &ExportOptions,
    ) -> Result<(PathBuf, Sealed), ExportError> {
        let (level, again, encrypt_to) = (options.level, options.again, &options.encrypt_to);
        if let Some(k) = encrypt_to.iter().find(|k| k.role != Role::Hq) {
            return Err(ExportError::NotHqRecipient(format!(
                "{} {} ({})",
                k.role,
                k.id,
                k.key_id_hex()
            )));
        }
        self.check_lock(lock)?;
        let cur = self.require_current()?;
        self.check_site_key(key)?;
        let previous = self.last_export(&cur.federation, cur.round)?;
        if let (Some(p), false) = (&previous, again) {
            return Err(ExportError::AlreadyExported {
                round: cur.round,
                file: p.file.clone(),
                sha256: p.sha256.clone(),
            });
        }
        let (local, weights) = self.local_weights()?;
        if local.base_hash != cur.hash {
            return Err(SiteError::StaleLocal {
                trained_round: local.round,
                current_round: cur.round,
            }
            .into());
        }
        let model = Payload::from_safetensors_vec(weights)?;
        if model.fingerprint() != cur.model_fingerprint {
            return Err(SiteError::Corrupt {
                path: self.weights_path(&local.weights_sha256),
                why: "local model's layout differs from the global it was trained from".into(),
            }
            .into());
        }
        let payload = if options.fisher {
            let bytes = self.local_fisher()?.ok_or(ExportError::NoFisher)?;
            let estimate = Payload::from_safetensors_vec(bytes)?;
            let values = estimate
                .tensors()
                .filter(|t| t.dtype == ferry_bundle::Dtype::F32)
                .map(|t| {
                    let v = t.data.chunks_exact(4);
                    let v = v.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                    (t.name.to_string(), v.collect())
                })
                .collect();
            ferry_bundle::fisher::attach(&model, &values)?
        } else {
            model
        };
        let draft = Draft::update(
            &cur.federation,
            cur.arch.clone(),
            cur.round,
            &cur.hash,
            key.id(),
            local.samples,
        );
        let draft = Draft {
            encrypt_to: encrypt_to.clone(),
            ..draft
        };
        let sealed = ferry_bundle::seal(draft, &payload, key, level)?;
        let path = sealed.write_to_dir(out_dir)?;
        self.mark_exported(lock, &sealed.hash)?;
        let mut entry = AuditEntry::new(
            AuditAction::Export,
            &path.display().to_string(),
            &sealed.hash,
            sealed.bytes.len() as u64,
            &sealed.manifest,
        );
        entry.supersedes = previous.map(|p| p.sha256);
        self.append_audit(lock, &entry)?;
        Ok((path, sealed))
    }
}

/// How [`SiteState::export_with`] seals an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportOptions {
    /// zstd level.
    pub level: i32,
    /// Replace an update already exported for this round.
    pub again: bool,
    /// HQ keys to encrypt the payload to (empty: in the clear).
    pub encrypt_to: Vec<PublicKey>,
    /// Ship the local model's Fisher estimate (`ferry.fisher/` tensors) with it.
    pub fisher: bool,
}
