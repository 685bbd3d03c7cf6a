//! `ferry-server`: HQ's tool. Verify site updates, merge them, sign the next global.
//! Every subcommand is a few lines over the ferry libraries.

mod enroll_cmd;
mod quality_cmds;
mod recipients;
mod round_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry_bundle::{escape, escape_path, Draft, Role};
use ferry_cli::{count, describe, outln, print_json, read_secret_key, read_weights};

mod hq_train;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-server",
    version,
    about = "ferry at HQ: start a federation, verify and merge site updates, sign the next global"
)]
#[command(
    after_help = "Start a federation:\n  ferry-server keygen --id hq --out keys/\n  ferry-server init --key keys/hq.key --weights init.safetensors --federation city-cctv --state hq/ --out bundles/\nThen each round:\n  ferry-server merge --key keys/hq.key --trust keys/ --state hq/ --out bundles/ /media/usb/*.ferry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per run and matched at once: the size of the largest variant (merge's many flags) costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Make HQ's key pair (<ID>.key secret, <ID>.pub for the sites), or with --root the federation's root key.
    Keygen(HqKeygenArgs),
    /// Show a public key's full fingerprint, to compare over the phone.
    Fingerprint(ferry_cli::FingerprintArgs),
    /// With the offline root key, sign the list of current HQ keys that sites accept (HQ key rotation).
    SignHqKeys(SignHqKeysArgs),
    /// Start a federation: write the round-0 global bundle and start HQ's ledger in --state.
    Init(InitArgs),
    /// Verify site updates and merge them into the next signed global.
    Merge(MergeArgs),
    /// Show the federation: round, current global, who contributed to each round, members and who HQ waits for.
    Status(StatusArgs),
    /// Write a new site's enrolment kit onto the stick (or add a site's reply key with --add-reply).
    Enroll(enroll_cmd::EnrollArgs),
    /// One whole round: merge every member's update on the stick, write the next global onto it.
    Round(round_cmd::RoundArgs),
    /// Show the effective settings (flags, ferry.toml, defaults) and where each came from.
    Config(enroll_cmd::ConfigArgs),
    /// Write the current global from the HQ state to a stick again.
    Emit(EmitArgs),
    /// After an HQ key rotation: keep the old key's power to decrypt (not to sign) in the HQ state.
    RetireKey(RetireKeyArgs),
    /// Sign a revocation list: bundles from the named keys are refused wherever the list is loaded.
    Revoke(RevokeArgs),
    /// Evaluate a global or update on HQ's own validation data (recorded in the ledger with --state).
    Eval(quality_cmds::EvalArgs),
    /// Per-tensor distance between two bundles (both verified first).
    Diff(quality_cmds::DiffArgs),
    /// Re-sign an earlier round's global as the next round: how HQ rolls back a bad global.
    Republish(quality_cmds::RepublishArgs),
    /// Write an HTML page with plots of the federation from the ledger: rounds, contributors, weights,
    /// distances, accuracy.
    Report(quality_cmds::ReportArgs),
    /// Check bundles against trusted keys.
    Verify(ferry_cli::VerifyArgs),
    /// Show a bundle's header and manifest without verifying it.
    Inspect(ferry_cli::InspectArgs),
    /// Verify a bundle and write its plain safetensors payload.
    Unpack(ferry_cli::UnpackArgs),
    /// Write the age identity derived from a key, to decrypt a payload with the standard `age` tool.
    AgeIdentity(ferry_cli::AgeIdentityArgs),
    /// Sign a file (a release's SHA256SUMS) with a ferry key: writes <FILE>.sig.
    SignFile(ferry_cli::release::SignFileArgs),
    /// Check a file's detached signature (<FILE>.sig), e.g. a release's SHA256SUMS.
    VerifyFile(ferry_cli::release::VerifyFileArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(ferry_cli::release::CompletionsArgs),
    /// Print the man page, or write one per command with --out.
    Man(ferry_cli::release::ManArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server keygen --id hq --out keys/\n  ferry-server keygen --id hq --out keys/ --protect        # asks for a passphrase twice\n  ferry-server keygen --root --id root --out /media/offline-usb/ --protect\n\nWrites <ID>.key (secret, mode 0600) and <ID>.pub (give this one to the sites). Read the printed\nfingerprint to each site over the phone; they compare it with `ferry-client fingerprint hq.pub`."
)]
struct HqKeygenArgs {
    #[command(flatten)]
    key: ferry_cli::KeygenArgs,
    /// Make the federation's offline root key instead of an HQ key (example: keygen --root --id root
    /// --out /media/offline-usb/ --protect). It only signs lists of HQ keys (sign-hq-keys); keep it offline.
    #[arg(long)]
    root: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example (on the offline machine that holds the root key):\n  ferry-server sign-hq-keys --root-key /media/safe/root.key --hq keys/hq-2027.pub \\\n      --federation city-cctv --serial 2 --valid-days 365 --out /media/usb/hq-keys-2.ferry-keys\n\nSites that pin this root (ferry-client import --root) accept globals only from the HQ keys of the newest\nsuch list they were given (--hq-keys). To replace a leaked HQ key, sign a list with a higher serial naming\nthe new key, and carry it to the sites with the first global the new key signs."
)]
struct SignHqKeysArgs {
    /// The federation's root secret key (made with `keygen --root`).
    #[arg(long)]
    root_key: PathBuf,
    /// Public key file of a current HQ key (repeatable: during a change, name both).
    #[arg(long, required = true)]
    hq: Vec<PathBuf>,
    /// Federation name.
    #[arg(long)]
    federation: String,
    /// Serial of this list: higher than every list signed before.
    #[arg(long)]
    serial: u64,
    /// Days until the list expires (sites warn after it, or refuse with --refuse-expired).
    #[arg(long, default_value_t = 365)]
    valid_days: u64,
    /// The list file to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server init --key keys/hq.key --weights init.safetensors --federation city-cctv --state hq/ --out bundles/\n  ferry-server init --key keys/hq.key --arch plate-cnn --seed 7 --federation city-cctv --state hq/ --out bundles/\n  # warm start on HQ's own data (docs/merging.md, few trips)\n  ferry-server init --state hq/ --key keys/hq.key --arch mnist-cnn --federation f --out bundles/ \\\n      --pretrain idx:/srv/hq-data --pretrain-epochs 2\n\nWrites <OUT>/global-r0.ferry for the sites and starts HQ's ledger in --state, which every `merge`\ncontinues from.",
    override_usage = "ferry-server init --key <KEY> --federation <FEDERATION> --state <DIR> (--weights <FILE> | --arch <NAME>) [OPTIONS]"
)]
struct InitArgs {
    /// HQ's secret key.
    #[arg(long)]
    key: PathBuf,
    /// Initial weights (safetensors), e.g. saved from PyTorch. Sites can re-pack but not train foreign weights.
    #[arg(long, required_unless_present = "arch", conflicts_with = "arch")]
    weights: Option<PathBuf>,
    /// An architecture ferry can train (plate-ctc-v2, plate-ctc-deep-v2, plate-ctc-deep-v3, plate-ctc-deep-v4,
    /// plate-ctc, plate-ctc-deep, plate-cnn, mnist-cnn), initialised from --seed.
    #[arg(long)]
    arch: Option<String>,
    /// Seed of the initial weights (same seed, bit-identical weights).
    #[arg(long, default_value_t = 0, requires = "arch")]
    seed: u64,
    /// Federation name (1-64 of a-z 0-9 . _ -); every bundle of this federation carries it.
    #[arg(long)]
    federation: String,
    /// Directory to write global-r0.ferry into.
    #[arg(long, default_value = "bundles")]
    out: PathBuf,
    /// HQ state directory (required): records round 0 in a new ledger there, which every `merge` continues from.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Print JSON: the file written, its hash and manifest.
    #[arg(long)]
    json: bool,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Days until the global expires (signed; sites warn after it). Example: --valid-days 30.
    #[arg(long, default_value_t = DEFAULT_VALID_DAYS)]
    valid_days: u64,
    /// Encrypt the global's payload to these keys (the member sites' .pub files, or a folder of them; repeatable):
    /// a lost stick then reveals no weights. HQ's own key is added. Example: --encrypt-to keys/sites/
    #[arg(long, value_name = "PUB")]
    encrypt_to: Vec<PathBuf>,
    /// Warm start on HQ's own data (issue 14).
    #[command(flatten)]
    pretrain: hq_train::PretrainArgs,
}

