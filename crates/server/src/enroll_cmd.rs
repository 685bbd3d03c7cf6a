//! `ferry-server enroll` (issue 16): write a site's enrolment kit onto the stick and add it to HQ's member list
//! (`ferry_merge::members`), or with `--add-reply` add the public key a site wrote into its kit's reply folder.
//! Also `ferry-server config`: HQ's effective settings (`ferry_merge::settings`) and where each came from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::kit::{KitFile, KitManifest};
use ferry_bundle::{escape, escape_path, PublicKey, Role};
use ferry_cli::settings::{pick, print_settings, Origin, SettingRow};
use ferry_cli::{outln, read_secret_key};
use ferry_merge::hq::DEFAULT_MIN_SITES;
use ferry_merge::members::{KeyAdded, Members};
use ferry_merge::settings::HqSettings;
use ferry_merge::{Ledger, Strategy};

/// Settings HQ's commands take as flags; each overrides `ferry.toml`.
#[derive(Debug, Args, Default)]
pub struct HqFlags {
    /// HQ's secret key (ferry.toml: key).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Where the stick is mounted (ferry.toml: stick).
    #[arg(long)]
    pub stick: Option<PathBuf>,
    /// The federation's root public key, if it has one: kits carry it, and sites pin it (ferry.toml: root).
    #[arg(long, value_name = "PUB", requires = "hq_keys")]
    pub root: Option<PathBuf>,
    /// The current root-signed list of HQ keys (.ferry-keys, from `sign-hq-keys`): kits carry it and `round`
    /// copies it onto the stick (ferry.toml: hq-keys).
    #[arg(long, value_name = "FILE")]
    pub hq_keys: Option<PathBuf>,
}

/// Merge settings for `round` and `config`; each overrides `ferry.toml`'s `[merge]`.
#[derive(Debug, Args, Default)]
pub struct MergeFlags {
    /// Site public keys (.pub, or a folder of them) trusted beside the members' keys (ferry.toml: trust).
    #[arg(long, value_name = "PUB")]
    pub trust: Vec<PathBuf>,
    /// fedavg, fedavgm, fedadam, median, trimmed-mean or fisher (ferry.toml [merge]: strategy).
    #[arg(long)]
    pub strategy: Option<Strategy>,
    /// Refuse fewer updates than this; merging a single site's update needs an explicit 1 (ferry.toml [merge]:
    /// min-sites).
    #[arg(long)]
    pub min_sites: Option<usize>,
    /// Clip each update's L2 distance from the current global (ferry.toml [merge]: clip-norm).
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Server learning rate for fedavgm and fedadam (ferry.toml [merge]: server-lr).
    #[arg(long)]
    pub server_lr: Option<f64>,
    /// Days until the new global expires (ferry.toml [merge]: valid-days).
    #[arg(long)]
    pub valid_days: Option<u64>,
}

/// HQ's effective settings.
#[derive(Debug)]
pub struct HqEffective {
    pub key: (Option<PathBuf>, Origin),
    pub stick: (Option<PathBuf>, Origin),
    pub trust: (Option<Vec<PathBuf>>, Origin),
    pub root: (Option<PathBuf>, Origin),
    pub hq_keys: (Option<PathBuf>, Origin),
    pub strategy: (Option<Strategy>, Origin),
    pub min_sites: (Option<usize>, Origin),
    pub clip_norm: (Option<f64>, Origin),
    pub server_lr: (Option<f64>, Origin),
    pub valid_days: (Option<u64>, Origin),
    /// ferry.toml's `encrypt-to` (a command's `--encrypt-to` / `--no-encrypt` override it; see `recipients`).
    pub encrypt_to: (Option<Vec<PathBuf>>, Origin),
}

impl HqEffective {
    pub fn resolve(state: &Path, hq: &HqFlags, merge: &MergeFlags) -> Result<HqEffective> {
        let file = HqSettings::load(state)?.unwrap_or_default();
        let m = &file.merge;
        let strategy = m
            .strategy
            .as_deref()
            .map(str::parse::<Strategy>)
            .transpose()?;
        Ok(HqEffective {
            key: pick(hq.key.clone(), file.key.clone(), None),
            stick: pick(hq.stick.clone(), file.stick.clone(), None),
            root: pick(hq.root.clone(), file.root.clone(), None),
            hq_keys: pick(hq.hq_keys.clone(), file.hq_keys.clone(), None),
            trust: pick(
                (!merge.trust.is_empty()).then(|| merge.trust.clone()),
                file.trust.clone(),
                None,
            ),
            strategy: pick(merge.strategy, strategy, Some(Strategy::default())),
            min_sites: pick(merge.min_sites, m.min_sites, Some(DEFAULT_MIN_SITES)),
            clip_norm: pick(merge.clip_norm, m.clip_norm, None),
            server_lr: pick(merge.server_lr, m.server_lr, None),
            valid_days: pick(
                merge.valid_days,
                m.valid_days,
                Some(ferry_bundle::manifest::DEFAULT_GLOBAL_VALIDITY / 86_400),
            ),
            encrypt_to: pick(None, file.encrypt_to.clone(), None),
        })
    }

