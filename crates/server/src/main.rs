//! `ferry-server`: HQ's tool. Verify site updates, merge them, sign the next global.
//! Every subcommand is a few lines over the ferry libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry_bundle::{Draft, Role, SecretKey};
use ferry_cli::{describe, read_weights};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-server",
    version,
    about = "ferry at HQ: start a federation, verify and merge site updates, sign the next global"
)]
#[command(
    after_help = "Start a federation:\n  ferry-server keygen --id hq --out keys/\n  ferry-server init --key keys/hq.key --weights init.safetensors --federation city-cctv --out bundles/"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make HQ's key pair (<ID>.key secret, <ID>.pub for the sites).
    Keygen(ferry_cli::KeygenArgs),
    /// Write the round-0 global bundle (and, with --state, start HQ's ledger).
    Init(InitArgs),
    /// Verify site updates and merge them into the next signed global.
    Merge(MergeArgs),
    /// Show the federation: round, current global, who contributed to each round.
    Status(StatusArgs),
    /// Write the current global from the HQ state to a stick again.
    Emit(EmitArgs),
    /// Sign a revocation list: bundles from the named keys are refused wherever the list is loaded.
    Revoke(RevokeArgs),
    /// Check bundles against trusted keys.
    Verify(ferry_cli::VerifyArgs),
    /// Show a bundle's header and manifest without verifying it.
    Inspect(ferry_cli::InspectArgs),
    /// Verify a bundle and write its plain safetensors payload.
    Unpack(ferry_cli::UnpackArgs),
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
    after_help = "Example:\n  ferry-server init --key keys/hq.key --weights init.safetensors --federation city-cctv --out bundles/"
)]
struct InitArgs {
    /// HQ's secret key.
    #[arg(long)]
    key: PathBuf,
    /// Initial weights (safetensors), e.g. saved from PyTorch. Sites can re-pack but not train foreign weights.
    #[arg(long, required_unless_present = "arch", conflicts_with = "arch")]
    weights: Option<PathBuf>,
    /// An architecture ferry can train (plate-ctc, plate-cnn, mnist-cnn), initialised from --seed.
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
    /// HQ state directory: records round 0 in a new ledger there (needed for `merge`).
    #[arg(long)]
    state: Option<PathBuf>,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-server merge --key keys/hq.key --trust keys/ --state hq/ --out bundles/ \\\n      /media/usb/site-a-r3.ferry /media/usb/site-b-r3.ferry\n\nRefuses the whole batch (nothing written, ledger unchanged) on any stale, replayed, duplicate,\nforeign, unverifiable or non-finite update."
)]
struct MergeArgs {
    /// HQ's secret key.
    #[arg(long)]
    key: PathBuf,
    /// Trusted site keys (--trust, repeatable) and revocation lists (--revocations).
    #[command(flatten)]
    trust: ferry_cli::TrustArgs,
    /// HQ state directory (made by `init --state`).
    #[arg(long)]
    state: PathBuf,
    /// Directory to write global-r<N+1>.ferry into.
    #[arg(long, default_value = "bundles")]
    out: PathBuf,
    /// fedavg, fedavgm, fedadam, median or trimmed-mean.
    #[arg(long, default_value = "fedavg")]
    strategy: ferry_merge::Strategy,
    /// samples (weight by signed sample counts) or equal (plain mean).
    #[arg(long, default_value = "samples")]
    weights: ferry_merge::Weighting,
    /// trimmed-mean: values dropped from each end of every coordinate.
    #[arg(long, default_value_t = 1)]
    trim: usize,
    /// Clip each update's L2 distance from the current global to this.
    #[arg(long)]
    clip_norm: Option<f64>,
    /// Server learning rate (fedavgm, fedadam).
    #[arg(long)]
    server_lr: Option<f64>,
    /// BatchNorm statistic names as mean:var suffix pairs, comma-separated.
    #[arg(long)]
    bn_names: Option<ferry_merge::BnRules>,
    /// Refuse fewer updates than this.
    #[arg(long, default_value_t = 1)]
    min_sites: usize,
    /// Cap each update's signed sample count at this (capped sites are reported).
    #[arg(long)]
    max_samples: Option<u64>,
    /// Print the merge report as JSON.
    #[arg(long)]
    json: bool,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Update bundles.
    #[arg(required = true)]
    updates: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// HQ state directory.
    #[arg(long)]
    state: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
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
}

