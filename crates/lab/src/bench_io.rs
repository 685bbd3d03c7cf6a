//! `ferry-lab bench bundle|merge` (issue 13): the bundle path's wall time and peak memory, measured on the real
//! tools (`ferry-client pack` and `verify`, `ferry-server merge`, run as child processes so each has its own peak
//! RSS), next to the raw `zstd | sha256sum` pass on the same bytes, an older ferry binary (`--before`) and the
//! Python reference (`bench/merge_ref.py`) when asked, alternating round by round so a change in the machine's
//! load does not favour one side.
//!
//! Inputs are generated with a fixed seed: f32 weights drawn from N(0, 0.02²) (they compress like trained
//! weights, about 8 %), one tensor holding almost all of the model (the worst case for a merge that holds whole
//! tensors), plus a small layer and a BatchNorm pair. `--synthetic` instead runs the merge engine in this process
//! on generated inputs, never written to disk, to measure memory at sizes the disk cannot hold (50 × 500 MB).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_bundle::{Draft, Dtype, Payload, Role, SecretKey, TensorMeta, TensorRef};
use ferry_merge::{
    Contribution, MergeConfig, MergeError, OwnedTensor, ServerState, Strategy, TensorSource,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};

/// What `bench bundle` and `bench merge` run.
#[derive(Debug, Clone)]
pub struct IoBenchConfig {
    /// Working folder (inputs are generated once and kept there).
    pub dir: PathBuf,
    /// Model size in MiB.
    pub size_mb: usize,
    /// Sites (merge only).
    pub sites: usize,
    /// Merge strategy.
    pub strategy: Strategy,
    /// Alternating rounds.
    pub rounds: usize,
    /// The ferry binary under test (`ferry-client` for bundle, `ferry-server` for merge).
    pub tool: PathBuf,
    /// An older binary of the same tool, measured in the same rounds.
    pub before: Option<PathBuf>,
    /// The Python merge reference (`bench/merge_ref.py`), run with `python3` in the same rounds.
    pub python: Option<PathBuf>,
}

/// The sibling binary `name` of this executable (`target/release/ferry-client` next to `ferry-lab`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found; build it (cargo build --release -p {name}) or pass its path",
            p.display()
        );
    }
    Ok(p)
}

fn f32_bytes(vals: impl Iterator<Item = f32>) -> Vec<u8> {
    vals.flat_map(f32::to_le_bytes).collect()
}

/// A model of `size_mb` MiB of f32: `embed.weight` holds almost all of it. `shift` moves every weight (an
/// update differs from the base by a small step).
fn model(size_mb: usize, seed: u64, shift: f32) -> Result<Vec<u8>> {
    let total = (size_mb << 20) / 4;
    let small = 64 * 64;
    let rows = (total.saturating_sub(small + 128)) / 256;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0f32, 0.02)?;
    let mut gen = |n: usize| f32_bytes((0..n).map(|_| normal.sample(&mut rng) + shift));
    let embed = gen(rows * 256);
    let fc = gen(small);
    let mean = gen(64);
    let var = f32_bytes((0..64).map(|i| 1.0 + i as f32 / 64.0 + shift.abs()));
    let refs = [
        TensorRef {
            name: "embed.weight",
            dtype: Dtype::F32,
            shape: &[rows, 256],
            data: &embed,
        },
        TensorRef {
            name: "fc.weight",
            dtype: Dtype::F32,
            shape: &[64, 64],
            data: &fc,
        },
        TensorRef {
            name: "bn.running_mean",
            dtype: Dtype::F32,
            shape: &[64],
            data: &mean,
        },
        TensorRef {
            name: "bn.running_var",
            dtype: Dtype::F32,
            shape: &[64],
            data: &var,
        },
    ];
    Ok(Payload::from_tensors(&refs)?.bytes().to_vec())
}

fn keypair(dir: &Path, role: Role, id: &str, seed: u8) -> Result<SecretKey> {
    let key = SecretKey::from_seed(role, id, [seed; 32]);
    if !dir.join(format!("{id}.key")).exists() {
        key.write_pair(dir)?;
    }
    Ok(key)
}