/// Default validity of a global, in days (`ferry_bundle::manifest::DEFAULT_GLOBAL_VALIDITY`).
const DEFAULT_VALID_DAYS: u64 = ferry_bundle::manifest::DEFAULT_GLOBAL_VALIDITY / 86_400;
const DAY: u64 = 86_400;

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server merge --key keys/hq.key --trust keys/ --state hq/ --out bundles/ \\\n      /media/usb/site-a-r3.ferry /media/usb/site-b-r3.ferry\n  ferry-server merge --state hq/ /media/usb/site-a-r3.ferry /media/usb/site-b-r3.ferry\n      (key, stick and [merge] settings from hq/ferry.toml; the members' keys are trusted)\n  # few trips (docs/merging.md): distil the site models into the merge on HQ's own data\n  ferry-server merge --state hq/ --distill idx:/srv/hq-data --distill-epochs 2 /media/usb/*.ferry\n  # Fisher-weighted (the sites ran ferry-client fisher and export --fisher)\n  ferry-server merge --state hq/ --strategy fisher /media/usb/*.ferry\n  # seal the merge or one site's model, whichever reads HQ's own labelled plates best\n  ferry-server merge --state hq/ --select folder:/srv/hq-val/labels.csv /media/usb/*.ferry\n\nRefuses the whole batch (nothing written, ledger unchanged) on any stale, replayed, duplicate,\nforeign, unverifiable or non-finite update."
)]
struct MergeArgs {
    /// HQ's secret key (default: ferry.toml's key).
    #[arg(long)]
    key: Option<PathBuf>,
    /// An HQ-signed revocation list (.ferry-rev); bundles from the keys it names are refused (repeatable).
    #[arg(long)]
    revocations: Vec<PathBuf>,
    /// HQ state directory (made by `init --state`).
    #[arg(long)]
    state: PathBuf,
    /// Directory to write global-r<N+1>.ferry into (default: ferry.toml's stick, else bundles/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Trusted site keys and the merge settings (--trust, --strategy, --min-sites, ...), each overriding
    /// ferry.toml.
    #[command(flatten)]
    settings: enroll_cmd::MergeFlags,
    /// samples (weight by signed sample counts) or equal (plain mean).
    #[arg(long, default_value = "samples")]
    weights: ferry_merge::Weighting,
    /// trimmed-mean: values dropped from each end of every coordinate.
    #[arg(long, default_value_t = 1)]
    trim: usize,
    /// BatchNorm statistic names as mean:var suffix pairs, comma-separated.
    #[arg(long)]
    bn_names: Option<ferry_merge::BnRules>,
    /// Cap each update's signed sample count at this (capped sites are reported).
    #[arg(long)]
    max_samples: Option<u64>,
    /// Cap a sample count above K times the lower median of the updates' counts, so one site cannot take the
    /// merge over by signing a huge count (0: off; capped sites are reported).
    #[arg(long, value_name = "K", default_value_t = ferry_merge::hq::DEFAULT_MAX_SAMPLE_RATIO)]
    max_sample_ratio: u64,
    /// Keep each site's BatchNorm running means within R base standard deviations of the current global's,
    /// and its running variances within a factor R² (0: off; bounded elements are reported).
    #[arg(long, value_name = "R", default_value_t = ferry_merge::DEFAULT_BN_BOUND)]
    bn_bound: f64,
    /// --strategy fisher: each site's Fisher values are divided by their mean over the tensor and clamped to
    /// [1/B, B], so no site weighs more than B times its FedAvg weight on any parameter (1: plain FedAvg).
    #[arg(long, value_name = "B", default_value_t = ferry_merge::DEFAULT_FISHER_BOUND)]
    fisher_bound: f64,
    /// Print the merge report as JSON.
    #[arg(long)]
    json: bool,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Quality gate: evaluate the merged and the current global on this data (HQ's validation set) and refuse
    /// a merged global that scores lower (nothing written). Example: --require-eval folder:hq-val/labels.csv
    #[arg(long, value_name = "SPEC")]
    require_eval: Option<ferry_train::data::DataSpec>,
    /// With --require-eval: also refuse a merged global whose accuracy is below X (0 to 1).
    #[arg(long, value_name = "X", requires = "require_eval")]
    min_accuracy: Option<f64>,
    /// --encrypt-to PUB / --no-encrypt.
    #[command(flatten)]
    encrypt: recipients::EncryptArgs,
    /// HQ's steps on its own data after the merge (issue 14): distillation, recalibration, selection.
    #[command(flatten)]
    distill: hq_train::DistillArgs,
    /// Update bundles.
    #[arg(required = true)]
    updates: Vec<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server status --state hq/\n  ferry-server status --state hq/ --json"
)]
struct StatusArgs {
    /// HQ state directory.
    #[arg(long)]
    state: PathBuf,
    /// The stick, to show whose update for the current round is on it (default: ferry.toml's stick).
    #[arg(long)]
    stick: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example (a stick was lost, or a site needs the current global again):\n  ferry-server emit --key keys/hq.key --state hq/ --out /media/usb/"
)]
struct EmitArgs {
    /// HQ's secret key (to verify the stored global).
    #[arg(long)]
    key: PathBuf,
    /// HQ state directory.
    #[arg(long)]
    state: PathBuf,
    /// Directory to write the current global into.
    #[arg(long, default_value = "bundles")]
    out: PathBuf,
    /// Print JSON: the file written.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example (HQ signs with keys/hq-2027.key from now on; the old key may have encrypted globals and updates):\n  ferry-server retire-key --state hq/ --key keys/hq-2026.key\n\nKeeps the old key's age decryption identity in <STATE>/retired/<KEY ID>.age (mode 0600), so merges and\nrepublishes still open what was encrypted to it, and records it in the ledger as a signer of stored globals.\nThe identity cannot sign: once this is done the old .key file can be destroyed. New globals are\nencrypted to the signing key, never to a retired one."
)]
struct RetireKeyArgs {
    /// The old HQ secret key (.key).
    #[arg(long)]
    key: PathBuf,
    /// HQ state directory.
    #[arg(long)]
    state: PathBuf,
    /// Print JSON: the identity file written and whether the ledger learnt the key.
    #[arg(long)]
    json: bool,
}

fn retire_key(a: &RetireKeyArgs) -> Result<()> {
    let old = read_secret_key(&a.key)?;
    let r = ferry_merge::hq::retire_key(&a.state, &old)?;
    if a.json {
        return print_json(&serde_json::json!({
            "identity": escape_path(&r.identity),
            "key_id": old.public().key_id_hex(),
            "newly_recorded": r.newly_recorded,
        }));
    }
    outln!(
        "kept the decryption identity of HQ key {} ({}) in {}{}; it cannot sign, so {} can now be destroyed",
        escape(old.id()),
        old.public().key_id_hex(),
        escape_path(&r.identity),
        if r.newly_recorded {
            ", and recorded the key as a signer of stored globals"
        } else {
            ""
        },
        escape_path(&a.key)
    );
    Ok(())
}

fn init(a: &InitArgs) -> Result<()> {
    // Without a ledger no `merge` can ever follow this global (issue 17): refuse before anything is written.
    let Some(state) = &a.state else {
        anyhow::bail!(
            "init needs --state DIR: HQ's state folder, where the ledger every `merge` continues from is kept \
             (e.g. ferry-server init --state hq/ --key {} --federation {} ...)",
            escape_path(&a.key),
            escape(&a.federation)
        );
    };
    let key = read_secret_key(&a.key)?;
    if key.role() != Role::Hq {
        anyhow::bail!(
            "{} is a {} key; only an hq key can sign globals",
            escape_path(&a.key),
            key.role()
        );
    }
    ferry_bundle::keys::validate_id("federation", &a.federation)?;
    let (payload, arch) = match (&a.weights, &a.arch) {
        (Some(w), _) => (read_weights(w)?, None),
        (None, Some(name)) => {
            let arch = ferry_train::Arch::from_name(name)?;
            let mut model = ferry_train::Model::init(arch, a.seed, &ferry_train::Device::Cpu)?;
            hq_train::pretrain(&a.pretrain, &mut model)?;
            let payload = ferry_bundle::Payload::from_safetensors_vec(model.to_safetensors()?)?;
            (payload, Some(arch.name()))
        }
        (None, None) => anyhow::bail!("give --weights FILE or --arch NAME"),
    };
    let mut draft = Draft::initial(&a.federation, arch.map(str::to_string));
    draft.expires = Some(
        draft
            .created
            .saturating_add(a.valid_days.saturating_mul(DAY)),
    );
    draft.encrypt_to = ferry_cli::encrypt_to_keys(&a.encrypt_to)?;
    let (path, sealed) = ferry_merge::hq::init_with(state, &key, &payload, draft, &a.out, a.level)?;
    if a.json {
        return print_json(&serde_json::json!({
            "file": escape_path(&path), "bytes": sealed.bytes.len(), "hash": sealed.hash,
            "state": escape_path(state), "manifest": sealed.manifest,
        }));
    }
    outln!(
        "wrote {} ({} bytes), {}",
        escape_path(&path),
        sealed.bytes.len(),
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

fn merge(a: &MergeArgs) -> Result<()> {
    // Flags first, then the state's ferry.toml, then the defaults: the resolution `round` and `config` use.
    let hq = enroll_cmd::HqFlags {
        key: a.key.clone(),
        stick: a.out.clone(),
        ..Default::default()
    };
    let eff = enroll_cmd::HqEffective::resolve(&a.state, &hq, &a.settings)?;
    let key = eff.key(&a.state)?;
    let out = eff
        .stick
        .0
        .clone()
        .unwrap_or_else(|| PathBuf::from("bundles"));
    // The members' keys, and the keys --trust (else ferry.toml's trust) names.
    let keyring = eff.keyring(&a.state)?;
    for u in &a.updates {
        ferry_cli::require_file(u)?;
    }
    // The lists are verified against the trusted keys and the state's federation, and stored, by the merge.
    let lists = ferry_cli::read_revocation_files(&a.revocations)?;
    let mut merge = ferry_merge::MergeConfig {
        strategy: eff.strategy.0.unwrap_or_default(),
        weighting: a.weights,
        trim: a.trim,
        clip_norm: eff.clip_norm.0,
        bn_bound: a.bn_bound,
        fisher_bound: a.fisher_bound,
        ..Default::default()
    };
    if let Some(lr) = eff.server_lr.0 {
        merge.fedavgm.lr = lr;
        merge.fedadam.lr = lr;
    }
    if let Some(bn) = &a.bn_names {
        merge.bn = bn.clone();
    }
    let config = ferry_merge::hq::RoundConfig {
        merge,
        min_sites: eff
            .min_sites
            .0
            .unwrap_or(ferry_merge::hq::DEFAULT_MIN_SITES),
        max_samples: a.max_samples,
        max_sample_ratio: a.max_sample_ratio,
        level: a.level,
        valid_for: eff
            .valid_days
            .0
            .unwrap_or(DEFAULT_VALID_DAYS)
            .saturating_mul(DAY),
        encrypt_to: a.encrypt.resolve(&a.state)?,
    };
    let evaluator = (a.require_eval.as_ref())
        .map(|spec| quality_cmds::Evaluator::for_state(&a.state, spec))
        .transpose()?;
    let mut evaluate = |b: &ferry_bundle::Bundle| match &evaluator {
        Some(e) => e.evaluate(b),
        None => Err("no evaluation data".to_string()),
    };
    let mut gate = evaluator.is_some().then_some(ferry_merge::hq::EvalGate {
        min_accuracy: a.min_accuracy,
        evaluate: &mut evaluate,
    });
    let mut refiner = hq_train::refiner(&a.distill);
    // Distillation prints its own progress lines.
    let pb = refiner.is_none().then(|| {
        ferry_cli::spinner(format!(
            "verifying and merging {}",
            count(a.updates.len() as u64, "update")
        ))
    });
    let result = ferry_merge::hq::merge_round_with(
        &a.state,
        &key,
        &keyring,
        &lists,
        &a.updates,
        &config,
        &out,
        refiner.as_mut(),
        gate.as_mut(),
    );
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let out = result?;
    if a.json {
        return print_json(&serde_json::json!({
            "file": escape_path(&out.path), "hash": out.sealed.hash, "round": out.sealed.manifest.round,
            "report": out.report, "capped": out.capped,
            "revocations": out.revocations.as_deref().map(escape_path),
        }));
    }
    outln!(
        "{:<12} {:>10} {:>8} {:>12}  bundle",
        "site",
        "samples",
        "weight",
        "distance"
    );
    for c in &out.report.contributions {
        let mut notes = String::new();
        if c.clipped {
            notes += &format!(" (clipped x{:.3})", c.scale);
        }
        if c.bn_bounded > 0 {
            notes += &format!(
                " ({} BatchNorm statistic value{} bounded)",
                c.bn_bounded,
                if c.bn_bounded == 1 { "" } else { "s" }
            );
        }
        // The robust strategies give every update the same say: no weight to show.
        let weight = c
            .weight
            .map_or_else(|| "-".to_string(), |w| format!("{w:.4}"));
        outln!(
            "{:<12} {:>10} {:>8} {:>12.4}  {}{notes}",
            escape(&c.site),
            c.samples,
            weight,
            c.distance,
            ferry_bundle::short(&c.bundle)
        );
    }
    // With two sites "far from the other" says nothing about which one is wrong.
    let outliers = if out.report.contributions.len() >= 3 {
        out.report.outliers(10.0)
    } else {
        Vec::new()
    };
    for o in outliers {
        eprintln!("warning: {}'s update is far from the others (distance {:.3}); consider --clip-norm or a robust strategy", escape(&o.site), o.distance);
    }
    for c in &out.capped {
        eprintln!(
            "warning: {} signed {} samples; weighted as {} ({})",
            escape(&c.site),
            c.declared,
            c.used,
            c.bound
        );
    }
    outln!(
        "wrote {} ({} bytes), {}",
        escape_path(&out.path),
        out.sealed.bytes.len(),
        describe(&out.sealed.manifest, &out.sealed.hash)
    );
    if let Some(r) = &out.revocations {
        outln!(
            "wrote {} (the revocation list the global names: carry it with the global)",
            escape_path(r)
        );
    }
    if a.require_eval.is_some() {
        quality_cmds::print_gate(&a.state)?;
    }
    Ok(())
}

fn status(a: &StatusArgs) -> Result<()> {
    round_cmd::status(&a.state, a.stick.as_deref(), a.json)
}

fn emit(a: &EmitArgs) -> Result<()> {
    let key = read_secret_key(&a.key)?;
    let path = ferry_merge::hq::emit(&a.state, &key, &a.out)?;
    if a.json {
        return print_json(&serde_json::json!({"file": escape_path(&path)}));
    }
    outln!("wrote {}", escape_path(&path));
    Ok(())
}

fn sign_hq_keys(a: &SignHqKeysArgs) -> Result<()> {
    let root = read_secret_key(&a.root_key)?;
    ferry_bundle::keys::validate_id("federation", &a.federation)?;
    let keys =
        a.hq.iter()
            .map(|p| Ok(ferry_bundle::PublicKey::read(p)?))
            .collect::<Result<Vec<_>>>()?;
    let now = ferry_bundle::unix_now();
    let list = ferry_bundle::keylist::HqKeyList::new(
        &a.federation,
        a.serial,
        now,
        now.saturating_add(a.valid_days.saturating_mul(DAY)),
        &keys,
    );
    let bytes = ferry_bundle::keylist::sign(&list, &root)?;
    ferry_bundle::fsutil::write_new_verified(&a.out, &bytes)?;
    outln!(
        "wrote {} naming {} for federation {}, serial {}",
        escape_path(&a.out),
        count(keys.len() as u64, "HQ key"),
        escape(&a.federation),
        a.serial
    );
    for k in &keys {
        outln!(
            "  {} {}  fingerprint {}",
            escape(&k.id),
            k.key_id_hex(),
            k.fingerprint()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-server revoke --key keys/hq.key --state hq/ --federation city-cctv --serial 1 \\\n      --revoke keys/site-b.pub --reason \"laptop stolen\" --out revocations-1.ferry-rev\n  ferry-server revoke --key keys/hq.key --state hq/ --federation city-cctv --serial 2 \\\n      --bundle 129710ef998ec5bbb1c627209d17f432f1885defbe1e18cfbb6834490de094e9 --reason \"poisoned global\" \\\n      --out revocations-2.ferry-rev\n\nWith --state the list is stored in HQ's state: every later merge applies it, and the next global names it\n(sites then refuse that global until they are given the list, which merge writes next to the global).\nCarry the list to every site; they store it on import (--revocations) and apply it from then on."
)]
struct RevokeArgs {
    /// HQ's secret key.
    #[arg(long)]
    key: PathBuf,
    /// Federation name.
    #[arg(long)]
    federation: String,
    /// Serial number of this list (increase it with every list you issue).
    #[arg(long)]
    serial: u64,
    /// Public key files of the keys to revoke (repeatable).
    #[arg(long)]
    revoke: Vec<PathBuf>,
    /// SHA-256 of a bundle file to withdraw, e.g. a poisoned global (repeatable; `sha256sum FILE`).
    #[arg(long = "bundle", value_name = "SHA256")]
    bundles: Vec<String>,
    /// Why, in words (shown to operators).
    #[arg(long, default_value = "revoked by HQ")]
    reason: String,
    /// Days until a newer list is due (signed; status warns after it).
    #[arg(long, default_value_t = DEFAULT_VALID_DAYS)]
    valid_days: u64,
    /// HQ state directory: store the list there, so every later merge applies it and names it.
    #[arg(long)]
    state: Option<PathBuf>,
    /// The list file to write (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Print JSON: the file written and the signed list.
    #[arg(long)]
    json: bool,
}

fn revoke(a: &RevokeArgs) -> Result<()> {
    if a.revoke.is_empty() && a.bundles.is_empty() {
        anyhow::bail!("nothing to revoke: give --revoke KEY.pub or --bundle SHA256");
    }
    let key = read_secret_key(&a.key)?;
    let mut revoked = Vec::new();
    for p in &a.revoke {
        let pk = ferry_bundle::PublicKey::read(p)?;
        revoked.push(ferry_bundle::revocation::Revoked {
            key_id: pk.key_id_hex(),
            role: pk.role,
            id: pk.id.clone(),
            reason: a.reason.clone(),
        });
    }
    let bundles = a
        .bundles
        .iter()
        .map(|h| ferry_bundle::revocation::RevokedBundle {
            sha256: h.to_ascii_lowercase(),
            reason: a.reason.clone(),
        })
        .collect();
    let now = ferry_bundle::unix_now();
    let list = ferry_bundle::revocation::RevocationList::new(
        &a.federation,
        a.serial,
        now,
        now.saturating_add(a.valid_days.saturating_mul(DAY)),
        revoked,
        bundles,
    );
    let bytes = ferry_bundle::revocation::sign(&list, &key)?;
    if let Some(state) = &a.state {
        ferry_merge::hq::store_revocation(state, &key, &bytes)?;
    }
    ferry_bundle::fsutil::write_new_verified(&a.out, &bytes)?;
    if a.json {
        return print_json(&serde_json::json!({
            "file": escape_path(&a.out), "sha256": ferry_bundle::sha256_hex(&bytes),
            "stored_in_state": a.state.as_deref().map(escape_path), "list": list,
        }));
    }
    outln!(
        "wrote {} revoking {} and {}{}",
        escape_path(&a.out),
        count(a.revoke.len() as u64, "key"),
        count(a.bundles.len() as u64, "bundle"),
        if a.state.is_some() {
            "; stored in HQ's state"
        } else {
            ""
        }
    );
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_cli::run_main("ferry-server", || match &cli.command {
        Command::Keygen(a) => ferry_cli::keygen(&a.key, if a.root { Role::Root } else { Role::Hq }),
        Command::Fingerprint(a) => ferry_cli::fingerprint(a),
        Command::SignHqKeys(a) => sign_hq_keys(a),
        Command::Init(a) => init(a),
        Command::Merge(a) => merge(a),
        Command::Status(a) => status(a),
        Command::Enroll(a) => enroll_cmd::run_enroll(a),
        Command::Round(a) => round_cmd::run_round(a),
        Command::Config(a) => enroll_cmd::run_config(a),
        Command::Emit(a) => emit(a),
        Command::RetireKey(a) => retire_key(a),
        Command::Revoke(a) => revoke(a),
        Command::Eval(a) => quality_cmds::eval(a),
        Command::Diff(a) => quality_cmds::diff(a),
        Command::Republish(a) => quality_cmds::republish(a),
        Command::Report(a) => quality_cmds::report(a),
        Command::Verify(a) => ferry_cli::verify(a),
        Command::Inspect(a) => ferry_cli::inspect(a),
        Command::Unpack(a) => ferry_cli::unpack(a),
        Command::AgeIdentity(a) => ferry_cli::age_identity(a),
        Command::SignFile(a) => ferry_cli::release::sign_file(a),
        Command::VerifyFile(a) => ferry_cli::release::verify_file(a),
        Command::Completions(a) => ferry_cli::release::completions(Cli::command(), a),
        Command::Man(a) => ferry_cli::release::man(Cli::command(), a),
    })
}
