//! Command-line pieces shared by `ferry-client` and `ferry-server`: the bundle commands both tools offer
//! (keygen, verify, inspect, unpack), printing, progress and exit codes. Binaries stay thin by calling these.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::keys::{KeyError, Protection};
use ferry_bundle::{
    escape, escape_path, fsutil, short, BundleKind, Keyring, Manifest, Role, SecretKey,
};

pub mod layout;
pub mod release;
pub mod settings;

/// Exit status when an input was refused or an operation failed.
pub const EXIT_FAILURE: u8 = 1;
/// Exit status for a usage error (clap uses the same).
pub const EXIT_USAGE: u8 = 2;

/// Run a tool's body, print `ferry-<tool>: <error>: <cause>...` once on failure, and map to an exit code.
/// Standard output closed by its reader (`inspect ... | head`) is a clean exit, status 0, as in ripgrep
/// (issue 17): the reader has what it wanted.
pub fn run_main(tool: &str, body: impl FnOnce() -> Result<()>) -> ExitCode {
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {}", error_line(&e));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// The error and its causes on one line, each said once: a cause that repeats its context is dropped, and a
/// context that only names a path is replaced by a cause that starts with that path (an I/O error names its
/// path itself; issue 17: "usb/: usb/: Is a directory").
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in e.chain().map(|c| c.to_string()) {
        if parts.iter().any(|p| p.contains(&c)) {
            continue;
        }
        match parts.last_mut() {
            Some(last) if c.starts_with(last.as_str()) => *last = c,
            _ => parts.push(c),
        }
    }
    parts.join(": ")
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StdoutError>()
            .is_some_and(|s| s.0.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Standard output could not be written. [`outln!`] returns it; [`run_main`] treats a broken pipe as a clean
/// exit and reports anything else (a full disk behind `> file`).
#[derive(Debug)]
pub struct StdoutError(pub std::io::Error);

impl std::fmt::Display for StdoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write to standard output: {}", self.0)
    }
}

impl std::error::Error for StdoutError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// `println!` that returns [`StdoutError`] from the enclosing function (which returns `anyhow::Result`)
/// instead of panicking when stdout is closed.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let ::std::result::Result::Err(e) = ::std::writeln!(::std::io::stdout().lock(), $($arg)*) {
            return ::std::result::Result::Err($crate::StdoutError(e).into());
        }
    }};
}

/// `print!` with [`outln!`]'s error handling.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use ::std::io::Write as _;
        if let ::std::result::Result::Err(e) = ::std::write!(::std::io::stdout().lock(), $($arg)*) {
            return ::std::result::Result::Err($crate::StdoutError(e).into());
        }
    }};
}

/// Print `value` as pretty JSON on stdout (the `--json` of every command that reports something).
pub fn print_json(value: &impl serde::Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// `n` and the noun, plural when `n` is not 1: "1 epoch", "0 contributors", "3 batches" (issue 17: no
/// "1 epochs", no "contributor(s)"). For regular English nouns.
pub fn count(n: u64, noun: &str) -> String {
    // A hard "ch" takes a plain "s": "2 epochs", not "2 epoches".
    let hard_ch = ["epoch"].contains(&noun);
    if n == 1 {
        format!("1 {noun}")
    } else if !hard_ch && ["s", "x", "ch", "sh"].iter().any(|e| noun.ends_with(e)) {
        format!("{n} {noun}es")
    } else {
        format!("{n} {noun}s")
    }
}

/// Refuse a directory where a bundle file is expected, naming a bundle inside it if there is one (issue 17:
/// `import usb/` said "usb/: usb/: Is a directory").
pub fn require_file(path: &Path) -> Result<()> {
    if !path.is_dir() {
        return Ok(());
    }
    let mut bundles: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "ferry") && p.is_file())
                .collect()
        })
        .unwrap_or_default();
    bundles.sort();
    let hint = match bundles.last() {
        Some(b) => format!(", e.g. {}", escape_path(b)),
        None => String::new(),
    };
    anyhow::bail!(
        "{} is a directory; give the bundle file in it{hint}",
        escape_path(path)
    )
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