/// One measured run of a command: wall seconds, CPU seconds (user + system) and peak RSS (MiB) from GNU time.
fn measure(label: &str, cmd: &mut Command) -> Result<Value> {
    let rss = tempfile::NamedTempFile::new()?;
    let program = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut timed = Command::new("/usr/bin/time");
    timed
        .arg("-f")
        .arg("%M %U %S")
        .arg("-o")
        .arg(rss.path())
        .arg(&program)
        .args(&args);
    if let Some(d) = cmd.get_current_dir() {
        timed.current_dir(d);
    }
    let start = Instant::now();
    let out = timed
        .output()
        .with_context(|| format!("running {label} (needs /usr/bin/time, Debian package `time`)"))?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{label} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let report = std::fs::read_to_string(rss.path())?;
    let nums: Vec<f64> = report
        .lines()
        .last()
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (kb, cpu) = match nums[..] {
        [kb, user, sys] => (kb, user + sys),
        _ => (0.0, 0.0),
    };
    let v = json!({"what": label, "seconds": secs, "cpu_s": cpu, "peak_rss_mib": kb / 1024.0, "load": load()});
    println!("{v}");
    Ok(v)
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn sh(script: &str) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    c
}

fn fresh(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    Ok(())
}

/// Median and range of the measurements labelled `what`.
fn summary(runs: &[Value], what: &str) -> Value {
    let mut s: Vec<f64> = runs
        .iter()
        .filter(|r| r["what"] == what)
        .filter_map(|r| r["seconds"].as_f64())
        .collect();
    let rss = runs
        .iter()
        .filter(|r| r["what"] == what)
        .filter_map(|r| r["peak_rss_mib"].as_f64())
        .fold(0f64, f64::max);
    let mut cpu: Vec<f64> = runs
        .iter()
        .filter(|r| r["what"] == what)
        .filter_map(|r| r["cpu_s"].as_f64())
        .collect();
    s.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    if s.is_empty() {
        return Value::Null;
    }
    json!({"median_s": s[s.len() / 2], "min_s": s[0], "max_s": s[s.len() - 1],
           "median_cpu_s": cpu.get(cpu.len() / 2), "peak_rss_mib": rss})
}

fn ratio(sum: &Value, num: &str, den: &str) -> Value {
    match (sum[num]["median_s"].as_f64(), sum[den]["median_s"].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    }
}

