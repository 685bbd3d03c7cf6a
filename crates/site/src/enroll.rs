//! Enrolment at a site (issue 16): a verified kit from HQ becomes a new state directory bound to one federation,
//! one site id and HQ's key, with the site's own key pair made here, and the site's public key written into the
//! kit's reply folder for HQ.
//!
//! After enrolment the pin ([`SitePin`]) names the site and its key, so [`SiteState::export`] refuses another
//! site's key, and [`SiteState::check_import`] refuses a global of another federation or model. A kit from a
//! federation with a root key pins the root and stores the kit's root-signed HQ key list, so a later HQ key is
//! accepted under a newer list signed by the same root (`ferry-client round` finds it on the stick).

use std::path::PathBuf;

use ferry_bundle::keys::KeyRecord;
use ferry_bundle::kit::{self, Kit};
use ferry_bundle::{escape, fsutil, Keyring, PublicKey, Role, SecretKey};

use crate::settings::SiteSettings;
use crate::state::SitePin;
use crate::trust::ImportTrust;
use crate::{ExportError, ImportPolicy, SiteError, SiteState};

/// The folder of the site's own key pair inside the state directory.
const KEYS_DIR: &str = "keys";

/// What enrolment did.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The site's id.
    pub site: String,
    /// The federation.
    pub federation: String,
    /// The site's secret key file (stays on this PC).
    pub key: PathBuf,
    /// The site's public key.
    pub public: PublicKey,
    /// The copy of the public key written for HQ (`<kit>/reply/<site>.pub`).
    pub reply: PathBuf,
    /// `false` when the state was already enrolled from this kit (the reply was written again if missing).
    pub fresh: bool,
}

impl SiteState {
    /// Enrol a new site from a verified `kit`: check the directory is empty, work out the pin (HQ's keys, the
    /// federation, the site id, the model) and the revocation list the kit carries, make the site's key pair
    /// under `keys/`, write `settings` as `ferry.toml` (with the key path filled in) under `header`, write the
    /// pin (the commit point), then write the public key into the kit's reply folder. Run again on a state
    /// enrolled from the same kit, it only writes the reply again.
    pub fn enroll(
        &self,
        kit: &Kit,
        mut settings: SiteSettings,
        header: &str,
    ) -> Result<Enrolled, SiteError> {
        let m = &kit.manifest;
        let key_dir = self.dir().join(KEYS_DIR);
        let key_path = key_dir.join(format!("{}.key", m.site));
        let reply_dir = kit::reply_dir(&kit.dir);
        let reply = reply_dir.join(format!("{}.pub", m.site));
        if self.exists() {
            if let Some(pin) = self.pin()? {
                let same = pin.federation == m.federation
                    && pin.site.as_deref() == Some(m.site.as_str())
                    && pin.site_key.is_some();
                if !same {
                    return Err(SiteError::AlreadyEnrolled {
                        path: self.dir().to_path_buf(),
                        what: format!(
                            "federation {}, site {}",
                            escape(&pin.federation),
                            escape(pin.site.as_deref().unwrap_or("(not enrolled)"))
                        ),
                    });
                }
                let public = pin
                    .site_key
                    .as_ref()
                    .map(KeyRecord::to_key)
                    .transpose()
                    .map_err(SiteError::InvalidPin)?
                    .ok_or_else(|| SiteError::InvalidPin("no site key".into()))?;
                fsutil::ensure_dir(&reply_dir)?;
                fsutil::write_new_or_same(&reply, public.to_file_text().as_bytes())?;
                return Ok(Enrolled {
                    site: m.site.clone(),
                    federation: m.federation.clone(),
                    key: key_path,
                    public,
                    reply,
                    fresh: false,
                });
            }
            if self.current()?.is_some() {
                return Err(SiteError::AlreadyEnrolled {
                    path: self.dir().to_path_buf(),
                    what: "a global imported without enrolment".into(),
                });
            }
        }
        // Whom to believe, worked out exactly as a first import would, from the kit's keys and lists: a root kit
        // pins the root (with its HQ key list, as `import --root --hq-keys`), any other kit HQ's keys.
        let mut keys = Keyring::new();
        for k in &kit.hq_keys {
            keys.add(k.clone())?;
        }
        let trust = ImportTrust {
            keys,
            revocations: kit.revocations.iter().cloned().collect(),
            hq_keys: kit.hq_key_list.clone(),
            root: kit.root.clone(),
            federation: Some(m.federation.clone()),
        };
        let prepared = self.prepare_import(&trust, &ImportPolicy::default())?;

        // A key left by an enrolment interrupted before its pin is used again; anything else is made here.
        let secret = if key_path.exists() {
            let k = SecretKey::read(&key_path)?;
            if k.role() != Role::Site || k.id() != m.site {
                return Err(SiteError::AlreadyEnrolled {
                    path: self.dir().to_path_buf(),
                    what: format!("a key {} that is not {}'s", escape_path(&key_path), m.site),
                });
            }
            k
        } else {
            SecretKey::generate(Role::Site, &m.site)?
        };
        let public = secret.public();
        let lock = self.create_and_lock()?;
        if !key_path.exists() {
            fsutil::ensure_dir(&key_dir)?;
            secret.write_pair(&key_dir)?;
        }
        for list in &prepared.new_lists {
            self.store_revocation_list(&lock, list)?;
        }
        if let Some(bytes) = &prepared.new_hq_keys {
            self.write_hq_key_list(&lock, bytes)?;
        }
        settings.key = Some(PathBuf::from(KEYS_DIR).join(format!("{}.key", m.site)));
        self.write_settings(&lock, &settings, header)?;
        let mut pin: SitePin = prepared.pin.clone();
        pin.site = Some(m.site.clone());
        pin.site_key = Some(KeyRecord::from(&public));
        pin.model_fingerprint = Some(m.model_fingerprint.clone());
        pin.how = "enrolment".into();
        self.write_pin(&lock, &pin)?;
        fsutil::ensure_dir(&reply_dir)?;
        fsutil::write_new_or_same(&reply, public.to_file_text().as_bytes())?;
        Ok(Enrolled {
            site: m.site.clone(),
            federation: m.federation.clone(),
            key: key_path,
            public,
            reply,
            fresh: true,
        })
    }

    /// Refuse `key` for an export unless it is the site key this state was enrolled with (a state pinned by a
    /// plain first import names no site: any site key may export from it, as before enrolment existed).
    pub fn check_site_key(&self, key: &SecretKey) -> Result<(), ExportError> {
        let Some(pin) = self.pin()? else {
            return Ok(());
        };
        let given = key.public();
        let wrong = |site: &str, key_id: &str| ExportError::WrongSiteKey {
            given: format!("key {} ({})", escape(&given.id), given.key_id_hex()),
            site: escape(site),
            key_id: key_id.to_string(),
        };
        if let Some(site) = &pin.site {
            let key_id = pin
                .site_key
                .as_ref()
                .map(|k| k.key_id.clone())
                .unwrap_or_else(|| "not recorded".into());
            if given.role != Role::Site || given.id != *site {
                return Err(wrong(site, &key_id));
            }
            if let Some(k) = &pin.site_key {
                if *k != KeyRecord::from(&given) {
                    return Err(wrong(site, &key_id));
                }
            }
        }
        Ok(())
    }
}

fn escape_path(p: &std::path::Path) -> String {
    ferry_bundle::escape_path(p)
}