impl TrustArgs {
    /// The `--revocations` files as (escaped name, bytes), unverified: for commands that verify and store them
    /// against their own state (`ferry-server merge`).
    pub fn revocation_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        read_revocation_files(&self.revocations)
    }
}

/// Read revocation list files (bounded) as (escaped name, bytes), unverified.
pub fn read_revocation_files(paths: &[PathBuf]) -> Result<Vec<(String, Vec<u8>)>> {
    paths
        .iter()
        .map(|p| Ok((escape_path(p), ferry_bundle::revocation::read_bytes(p)?)))
        .collect()
}

/// The environment variable a passphrase is read from, for scripts (issue 15 §4). Without it, a command that
/// needs a passphrase-protected key asks for the passphrase on the terminal.
pub const PASSPHRASE_ENV: &str = "FERRY_PASSPHRASE";

fn ask_passphrase(prompt: &str, path: &Path) -> std::result::Result<String, KeyError> {
    if let Some(p) = std::env::var_os(PASSPHRASE_ENV) {
        return p
            .into_string()
            .map_err(|_| KeyError::Invalid(format!("{PASSPHRASE_ENV} is not valid UTF-8")));
    }
    rpassword::prompt_password(prompt).map_err(|_| KeyError::NeedsPassphrase(path.to_path_buf()))
}

/// Read a secret key file; if it is passphrase-protected, the passphrase comes from `FERRY_PASSPHRASE` or is
/// asked for on the terminal.
pub fn read_secret_key(path: &Path) -> Result<SecretKey> {
    Ok(SecretKey::read_with(path, || {
        ask_passphrase(&format!("passphrase for {}: ", escape_path(path)), path)
            .map(ferry_bundle::keys::passphrase)
    })?)
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

/// Whose encrypted payloads this command may open: `--identity`, the operator's own secret keys (issue 15 §5).
#[derive(Debug, Clone, Default, Args)]
pub struct IdentityArgs {
    /// Your own secret key (.key), to read a payload encrypted to it (repeatable; a protected key asks for its
    /// passphrase or reads FERRY_PASSPHRASE). Example: --identity keys/site-a.key
    #[arg(long)]
    pub identity: Vec<PathBuf>,
}

impl IdentityArgs {
    /// Add each `--identity` key to `ring` as a decryption identity.
    pub fn apply(&self, ring: &mut Keyring) -> Result<()> {
        for p in &self.identity {
            ring.add_identity(&read_secret_key(p)?);
        }
        Ok(())
    }

    /// Whether any identity was given.
    pub fn is_empty(&self) -> bool {
        self.identity.is_empty()
    }
}

/// Parse `--encrypt-to` public key files: the keys a new bundle's payload is encrypted to (issue 15 §5). Each
/// may be a `.pub` file or a folder of them, as `--trust` takes.
pub fn encrypt_to_keys(paths: &[PathBuf]) -> Result<Vec<ferry_bundle::PublicKey>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    Ok(Keyring::load(paths)?.keys().cloned().collect())
}

/// Read and verify one bundle file into memory, with a spinner for big files.
pub fn open_bundle(path: &Path, keyring: &Keyring) -> Result<ferry_bundle::Bundle> {
    with_spinner(path, "verifying", || ferry_bundle::open_file(path, keyring))
}

/// Run `f` on the bundle at `path` behind a spinner when the file is big; errors name the file.
pub fn with_spinner<T>(
    path: &Path,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, ferry_bundle::OpenError>,
) -> Result<T> {
    require_file(path)?;
    let big = std::fs::metadata(path)
        .map(|m| m.len() > SPINNER_BYTES)
        .unwrap_or(false);
    let pb = big.then(|| spinner(format!("{what} {}", escape_path(path))));
    let r = f().with_context(|| escape_path(path));
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    r
}