/// `bench bundle`: `pack` of a `size_mb` model and `verify` of the update, against `zstd -3 | sha256sum` and
/// `zstd -d | sha256sum` on the same bytes. Returns the summary (also printed).
pub fn bundle(c: &IoBenchConfig) -> Result<Value> {
    std::fs::create_dir_all(&c.dir)?;
    let dir = std::fs::canonicalize(&c.dir)?;
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    let hq = keypair(&keys, Role::Hq, "hq", 1)?;
    keypair(&keys, Role::Site, "site-a", 2)?;
    let weights = dir.join(format!("w{}.safetensors", c.size_mb));
    let base = dir.join(format!("global-{}.ferry", c.size_mb));
    if !weights.exists() || !base.exists() {
        let _ = std::fs::remove_file(&base);
        let g = model(c.size_mb, 1, 0.0)?;
        let payload = Payload::from_safetensors(&g)?;
        let sealed = ferry_bundle::seal(Draft::initial("bench", None), &payload, &hq, 3)?;
        ferry_bundle::fsutil::write_new(&base, &sealed.bytes)?;
        ferry_bundle::fsutil::write_new(&weights, &model(c.size_mb, 2, 0.001)?)?;
    }
    let mut tools = vec![("ferry", c.tool.clone())];
    if let Some(b) = &c.before {
        tools.push(("before", b.clone()));
    }
    let mut runs = Vec::new();
    for _ in 0..c.rounds {
        for (name, tool) in &tools {
            let out = dir.join(format!("out-{name}"));
            fresh(&out)?;
            let mut pack = Command::new(tool);
            pack.arg("pack")
                .arg("--key")
                .arg(keys.join("site-a.key"))
                .arg("--weights")
                .arg(&weights)
                .args(["--samples", "1", "--base"])
                .arg(&base)
                .arg("--trust")
                .arg(keys.join("hq.pub"))
                .arg("--out")
                .arg(&out);
            runs.push(measure(&format!("{name} pack"), &mut pack)?);
            let mut verify = Command::new(tool);
            verify
                .arg("verify")
                .arg("--trust")
                .arg(keys.join("site-a.pub"))
                .arg(out.join("site-a-r0.ferry"));
            runs.push(measure(&format!("{name} verify"), &mut verify)?);
        }
        let w = weights.display();
        runs.push(measure(
            "zstd -3 | sha256sum",
            &mut sh(&format!("zstd -q -3 -c '{w}' | sha256sum >/dev/null")),
        )?);
        // pack's disk work, on the raw pass: the compressed file written, fsynced, dropped from the page cache
        // and read back from the disk, as `pack` must do with what reaches the stick (threat model).
        let raw = dir.join("raw.zst");
        let _ = std::fs::remove_file(&raw);
        runs.push(measure(
            "zstd -3 | sha256sum, written, fsynced, read back",
            &mut sh(&format!(
                "zstd -q -3 -c '{w}' | tee '{r}' | sha256sum >/dev/null && sync '{r}' && \
                 dd if='{r}' iflag=nocache count=0 status=none && sha256sum '{r}' >/dev/null",
                r = raw.display()
            )),
        )?);
        let _ = std::fs::remove_file(&raw);
        let u = dir.join("out-ferry").join("site-a-r0.ferry");
        runs.push(measure(
            "zstd -d | sha256sum",
            &mut sh(&format!(
                "zstd -q -d -c '{}' | sha256sum >/dev/null",
                u.display()
            )),
        )?);
    }
    let mut sum = json!({"size_mb": c.size_mb, "rounds": c.rounds});
    for w in [
        "ferry pack",
        "ferry verify",
        "before pack",
        "before verify",
        "zstd -3 | sha256sum",
        "zstd -3 | sha256sum, written, fsynced, read back",
        "zstd -d | sha256sum",
    ] {
        sum[w] = summary(&runs, w);
    }
    sum["pack: raw ÷ ferry"] = ratio(&sum, "zstd -3 | sha256sum", "ferry pack");
    sum["pack: raw with the same disk work ÷ ferry"] = ratio(
        &sum,
        "zstd -3 | sha256sum, written, fsynced, read back",
        "ferry pack",
    );
    sum["verify: raw ÷ ferry"] = ratio(&sum, "zstd -d | sha256sum", "ferry verify");
    sum["pack: before ÷ ferry"] = ratio(&sum, "before pack", "ferry pack");
    sum["verify: before ÷ ferry"] = ratio(&sum, "before verify", "ferry verify");
    println!("{}", serde_json::to_string_pretty(&sum)?);
    Ok(sum)
}