    /// HQ's key, or the error that says where to set it.
    pub fn key(&self, state: &Path) -> Result<ferry_bundle::SecretKey> {
        match &self.key.0 {
            Some(k) => read_secret_key(k),
            None => anyhow::bail!(
                "which key is HQ's? give --key FILE, or set `key = \"...\"` in {}",
                escape_path(&HqSettings::path(state))
            ),
        }
    }

    /// With a root key: the root and the signed HQ key list (its bytes), or `None` without a root. A root
    /// without a list, or a list without a root, is refused (kits carry both, or neither).
    pub fn root_and_list(&self, state: &Path) -> Result<Option<(PublicKey, Vec<u8>)>> {
        let file = escape_path(&HqSettings::path(state));
        match (&self.root.0, &self.hq_keys.0) {
            (Some(r), Some(l)) => {
                let root = PublicKey::read(r)?;
                let bytes = ferry_bundle::keylist::read_bytes(l)
                    .with_context(|| escape_path(l))?;
                Ok(Some((root, bytes)))
            }
            (None, None) => Ok(None),
            (Some(_), None) => anyhow::bail!(
                "a root key is set but no HQ key list: give --hq-keys FILE (from `sign-hq-keys`), or set hq-keys in {file}"
            ),
            (None, Some(_)) => anyhow::bail!(
                "an HQ key list is set but not the root key that signs it: give --root root.pub, or set root in {file}"
            ),
        }
    }

    /// The keys a merge trusts: the members' enrolled keys and the `trust` setting's. Refused when empty.
    pub fn keyring(&self, state: &Path) -> Result<ferry_bundle::Keyring> {
        let mut keyring = Members::load(state)?.keyring();
        if let Some(t) = &self.trust.0 {
            for k in ferry_cli::load_keyring(t)?.keys() {
                keyring.add(k.clone())?;
            }
        }
        if keyring.keys().next().is_none() {
            anyhow::bail!(
                "no site key to trust: enrol the sites (ferry-server enroll), give --trust keys/, or set `trust = [\"../keys/\"]` in {}",
                escape_path(&HqSettings::path(state))
            );
        }
        Ok(keyring)
    }

    /// The stick, or the error that says where to set it.
    pub fn stick(&self, state: &Path) -> Result<PathBuf> {
        match &self.stick.0 {
            Some(s) => Ok(s.clone()),
            None => anyhow::bail!(
                "where is the stick? give --stick PATH, or set `stick = \"/media/usb\"` in {}",
                escape_path(&HqSettings::path(state))
            ),
        }
    }

    fn rows(&self) -> Vec<SettingRow> {
        vec![
            SettingRow::path("key", &self.key),
            SettingRow::paths("trust", &self.trust),
            SettingRow::path("stick", &self.stick),
            SettingRow::path("root", &self.root),
            SettingRow::path("hq-keys", &self.hq_keys),
            SettingRow::new("merge.strategy", &self.strategy),
            SettingRow::new("merge.min-sites", &self.min_sites),
            SettingRow::new("merge.clip-norm", &self.clip_norm),
            SettingRow::new("merge.server-lr", &self.server_lr),
            SettingRow::new("merge.valid-days", &self.valid_days),
            encrypt_to_row(&self.encrypt_to),
        ]
    }
}

