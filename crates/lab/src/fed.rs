//! A federation on disk, driven through the same library calls as `ferry-server` and `ferry-client` (issue 5):
//! real keys in `keys/`, HQ's ledger in `hq/`, one site state directory per site in `sites/<id>/`, and a `usb/`
//! folder standing in for the stick. Every file that crosses the air gap is recorded as a [`Crossing`], so the
//! experiments can report exactly what was carried.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferry_bundle::{open_file, Keyring, Payload, PublicKey, Role, SecretKey};
use ferry_merge::hq::{self, RoundConfig, RoundOutcome};
use ferry_site::{
    fisher_site, train_site, ExportOptions, ImportPolicy, ImportTrust, LocalRun, SiteState,
    SiteTrainSummary,
};

/// The federation name the lab's federations use.
const FEDERATION: &str = "ferry-lab";
use ferry_train::data::Dataset;
use ferry_train::fisher::FisherConfig;
use ferry_train::{evaluate, Arch, Device, Evaluation, Model, TrainConfig, TrainObserver};

/// zstd level of every bundle the lab writes (the tools' default).
pub const LEVEL: i32 = 3;
/// Images per evaluation batch.
pub const EVAL_BATCH: usize = 256;

/// Which way a file crossed the air gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// A global carried from HQ to this site.
    ToSite(String),
    /// A site's update carried to HQ.
    ToHq,
}

/// One bundle file carried across the air gap.
#[derive(Debug, Clone)]
pub struct Crossing {
    /// The file on the "stick".
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// SHA-256 of the file.
    pub sha256: String,
    /// Which way it went.
    pub direction: Direction,
}

impl Crossing {
    fn of(path: &Path, sha256: &str, direction: Direction) -> Result<Crossing> {
        let bytes = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        Ok(Crossing {
            path: path.to_path_buf(),
            bytes,
            sha256: sha256.to_string(),
            direction,
        })
    }

    /// `name  size  sha256-short  direction`, for the per-round listing.
    pub fn line(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = match &self.direction {
            Direction::ToSite(s) => format!("HQ -> {s}"),
            Direction::ToHq => "site -> HQ".to_string(),
        };
        format!(
            "{name:<22} {:>10}  sha256 {}  {dir}",
            human_bytes(self.bytes),
            ferry_bundle::short(&self.sha256)
        )
    }
}

/// `1.23 MB` style sizes.
pub fn human_bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / f64::from(1u32 << 20))
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// One site: its key and its state directory.
#[derive(Debug)]
pub struct Site {
    /// The site id (`site-a`).
    pub id: String,
    key: SecretKey,
    /// The state directory.
    pub state: SiteState,
}

/// HQ and its sites in one folder, with every crossing recorded.
#[derive(Debug)]
pub struct Federation {
    /// The federation's folder.
    pub root: PathBuf,
    /// The stand-in for the USB stick.
    pub usb: PathBuf,
    /// The architecture trained.
    pub arch: Arch,
    hq_dir: PathBuf,
    hq_key: SecretKey,
    /// What HQ trusts: every site's `.pub` (read back from `keys/`) and its own.
    hq_trust: Keyring,
    /// What every site trusts: HQ's `.pub`.
    site_trust: Keyring,
    /// The sites, in the order given.
    pub sites: Vec<Site>,
    /// Every file carried so far, in order.
    pub crossings: Vec<Crossing>,
    /// The newest global's path on the stick.
    pub global: PathBuf,
    /// Its round.
    pub round: u64,
}

impl Federation {
    /// Make keys for HQ and `site_ids` in `root/keys/`, then have HQ write round 0 (`arch` initialised from
    /// `seed`) into `root/usb/`. Refuses a `root` that already holds a federation.
    pub fn create(root: &Path, arch: Arch, seed: u64, site_ids: &[String]) -> Result<Federation> {
        Federation::create_from(root, Model::init(arch, seed, &Device::Cpu)?, site_ids)
    }

    /// [`Federation::create`] with HQ's round 0 given (a warm start trained on HQ's own data, issue 14).
    pub fn create_from(root: &Path, model: Model, site_ids: &[String]) -> Result<Federation> {
        let arch = model.arch();
        if root.join("hq").exists() {
            bail!(
                "{} already holds a federation; choose a new folder",
                root.display()
            );
        }
        let keys = root.join("keys");
        let hq_key = SecretKey::generate(Role::Hq, "hq")?;
        let (_, hq_pub) = hq_key.write_pair(&keys)?;
        let mut site_trust = Keyring::new();
        site_trust.add(PublicKey::read(&hq_pub)?)?;
        let mut hq_trust = Keyring::new();
        hq_trust.add(PublicKey::read(&hq_pub)?)?;
        let mut sites = Vec::new();
        for id in site_ids {
            let key = SecretKey::generate(Role::Site, id)?;
            let (_, public) = key.write_pair(&keys)?;
            // HQ trusts what is in the `.pub` file it was handed, not the in-memory key.
            hq_trust.add(PublicKey::read(&public)?)?;
            let state = SiteState::at(&root.join("sites").join(id));
            sites.push(Site {
                id: id.clone(),
                key,
                state,
            });
        }
        let payload = Payload::from_safetensors_vec(model.to_safetensors()?)?;
        let hq_dir = root.join("hq");
        let usb = root.join("usb");
        let (global, sealed) = hq::init(
            &hq_dir,
            &hq_key,
            &payload,
            FEDERATION,
            Some(arch.name()),
            &usb,
            LEVEL,
        )
        .context("HQ init")?;
        let _ = sealed;
        Ok(Federation {
            root: root.to_path_buf(),
            usb,
            arch,
            hq_dir,
            hq_key,
            hq_trust,
            site_trust,
            sites,
            crossings: Vec::new(),
            global,
            round: 0,
        })
    }

