//! `ferry-client enroll KIT --state DIR` (issue 16): a new site state bound to the kit's federation and site id,
//! the site's key pair made here, and its public key written into the kit's reply folder for HQ. The work is
//! `ferry_bundle::kit::read` and `ferry_site::SiteState::enroll`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::{escape, escape_path};
use ferry_cli::outln;
use ferry_site::SiteState;

use crate::config_cmd::SettingFlags;

/// `ferry-client enroll`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example (the stick HQ gave you is at /media/usb):\n  ferry-client enroll /media/usb/kit-site-b --state site/ --hq-fingerprint \"1a2b 3c4d ...\" \\\n      --data folder:/data/plates/labels.csv --warmup 50\n\nChecks HQ's signature over the kit, then creates site/ bound to the kit's federation and site id,\nmakes this site's key pair (site/keys/<site>.key stays on this PC), writes site/ferry.toml with the\nsettings given (the stick defaults to the folder holding the kit), and writes <site>.pub into the\nkit's reply/ folder: carry the stick back to HQ. Compare the HQ fingerprint printed with the one HQ\nreads you over the phone (or give it with --hq-fingerprint to have it checked)."
)]
pub struct EnrollArgs {
    /// The kit folder HQ wrote (e.g. /media/usb/kit-site-b).
    pub kit: PathBuf,
    /// The new site state directory (must not hold another site).
    #[arg(long)]
    pub state: PathBuf,
    /// HQ's key fingerprint as HQ read it to you (or, for a federation with a root key, the root's): the kit is
    /// refused if its key differs.
    #[arg(long, value_name = "FINGERPRINT")]
    pub hq_fingerprint: Option<String>,
    /// Settings to remember in ferry.toml.
    #[command(flatten)]
    pub settings: SettingFlags,
}

fn normalise(fp: &str) -> String {
    fp.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

pub fn run_enroll(a: &EnrollArgs) -> Result<()> {
    let kit = ferry_bundle::kit::read(&a.kit)?;
    let m = &kit.manifest;
    if let Some(given) = &a.hq_fingerprint {
        // A root kit's keys are vouched for by its root: the root's fingerprint identifies the federation.
        let anchors: Vec<&ferry_bundle::PublicKey> =
            kit.hq_keys.iter().chain(kit.root.as_ref()).collect();
        if !anchors
            .iter()
            .any(|k| normalise(&k.fingerprint()) == normalise(given))
        {
            anyhow::bail!(
                "the kit's {} ({}) does not have the fingerprint you were given ({}): this kit did not come from your HQ; do not use it",
                if kit.root.is_some() { "HQ and root keys" } else { "HQ key" },
                anchors
                    .iter()
                    .map(|k| k.fingerprint())
                    .collect::<Vec<_>>()
                    .join(", "),
                escape(given)
            );
        }
    }
    let mut settings = a.settings.to_settings();
    if settings.stick.is_none() {
        // The kit came on the stick: remember where it is mounted.
        settings.stick = a
            .kit
            .canonicalize()
            .ok()
            .and_then(|k| k.parent().map(|p| p.to_path_buf()));
    }
    let header = format!(
        "ferry settings of site {} in federation {} (written by `ferry-client enroll`).\n\
         Flags given to a command override these; `ferry-client config --state DIR` shows what is in effect.\n\
         Keys (before any [section]): key, trust, stick, data, eval-data, encrypt, fisher; [train]: epochs, lr, warmup, batch, seed, device, limit, augment.",
        m.site, m.federation
    );
    let state = SiteState::at(&a.state);
    let done = state
        .enroll(&kit, settings, &header)
        .with_context(|| format!("enrolling into {}", escape_path(&a.state)))?;
    if !done.fresh {
        outln!(
            "{} is already enrolled as {} in federation {}; wrote its public key to {} again",
            escape_path(&a.state),
            done.site,
            done.federation,
            escape_path(&done.reply)
        );
        return Ok(());
    }
    outln!(
        "enrolled {} in federation {} (state {}; model {})",
        done.site,
        done.federation,
        escape_path(&a.state),
        m.arch.as_deref().unwrap_or("foreign weights")
    );
    for k in &kit.hq_keys {
        outln!(
            "HQ key {} {}, fingerprint {}",
            escape(&k.id),
            k.key_id_hex(),
            k.fingerprint()
        );
    }
    if let Some(root) = &kit.root {
        outln!(
            "root key {} {}, fingerprint {}: this site pins the root; a new HQ key is accepted under a newer HQ key list it signs",
            escape(&root.id),
            root.key_id_hex(),
            root.fingerprint()
        );
    }
    if a.hq_fingerprint.is_none() {
        outln!("  compare that fingerprint with the one HQ reads you over the phone before the first round");
    }
    outln!(
        "site key {} (secret: it stays on this PC)",
        escape_path(&done.key)
    );
    outln!(
        "wrote {} for HQ, fingerprint {}",
        escape_path(&done.reply),
        done.public.fingerprint()
    );
    outln!(
        "settings in {}; next: carry the stick to HQ, then run `ferry-client round --state {}` when it comes back with a global",
        escape_path(&state.settings_path()),
        escape_path(&a.state)
    );
    Ok(())
}