/// `encrypt-to` in words: unset means "as the current global" (`recipients::from_settings`), an empty list the
/// clear.
fn encrypt_to_row(picked: &(Option<Vec<PathBuf>>, Origin)) -> SettingRow {
    let shown = match &picked.0 {
        None => "as the current global".to_string(),
        Some(v) if v.is_empty() => "nobody (in the clear)".to_string(),
        Some(v) => v
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    SettingRow::new("encrypt-to", &(Some(shown), picked.1))
}

/// `ferry-server config`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server config --state hq/\n  ferry-server config --state hq/ --strategy median --json\n\nSettings live in <STATE>/ferry.toml, for example:\n  key = \"../keys/hq.key\"\n  stick = \"/media/usb\"\n  [merge]\n  strategy = \"fedavg\"\n  min-sites = 2\nRelative paths are relative to the state folder. A flag given to a command overrides the file."
)]
pub struct ConfigArgs {
    /// HQ state directory.
    #[arg(long)]
    pub state: PathBuf,
    #[command(flatten)]
    pub hq: HqFlags,
    #[command(flatten)]
    pub merge: MergeFlags,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_config(a: &ConfigArgs) -> Result<()> {
    let eff = HqEffective::resolve(&a.state, &a.hq, &a.merge)?;
    let mut warnings = Vec::new();
    let members = Members::load(&a.state)?;
    let with_keys = members.members.iter().filter(|m| m.key.is_some()).count();
    if let Some(min) = eff.min_sites.0 {
        if min > with_keys && !members.members.is_empty() {
            warnings.push(format!(
                "min-sites is {min} but only {with_keys} member(s) sent their key: no round can merge yet"
            ));
        }
    }
    let file = HqSettings::path(&a.state);
    let file = if file.exists() {
        escape_path(&file)
    } else {
        format!("{} (none yet)", escape_path(&file))
    };
    print_settings(&file, &eff.rows(), &warnings, a.json)
}

/// `ferry-server enroll`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server enroll --state hq/ --site site-b                 # kit at <stick>/kit-site-b\n  ferry-server enroll --state hq/ --site site-b --out /media/usb/kit-site-b\n  ferry-server enroll --state hq/ --add-reply /media/usb/kit-site-b   # the site's key, once it enrolled\n\nThe kit holds HQ's public key, the federation's name and model, the site's id, HQ's newest\nrevocation list and a README.txt for the operator, signed by HQ. Read HQ's fingerprint (printed)\nto the site over the phone. `ferry-server round` also adds the replies it finds on the stick."
)]
pub struct EnrollArgs {
    /// HQ state directory (made by `init`).
    #[arg(long)]
    pub state: PathBuf,
    /// The site to enrol (its id: 1-64 of a-z 0-9 . _ -).
    #[arg(
        long,
        required_unless_present = "add_reply",
        conflicts_with = "add_reply"
    )]
    pub site: Option<String>,
    /// Add the public key a site wrote into its kit (the kit folder or its reply/ folder) to the member list.
    #[arg(long, value_name = "DIR")]
    pub add_reply: Option<PathBuf>,
    /// The kit folder to write (default: <stick>/kit-<site>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub hq: HqFlags,
}

fn readme(m: &KitManifest, hq: &PublicKey, root: Option<&PublicKey>) -> String {
    let root_note = match root {
        Some(r) => format!(
            "\x20  This federation also has a root key (root.pub), fingerprint\n\
             \x20     {}\n\
             \x20  Compare it too: the site pins the root, and later accepts a new HQ key\n\
             \x20  only under a list of HQ keys the root signed (hq-keys-*.ferry-keys).\n",
            r.fingerprint()
        ),
        None => String::new(),
    };
    format!(
        "ferry enrolment kit for site {site} of federation {fed}\n\
         ====================================================\n\n\
         This folder lets this site join the federation. It holds HQ's public key\n\
         (hq.pub), the federation's name and model, this site's id, and HQ's list of\n\
         revoked keys. It holds nothing secret.\n\n\
         1. Before anything else, phone HQ and compare HQ's key fingerprint:\n\
         \x20     {fp}\n\
         \x20  If it differs, stop: this kit did not come from your HQ.\n{root_note}\n\
         2. On the site PC, with this stick mounted (here at /media/usb):\n\
         \x20     ferry-client enroll /media/usb/kit-{site} --state site/ \\\n\
         \x20         --data folder:/data/plates/labels.csv\n\
         \x20  It makes the site's key (the secret stays on the PC), remembers the\n\
         \x20  settings in site/ferry.toml, and writes reply/{site}.pub into this folder.\n\n\
         3. Carry the stick back to HQ. Read HQ the site key's fingerprint that\n\
         \x20  enroll printed.\n\n\
         4. Each round, when the stick comes with a new global:\n\
         \x20     ferry-client round --state site/\n\
         \x20  and carry back the one file it names. Only the model's weights leave the\n\
         \x20  building; `ferry-client log --state site/` lists everything that did.\n",
        site = m.site,
        fed = m.federation,
        fp = hq.fingerprint()
    )
}

