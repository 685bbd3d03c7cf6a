//! HQ's own training (issue 14, "fewer trips"): `merge --distill SPEC` (ensemble distillation of the merged
//! model on HQ's own data, before the global is sealed), `init --pretrain SPEC` (a warm start: round 0
//! trained on HQ's own data) and `merge --select SPEC` (the merge or one site's model, whichever reads HQ's
//! labelled data best). The ML is `ferry_train`'s; the merge hook is `ferry_merge::hq::Refiner`.
//! HQ's data is HQ's alone (a synthetic renderer configuration, a public dataset, a slice no site holds):
//! never site data.

use anyhow::{Context, Result};
use clap::Args;
use ferry_bundle::escape;
use ferry_merge::hq::{Refined, Refiner};
use ferry_train::data::{DataSpec, Dataset, LoadConfig};
use ferry_train::distill::{distill_safetensors, DistillConfig, PretrainConfig};
use ferry_train::select::merge_or_site;
use ferry_train::{Arch, EpochStats, TrainObserver};

/// `merge --distill` and its settings.
#[derive(Debug, Args)]
pub struct DistillArgs {
    /// After the merge, distil the site models into the merged one on HQ's own unlabelled data (a data spec:
    /// idx:DIR[:test], plates:STYLE:N:SEED, folder:DIR). Never give site data. Example: --distill idx:/hq/data
    #[arg(long, value_name = "SPEC")]
    pub distill: Option<DataSpec>,
    /// Distillation: passes over HQ's data.
    #[arg(long, value_name = "N", default_value_t = DistillConfig::default().epochs, requires = "distill")]
    pub distill_epochs: u32,
    /// Distillation: Adam learning rate.
    #[arg(long, value_name = "LR", default_value_t = DistillConfig::default().lr, requires = "distill")]
    pub distill_lr: f64,
    /// Distillation: softmax temperature.
    #[arg(long, value_name = "T", default_value_t = DistillConfig::default().temperature, requires = "distill")]
    pub distill_temperature: f64,
    /// Distillation: use only the first N samples of HQ's data.
    #[arg(long, value_name = "N", requires = "distill")]
    pub distill_limit: Option<usize>,
    /// After the merge, re-estimate the BatchNorm statistics of the merged model on HQ's own images (a data
    /// spec; labels unused), as `ferry-client recalibrate` does at a site. Example: --recalibrate plates:clean:2000:5
    #[arg(long, value_name = "SPEC", conflicts_with = "distill")]
    pub recalibrate: Option<DataSpec>,
    /// After the merge (and --distill or --recalibrate), evaluate the merged model and every site's model on
    /// HQ's own labelled data and seal the one that reads it best as the next global; a tie keeps the merge.
    /// The choice and every score are recorded with the round. A site's model chosen goes to every site.
    /// Example: --select folder:hq-val/labels.csv
    #[arg(long, value_name = "SPEC")]
    pub select: Option<DataSpec>,
}

/// `init --pretrain` and its settings.
#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Train round 0 on HQ's own labelled data before sealing it (a warm start: the sites then start in one
    /// basin). Needs --arch. Example: --pretrain plates:clean:4000:9
    #[arg(long, value_name = "SPEC", requires = "arch")]
    pub pretrain: Option<DataSpec>,
    /// Pretraining: epochs.
    #[arg(long, value_name = "N", default_value_t = PretrainConfig::default().epochs, requires = "pretrain")]
    pub pretrain_epochs: u32,
    /// Pretraining: Adam's peak learning rate.
    #[arg(long, value_name = "LR", default_value_t = PretrainConfig::default().lr, requires = "pretrain")]
    pub pretrain_lr: f64,
    /// Pretraining: images per step.
    #[arg(long, value_name = "B", default_value_t = PretrainConfig::default().batch, requires = "pretrain")]
    pub pretrain_batch: usize,
    /// Pretraining: use only the first N samples of HQ's data.
    #[arg(long, value_name = "N", requires = "pretrain")]
    pub pretrain_limit: Option<usize>,
}

fn load(spec: &DataSpec, limit: Option<usize>, arch: Arch) -> Result<Dataset> {
    spec.load(&LoadConfig {
        limit,
        font: None,
        input: Some(arch.input()),
        classes: Some(arch.classes()),
    })
    .with_context(|| format!("loading HQ's data {spec}"))
}

