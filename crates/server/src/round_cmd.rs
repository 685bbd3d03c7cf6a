//! `ferry-server round` and the member part of `ferry-server status` (issue 16).
//!
//! `round`: add the site keys written into the kits' reply folders on the stick, find every update for the
//! current round on the stick, refuse the round if one is not from a member (with its enrolled key), merge them
//! with the remembered settings (`ferry_merge::hq::merge_round`), and write the next global and HQ's newest
//! revocation list onto the stick. Run again after an interruption: a committed round leaves only stale
//! updates on the stick, and the new global is written to it if it is not there yet.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::{escape, escape_path, short, BundleKind};
use ferry_cli::{count, outln, print_json};
use ferry_merge::members::{KeyAdded, Members};
use ferry_merge::Ledger;

use crate::enroll_cmd::{reply_keys, HqEffective, HqFlags, MergeFlags};

/// `ferry-server round`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server round --state hq/                 # key, stick and strategy from hq/ferry.toml\n  ferry-server round --state hq/ --stick /media/usb --min-sites 3\n\nAdds the keys of newly enrolled sites (kit-*/reply/ on the stick), merges every update for the\ncurrent round found on the stick (refusing the round if one is not from a member), writes\nglobal-r<N+1>.ferry and HQ's newest revocation list onto the stick, and says who it is still waiting for."
)]
pub struct RoundArgs {
    /// HQ state directory.
    #[arg(long)]
    pub state: PathBuf,
    #[command(flatten)]
    pub hq: HqFlags,
    #[command(flatten)]
    pub merge: MergeFlags,
    /// Print one JSON object instead of sentences: keys added, files skipped, the merge (or why none), files
    /// written, who HQ waits for, and what to carry. Notes and warnings stay on stderr.
    #[arg(long)]
    pub json: bool,
}

/// What is on the stick for the current round.
struct Scan {
    /// Updates of the current round: (file, site).
    current: Vec<(PathBuf, String)>,
    /// Other files and why they are left alone.
    skipped: Vec<(PathBuf, String)>,
    /// Whether `global-r<round>.ferry` is on the stick.
    has_global: bool,
}

/// Look at every `.ferry` file in the stick's top folder (headers only: nothing here is trusted yet).
fn scan(stick: &Path, federation: &str, round: u64) -> Result<Scan> {
    let mut s = Scan {
        current: Vec::new(),
        skipped: Vec::new(),
        has_global: false,
    };
    let entries = std::fs::read_dir(stick)
        .with_context(|| format!("reading the stick {}", escape_path(stick)))?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            !n.starts_with('.') && n.ends_with(".ferry")
        })
        .collect();
    paths.sort();
    for p in paths {
        let m = match ferry_bundle::inspect_file(&p).map(|i| i.manifest) {
            Ok(Ok(m)) => m,
            Ok(Err(why)) => {
                s.skipped
                    .push((p, format!("unreadable manifest ({})", escape(&why))));
                continue;
            }
            Err(e) => {
                s.skipped.push((p, format!("not a readable bundle ({e})")));
                continue;
            }
        };
        if m.kind == BundleKind::Global {
            if m.round == round && m.federation == federation {
                s.has_global = true;
            }
            continue;
        }
        let site = m.site_id().unwrap_or("").to_string();
        if m.federation != federation {
            s.skipped.push((
                p,
                format!(
                    "an update of federation {}, not this one",
                    escape(&m.federation)
                ),
            ));
        } else if m.round < round {
            s.skipped
                .push((p, format!("round {}: merged already", m.round)));
        } else if m.round > round {
            s.skipped
                .push((p, format!("round {}, but HQ is at round {round}", m.round)));
        } else {
            s.current.push((p, site));
        }
    }
    Ok(s)
}