pub fn run_enroll(a: &EnrollArgs) -> Result<()> {
    if let Some(dir) = &a.add_reply {
        return add_reply(&a.state, dir);
    }
    let Some(site) = &a.site else {
        anyhow::bail!("give --site ID (or --add-reply DIR)");
    };
    ferry_bundle::keys::validate_id("site", site)?;
    let eff = HqEffective::resolve(&a.state, &a.hq, &MergeFlags::default())?;
    let key = eff.key(&a.state)?;
    if key.role() != Role::Hq {
        anyhow::bail!(
            "{} is not an hq key: kits are signed with HQ's key",
            escape(key.id())
        );
    }
    let ledger = Ledger::peek(&a.state)?;
    let out = match &a.out {
        Some(o) => o.clone(),
        None => eff.stick(&a.state)?.join(format!("kit-{site}")),
    };
    let mut manifest = KitManifest::new(
        &ledger.federation,
        ledger.arch.as_deref(),
        &ledger.model_fingerprint,
        site,
        &key.public(),
    );
    // With a root key: the kit carries the root and its signed list, which must name HQ's key.
    let root = eff.root_and_list(&a.state)?;
    if let Some((r, list)) = &root {
        manifest = manifest.with_root(r, list).map_err(|why| {
            anyhow::anyhow!(
                "{}: {why}",
                escape_path(eff.hq_keys.0.as_deref().unwrap_or(Path::new("hq-keys")))
            )
        })?;
    }
    let stored = ferry_merge::hq::stored_revocations(&a.state)?;
    let newest = ferry_bundle::revocation::newest(&stored);
    if let Some(v) = newest {
        manifest.revocations = Some(KitFile {
            file: format!(
                "revocations-{}.{}",
                v.list.serial,
                ferry_bundle::revocation::EXTENSION
            ),
            sha256: v.sha256.clone(),
        });
    }
    if std::fs::symlink_metadata(&out).is_ok() {
        anyhow::bail!(
            "{} already exists; remove it or give --out",
            escape_path(&out)
        );
    }
    // The member first: a kit without a member entry would be refused at the first round.
    Members::enroll(&a.state, site)?;
    ferry_bundle::kit::write(
        &out,
        &manifest,
        &key,
        newest.map(|v| v.bytes.as_slice()),
        root.as_ref().map(|(_, l)| l.as_slice()),
        &readme(&manifest, &key.public(), root.as_ref().map(|(r, _)| r)),
    )?;
    outln!(
        "wrote the kit for {site} to {} (federation {}, model {})",
        escape_path(&out),
        escape(&ledger.federation),
        ledger
            .arch
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "foreign weights".into())
    );
    match &root {
        Some((r, _)) => outln!(
            "root key fingerprint {} (HQ key {}): read the root's to {site}'s operator over the phone",
            r.fingerprint(),
            key.public().fingerprint()
        ),
        None => outln!(
            "HQ key fingerprint {}: read it to {site}'s operator over the phone",
            key.public().fingerprint()
        ),
    }
    outln!(
        "{site} is a member now; its key is added when the stick comes back (`ferry-server round`, or enroll --add-reply {})",
        escape_path(&out)
    );
    Ok(())
}

/// The `.pub` files in a reply folder (`DIR/reply/*.pub` or `DIR/*.pub`).
pub fn reply_keys(dir: &Path) -> Result<Vec<(PathBuf, PublicKey)>> {
    let reply = ferry_bundle::kit::reply_dir(dir);
    let folder = if reply.is_dir() {
        reply
    } else {
        dir.to_path_buf()
    };
    let mut v = Vec::new();
    let entries =
        std::fs::read_dir(&folder).with_context(|| format!("reading {}", escape_path(&folder)))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !name.ends_with(".pub") {
            continue;
        }
        let key = PublicKey::read(&e.path())?;
        v.push((e.path(), key));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

fn add_reply(state: &Path, dir: &Path) -> Result<()> {
    let keys = reply_keys(dir)?;
    if keys.is_empty() {
        anyhow::bail!(
            "{} holds no site reply (<site>.pub): has the site run `ferry-client enroll` on this kit?",
            escape_path(dir)
        );
    }
    for (path, key) in keys {
        let added = Members::add_key(state, &key).with_context(|| escape_path(&path))?;
        match added {
            KeyAdded::Added => outln!(
                "added {}'s key {}, fingerprint {}: compare it with the one {} read you",
                escape(&key.id),
                key.key_id_hex(),
                key.fingerprint(),
                escape(&key.id)
            ),
            KeyAdded::AlreadyThere => {
                outln!("{}'s key is already in the member list", escape(&key.id))
            }
        }
    }
    Ok(())
}