    /// Carry the newest global to site `i`: verify it against HQ's key and import it (refusing rollbacks).
    pub fn deliver(&mut self, i: usize) -> Result<&Crossing> {
        let site = &self.sites[i];
        // The first import pins the federation and HQ's key, as `ferry-client import --federation` does.
        let trust = ImportTrust {
            keys: self.site_trust.clone(),
            federation: Some(FEDERATION.to_string()),
            ..ImportTrust::default()
        };
        let policy = ImportPolicy::default();
        let prepared = site.state.prepare_import(&trust, &policy)?;
        let bundle = open_file(&self.global, prepared.keyring())
            .with_context(|| format!("{} verifying {}", site.id, self.global.display()))?;
        site.state
            .import_new(
                &bundle,
                &self.global.display().to_string(),
                &policy,
                &prepared,
            )
            .with_context(|| format!("{} importing {}", site.id, self.global.display()))?;
        let c = Crossing::of(
            &self.global,
            &bundle.hash,
            Direction::ToSite(site.id.clone()),
        )?;
        Ok(self.log_crossing(c))
    }

    /// Train site `i`'s current global on `data` (the site keeps its Adam state between rounds).
    pub fn train(
        &self,
        i: usize,
        data: &Dataset,
        cfg: &TrainConfig,
        obs: &mut dyn TrainObserver,
    ) -> Result<SiteTrainSummary> {
        let site = &self.sites[i];
        let lock = site.state.lock()?;
        train_site(&site.state, &lock, data, cfg, &Device::Cpu, obs)
            .with_context(|| format!("training {}", site.id))
    }

    /// Record weights trained elsewhere (the same arithmetic as `train_site`, run in memory) as site `i`'s local
    /// model for its current global, as `ferry-client train` would have left it.
    pub fn record_local(
        &self,
        i: usize,
        weights: &[u8],
        samples: u64,
        epochs: u32,
        steps: u64,
    ) -> Result<()> {
        let site = &self.sites[i];
        let lock = site.state.lock()?;
        site.state.record_local(
            &lock,
            weights,
            LocalRun {
                samples,
                epochs,
                steps,
            },
        )?;
        Ok(())
    }

    /// Site `i` seals its local model and writes it to the stick.
    pub fn export(&mut self, i: usize) -> Result<&Crossing> {
        let site = &self.sites[i];
        let (path, sealed) = {
            let lock = site.state.lock()?;
            site.state
                .export(&lock, &site.key, &self.usb, LEVEL, false)
                .with_context(|| format!("{} exporting", site.id))?
        };
        Ok(self.log_crossing(Crossing::of(&path, &sealed.hash, Direction::ToHq)?))
    }

    /// Site `i` takes its local model's Fisher estimate on `data` (`ferry-client fisher`) and exports the model
    /// with it (`export --fisher`, issue 14). An update the site already exported for this round is replaced
    /// (`--again`) and its crossing dropped from the log: an operator carries only the new file.
    pub fn export_with_fisher(
        &mut self,
        i: usize,
        data: &Dataset,
        cfg: &FisherConfig,
    ) -> Result<&Crossing> {
        let site = &self.sites[i];
        let (path, sealed, replaced) = {
            let lock = site.state.lock()?;
            fisher_site(&site.state, &lock, data, cfg, &Device::Cpu, &mut |_, _| {})
                .with_context(|| format!("{}: Fisher estimate", site.id))?;
            let replaced = site.state.local()?.and_then(|l| l.exported);
            // The replaced file leaves the stick: export never overwrites, and nobody carries it.
            for c in self
                .crossings
                .iter()
                .filter(|c| Some(&c.sha256) == replaced.as_ref())
            {
                std::fs::remove_file(&c.path)
                    .with_context(|| format!("removing {}", c.path.display()))?;
            }
            let options = ExportOptions {
                level: LEVEL,
                again: replaced.is_some(),
                encrypt_to: Vec::new(),
                fisher: true,
            };
            let (path, sealed) = site
                .state
                .export_with(&lock, &site.key, &self.usb, &options)
                .with_context(|| format!("{} exporting", site.id))?;
            (path, sealed, replaced)
        };
        if let Some(old) = replaced {
            self.crossings.retain(|c| c.sha256 != old);
        }
        Ok(self.log_crossing(Crossing::of(&path, &sealed.hash, Direction::ToHq)?))
    }