/// Arguments of `keygen`.
#[derive(Debug, Args)]
#[command(
    after_help = "Writes <ID>.key (secret, mode 0600) and <ID>.pub (give this one to the other side).\n\nExamples:\n  keygen --id site-a --out keys/\n  keygen --id site-a --out keys/ --protect        # asks for a passphrase twice\n  FERRY_PASSPHRASE=... keygen --id hq --out keys/ --protect\n\nRead the printed fingerprint to the other side over the phone; they compare it with\n`fingerprint <ID>.pub` before trusting the key."
)]
pub struct KeygenArgs {
    /// Id of the key's owner: the site id (e.g. site-a) or the HQ id (e.g. hq).
    #[arg(long)]
    pub id: String,
    /// Directory to write the key pair into.
    #[arg(long, default_value = "keys")]
    pub out: PathBuf,
    /// Protect the secret key with a passphrase (age, scrypt): asked twice on the terminal, or taken from
    /// FERRY_PASSPHRASE. Every command that uses the key then asks for it (or reads FERRY_PASSPHRASE).
    #[arg(long)]
    pub protect: bool,
    /// Print JSON: the two files, the key id and the fingerprint.
    #[arg(long)]
    pub json: bool,
}

/// `keygen`: make a key pair of the given role.
pub fn keygen(args: &KeygenArgs, role: Role) -> Result<()> {
    let sk = SecretKey::generate(role, &args.id)?;
    let (secret, public) = if args.protect {
        let probe = args.out.join(format!("{}.key", args.id));
        let first = ask_passphrase("passphrase for the new key: ", &probe)?;
        if std::env::var_os(PASSPHRASE_ENV).is_none() {
            let again = ask_passphrase("the same passphrase again: ", &probe)?;
            if again != first {
                anyhow::bail!("the two passphrases differ; nothing was written");
            }
        }
        if first.is_empty() {
            anyhow::bail!("an empty passphrase protects nothing; nothing was written");
        }
        let protection = Protection::passphrase(ferry_bundle::keys::passphrase(first));
        sk.write_pair_protected(&args.out, &protection)?
    } else {
        sk.write_pair(&args.out)?
    };
    if args.json {
        let pk = sk.public();
        return print_json(&serde_json::json!({
            "secret": escape_path(&secret), "public": escape_path(&public), "role": pk.role.to_string(),
            "id": escape(&pk.id), "key_id": pk.key_id_hex(), "fingerprint": pk.fingerprint(),
            "protected": args.protect,
        }));
    }
    let protected = if args.protect {
        ", protected by a passphrase"
    } else {
        ""
    };
    outln!(
        "wrote {} (secret{protected}, keep it here)",
        escape_path(&secret)
    );
    outln!(
        "wrote {} (public, key id {})",
        escape_path(&public),
        sk.public().key_id_hex()
    );
    outln!("fingerprint {}", sk.public().fingerprint());
    outln!(
        "age recipient {} (payloads encrypted to this key: --encrypt-to {})",
        sk.public().recipient_text(),
        escape_path(&public)
    );
    Ok(())
}

/// Arguments of `fingerprint`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  fingerprint keys/hq.pub\n\nRead the fingerprint aloud and compare all 16 groups with the key's owner before trusting it."
)]
pub struct FingerprintArgs {
    /// Public key files (.pub).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print one JSON object per key.
    #[arg(long)]
    pub json: bool,
}