/// `bench merge`: `ferry-server merge` of `sites` updates of a `size_mb` model, against `zstd -d | sha256sum`
/// over the same update files and, when given, the Python reference and an older ferry-server.
pub fn merge(c: &IoBenchConfig) -> Result<Value> {
    std::fs::create_dir_all(&c.dir)?;
    let dir = std::fs::canonicalize(&c.dir)?;
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    let hq = keypair(&keys, Role::Hq, "hq", 1)?;
    let template = dir.join("hq-template");
    let updates_dir = dir.join("updates");
    let mut updates = Vec::new();
    let ready = dir.join("inputs.json");
    if !ready.exists() {
        fresh(&template)?;
        fresh(&updates_dir)?;
        std::fs::create_dir_all(&updates_dir)?;
        let g = Payload::from_safetensors(&model(c.size_mb, 1, 0.0)?)?;
        let (g0, sealed) =
            ferry_merge::hq::init(&template, &hq, &g, "bench", None, &dir.join("g0"), 3)?;
        drop(g);
        for i in 0..c.sites {
            let id = format!("site-{i}");
            let key = keypair(&keys, Role::Site, &id, 10 + i as u8)?;
            let w =
                Payload::from_safetensors(&model(c.size_mb, 100 + i as u64, 0.001 * i as f32)?)?;
            let draft = Draft::update_for(&sealed.manifest, &sealed.hash, &id, 1000 + i as u64);
            let u = ferry_bundle::seal(draft, &w, &key, 3)?;
            updates.push(u.write_to_dir(&updates_dir)?);
        }
        let inputs = json!({
            "global": g0, "hq_key": keys.join("hq.key"), "trust": keys,
            "updates": updates, "out": dir.join("python-out"),
        });
        std::fs::write(&ready, serde_json::to_vec_pretty(&inputs)?)?;
    } else {
        let v: Value = serde_json::from_slice(&std::fs::read(&ready)?)?;
        for u in v["updates"].as_array().into_iter().flatten() {
            updates.push(PathBuf::from(u.as_str().unwrap_or_default()));
        }
        if updates.len() != c.sites {
            bail!(
                "{} holds inputs for {} sites; use another --dir",
                dir.display(),
                updates.len()
            );
        }
    }
    let mut tools = vec![("ferry", c.tool.clone())];
    if let Some(b) = &c.before {
        tools.push(("before", b.clone()));
    }
    let mut runs = Vec::new();
    for _ in 0..c.rounds {
        for (name, tool) in &tools {
            let state = dir.join(format!("hq-{name}"));
            let out = dir.join(format!("out-{name}"));
            fresh(&state)?;
            fresh(&out)?;
            let copied = Command::new("cp")
                .arg("-r")
                .arg(&template)
                .arg(&state)
                .status()?;
            if !copied.success() {
                bail!("copying the HQ state failed");
            }
            let mut m = Command::new(tool);
            m.arg("merge")
                .arg("--key")
                .arg(keys.join("hq.key"))
                .arg("--trust")
                .arg(&keys)
                .arg("--state")
                .arg(&state)
                .arg("--out")
                .arg(&out)
                .args(["--strategy", c.strategy.name()])
                .args(&updates);
            runs.push(measure(&format!("{name} merge"), &mut m)?);
        }
        if let Some(py) = &c.python {
            fresh(&dir.join("python-out"))?;
            let mut p = Command::new("python3");
            p.arg(py)
                .arg(&ready)
                .args(["--strategy", c.strategy.name()]);
            runs.push(measure("python merge", &mut p)?);
        }
        let files: Vec<String> = updates
            .iter()
            .map(|u| format!("'{}'", u.display()))
            .collect();
        runs.push(measure(
            "zstd -d | sha256sum",
            &mut sh(&format!(
                "for f in {}; do zstd -q -d -c \"$f\" | sha256sum >/dev/null; done",
                files.join(" ")
            )),
        )?);
    }
    let mut sum = json!({"sites": c.sites, "size_mb": c.size_mb, "strategy": c.strategy.name(), "rounds": c.rounds});
    for w in [
        "ferry merge",
        "before merge",
        "python merge",
        "zstd -d | sha256sum",
    ] {
        sum[w] = summary(&runs, w);
    }
    sum["python ÷ ferry"] = ratio(&sum, "python merge", "ferry merge");
    sum["before ÷ ferry"] = ratio(&sum, "before merge", "ferry merge");
    sum["raw ÷ ferry"] = ratio(&sum, "zstd -d | sha256sum", "ferry merge");
    if let Some(rss) = sum["ferry merge"]["peak_rss_mib"].as_f64() {
        sum["ferry peak RSS ÷ model"] = json!(rss / c.size_mb as f64);
    }
    println!("{}", serde_json::to_string_pretty(&sum)?);
    Ok(sum)
}

