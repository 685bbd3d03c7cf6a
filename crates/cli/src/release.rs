//! Commands for installing and checking ferry itself rather than bundles (issue 17): shell completions and man
//! pages generated from the clap definitions (the `.deb` installs both), and detached file signatures, with which
//! a release's `SHA256SUMS` is signed and checked (`docs/install.md`).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::outln;
use clap::Args;
use ferry_bundle::{filesig, fsutil};

use crate::TrustArgs;

/// Arguments of `completions`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-client completions bash > ~/.local/share/bash-completion/completions/ferry-client\n\nThe .deb installs them for bash, zsh and fish."
)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    pub shell: clap_complete::Shell,
}

/// `completions`: print the completion script for `cmd` (the tool's whole clap definition) to stdout.
pub fn completions(mut cmd: clap::Command, args: &CompletionsArgs) -> Result<()> {
    let name = cmd.get_name().to_string();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, name, &mut script);
    use std::io::Write;
    std::io::stdout()
        .write_all(&script)
        .map_err(crate::StdoutError)?;
    Ok(())
}

/// Arguments of `man`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  ferry-client man | man -l -\n  ferry-client man --out man/    # ferry-client.1 and ferry-client-<command>.1 for each command"
)]
pub struct ManArgs {
    /// Write one page per command into this directory instead of printing the tool's page.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Man pages for `cmd` and each of its subcommands: (file name, roff).
fn man_pages(cmd: &clap::Command) -> Result<Vec<(String, Vec<u8>)>> {
    let mut pages = Vec::new();
    let mut roff = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut roff)?;
    pages.push((format!("{}.1", cmd.get_name()), roff));
    // Not clap's own `help` command: `--help` and the pages themselves cover it.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        // Named `ferry-client-import`, with its usage line saying `ferry-client import`.
        let usage = format!("{} {}", cmd.get_name(), sub.get_name());
        pages.extend(man_pages(&sub.clone().name(name).bin_name(usage))?);
    }
    Ok(pages)
}

/// `man`: print the tool's man page, or write every page into `--out`.
pub fn man(mut cmd: clap::Command, args: &ManArgs) -> Result<()> {
    cmd.build();
    let pages = man_pages(&cmd)?;
    let Some(dir) = &args.out else {
        use std::io::Write;
        std::io::stdout()
            .write_all(&pages[0].1)
            .map_err(crate::StdoutError)?;
        return Ok(());
    };
    fsutil::ensure_dir(dir)?;
    for (name, roff) in &pages {
        fsutil::write_replace(&dir.join(name), roff)?;
    }
    outln!(
        "wrote {} man pages into {}",
        pages.len(),
        ferry_bundle::escape_path(dir)
    );
    Ok(())
}

/// Arguments of `sign-file`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry-server sign-file --key keys/ferry-release.key dist/SHA256SUMS\n\nWrites <FILE>.sig; check it with `ferry-client verify-file --trust ferry-release.pub <FILE>`."
)]
pub struct SignFileArgs {
    /// The secret key to sign with.
    #[arg(long)]
    pub key: PathBuf,
    /// The file to sign.
    pub file: PathBuf,
    /// Where to write the signature (must not exist) [default: <FILE>.sig].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn sig_path(file: &std::path::Path, given: &Option<PathBuf>) -> PathBuf {
    given.clone().unwrap_or_else(|| {
        let mut p = file.as_os_str().to_owned();
        p.push(".sig");
        p.into()
    })
}

/// `sign-file`: a detached signature over any file (a release's `SHA256SUMS`).
pub fn sign_file(args: &SignFileArgs) -> Result<()> {
    let key = crate::read_secret_key(&args.key)?;
    let out = sig_path(&args.file, &args.out);
    filesig::sign_file(&args.file, &out, &key)?;
    let public = key.public();
    outln!(
        "wrote {} (signature of {} by {} {} [{}])",
        ferry_bundle::escape_path(&out),
        ferry_bundle::escape_path(&args.file),
        public.role,
        public.id,
        public.key_id_hex()
    );
    Ok(())
}

/// Arguments of `verify-file`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example (a release):\n  ferry-client verify-file --trust ferry-release.pub SHA256SUMS && sha256sum -c SHA256SUMS"
)]
pub struct VerifyFileArgs {
    /// Trusted keys and revocation lists.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// The signed file.
    pub file: PathBuf,
    /// The signature [default: <FILE>.sig].
    #[arg(long)]
    pub sig: Option<PathBuf>,
}

/// `verify-file`: check a detached signature made by `sign-file`.
pub fn verify_file(args: &VerifyFileArgs) -> Result<()> {
    let ring = args.trust.keyring()?;
    let sig = sig_path(&args.file, &args.sig);
    let key = filesig::verify_file(&args.file, &sig, &ring)
        .with_context(|| ferry_bundle::escape_path(&args.file))?;
    outln!(
        "OK    {}  signed by {} {} [{}]",
        ferry_bundle::escape_path(&args.file),
        key.role,
        key.id,
        key.key_id_hex()
    );
    Ok(())
}