/// One line per epoch on stderr.
struct EpochLines(&'static str);

impl TrainObserver for EpochLines {
    fn on_epoch(&mut self, s: &EpochStats) {
        eprintln!(
            "{}: epoch {} loss {:.4} ({:.0} img/s)",
            self.0,
            s.epoch + 1,
            s.loss,
            s.images_per_sec
        );
    }
}

fn arch_of(name: Option<&str>, step: &str) -> Result<Arch, String> {
    Arch::from_name(name.unwrap_or(""))
        .map_err(|e| format!("{step} needs a global that names an architecture ferry trains ({e})"))
}

/// The refiner `merge --distill`, `--recalibrate` and `--select` hand the merge, or `None` without any: the
/// distillation or recalibration first, then the selection among its result and the site models.
pub fn refiner(a: &DistillArgs) -> Option<Refiner<'static>> {
    let step = recalibrator(a).or_else(|| distiller(a));
    let Some(spec) = a.select.clone() else {
        return step;
    };
    let describe = match &step {
        Some(s) => format!("{} then select data={spec}", s.describe),
        None => format!("select data={spec}"),
    };
    let mut step = step;
    Some(Refiner {
        describe,
        run: Box::new(move |input| {
            let refined = match step.as_mut() {
                Some(s) => Some((s.run)(input)?),
                None => None,
            };
            let arch = arch_of(input.arch, "selection")?;
            let data = load(&spec, None, arch).map_err(|e| format!("{e:#}"))?;
            let sites: Vec<(String, &[u8])> = input
                .updates
                .iter()
                .map(|u| (escape(&u.site), u.model.as_slice()))
                .collect();
            let merged = refined
                .as_ref()
                .map_or(input.merged, |r| r.model.as_slice());
            let (model, s) =
                merge_or_site(arch, merged, &sites, &data, 256).map_err(|e| e.to_string())?;
            eprintln!("selection on HQ's data: {}", s.note());
            let note = match refined.as_ref().and_then(|r| r.note.as_deref()) {
                Some(n) => format!("{n}; {}", s.note()),
                None => s.note(),
            };
            Ok(Refined {
                model,
                note: Some(note),
            })
        }),
    })
}

/// `merge --recalibrate`.
fn recalibrator(a: &DistillArgs) -> Option<Refiner<'static>> {
    let spec = a.recalibrate.clone()?;
    Some(Refiner {
        describe: format!("recalibrate data={spec}"),
        run: Box::new(move |input| {
            let arch = arch_of(input.arch, "recalibration")?;
            let data = load(&spec, None, arch).map_err(|e| format!("{e:#}"))?;
            let (model, r) =
                ferry_train::train::recalibrate_safetensors(arch, input.merged, &data, 256)
                    .map_err(|e| e.to_string())?;
            eprintln!(
                "re-estimated the BatchNorm statistics on {} HQ images ({} batches)",
                r.samples, r.batches
            );
            Ok(Refined { model, note: None })
        }),
    })
}

/// `merge --distill`.
fn distiller(a: &DistillArgs) -> Option<Refiner<'static>> {
    let spec = a.distill.clone()?;
    let cfg = DistillConfig {
        epochs: a.distill_epochs,
        lr: a.distill_lr,
        temperature: a.distill_temperature,
        ..DistillConfig::default()
    };
    let limit = a.distill_limit;
    Some(Refiner {
        describe: format!(
            "distill epochs={} lr={} t={} data={spec}",
            cfg.epochs, cfg.lr, cfg.temperature
        ),
        run: Box::new(move |input| {
            let arch = arch_of(input.arch, "distillation")?;
            let data = load(&spec, limit, arch).map_err(|e| format!("{e:#}"))?;
            let teachers: Vec<&[u8]> = input.updates.iter().map(|u| u.model.as_slice()).collect();
            let (model, s) = distill_safetensors(
                arch,
                input.merged,
                &teachers,
                &data,
                &cfg,
                &mut EpochLines("distilling"),
            )
            .map_err(|e| e.to_string())?;
            eprintln!(
                "distilled {} site models on {} HQ samples: KL to the ensemble {:.4} -> {:.4}",
                s.teachers, s.samples, s.kl_before, s.kl_after
            );
            Ok(Refined { model, note: None })
        }),
    })
}

/// Train `model` on HQ's data per `--pretrain` (no-op without it).
pub fn pretrain(a: &PretrainArgs, model: &mut ferry_train::Model) -> Result<()> {
    let Some(spec) = &a.pretrain else {
        return Ok(());
    };
    let data = load(spec, a.pretrain_limit, model.arch())?;
    let cfg = PretrainConfig {
        epochs: a.pretrain_epochs,
        batch: a.pretrain_batch,
        lr: a.pretrain_lr,
        seed: 0,
    };
    let s = ferry_train::distill::pretrain(model, &data, &cfg, &mut EpochLines("pretraining"))?;
    eprintln!(
        "pretrained round 0 on {} HQ samples: {} steps, training accuracy {:.2}%",
        data.len(),
        s.steps,
        100.0 * s.accuracy
    );
    Ok(())
}
