//! `ferry-server`: HQ's tool. Verify site updates, merge them, sign the next global.
//! Every subcommand is a few lines over the ferry libraries.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
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
    /// Write the round-0 global bundle.
    Init(InitArgs),
    /// Check bundles against trusted keys.
    Verify(ferry_cli::VerifyArgs),
    /// Show a bundle's header and manifest without verifying it.
    Inspect(ferry_cli::InspectArgs),
    /// Verify a bundle and write its plain safetensors payload.
    Unpack(ferry_cli::UnpackArgs),
}

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-server init --key keys/hq.key --weights init.safetensors --federation city-cctv --out bundles/"
)]
struct InitArgs {
    /// HQ's secret key.
    #[arg(long)]
    key: PathBuf,
    /// Initial weights (safetensors), e.g. saved from PyTorch.
    #[arg(long)]
    weights: PathBuf,
    /// Federation name (1-64 of a-z 0-9 . _ -); every bundle of this federation carries it.
    #[arg(long)]
    federation: String,
    /// Directory to write global-r0.ferry into.
    #[arg(long, default_value = "bundles")]
    out: PathBuf,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
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
    let payload = read_weights(&a.weights)?;
    let sealed = ferry_bundle::seal(Draft::initial(&a.federation, None), &payload, &key, a.level)?;
    let path = sealed.write_to_dir(&a.out)?;
    println!(
        "wrote {} ({} bytes), {}",
        path.display(),
        sealed.bytes.len(),
        describe(&sealed.manifest, &sealed.hash)
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ferry_cli::run_main("ferry-server", || match &cli.command {
        Command::Keygen(a) => ferry_cli::keygen(a, Role::Hq),
        Command::Init(a) => init(a),
        Command::Verify(a) => ferry_cli::verify(a),
        Command::Inspect(a) => ferry_cli::inspect(a),
        Command::Unpack(a) => ferry_cli::unpack(a),
    })
}