    /// HQ verifies and merges `updates` into the next global, written to the stick.
    pub fn merge(&mut self, updates: &[PathBuf], cfg: &RoundConfig) -> Result<RoundOutcome> {
        let out = hq::merge_round(
            &self.hq_dir,
            &self.hq_key,
            &self.hq_trust,
            &[],
            updates,
            cfg,
            &self.usb,
        )
        .context("HQ merge")?;
        self.global = out.path.clone();
        self.round = out.sealed.manifest.round;
        Ok(out)
    }

    /// [`Federation::merge`] with a step HQ runs on the merged model before sealing it (issue 14: distillation
    /// on HQ's own data), as `ferry-server merge --distill` does.
    pub fn merge_refined(
        &mut self,
        updates: &[PathBuf],
        cfg: &RoundConfig,
        refiner: &mut hq::Refiner<'_>,
    ) -> Result<RoundOutcome> {
        let out = hq::merge_round_with(
            &self.hq_dir,
            &self.hq_key,
            &self.hq_trust,
            &[],
            updates,
            cfg,
            &self.usb,
            Some(refiner),
            None,
        )
        .context("HQ merge")?;
        self.global = out.path.clone();
        self.round = out.sealed.manifest.round;
        Ok(out)
    }

    /// A copy of the whole federation (keys, HQ's ledger, every site's state, the stick) in `root`, to try
    /// another HQ step on the same updates (issue 14). The copy reads its keys back from `root/keys/`; its
    /// crossings so far are the original's, with paths moved to the copy's stick.
    pub fn fork(&self, root: &Path) -> Result<Federation> {
        if root.exists() {
            bail!("{} exists; choose a new folder", root.display());
        }
        copy_dir(&self.root, root)?;
        let moved = |p: &Path| -> PathBuf {
            p.strip_prefix(&self.root)
                .map_or_else(|_| p.to_path_buf(), |rel| root.join(rel))
        };
        let keys = root.join("keys");
        let sites = self
            .sites
            .iter()
            .map(|s| {
                Ok(Site {
                    id: s.id.clone(),
                    key: SecretKey::read(&keys.join(format!("{}.key", s.id)))?,
                    state: SiteState::at(&root.join("sites").join(&s.id)),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Federation {
            root: root.to_path_buf(),
            usb: moved(&self.usb),
            arch: self.arch,
            hq_dir: moved(&self.hq_dir),
            hq_key: SecretKey::read(&keys.join("hq.key"))?,
            hq_trust: self.hq_trust.clone(),
            site_trust: self.site_trust.clone(),
            sites,
            crossings: self
                .crossings
                .iter()
                .map(|c| Crossing {
                    path: moved(&c.path),
                    ..c.clone()
                })
                .collect(),
            global: moved(&self.global),
            round: self.round,
        })
    }

    /// Verify update `path` (on this federation's stick) against the sites' keys and load its model.
    pub fn update_model(&self, path: &Path) -> Result<Model> {
        let bundle = open_file(path, &self.hq_trust)
            .with_context(|| format!("verifying {}", path.display()))?;
        Ok(Model::from_safetensors(
            self.arch,
            bundle.payload(),
            &Device::Cpu,
        )?)
    }

    /// Verify the newest global against HQ's key and load it.
    pub fn global_model(&self) -> Result<Model> {
        let bundle = open_file(&self.global, &self.site_trust)
            .with_context(|| format!("verifying {}", self.global.display()))?;
        Ok(Model::from_safetensors(
            self.arch,
            bundle.payload(),
            &Device::Cpu,
        )?)
    }

    /// Accuracy of the newest global on `data`.
    pub fn evaluate_global(&self, data: &Dataset) -> Result<Evaluation> {
        Ok(evaluate(&self.global_model()?, data, EVAL_BATCH)?)
    }

    /// Records a file that crossed the air gap; returns the record.
    fn log_crossing(&mut self, c: Crossing) -> &Crossing {
        let i = self.crossings.len();
        self.crossings.push(c);
        &self.crossings[i]
    }

    /// Bytes carried so far, both ways.
    pub fn bytes_carried(&self) -> u64 {
        self.crossings.iter().map(|c| c.bytes).sum()
    }
}

/// `paths` (files under `from`, e.g. updates on one federation's stick) as the same files under `to` (the same
/// stick in a [`Federation::fork`]).
pub fn moved_paths(paths: &[PathBuf], from: &Path, to: &Path) -> Vec<PathBuf> {
    paths
        .iter()
        .map(|p| {
            p.strip_prefix(from)
                .map_or_else(|_| p.clone(), |r| to.join(r))
        })
        .collect()
}

/// Copy a directory tree (regular files and folders; the lab's federations hold nothing else).
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for e in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let e = e?;
        let (src, dst) = (e.path(), to.join(e.file_name()));
        if e.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}