/// `fingerprint`: show each key's role, id, key id and full fingerprint.
pub fn fingerprint(args: &FingerprintArgs) -> Result<()> {
    for f in &args.files {
        let k = ferry_bundle::PublicKey::read(f)?;
        if args.json {
            let v = serde_json::json!({"file": escape_path(f), "role": k.role.to_string(), "id": escape(&k.id),
                "key_id": k.key_id_hex(), "fingerprint": k.fingerprint(), "age_recipient": k.recipient_text()});
            outln!("{v}");
            continue;
        }
        outln!(
            "{}  {} {}  key id {}\n  fingerprint {}\n  age recipient {}",
            escape_path(f),
            k.role,
            escape(&k.id),
            k.key_id_hex(),
            k.fingerprint(),
            k.recipient_text()
        );
    }
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
    /// Keys that open encrypted payloads. Without one, an encrypted bundle's signature and ciphertext are
    /// verified and its tensors are not.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Print one JSON object per file.
    #[arg(long)]
    pub json: bool,
    /// Bundle files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `verify`: check each file; fails if any does not verify.
pub fn verify(args: &VerifyArgs) -> Result<()> {
    let mut ring = args.trust.keyring()?;
    args.identity.apply(&mut ring)?;
    let mut failed = 0;
    for f in &args.files {
        // Verified as a stream, the payload checked and dropped: memory stays at a few chunks. An encrypted
        // payload without an identity: signature and ciphertext hash only (issue 15 §5).
        let checked = with_spinner(f, "verifying", || {
            match ferry_bundle::open_file_into(f, &ring, std::io::sink()) {
                Err(ferry_bundle::OpenError::Encrypted(_)) => {
                    let i = ferry_bundle::identify_file(f, &ring)?;
                    Ok((i.manifest, i.hash, false))
                }
                r => r.map(|o| (o.manifest, o.hash, true)),
            }
        });
        match checked {
            Ok((manifest, hash, opened)) => {
                let sealed_to = (!opened)
                    .then(|| {
                        manifest
                            .encryption
                            .as_ref()
                            .map(|e| e.describe_recipients())
                    })
                    .flatten();
                if args.json {
                    let v = serde_json::json!({"file": escape_path(f), "ok": true, "hash": hash,
                        "decrypted": opened, "manifest": manifest});
                    outln!("{v}");
                } else {
                    outln!("OK    {}  {}", escape_path(f), describe(&manifest, &hash));
                    if let Some(to) = sealed_to {
                        outln!(
                            "      payload encrypted to {to}: signature and ciphertext hash verified; its tensors \
                             are checked with --identity"
                        );
                    }
                }
            }
            Err(e) => {
                failed += 1;
                // The line starts with the file, already printed in its column.
                let line = error_line(&e);
                let name = escape_path(f);
                let msg = line
                    .strip_prefix(&format!("{name}: "))
                    .unwrap_or(&line)
                    .to_string();
                if args.json {
                    outln!(
                        "{}",
                        serde_json::json!({"file": escape_path(f), "ok": false, "error": msg})
                    );
                } else {
                    outln!("FAIL  {}  {msg}", escape_path(f));
                }
            }
        }
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {} failed verification",
            count(args.files.len() as u64, "bundle")
        );
    }
    Ok(())
}

/// One line describing a manifest.
pub fn describe(m: &Manifest, hash: &str) -> String {
    let who = match (&m.kind, &m.site) {
        (BundleKind::Update, Some(s)) => {
            format!(
                "update from {} ({})",
                escape(&s.id),
                count(s.samples, "sample")
            )
        }
        _ if m.contributors.is_empty() => "global (initial model)".to_string(),
        _ => format!(
            "global ({})",
            count(m.contributors.len() as u64, "contributor")
        ),
    };
    format!(
        "{who}, federation {}, round {}, {}, signed by {} {} [{}], sha256 {}",
        escape(&m.federation),
        m.round,
        count(m.tensors.len() as u64, "tensor"),
        m.signer.role,
        escape(&m.signer.id),
        escape(&m.signer.key_id),
        short(hash)
    )
}