/// Add the keys sites wrote into their kits' reply folders (`kit-*/reply/*.pub` on the stick). Returns the keys
/// added (site, key id, fingerprint, file); says so in words unless `json`.
fn add_replies(state: &Path, stick: &Path, json: bool) -> Result<Vec<serde_json::Value>> {
    let mut added = Vec::new();
    let Ok(entries) = std::fs::read_dir(stick) else {
        return Ok(added);
    };
    let mut kits: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("kit-"))
                && ferry_bundle::kit::reply_dir(p).is_dir()
        })
        .collect();
    kits.sort();
    for kit in kits {
        for (path, key) in reply_keys(&kit)? {
            match Members::add_key(state, &key) {
                Ok(KeyAdded::Added) => {
                    added.push(serde_json::json!({
                        "site": escape(&key.id), "key_id": key.key_id_hex(),
                        "fingerprint": key.fingerprint(), "file": escape_path(&path),
                    }));
                    if !json {
                        outln!(
                            "added {}'s key {} from {}, fingerprint {}: compare it with the one {} read you",
                            escape(&key.id),
                            key.key_id_hex(),
                            escape_path(&path),
                            key.fingerprint(),
                            escape(&key.id)
                        );
                    }
                }
                Ok(KeyAdded::AlreadyThere) => {}
                Err(e) => eprintln!("warning: {}: {e}; not added", escape_path(&path)),
            }
        }
    }
    Ok(added)
}

/// With a root key: the current root-signed HQ key list to put onto the stick beside the global (its path there,
/// `hq-keys-<serial>.ferry-keys`, and its bytes), so sites that pin the root follow a change of HQ key. Checked
/// here: signed by the root, of this federation, naming the key that signs the global.
fn key_list_for_stick(
    eff: &HqEffective,
    state: &Path,
    stick: &Path,
    federation: &str,
    key: &ferry_bundle::SecretKey,
) -> Result<Option<(PathBuf, Vec<u8>)>> {
    let Some((root, bytes)) = eff.root_and_list(state)? else {
        return Ok(None);
    };
    let (list, keys) = ferry_bundle::keylist::verify(&bytes, &root)
        .and_then(|(l, k)| l.check_federation(federation).map(|_| (l, k)))
        .context("the HQ key list (hq-keys)")?;
    if !keys.contains(&key.public()) {
        anyhow::bail!(
            "the root-signed HQ key list {} does not name HQ's key {} ({}): sites that pin the root would refuse this global; sign a new list (sign-hq-keys) naming it",
            list.serial,
            escape(key.id()),
            key.public().key_id_hex()
        );
    }
    let path = stick.join(format!(
        "hq-keys-{}.{}",
        list.serial,
        ferry_bundle::keylist::EXTENSION
    ));
    Ok(Some((path, bytes)))
}

/// Write the key list of [`key_list_for_stick`] (once the global is written), returning its path.
fn write_key_list(list: &Option<(PathBuf, Vec<u8>)>) -> Result<Option<PathBuf>> {
    match list {
        Some((path, bytes)) => {
            ferry_bundle::fsutil::write_new_or_same(path, bytes)?;
            Ok(Some(path.clone()))
        }
        None => Ok(None),
    }
}

