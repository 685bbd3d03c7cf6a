//! `ferry-client`: the site's tool. Import HQ's global, train on local data, export a signed update.
//! Every subcommand is a few lines over the ferry libraries.

mod train_cmds;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use ferry_bundle::{short, Draft, Role, SecretKey};
use ferry_cli::{describe, open_bundle, read_weights};
use ferry_site::{ImportOutcome, ImportPolicy, SiteState, DEFAULT_MAX_ROUND_JUMP};

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
    /// Make this site's key pair (<ID>.key secret, <ID>.pub for HQ).
    Keygen(ferry_cli::KeygenArgs),
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
    /// Seal the locally trained model as an update bundle for HQ.
    Export(ExportArgs),
    /// Check bundles against trusted keys.
    Verify(ferry_cli::VerifyArgs),
    /// Show a bundle's header and manifest without verifying it.
    Inspect(ferry_cli::InspectArgs),
    /// Verify a bundle and write its plain safetensors payload.
    Unpack(ferry_cli::UnpackArgs),
    /// Check a file's detached signature (<FILE>.sig), e.g. a release's SHA256SUMS.
    VerifyFile(ferry_cli::release::VerifyFileArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(ferry_cli::release::CompletionsArgs),
    /// Print the man page, or write one per command with --out.
    Man(ferry_cli::release::ManArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-client pack --key keys/site-a.key --weights model.safetensors --samples 80000 \\\n      --base global-r3.ferry --trust keys/hq.pub --out /media/usb/\n\nWrites <OUT>/<site>-r<round>.ferry; round, federation and base hash come from the base global."
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
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-client import --trust keys/hq.pub --state site/ /media/usb/global-r4.ferry\n\nRefuses older globals (rollback), other federations and big round jumps; importing the current global again does nothing."
)]
struct ImportArgs {
    #[command(flatten)]
    trust: ferry_cli::TrustArgs,
    /// The site's state directory.
    #[arg(long)]
    state: PathBuf,
    /// Refuse a global more than this many rounds ahead of the one held.
    #[arg(long, default_value_t = DEFAULT_MAX_ROUND_JUMP)]
    max_round_jump: u64,
    /// The global bundle.
    file: PathBuf,
}

#[derive(Debug, Args)]
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
    after_help = "Example:\n  ferry-client export --state site/ --key keys/site-a.key --out /media/usb/"
)]
struct ExportArgs {
    /// The site's state directory.
    #[arg(long)]
    state: PathBuf,
    /// This site's secret key.
    #[arg(long)]
    key: PathBuf,
    /// Directory to write the update into (e.g. the mounted stick).
    #[arg(long, default_value = "bundles")]
    out: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
}

fn pack(a: &PackArgs) -> Result<()> {
    let key = SecretKey::read(&a.key)?;
    if key.role() != Role::Site {
        anyhow::bail!(
            "{} is an hq key; updates are signed with the site's own key",
            a.key.display()
        );
    }
    let ring = a.trust.keyring()?;
    let base = open_bundle(&a.base, &ring).context("base global")?;
    if base.manifest.kind != ferry_bundle::BundleKind::Global {
        anyhow::bail!(
            "{} is not a global bundle; --base takes the global the weights were trained from",
            a.base.display()
        );
    }
    let payload = read_weights(&a.weights)?;
    if payload.fingerprint() != base.manifest.model_fingerprint {
        anyhow::bail!(
            "{}: tensor names, dtypes or shapes differ from the base global's model; HQ would refuse this update",
            a.weights.display()
        );
    }
    let draft = Draft::update_for(&base.manifest, &base.hash, key.id(), a.samples);
    let sealed = ferry_bundle::seal(draft, &payload, &key, a.level)?;
    let path = sealed.write_to_dir(&a.out)?;
    println!(
        "wrote {} ({} bytes), {}",
        path.display(),
        sealed.bytes.len(),
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

fn import(a: &ImportArgs) -> Result<()> {
    let ring = a.trust.keyring()?;
    let bundle = open_bundle(&a.file, &ring)?;
    let state = SiteState::at(&a.state);
    let policy = ImportPolicy {
        max_round_jump: a.max_round_jump,
    };
    match state.import_new(&bundle, &a.file.display().to_string(), &policy)? {
        ImportOutcome::AlreadyCurrent => {
            println!(
                "already current: round {} ({}), nothing to do",
                bundle.manifest.round,
                short(&bundle.hash)
            )
        }
        ImportOutcome::Installed { previous } => {
            let from = previous
                .map(|p| format!(" (was round {})", p.round))
                .unwrap_or_default();
            println!(
                "imported round {}{from}: {}",
                bundle.manifest.round,
                describe(&bundle.manifest, &bundle.hash)
            );
            println!(
                "model for the recogniser: {}",
                state.current_model_path().display()
            );
        }
    }
    Ok(())
}

fn status(a: &StatusArgs) -> Result<()> {
    let state = SiteState::open(&a.state)?;
    let cur = state.current()?;
    let local = state.local()?;
    let pending = state.pending_export()?;
    if a.json {
        let v = serde_json::json!({"global": cur, "previous": state.previous()?, "local": local, "pending_export": pending});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let Some(g) = cur else {
        println!("no global imported yet; run `ferry-client import`");
        return Ok(());
    };
    println!("federation  {}", g.federation);
    println!("round       {}", g.round);
    println!("global      {}", g.hash);
    println!(
        "arch        {}",
        g.arch
            .as_deref()
            .unwrap_or("(foreign weights: import and re-pack only)")
    );
    println!("imported    {} (unix) from {}", g.imported_at, g.source);
    println!("model file  {}", state.current_model_path().display());
    match local {
        Some(l) if l.base_hash == g.hash => match &l.exported {
            Some(h) => println!(
                "local       trained ({} samples, {} epochs), exported as {}",
                l.samples,
                l.epochs,
                short(h)
            ),
            None => println!(
                "local       trained ({} samples, {} epochs), WAITING TO BE EXPORTED",
                l.samples, l.epochs
            ),
        },
        Some(l) => println!(
            "local       trained from an older global (round {}); train again",
            l.round
        ),
        None => println!("local       not trained this round"),
    }
    Ok(())
}

fn export(a: &ExportArgs) -> Result<()> {
    let key = SecretKey::read(&a.key)?;
    let state = SiteState::open(&a.state)?;
    let lock = state.lock()?;
    let (path, sealed) = state.export(&lock, &key, &a.out, a.level)?;
    println!(
        "wrote {} ({} bytes), {}",
        path.display(),
        sealed.bytes.len(),
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

// candle allocates and frees many large buffers per step; glibc's malloc returns them to the kernel each time
// (page faults, ~45 % system time). mimalloc keeps them (issue 7).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_cli::run_main("ferry-client", || match &cli.command {
        Command::Keygen(a) => ferry_cli::keygen(a, Role::Site),
        Command::Pack(a) => pack(a),
        Command::Import(a) => import(a),
        Command::Status(a) => status(a),
        Command::Train(a) => train_cmds::run_train(a),
        Command::Eval(a) => train_cmds::run_eval(a),
        Command::Recalibrate(a) => train_cmds::run_recalibrate(a),
        Command::Export(a) => export(a),
        Command::Verify(a) => ferry_cli::verify(a),
        Command::Inspect(a) => ferry_cli::inspect(a),
        Command::Unpack(a) => ferry_cli::unpack(a),
        Command::VerifyFile(a) => ferry_cli::release::verify_file(a),
        Command::Completions(a) => ferry_cli::release::completions(Cli::command(), a),
        Command::Man(a) => ferry_cli::release::man(Cli::command(), a),
    })
}