/// Arguments of `inspect`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  inspect /media/usb/global-r3.ferry | head -20\n  inspect --json /media/usb/site-a-r3.ferry\n\nReads the header without any key: nothing shown is verified. Use `verify` to check it."
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
    require_file(&args.file)?;
    let i = ferry_bundle::inspect_file(&args.file).with_context(|| escape_path(&args.file))?;
    if args.json {
        let v = serde_json::json!({
            "verified": false,
            "file": escape_path(&args.file),
            "sha256": i.hash,
            "file_len": i.file_len,
            "header_len": i.header_len,
            "payload_len": i.payload_len,
            "format": i.version,
            "key_id": i.key_id,
            "manifest": i.manifest.as_ref().ok(),
            "manifest_error": i.manifest.as_ref().err(),
        });
        return print_json(&v);
    }
    outln!("UNVERIFIED: shown without checking the signature; run `verify --trust ...` before trusting it.");
    outln!(
        "file        {} ({} bytes, sha256 {})",
        escape_path(&args.file),
        i.file_len,
        i.hash
    );
    outln!(
        "format      {} (header {} bytes, payload {} bytes)",
        i.version,
        i.header_len,
        i.payload_len
    );
    outln!("key id      {}", i.key_id);
    let m = match &i.manifest {
        Ok(m) => m,
        Err(e) => anyhow::bail!("manifest cannot be read: {e}"),
    };
    outln!("kind        {}", m.kind);
    outln!("federation  {}", escape(&m.federation));
    outln!(
        "arch        {}",
        m.arch
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "(foreign weights)".into())
    );
    outln!("round       {}", m.round);
    outln!("base        {}", m.base.as_deref().unwrap_or("(none)"));
    if let Some(r) = &m.revocations {
        outln!(
            "revocations list {} (sha256 {})",
            r.serial,
            short(&r.sha256)
        );
    }
    if let Some(e) = m.expires {
        outln!("expires     {}", ferry_bundle::utc(e));
    }
    if let Some(s) = &m.site {
        outln!(
            "site        {} ({})",
            escape(&s.id),
            count(s.samples, "sample")
        );
    }
    for c in &m.contributors {
        outln!(
            "contributor {} {}, bundle {}",
            escape(&c.site),
            count(c.samples, "sample"),
            short(&c.bundle)
        );
    }
    if let Some(s) = &m.strategy {
        outln!("strategy    {}", escape(s));
    }
    outln!(
        "signer      {} {} [{}]",
        m.signer.role,
        escape(&m.signer.id),
        escape(&m.signer.key_id)
    );
    outln!("created     {}", ferry_bundle::utc(m.created));
    outln!("fingerprint {}", m.model_fingerprint);
    let ratio = m.payload.len as f64 / (m.payload.compressed_len.max(1)) as f64;
    outln!(
        "payload     {} -> {} bytes zstd ({ratio:.2}x), sha256 {}",
        m.payload.len,
        m.payload.compressed_len,
        m.payload.sha256
    );
    if let Some(e) = &m.encryption {
        outln!(
            "encrypted   {} to {}, {} bytes of ciphertext, sha256 {}",
            escape(&e.scheme),
            e.describe_recipients(),
            e.len,
            escape(&e.sha256)
        );
        outln!(
            "            with the standard tools: tail -c +{} FILE | age -d -i IDENTITY | zstd -d -o model.safetensors",
            i.header_len + 1
        );
    }
    outln!("tensors     {}", m.tensors.len());
    for t in &m.tensors {
        let n: usize = t.shape.iter().product();
        outln!(
            "  {:<40} {:<5} {:?} ({})",
            escape(&t.name),
            t.dtype,
            t.shape,
            count(n as u64, "value")
        );
    }
    Ok(())
}

/// Arguments of `age-identity`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  age-identity --key keys/hq.key --out hq.age\n  tail -c +HEADER_LEN+1 site-a-r3.ferry | age -d -i hq.age | zstd -d -o model.safetensors\n\n(inspect prints the exact tail command.) The identity is derived from the key: treat the file like the key."
)]
pub struct AgeIdentityArgs {
    /// Your secret key (.key).
    #[arg(long)]
    pub key: PathBuf,
    /// Where to write the age identity file (mode 0600; must not exist).
    #[arg(long)]
    pub out: PathBuf,
}

/// `age-identity`: write the age X25519 identity derived from a ferry key, for `age -d -i` (issue 15 §5).
pub fn age_identity(args: &AgeIdentityArgs) -> Result<()> {
    let sk = read_secret_key(&args.key)?;
    let text = sk.age_identity_file_text();
    fsutil::write_new_private(&args.out, text.as_bytes())?;
    outln!(
        "wrote {} (age identity for {}, mode 0600)",
        escape_path(&args.out),
        sk.public().recipient_text()
    );
    Ok(())
}