pub fn run_round(a: &RoundArgs) -> Result<()> {
    let eff = HqEffective::resolve(&a.state, &a.hq, &a.merge)?;
    let key = eff.key(&a.state)?;
    let stick = eff.stick(&a.state)?;
    if !stick.is_dir() {
        anyhow::bail!(
            "the stick {} is not mounted (no such folder)",
            escape_path(&stick)
        );
    }
    let ledger = Ledger::peek(&a.state)?;
    let json = a.json;
    // Before anything is merged: a list that does not name HQ's key refuses the round.
    let key_list = key_list_for_stick(&eff, &a.state, &stick, &ledger.federation, &key)?;
    let added = add_replies(&a.state, &stick, json)?;
    let members = Members::load(&a.state)?;
    let round = ledger.current.round;
    let found = scan(&stick, &ledger.federation, round)?;
    for (p, why) in &found.skipped {
        eprintln!("note: skipped {}: {why}", escape_path(p));
    }
    // The JSON object, completed below (`--json`).
    let mut report = serde_json::json!({
        "federation": escape(&ledger.federation), "round": round, "stick": escape_path(&stick),
        "keys_added": added,
        "skipped": found.skipped.iter()
            .map(|(p, why)| serde_json::json!({"file": escape_path(p), "why": why}))
            .collect::<Vec<_>>(),
        "merged": false, "written": [], "carry": null, "warnings": [],
    });
    // The member check, before anything is verified or merged: one stranger refuses the round.
    for (p, site) in &found.current {
        match members.get(site) {
            Some(m) if m.key.is_some() => {}
            Some(_) => anyhow::bail!(
                "{}: {} is enrolled but HQ does not have its key yet (its kit's reply folder was not on this stick): add it with `ferry-server enroll --add-reply KIT`, or take the file off the stick",
                escape_path(p),
                escape(site)
            ),
            None => anyhow::bail!(
                "{}: {} is not a member of federation {}: refusing the round; take the file off the stick (or enrol the site: ferry-server enroll --site {})",
                escape_path(p),
                escape(site),
                escape(&ledger.federation),
                escape(site)
            ),
        }
    }
    let waiting: Vec<String> = members
        .members
        .iter()
        .filter(|m| !found.current.iter().any(|(_, s)| *s == m.site))
        .map(|m| escape(&m.site))
        .collect();
    report["waiting"] = serde_json::json!(waiting);
    if found.current.is_empty() {
        let written = if !found.has_global {
            Some(ferry_merge::hq::emit(&a.state, &key, &stick)?)
        } else {
            None
        };
        let key_list = write_key_list(&key_list)?;
        if json {
            let files: Vec<String> = written
                .iter()
                .chain(key_list.iter())
                .map(|p| escape_path(p))
                .collect();
            if !files.is_empty() {
                report["written"] = serde_json::json!(files);
                report["carry"] = serde_json::json!({"files": files, "to": "every site"});
            }
            return print_json(&report);
        }
        match written {
            Some(path) => outln!(
                "no update for round {round} on the stick; wrote the current global {} for the sites",
                escape_path(&path)
            ),
            None => outln!("no update for round {round} on the stick yet"),
        }
        if !waiting.is_empty() {
            outln!("waiting for {}", waiting.join(", "));
        }
        return Ok(());
    }
    let keyring = eff.keyring(&a.state)?;
    let mut merge = ferry_merge::MergeConfig {
        strategy: eff.strategy.0.unwrap_or_default(),
        clip_norm: eff.clip_norm.0,
        ..Default::default()
    };
    if let Some(lr) = eff.server_lr.0 {
        merge.fedavgm.lr = lr;
        merge.fedadam.lr = lr;
    }
    let config = ferry_merge::hq::RoundConfig {
        merge,
        min_sites: eff
            .min_sites
            .0
            .unwrap_or(ferry_merge::hq::DEFAULT_MIN_SITES),
        valid_for: eff.valid_days.0.unwrap_or(30).saturating_mul(86_400),
        encrypt_to: crate::recipients::from_settings(&a.state)?,
        ..Default::default()
    };
    let files: Vec<PathBuf> = found.current.iter().map(|(p, _)| p.clone()).collect();
    let pb = ferry_cli::spinner(format!(
        "verifying and merging {}",
        count(files.len() as u64, "update")
    ));
    let result =
        ferry_merge::hq::merge_round(&a.state, &key, &keyring, &[], &files, &config, &stick);
    pb.finish_and_clear();
    let out = result?;
    let key_list = write_key_list(&key_list)?;
    let mut warnings = Vec::new();
    for c in &out.capped {
        let w = format!(
            "{} signed {} samples; weighted as {} ({})",
            escape(&c.site),
            c.declared,
            c.used,
            c.bound
        );
        eprintln!("warning: {w}");
        warnings.push(w);
    }
    let mut carry = vec![escape_path(&out.path)];
    carry.extend(out.revocations.as_deref().map(escape_path));
    carry.extend(key_list.as_deref().map(escape_path));
    if json {
        report["merged"] = true.into();
        report["strategy"] = config.merge.strategy.to_string().into();
        report["new_round"] = out.sealed.manifest.round.into();
        report["hash"] = out.sealed.hash.clone().into();
        report["contributors"] = out
            .report
            .contributions
            .iter()
            .map(|c| {
                serde_json::json!({
                    "site": escape(&c.site), "samples": c.samples, "weight": c.weight,
                    "distance": c.distance,
                })
            })
            .collect();
        report["written"] = serde_json::json!(carry);
        report["carry"] = serde_json::json!({"files": carry, "to": "every site"});
        report["warnings"] = serde_json::json!(warnings);
        return print_json(&report);
    }
    outln!(
        "merged round {round} ({}): {}",
        config.merge.strategy,
        out.report
            .contributions
            .iter()
            .map(|c| format!(
                "{} ({} samples, distance {:.4})",
                escape(&c.site),
                c.samples,
                c.distance
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !waiting.is_empty() {
        outln!("not in this round: {}", waiting.join(", "));
    }
    outln!();
    outln!(
        "Carry {} ({}){}{} to every site on this stick.",
        escape_path(&out.path),
        short(&out.sealed.hash),
        out.revocations
            .as_deref()
            .map(|r| format!(" and {}", escape_path(r)))
            .unwrap_or_default(),
        key_list
            .as_deref()
            .map(|r| format!(" and {}", escape_path(r)))
            .unwrap_or_default()
    );
    Ok(())
}

/// `ferry-server status`: the ledger's status, then the members, who sent an update for the current round
/// (on the stick, when one is given or remembered) and who HQ is waiting for.
pub fn status(state: &Path, stick: Option<&Path>, json: bool) -> Result<()> {
    let s = ferry_merge::hq::status(state)?;
    let members = Members::load(state)?;
    let stick = match stick {
        Some(p) => Some(p.to_path_buf()),
        None => HqEffective::resolve(state, &HqFlags::default(), &MergeFlags::default())
            .ok()
            .and_then(|e| e.stick.0),
    };
    let on_stick = match stick.as_deref().filter(|p| p.is_dir()) {
        Some(p) => Some(scan(p, &s.federation, s.round)?),
        None => None,
    };
    let sent = |site: &str| {
        on_stick
            .as_ref()
            .is_some_and(|sc| sc.current.iter().any(|(_, s)| s == site))
    };
    let rows: Vec<serde_json::Value> = members
        .members
        .iter()
        .map(|m| {
            serde_json::json!({
                "site": m.site, "enrolled_at": m.enrolled_at,
                "key_id": m.key.as_ref().map(|k| k.key_id.clone()),
                "sent": on_stick.as_ref().map(|_| sent(&m.site)),
            })
        })
        .collect();
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["members"] = serde_json::Value::Array(rows);
        v["stick"] = serde_json::json!(stick.as_deref().map(escape_path));
        return print_json(&v);
    }
    ferry_cli::out!("{s}");
    if members.members.is_empty() {
        outln!("members     none enrolled (ferry-server enroll --site ID)");
        return Ok(());
    }
    outln!("members     {}", members.members.len());
    for m in &members.members {
        let key = match &m.key {
            Some(k) => format!("key {}", k.key_id),
            None => "kit written, key not back yet".into(),
        };
        let round_note = match &on_stick {
            Some(_) if sent(&m.site) => format!("sent its round-{} update", s.round),
            Some(_) => "waiting".into(),
            None => String::new(),
        };
        outln!("  {:<16} {:<28} {}", escape(&m.site), key, round_note);
    }
    match (&on_stick, stick.as_deref()) {
        (Some(_), Some(p)) => {
            let waiting: Vec<String> = members
                .members
                .iter()
                .filter(|m| !sent(&m.site))
                .map(|m| escape(&m.site))
                .collect();
            if waiting.is_empty() {
                outln!("round {}: every member's update is on {}", s.round, escape_path(p));
            } else {
                outln!(
                    "round {}: waiting for {} (updates looked for on {})",
                    s.round,
                    waiting.join(", "),
                    escape_path(p)
                );
            }
        }
        _ => outln!(
            "round {}: give --stick PATH (or set stick in ferry.toml) to see whose update has arrived",
            s.round
        ),
    }
    Ok(())
}
