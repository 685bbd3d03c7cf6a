//! `ferry-client`: the site's tool. Import HQ's global, train on local data, export a signed update.
//! Every subcommand is a few lines over the ferry libraries.

mod config_cmd;
mod data_cmds;
mod encrypt;
mod enroll_cmd;
mod round_cmd;
mod train_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry_bundle::{escape, escape_path, short, Draft, Role};
use ferry_cli::{
    count, describe, open_bundle, outln, print_json, read_secret_key, read_weights, with_spinner,
};
use ferry_site::{
    ExportOptions, ImportOutcome, ImportPolicy, ImportTrust, SiteState, DEFAULT_MAX_ROUND_JUMP,
};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-client",
    version,
    about = "ferry at a site: import the global model, train locally, export a signed update for HQ"
)]
#[command(
    after_help = "A round at a site:\n  ferry-client import --trust keys/hq.pub --state site/ /media/usb/global-r3.ferry\n  ferry-client train  --state site/ --data plates:loose:2000 --epochs 1\n  ferry-client export --state site/ --key keys/site-a.key --out /media/usb/"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a federation with the kit HQ wrote: makes the site state, its key pair, and the reply for HQ.
    Enroll(enroll_cmd::EnrollArgs),
    /// One whole round: import the newest global on the stick, train, evaluate, export, say what to carry.
    Round(round_cmd::RoundArgs),
    /// Show the effective settings (flags, ferry.toml, defaults) and where each came from.
    Config(config_cmd::ConfigArgs),
    /// Make this site's key pair (<ID>.key secret, <ID>.pub for HQ).
    Keygen(ferry_cli::KeygenArgs),
    /// Show a public key's full fingerprint, to compare over the phone.
    Fingerprint(ferry_cli::FingerprintArgs),
    /// Sign weights you trained yourself (e.g. a PyTorch state_dict saved with safetensors) as an update.
    Pack(PackArgs),
    /// Verify a global bundle from HQ and install it as this site's current model.
    Import(ImportArgs),
    /// Show the site's state: round, global, pending update.
    Status(StatusArgs),
    /// Train the imported global on local data (CPU or CUDA); resumable, optimizer state kept between rounds.
    Train(train_cmds::TrainArgs),
    /// Accuracy of the global, local or deployed model on local data.
    Eval(train_cmds::EvalArgs),
    /// Re-estimate BatchNorm statistics on local images (no labels) for the deployed model, without a round trip.
    Recalibrate(train_cmds::RecalibrateArgs),
    /// The local model's diagonal Fisher estimate on local data, shipped by export --fisher for HQ's Fisher merge.
    Fisher(train_cmds::FisherArgs),
    /// Report on a dataset without training: counts, label histogram, unreadable images, unknown characters.
    CheckData(data_cmds::CheckDataArgs),
    /// What the model reads on images; with --data, a labels CSV to correct instead of typing every label.
    Predict(data_cmds::PredictArgs),
    /// Seal the locally trained model as an update bundle for HQ.
    Export(ExportArgs),
    /// The audit log: every bundle imported or exported, with its hash, size, signer and tensor list.
    Log(LogArgs),
    /// Check bundles against trusted keys.
    Verify(ferry_cli::VerifyArgs),
    /// Show a bundle's header and manifest without verifying it.
    Inspect(ferry_cli::InspectArgs),
    /// Verify a bundle and write its plain safetensors payload.
    Unpack(ferry_cli::UnpackArgs),
    /// Write the age identity derived from a key, to decrypt a payload with the standard `age` tool.
    AgeIdentity(ferry_cli::AgeIdentityArgs),
    /// Check a file's detached signature (<FILE>.sig), e.g. a release's SHA256SUMS.
    VerifyFile(ferry_cli::release::VerifyFileArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(ferry_cli::release::CompletionsArgs),
    /// Print the man page, or write one per command with --out.
    Man(ferry_cli::release::ManArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-client pack --key keys/site-a.key --weights model.safetensors --samples 80000 \\\n      --base global-r3.ferry --trust keys/hq.pub --out /media/usb/\n\nWrites <OUT>/<site>-r<round>.ferry; round, federation and base hash come from the base global.\nThe weights must hold exactly the base global's tensors (names, dtypes, shapes): in PyTorch, save\nmodel.state_dict() of the model unpacked from the global, in F32, without a `module.` prefix.\nWith --encrypt-to keys/hq.pub the weights are encrypted to HQ (a lost stick reveals none)."
)]
struct PackArgs {
    /// This site's secret key.
    #[arg(long)]
    key: PathBuf,
    /// The trained weights, a safetensors file.
    #[arg(long)]
    weights: PathBuf,
    /// Number of training samples behind these weights (the FedAvg weight).
    #[arg(long)]
    samples: u64,
    /// The global bundle these weights were trained from.
    #[arg(long)]
    base: PathBuf,
    #[command(flatten)]
    trust: ferry_cli::TrustArgs,
    /// Directory to write the update into (e.g. the mounted stick).
    #[arg(long, default_value = "bundles")]
    out: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Print JSON: the file written, its hash and manifest.
    #[arg(long)]
    json: bool,
    /// Encrypt the update's payload to HQ's key (.pub; repeatable): a lost stick then reveals no weights.
    /// Example: --encrypt-to keys/hq.pub
    #[arg(long, value_name = "PUB")]
    encrypt_to: Vec<PathBuf>,
    /// A diagonal Fisher estimate of these weights to ship with them, for HQ's --strategy fisher: a safetensors
    /// file of F32 tensors named and shaped like the model's (e.g. the mean squared gradients PyTorch computed).
    #[arg(long, value_name = "SAFETENSORS")]
    fisher: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  After `ferry-client enroll` (trust and stick from site/ferry.toml; the newest global on the stick):\n    ferry-client import --state site/\n  First import without a kit (pins the federation and HQ's key):\n    ferry-client import --federation city-cctv --trust keys/hq.pub --state site/ /media/usb/global-r0.ferry\n  First import under the federation's root key (pins the root; HQ keys come from root-signed lists):\n    ferry-client import --federation city-cctv --root keys/root.pub --hq-keys /media/usb/hq-keys-1.ferry-keys \\\n        --state site/ /media/usb/global-r0.ferry\n  Later rounds (the pin decides whom to believe; give revocation lists and new HQ key lists HQ sends):\n    ferry-client import --state site/ --revocations /media/usb/revocations-3.ferry-rev /media/usb/global-r4.ferry\n\nRefuses older globals (rollback), forks (round N+1 not based on the global held), other federations,\nHQ keys the pin does not cover, globals naming a revocation list the site lacks, and big round jumps.\nImporting the current global again does nothing (revocation lists given are still stored)."
)]
struct ImportArgs {
    /// HQ's public key (.pub, or a folder of them). Needed for the first import without a kit, which pins it;
    /// later it must be a key the site pinned (a new HQ key is accepted only under the root's signature,
    /// --hq-keys). Default: ferry.toml's trust.
    #[arg(long)]
    trust: Vec<PathBuf>,
    /// HQ-signed revocation list (.ferry-rev, repeatable): verified, stored in the state and applied to every
    /// later import. Example: --revocations /media/usb/revocations-3.ferry-rev
    #[arg(long)]
    revocations: Vec<PathBuf>,
    /// The federation this site belongs to: required on the first import (it is pinned), checked afterwards.
    /// Example: --federation city-cctv
    #[arg(long)]
    federation: Option<String>,
    /// The federation's root public key, pinned on the first import (or added to a site pinned to an HQ key,
    /// if its HQ key list names that key). Example: --root keys/root.pub
    #[arg(long)]
    root: Option<PathBuf>,
    /// A list of HQ keys signed by the pinned root (.ferry-keys): a newer one replaces the stored one.
    /// Example: --hq-keys /media/usb/hq-keys-2.ferry-keys
    #[arg(long)]
    hq_keys: Option<PathBuf>,
    /// Refuse an expired global or HQ key list instead of warning (air-gapped clocks drift: check the date).
    #[arg(long)]
    refuse_expired: bool,
    /// The site's state directory.
    #[arg(long)]
    state: PathBuf,
    /// Refuse a global more than this many rounds ahead of the one held (a bigger jump can be a
    /// fast-forward by a leaked HQ key; after a long absence, raise it on purpose). Example: --max-round-jump 30
    #[arg(long, default_value_t = DEFAULT_MAX_ROUND_JUMP)]
    max_round_jump: u64,
    /// Print JSON: what happened (installed or already current), the round, hash, manifest and warnings.
    #[arg(long)]
    json: bool,
    /// This site's secret key, to read a global encrypted to the site.
    #[command(flatten)]
    identity: ferry_cli::IdentityArgs,
    /// The global bundle, or a folder (the stick): then the newest global in it this site can import.
    /// Default: ferry.toml's stick.
    file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client log --state site/\n  ferry-client log --state site/ --tensors\n  ferry-client log --state site/ --json > audit.json\n\nThe log is site/audit.jsonl: one JSON line per bundle that entered or left the site, appended\nafter each import and export. Show it to whoever must know what left the building: each export\nlists every tensor it carried (names, dtypes, shapes) and nothing else."
)]
struct LogArgs {
    /// The site's state directory.
    #[arg(long)]
    state: PathBuf,
    /// List each bundle's tensors too.
    #[arg(long)]
    tensors: bool,
    /// Print the entries as one JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client status --state site/\n  ferry-client status --state site/ --json"
)]
struct StatusArgs {
    /// The site's state directory.
    #[arg(long)]
    state: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client export --state site/                    # key and stick from site/ferry.toml\n  ferry-client export --state site/ --key keys/site-a.key --out /media/usb/\n  ferry-client export --state site/ --key keys/site-a.key --out /media/usb/ --json\n  ferry-client export --state site/ --fisher             # after ferry-client fisher: for HQ's --strategy fisher"
)]
struct ExportArgs {
    /// The site's state directory.
    #[arg(long)]
    state: PathBuf,
    /// This site's secret key (default: ferry.toml's key, which enroll wrote).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Directory to write the update into (default: ferry.toml's stick, else bundles/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Export although an update for this round already left the site (it replaces that one: carry only the
    /// new file; the audit log records which superseded which).
    #[arg(long)]
    again: bool,
    /// Print JSON: the file written, its hash and manifest.
    #[arg(long)]
    json: bool,
    /// Ship the local model's Fisher estimate (ferry-client fisher) with it, for HQ's --strategy fisher
    /// (ferry.toml: `fisher = true` does it for every export).
    #[arg(long)]
    fisher: bool,
    /// --encrypt-to PUB / --encrypt / --no-encrypt.
    #[command(flatten)]
    encrypt: encrypt::EncryptArgs,
}