/// Arguments of `unpack`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  unpack --trust keys/hq.pub bundles/global-r3.ferry --out model.safetensors\n  unpack --json --trust keys/hq.pub bundles/global-r3.ferry --out model.safetensors\n\nThe output is a plain safetensors file (PyTorch: safetensors.torch.load_file)."
)]
pub struct UnpackArgs {
    /// Trusted keys and revocation lists.
    #[command(flatten)]
    pub trust: TrustArgs,
    /// Keys that open an encrypted payload.
    #[command(flatten)]
    pub identity: IdentityArgs,
    /// Bundle file.
    pub file: PathBuf,
    /// Where to write the safetensors file (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Print JSON: the file written, the bundle's hash and manifest.
    #[arg(long)]
    pub json: bool,
}

/// `unpack`: verify, then write the plain safetensors payload.
pub fn unpack(args: &UnpackArgs) -> Result<()> {
    let mut ring = args.trust.keyring()?;
    args.identity.apply(&mut ring)?;
    // The payload streams into a temp file beside --out, linked under its name only once it verified.
    let (manifest, hash, written) = fsutil::write_new_with(&args.out, |file| {
        let (manifest, hash) = with_spinner(&args.file, "verifying", || {
            let o = ferry_bundle::open_file_into(
                &args.file,
                &ring,
                std::io::BufWriter::new(&mut *file),
            )?;
            o.payload
                .into_inner()
                .map_err(|e| ferry_bundle::OpenError::Write(e.into_error()))?;
            Ok((o.manifest, o.hash))
        })?;
        // An update carrying a Fisher estimate (issue 14) unpacks to the model alone, so a PyTorch
        // `load_state_dict(strict=True)` loads it; the estimate is for HQ's merge.
        let written = if ferry_bundle::fisher::has_fisher(&manifest.tensor_metas()) {
            model_only(file)?
        } else {
            (manifest.tensors.len(), manifest.payload.len)
        };
        Ok::<_, anyhow::Error>((manifest, hash, written))
    })?;
    let (manifest, hash, (tensors, bytes)) = (manifest, hash, written);
    if args.json {
        return print_json(&serde_json::json!({
            "file": escape_path(&args.out), "bytes": bytes, "hash": hash, "manifest": manifest,
        }));
    }
    let fisher = manifest.tensors.len() - tensors;
    outln!(
        "wrote {} ({}, {bytes} bytes) from {}{}",
        escape_path(&args.out),
        count(tensors as u64, "tensor"),
        describe(&manifest, &hash),
        if fisher > 0 {
            format!(
                " (the model; its {} left out)",
                count(fisher as u64, "Fisher tensor")
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// Rewrite a verified payload in `file` as the model without its Fisher tensors; (tensors, bytes) written.
fn model_only(file: &mut std::fs::File) -> Result<(usize, u64)> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    let payload = ferry_bundle::Payload::from_safetensors_vec(bytes)?;
    let (model, _) = ferry_bundle::fisher::split(&payload)?;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(model.bytes())?;
    Ok((model.metas().len(), model.bytes().len() as u64))
}

/// Read a local weights file (safetensors) given by the operator.
pub fn read_weights(path: &Path) -> Result<ferry_bundle::Payload> {
    let bytes = fsutil::read_capped(path, 16 << 30)?;
    ferry_bundle::Payload::from_safetensors_vec(bytes).with_context(|| escape_path(path))
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_take_the_right_plural() {
        assert_eq!(count(1, "epoch"), "1 epoch");
        assert_eq!(count(2, "epoch"), "2 epochs");
        assert_eq!(count(3, "batch"), "3 batches");
        assert_eq!(count(0, "contributor"), "0 contributors");
        assert_eq!(count(2, "pass"), "2 passes");
        assert_eq!(count(1, "update"), "1 update");
    }
}