fn init(a: &InitArgs) -> Result<()> {
    let key = SecretKey::read(&a.key)?;
    if key.role() != Role::Hq {
        anyhow::bail!(
            "{} is a site key; only an hq key can sign globals",
            a.key.display()
        );
    }
    ferry_bundle::keys::validate_id("federation", &a.federation)?;
    let (payload, arch) = match (&a.weights, &a.arch) {
        (Some(w), _) => (read_weights(w)?, None),
        (None, Some(name)) => {
            let arch = ferry_train::Arch::from_name(name)?;
            let model = ferry_train::Model::init(arch, a.seed, &ferry_train::Device::Cpu)?;
            let payload = ferry_bundle::Payload::from_safetensors(&model.to_safetensors()?)?;
            (payload, Some(arch.name()))
        }
        (None, None) => anyhow::bail!("give --weights FILE or --arch NAME"),
    };
    let (path, sealed) = match &a.state {
        Some(state) => {
            ferry_merge::hq::init(state, &key, &payload, &a.federation, arch, &a.out, a.level)?
        }
        None => {
            let draft = Draft::initial(&a.federation, arch.map(str::to_string));
            let sealed = ferry_bundle::seal(draft, &payload, &key, a.level)?;
            (sealed.write_to_dir(&a.out)?, sealed)
        }
    };
    println!(
        "wrote {} ({} bytes), {}",
        path.display(),
        sealed.bytes.len(),
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

fn merge(a: &MergeArgs) -> Result<()> {
    let key = SecretKey::read(&a.key)?;
    let keyring = a.trust.keyring()?;
    let mut merge = ferry_merge::MergeConfig {
        strategy: a.strategy,
        weighting: a.weights,
        trim: a.trim,
        clip_norm: a.clip_norm,
        ..Default::default()
    };
    if let Some(lr) = a.server_lr {
        merge.fedavgm.lr = lr;
        merge.fedadam.lr = lr;
    }
    if let Some(bn) = &a.bn_names {
        merge.bn = bn.clone();
    }
    let config = ferry_merge::hq::RoundConfig {
        merge,
        min_sites: a.min_sites,
        max_samples: a.max_samples,
        level: a.level,
    };
    let pb = ferry_cli::spinner(format!(
        "verifying and merging {} update(s)",
        a.updates.len()
    ));
    let result =
        ferry_merge::hq::merge_round(&a.state, &key, &keyring, &a.updates, &config, &a.out);
    pb.finish_and_clear();
    let out = result?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "file": out.path, "hash": out.sealed.hash, "round": out.sealed.manifest.round,
                "report": out.report, "capped": out.capped,
            }))?
        );
        return Ok(());
    }
    println!(
        "{:<12} {:>10} {:>8} {:>12}  bundle",
        "site", "samples", "weight", "distance"
    );
    for c in &out.report.contributions {
        let clip = if c.clipped {
            format!(" (clipped x{:.3})", c.scale)
        } else {
            String::new()
        };
        println!(
            "{:<12} {:>10} {:>8.4} {:>12.4}  {}{clip}",
            c.site,
            c.samples,
            c.weight,
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
        eprintln!("warning: {}'s update is far from the others (distance {:.3}); consider --clip-norm or a robust strategy", o.site, o.distance);
    }
    for s in &out.capped {
        eprintln!("warning: {s}'s sample count was capped at --max-samples");
    }
    println!(
        "wrote {} ({} bytes), {}",
        out.path.display(),
        out.sealed.bytes.len(),
        describe(&out.sealed.manifest, &out.sealed.hash)
    );
    Ok(())
}

fn status(a: &StatusArgs) -> Result<()> {
    let s = ferry_merge::hq::status(&a.state)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{s}");
    }
    Ok(())
}

fn emit(a: &EmitArgs) -> Result<()> {
    let key = SecretKey::read(&a.key)?;
    let path = ferry_merge::hq::emit(&a.state, &key, &a.out)?;
    println!("wrote {}", path.display());
    Ok(())
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-server revoke --key keys/hq.key --federation city-cctv --serial 1 \\\n      --revoke keys/site-b.pub --reason \"laptop stolen\" --out revocations-1.ferry-rev\n\nCarry the list to every site and pass it with --revocations to import, verify and merge."
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
    #[arg(long, required = true)]
    revoke: Vec<PathBuf>,
    /// Why, in words (shown to operators).
    #[arg(long, default_value = "revoked by HQ")]
    reason: String,
    /// The list file to write (must not exist).
    #[arg(long)]
    out: PathBuf,
}

fn revoke(a: &RevokeArgs) -> Result<()> {
    let key = SecretKey::read(&a.key)?;
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
    let list = ferry_bundle::revocation::RevocationList::new(
        &a.federation,
        a.serial,
        ferry_bundle::unix_now(),
        revoked,
    );
    let bytes = ferry_bundle::revocation::sign(&list, &key)?;
    ferry_bundle::fsutil::write_new_verified(&a.out, &bytes)?;
    println!(
        "wrote {} revoking {} key(s)",
        a.out.display(),
        a.revoke.len()
    );
    Ok(())
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_cli::run_main("ferry-server", || match &cli.command {
        Command::Keygen(a) => ferry_cli::keygen(a, Role::Hq),
        Command::Init(a) => init(a),
        Command::Merge(a) => merge(a),
        Command::Status(a) => status(a),
        Command::Emit(a) => emit(a),
        Command::Revoke(a) => revoke(a),
        Command::Verify(a) => ferry_cli::verify(a),
        Command::Inspect(a) => ferry_cli::inspect(a),
        Command::Unpack(a) => ferry_cli::unpack(a),
        Command::SignFile(a) => ferry_cli::release::sign_file(a),
        Command::VerifyFile(a) => ferry_cli::release::verify_file(a),
        Command::Completions(a) => ferry_cli::release::completions(Cli::command(), a),
        Command::Man(a) => ferry_cli::release::man(Cli::command(), a),
    })
}
