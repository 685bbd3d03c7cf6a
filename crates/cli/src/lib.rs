//! Command-line pieces shared by `ferry-client` and `ferry-server`: the bundle commands both tools offer
//! (keygen, verify, inspect, unpack), printing, progress and exit codes. Binaries stay thin by calling these.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::{escape, fsutil, short, BundleKind, Keyring, Manifest, Role, SecretKey};

pub mod release;

/// Exit status when an input was refused or an operation failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for a usage error (clap uses the same).
pub const EXIT_USAGE: u8 = 2;

/// Run a tool's body, print `ferry-<tool>: <error>: <cause>...` once on failure, and map to an exit code.
pub fn run_main(tool: &str, body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            // Collapse a cause that merely repeats its context.
            let mut parts: Vec<String> = Vec::new();
            for c in chain {
                if !parts.iter().any(|p| p.contains(&c)) {
                    parts.push(c);
                }
            }
            eprintln!("{tool}: {}", parts.join(": "));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A spinner on stderr for work on big files (hidden when stderr is not a terminal).
pub fn spinner(msg: impl Into<String>) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg.into());
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

/// Show a spinner only for files above this size.
pub const SPINNER_BYTES: u64 = 8 << 20;

/// Which keys to trust: `--trust` public keys, minus those revoked by HQ-signed `--revocations` lists.
#[derive(Debug, Clone, Args)]
pub struct TrustArgs {
    /// A trusted .pub file or a directory of them (repeatable).
    #[arg(long, required = true)]
    pub trust: Vec<PathBuf>,
    /// An HQ-signed revocation list (.ferry-rev); bundles from the keys it names are refused (repeatable).
    #[arg(long)]
    pub revocations: Vec<PathBuf>,
}

impl TrustArgs {
    /// Load the keyring and apply the revocation lists (each verified against the trusted HQ keys).
    pub fn keyring(&self) -> Result<Keyring> {
        let mut ring = load_keyring(&self.trust)?;
        ferry_bundle::revocation::load(&self.revocations, &mut ring)?;
        Ok(ring)
    }
}

/// `--trust` paths loaded into a keyring.
pub fn load_keyring(trust: &[PathBuf]) -> Result<Keyring> {
    if trust.is_empty() {
        anyhow::bail!(
            "no trusted keys given: pass --trust with a .pub file or a directory of them"
        );
    }
    Ok(Keyring::load(trust)?)
}

/// Read and verify one bundle file, with a spinner for big files.
pub fn open_bundle(path: &Path, keyring: &Keyring) -> Result<ferry_bundle::Bundle> {
    let big = std::fs::metadata(path)
        .map(|m| m.len() > SPINNER_BYTES)
        .unwrap_or(false);
    let pb = big.then(|| spinner(format!("verifying {}", path.display())));
    let r = ferry_bundle::open_file(path, keyring).with_context(|| format!("{}", path.display()));
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    r
}

/// Arguments of `keygen`.
#[derive(Debug, Args)]
#[command(
    after_help = "Writes <ID>.key (secret, mode 0600) and <ID>.pub (give this one to the other side)."
)]
pub struct KeygenArgs {
    /// Id of the key's owner: the site id (e.g. site-a) or the HQ id (e.g. hq).
    #[arg(long)]
    pub id: String,
    /// Directory to write the key pair into.
    #[arg(long, default_value = "keys")]
    pub out: PathBuf,
}

/// `keygen`: make a key pair of the given role.
pub fn keygen(args: &KeygenArgs, role: Role) -> Result<()> {
    let sk = SecretKey::generate(role, &args.id)?;
    let (secret, public) = sk.write_pair(&args.out)?;
    println!("wrote {} (secret, keep it here)", secret.display());
    println!(
        "wrote {} (public, key id {})",
        public.display(),
        sk.public().key_id_hex()
    );
    Ok(())
}

/// Arguments of `verify`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  verify --trust keys/hq.pub bundles/global-r3.ferry\n\nExit status 0 only if every file verifies."
)]
pub struct VerifyArgs {
    /// Trusted keys and revocation lists.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Print one JSON object per file.
    #[arg(long)]
    pub json: bool,
    /// Bundle files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `verify`: check each file; fails if any does not verify.
pub fn verify(args: &VerifyArgs) -> Result<()> {
    let ring = args.trust.keyring()?;
    let mut failed = 0;
    for f in &args.files {
        match open_bundle(f, &ring) {
            Ok(b) => {
                if args.json {
                    let v = serde_json::json!({"file": f, "ok": true, "hash": b.hash, "manifest": b.manifest});
                    println!("{v}");
                } else {
                    println!("OK    {}  {}", f.display(), describe(&b.manifest, &b.hash));
                }
            }
            Err(e) => {
                failed += 1;
                let msg = e
                    .chain()
                    .skip(1)
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(": ");
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({"file": f, "ok": false, "error": msg})
                    );
                } else {
                    println!("FAIL  {}  {msg}", f.display());
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} bundle(s) failed verification",
            args.files.len()
        );
    }
    Ok(())
}