/// What `pack` and `export` print: the update written.
fn report_written(path: &std::path::Path, sealed: &ferry_bundle::Sealed, json: bool) -> Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "file": escape_path(path), "bytes": sealed.bytes.len(), "hash": sealed.hash,
            "manifest": sealed.manifest,
        }));
    }
    outln!(
        "wrote {} ({} bytes), {}",
        escape_path(path),
        sealed.bytes.len(),
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

fn pack(a: &PackArgs) -> Result<()> {
    let key = read_secret_key(&a.key)?;
    if key.role() != Role::Site {
        anyhow::bail!(
            "{} is an {} key; updates are signed with the site's own key",
            escape_path(&a.key),
            key.role()
        );
    }
    let ring = a.trust.keyring()?;
    // The base's signed compressed-payload hash pins its weights: verifying up to that hash names it, without
    // decompressing a model pack never reads (issue 13).
    let base = with_spinner(&a.base, "checking", || {
        ferry_bundle::identify_file(&a.base, &ring)
    })
    .context("base global")?;
    if base.manifest.kind != ferry_bundle::BundleKind::Global {
        anyhow::bail!(
            "{} is not a global bundle; --base takes the global the weights were trained from",
            escape_path(&a.base)
        );
    }
    let encrypt_to = ferry_cli::encrypt_to_keys(&a.encrypt_to)?;
    if let Some(k) = encrypt_to.iter().find(|k| k.role != Role::Hq) {
        return Err(ferry_site::ExportError::NotHqRecipient(format!(
            "{} {} ({})",
            k.role,
            escape(&k.id),
            k.key_id_hex()
        ))
        .into());
    }
    let payload = read_weights(&a.weights)?;
    if payload.fingerprint() != base.manifest.model_fingerprint {
        let why = ferry_cli::layout::summary(&base.manifest.tensors, payload.metas())
            .unwrap_or_else(|| "tensor names, dtypes or shapes differ".into());
        anyhow::bail!(
            "{} does not fit the base global's model (HQ would refuse the update): {why}",
            escape_path(&a.weights)
        );
    }
    let payload = match &a.fisher {
        None => payload,
        Some(path) => {
            let estimate = read_weights(path)?;
            let mut values = std::collections::BTreeMap::new();
            for t in estimate.tensors() {
                if t.dtype != ferry_bundle::Dtype::F32 {
                    anyhow::bail!(
                        "{}: Fisher tensor {} is {}; save the estimate as F32",
                        escape_path(path),
                        escape(t.name),
                        t.dtype
                    );
                }
                let v = t.data.chunks_exact(4);
                let v = v.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                values.insert(t.name.to_string(), v.collect::<Vec<f32>>());
            }
            ferry_bundle::fisher::attach(&payload, &values)
                .with_context(|| format!("{} (--fisher)", escape_path(path)))?
        }
    };
    let draft = Draft {
        encrypt_to,
        ..Draft::update_for(&base.manifest, &base.hash, key.id(), a.samples)
    };
    let sealed = ferry_bundle::seal(draft, &payload, &key, a.level)?;
    let path = sealed.write_to_dir(&a.out)?;
    report_written(&path, &sealed, a.json)
}

fn import(a: &ImportArgs) -> Result<()> {
    let state = SiteState::at(&a.state);
    let flags = config_cmd::SettingFlags {
        trust: a.trust.clone(),
        stick: a.file.clone(),
        ..Default::default()
    };
    let eff = config_cmd::Effective::resolve(&state, &flags).context("reading the settings")?;
    let Some(file) = eff.stick.0.clone() else {
        anyhow::bail!(
            "which global? give the file (or the stick's folder), or set `stick = \"/media/usb\"` in {}",
            escape_path(&state.settings_path())
        );
    };
    if !file.is_dir() {
        ferry_cli::require_file(&file)?;
    }
    let keys = match &eff.trust.0 {
        Some(t) => ferry_cli::load_keyring(t)?,
        None => ferry_bundle::Keyring::new(),
    };
    let hq_keys = match &a.hq_keys {
        Some(p) => Some((
            escape_path(p),
            ferry_bundle::keylist::read_bytes(p).with_context(|| escape_path(p))?,
        )),
        None => None,
    };
    let trust = ImportTrust {
        keys,
        revocations: ferry_cli::read_revocation_files(&a.revocations)?,
        hq_keys,
        root: a
            .root
            .as_deref()
            .map(ferry_bundle::PublicKey::read)
            .transpose()?,
        federation: a.federation.clone(),
    };
    let policy = ImportPolicy {
        max_round_jump: a.max_round_jump,
        refuse_expired: a.refuse_expired,
        ..ImportPolicy::default()
    };
    let mut prepared = state.prepare_import(&trust, &policy)?;
    // The site's identities join the keyring, so an encrypted global reads, picked from a folder or named.
    a.identity.apply(prepared.keyring_mut())?;
    // A folder (the stick): the newest global in it that this site can import (issue 16).
    let (file, bundle) = if file.is_dir() {
        let picked = state.pick_global(&file, &prepared, &policy)?;
        for (p, why) in &picked.skipped {
            eprintln!("note: skipped {}: {why}", escape_path(p));
        }
        (picked.path, picked.bundle)
    } else {
        let bundle = open_bundle(&file, prepared.keyring()).with_context(|| {
            format!(
                "this site accepts globals of federation {} signed by {}",
                prepared.federation(),
                prepared.hq_key_ids()
            )
        })?;
        (file, bundle)
    };
    let outcome = state.import_new(&bundle, &file.display().to_string(), &policy, &prepared)?;
    if a.json {
        let (installed, previous, warnings) = match &outcome {
            ImportOutcome::AlreadyCurrent { warnings } => (false, None, warnings),
            ImportOutcome::Installed { previous, warnings } => {
                (true, previous.as_ref().map(|p| p.round), warnings)
            }
        };
        return print_json(&serde_json::json!({
            "file": escape_path(&file), "installed": installed, "round": bundle.manifest.round,
            "previous_round": previous, "hash": bundle.hash, "manifest": bundle.manifest,
            "model": escape_path(&state.current_model_path()), "warnings": warnings,
        }));
    }
    match outcome {
        ImportOutcome::AlreadyCurrent { warnings } => {
            outln!(
                "already current: round {} ({}), nothing to do",
                bundle.manifest.round,
                short(&bundle.hash)
            );
            print_warnings(&warnings);
        }
        ImportOutcome::Installed { previous, warnings } => {
            let from = previous
                .map(|p| format!(" (was round {})", p.round))
                .unwrap_or_default();
            outln!(
                "imported round {}{from}: {}",
                bundle.manifest.round,
                describe(&bundle.manifest, &bundle.hash)
            );
            outln!(
                "model for the recogniser: {}",
                escape_path(&state.current_model_path())
            );
            print_warnings(&warnings);
        }
    }
    Ok(())
}

fn print_warnings(warnings: &[String]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

fn status(a: &StatusArgs) -> Result<()> {
    let state = SiteState::open(&a.state)?;
    let cur = state.current()?;
    let local = state.local()?;
    let pending = state.pending_export()?;
    let pin = state.pin()?;
    let lists = state.revocation_lists()?;
    let now = ferry_bundle::unix_now();
    let mut warnings = Vec::new();
    if let Some(newest) = lists.last().filter(|v| v.list.expired(now)) {
        warnings.push(format!(
            "the newest revocation list ({}) expired at {}; ask HQ for a newer one",
            newest.list.serial,
            ferry_bundle::utc(newest.list.expires.unwrap_or(0))
        ));
    }
    if let Some(g) = &cur {
        if let Some(e) = g.expires.filter(|e| now > *e) {
            warnings.push(format!(
                "global round {} expired at {}; ask HQ for a newer one (air-gapped clocks drift: check this machine's date too)",
                g.round,
                ferry_bundle::utc(e)
            ));
        }
    }
    if a.json {
        let v = serde_json::json!({"global": cur, "previous": state.previous()?, "local": local, "pending_export": pending,
            "pin": pin, "revocation_lists": lists.iter().map(|v| serde_json::json!({"serial": v.list.serial, "sha256": v.sha256, "expires": v.list.expires})).collect::<Vec<_>>(),
            "warnings": warnings});
        return print_json(&v);
    }
    let Some(g) = cur else {
        outln!("no global imported yet; run `ferry-client import`");
        return Ok(());
    };
    outln!("federation  {}", escape(&g.federation));
    outln!("round       {}", g.round);
    outln!("global      {}", escape(&g.hash));
    outln!(
        "arch        {}",
        g.arch
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "(foreign weights: import and re-pack only)".into())
    );
    // Stored escaped; escaped again in case an older ferry wrote the record.
    outln!(
        "imported    {} from {}",
        ferry_bundle::utc(g.imported_at),
        escape(&g.source)
    );
    if let Some(e) = g.expires {
        outln!("expires     {}", ferry_bundle::utc(e));
    }
    match &pin {
        Some(p) => match &p.root {
            Some(r) => outln!(
                "pinned      root key {} ({})",
                escape(&r.key_id),
                escape(&p.how)
            ),
            None => outln!(
                "pinned      HQ {} {} ({})",
                if p.hq_keys.len() == 1 { "key" } else { "keys" },
                p.hq_keys
                    .iter()
                    .map(|k| escape(&k.key_id))
                    .collect::<Vec<_>>()
                    .join(", "),
                escape(&p.how)
            ),
        },
        None => {
            outln!("pinned      nothing yet (the next import pins the federation and HQ's key)")
        }
    }
    match lists.last() {
        Some(v) => outln!(
            "revocations {}, newest {} ({})",
            count(lists.len() as u64, "list"),
            v.list.serial,
            short(&v.sha256)
        ),
        None => outln!("revocations none"),
    }
    outln!("model file  {}", escape_path(&state.current_model_path()));
    match local {
        Some(l) if l.base_hash == g.hash => match &l.exported {
            Some(h) => outln!(
                "local       trained ({}, {}), exported as {}",
                count(l.samples, "sample"),
                count(l.epochs.into(), "epoch"),
                short(h)
            ),
            None => outln!(
                "local       trained ({}, {}), WAITING TO BE EXPORTED",
                count(l.samples, "sample"),
                count(l.epochs.into(), "epoch")
            ),
        },
        Some(l) => outln!(
            "local       trained from an older global (round {}); train again",
            l.round
        ),
        None => outln!("local       not trained this round"),
    }
    print_warnings(&warnings);
    Ok(())
}

fn export(a: &ExportArgs) -> Result<()> {
    let state = SiteState::open(&a.state)?;
    let flags = config_cmd::SettingFlags {
        key: a.key.clone(),
        stick: a.out.clone(),
        ..Default::default()
    };
    let eff = config_cmd::Effective::resolve(&state, &flags).context("reading the settings")?;
    let key = read_secret_key(&eff.key(&state)?)?;
    let out = eff
        .stick
        .0
        .clone()
        .unwrap_or_else(|| PathBuf::from("bundles"));
    // Checked before the lock too, which would leave a `lock` file in a folder that holds no state (issue 17).
    state.require_current()?;
    let lock = state.lock()?;
    let encrypt_to = a.encrypt.resolve(&state)?;
    let options = ExportOptions {
        level: a.level,
        again: a.again,
        encrypt_to,
        fisher: a.fisher || eff.fisher.0 == Some(true),
    };
    let (path, sealed) = state.export_with(&lock, &key, &out, &options)?;
    report_written(&path, &sealed, a.json)
}

fn log(a: &LogArgs) -> Result<()> {
    let state = SiteState::open(&a.state)?;
    let entries = state.audit_log()?;
    if a.json {
        return print_json(&entries);
    }
    if entries.is_empty() {
        outln!("nothing imported or exported yet");
        return Ok(());
    }
    for e in &entries {
        // Every string in an entry was escaped when it was logged.
        outln!(
            "{}  {:<6}  round {:<4} {}  {}  {}, {}, signed by {} {}",
            ferry_bundle::utc(e.time),
            e.action,
            e.round,
            short(&e.sha256),
            e.file,
            ferry_cli::count(e.size, "byte"),
            ferry_cli::count(e.tensors.len() as u64, "tensor"),
            e.signer_role,
            e.signer
        );
        if let Some(old) = &e.supersedes {
            outln!(
                "      replaces the update {} exported before it",
                short(old)
            );
        }
        if a.tensors {
            for t in &e.tensors {
                outln!("      {} {} {:?}", t.name, t.dtype, t.shape);
            }
        }
    }
    Ok(())
}

// candle allocates and frees many large buffers per step; glibc's malloc returns them to the kernel each time
// (page faults, ~45 % system time). mimalloc keeps them (issue 7).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_cli::run_main("ferry-client", || match &cli.command {
        Command::Enroll(a) => enroll_cmd::run_enroll(a),
        Command::Round(a) => round_cmd::run_round(a),
        Command::Config(a) => config_cmd::run_config(a),
        Command::Keygen(a) => ferry_cli::keygen(a, Role::Site),
        Command::Fingerprint(a) => ferry_cli::fingerprint(a),
        Command::Pack(a) => pack(a),
        Command::Import(a) => import(a),
        Command::Status(a) => status(a),
        Command::Train(a) => train_cmds::run_train(a),
        Command::Eval(a) => train_cmds::run_eval(a),
        Command::Recalibrate(a) => train_cmds::run_recalibrate(a),
        Command::Fisher(a) => train_cmds::run_fisher(a),
        Command::CheckData(a) => data_cmds::run_check_data(a),
        Command::Predict(a) => data_cmds::run_predict(a),
        Command::Export(a) => export(a),
        Command::Log(a) => log(a),
        Command::Verify(a) => ferry_cli::verify(a),
        Command::Inspect(a) => ferry_cli::inspect(a),
        Command::Unpack(a) => ferry_cli::unpack(a),
        Command::AgeIdentity(a) => ferry_cli::age_identity(a),
        Command::VerifyFile(a) => ferry_cli::release::verify_file(a),
        Command::Completions(a) => ferry_cli::release::completions(Cli::command(), a),
        Command::Man(a) => ferry_cli::release::man(Cli::command(), a),
    })
}