/// One site's generated model: values from a hash of (site, element), never stored.
struct Generated {
    site: u64,
    layout: Vec<TensorMeta>,
}

fn value(site: u64, tensor: usize, i: usize) -> f32 {
    let mut x = (site << 40) ^ ((tensor as u64) << 32) ^ i as u64;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04 + site as f32 * 1e-4
}

impl TensorSource for Generated {
    fn describe(&mut self, name: &str) -> Result<(Dtype, Vec<usize>, usize), MergeError> {
        let m = self.find(name)?.1;
        Ok((m.dtype, m.shape.clone(), m.byte_len().unwrap_or(0)))
    }

    fn read(&mut self, name: &str) -> Result<OwnedTensor, MergeError> {
        let (_, m) = self.find(name)?;
        let (dtype, shape) = (m.dtype, m.shape.clone());
        let n = m.numel().unwrap_or(0);
        Ok(OwnedTensor {
            dtype,
            shape,
            data: self.read_elements(name, 0, n)?,
        })
    }

    fn read_elements(
        &mut self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<u8>, MergeError> {
        let (t, _) = self.find(name)?;
        Ok(f32_bytes(
            (start..start + count).map(|i| value(self.site, t, i)),
        ))
    }
}

impl Generated {
    fn find(&self, name: &str) -> Result<(usize, &TensorMeta), MergeError> {
        self.layout
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == name)
            .ok_or_else(|| MergeError::MissingTensor {
                origin: format!("site {}", self.site),
                tensor: name.into(),
            })
    }
}

/// `bench merge --synthetic`: the merge HQ runs (slice-wise engine, next global compressed and hashed as it is
/// computed, signed), on `sites` generated inputs in this process; reports time and this process's peak RSS.
pub fn synthetic(c: &IoBenchConfig) -> Result<Value> {
    let total = (c.size_mb as u64 * 1_000_000 / 4) as usize;
    let layout = vec![
        TensorMeta {
            name: "embed.weight".into(),
            dtype: Dtype::F32,
            shape: vec![total - 4096],
        },
        TensorMeta {
            name: "fc.weight".into(),
            dtype: Dtype::F32,
            shape: vec![64, 64],
        },
    ];
    let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
    let start = Instant::now();
    let mut base = Generated {
        site: 999,
        layout: layout.clone(),
    };
    let mut sources: Vec<Generated> = (0..c.sites as u64)
        .map(|site| Generated {
            site,
            layout: layout.clone(),
        })
        .collect();
    let mut contributions: Vec<Contribution<'_>> = sources
        .iter_mut()
        .map(|s| Contribution {
            site: format!("site-{}", s.site),
            bundle: format!("{:064x}", s.site),
            samples: 1 + s.site,
            source: s,
        })
        .collect();
    let draft = Draft {
        created: 0,
        ..Draft::initial("bench", None)
    };
    let mut writer = ferry_bundle::BundleWriter::new(draft, layout.clone(), &hq, 3)?;
    let config = MergeConfig {
        strategy: c.strategy,
        ..MergeConfig::default()
    };
    ferry_merge::merge_streaming(
        &layout,
        &mut base,
        &mut contributions,
        &config,
        &mut ServerState::new(),
        |m, d| {
            writer.write(d).map_err(|e| MergeError::Output {
                tensor: m.name.clone(),
                reason: e.to_string(),
            })
        },
    )?;
    let sealed = writer.finish()?;
    let secs = start.elapsed().as_secs_f64();
    let hwm = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    let model_mib = (total * 4) as f64 / (1u64 << 20) as f64;
    let v = json!({
        "what": "synthetic merge", "sites": c.sites, "size_mb": c.size_mb, "strategy": c.strategy.name(),
        "seconds": secs, "peak_rss_mib": hwm / 1024.0, "model_mib": model_mib,
        "limit_mib (3 x model + 64)": 3.0 * model_mib + 64.0, "global_bytes": sealed.bytes.len(), "load": load(),
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(v)
}