/// One line describing a manifest.
pub fn describe(m: &Manifest, hash: &str) -> String {
    let who = match (&m.kind, &m.site) {
        (BundleKind::Update, Some(s)) => {
            format!("update from {} ({} samples)", escape(&s.id), s.samples)
        }
        _ => format!("global ({} contributor(s))", m.contributors.len()),
    };
    format!(
        "{who}, federation {}, round {}, {} tensors, signed by {} {} [{}], sha256 {}",
        escape(&m.federation),
        m.round,
        m.tensors.len(),
        m.signer.role,
        escape(&m.signer.id),
        escape(&m.signer.key_id),
        short(hash)
    )
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
#[command(
    after_help = "Reads the header without any key: nothing shown is verified. Use `verify` to check it."
)]
pub struct InspectArgs {
    /// Bundle file.
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `inspect`: show a bundle's header and manifest, clearly marked unverified.
pub fn inspect(args: &InspectArgs) -> Result<()> {
    let bytes = fsutil::read_capped(&args.file, ferry_bundle::MAX_BUNDLE_BYTES)?;
    let i = ferry_bundle::inspect(&bytes).with_context(|| format!("{}", args.file.display()))?;
    if args.json {
        let v = serde_json::json!({
            "verified": false,
            "file": args.file,
            "sha256": i.hash,
            "file_len": i.file_len,
            "header_len": i.header_len,
            "payload_len": i.payload_len,
            "format": i.version,
            "key_id": i.key_id,
            "manifest": i.manifest.as_ref().ok(),
            "manifest_error": i.manifest.as_ref().err(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("UNVERIFIED: shown without checking the signature; run `verify --trust ...` before trusting it.");
    println!(
        "file        {} ({} bytes, sha256 {})",
        args.file.display(),
        i.file_len,
        i.hash
    );
    println!(
        "format      {} (header {} bytes, payload {} bytes)",
        i.version, i.header_len, i.payload_len
    );
    println!("key id      {}", i.key_id);
    let m = match &i.manifest {
        Ok(m) => m,
        Err(e) => anyhow::bail!("manifest cannot be read: {e}"),
    };
    println!("kind        {}", m.kind);
    println!("federation  {}", escape(&m.federation));
    println!(
        "arch        {}",
        m.arch
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "(foreign weights)".into())
    );
    println!("round       {}", m.round);
    println!("base        {}", m.base.as_deref().unwrap_or("(none)"));
    if let Some(s) = &m.site {
        println!("site        {} ({} samples)", escape(&s.id), s.samples);
    }
    for c in &m.contributors {
        println!(
            "contributor {} {} samples, bundle {}",
            escape(&c.site),
            c.samples,
            short(&c.bundle)
        );
    }
    if let Some(s) = &m.strategy {
        println!("strategy    {}", escape(s));
    }
    println!(
        "signer      {} {} [{}]",
        m.signer.role,
        escape(&m.signer.id),
        escape(&m.signer.key_id)
    );
    println!("created     {} (unix seconds)", m.created);
    println!("fingerprint {}", m.model_fingerprint);
    let ratio = m.payload.len as f64 / (m.payload.compressed_len.max(1)) as f64;
    println!(
        "payload     {} -> {} bytes zstd ({ratio:.2}x), sha256 {}",
        m.payload.len, m.payload.compressed_len, m.payload.sha256
    );
    println!("tensors     {}", m.tensors.len());
    for t in &m.tensors {
        let n: usize = t.shape.iter().product();
        println!(
            "  {:<40} {:<5} {:?} ({n} values)",
            escape(&t.name),
            t.dtype,
            t.shape
        );
    }
    Ok(())
}

/// Arguments of `unpack`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  unpack --trust keys/hq.pub bundles/global-r3.ferry --out model.safetensors\n\nThe output is a plain safetensors file (PyTorch: safetensors.torch.load_file)."
)]
pub struct UnpackArgs {
    /// Trusted keys and revocation lists.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Bundle file.
    pub file: PathBuf,
    /// Where to write the safetensors file (must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// `unpack`: verify, then write the plain safetensors payload.
pub fn unpack(args: &UnpackArgs) -> Result<()> {
    let ring = args.trust.keyring()?;
    let b = open_bundle(&args.file, &ring)?;
    fsutil::write_new(&args.out, b.payload())?;
    println!(
        "wrote {} ({} tensors, {} bytes) from {}",
        args.out.display(),
        b.metas().len(),
        b.payload().len(),
        describe(&b.manifest, &b.hash)
    );
    Ok(())
}

/// Read a local weights file (safetensors) given by the operator.
pub fn read_weights(path: &Path) -> Result<ferry_bundle::Payload> {
    let bytes = fsutil::read_capped(path, 16 << 30)?;
    ferry_bundle::Payload::from_safetensors(&bytes).with_context(|| format!("{}", path.display()))
}
