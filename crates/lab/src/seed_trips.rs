//! The few-trips rows of `ferry-lab seed-table --few-trips` (issue 14): what one and two trips buy on the plate
//! benchmark, each method through the tools' own code paths and real bundles.
//!
//! - `best-site`: the site model HQ would pick (best on HQ's tuning plates), alone; `ensemble`: the average
//!   softmax of the two site models (not one model: the ceiling a one-trip merge aims at).
//! - `one-shot-fisher`: each site ships its Fisher estimate (`ferry-client fisher`, `export --fisher`), HQ merges
//!   with `--strategy fisher`, the bound chosen on HQ's tuning plates; `one-shot-distill`: FedAvg, then
//!   `merge --distill` on HQ's plates; `one-shot-recal`: FedAvg, then `merge --recalibrate` (BatchNorm statistics
//!   re-estimated on HQ's plates); `one-shot-select`: FedAvg, then `merge --select` on HQ's tuning plates (the
//!   merge or one site's model, whichever reads them best, is sealed).
//! - `one-shot-site-recal`: FedAvg, then each site imports the global and re-estimates its BatchNorm statistics on
//!   its own training images (`ferry-client recalibrate`, labels unused) for the model it deploys, as in
//!   FedBN/SiloBN; each validation plate is read by the deployed model of the site whose crop style it has (site A
//!   loose, site B tight).
//! - `two-trip-<method>`: two rounds of T/2 epochs; the first merge is FedAvg, the second uses the method;
//!   `two-trip-select` uses `merge --select` at both merges (the sites' second trip starts from what HQ kept).
//! - with `--pretrain-epochs N`: `hq-pretrained` (round 0 trained on HQ's own clean plates, no trip),
//!   `one-shot-pretrain` and `two-trip-pretrain` (FedAvg from that round 0, both sites trained again).
//!
//! **HQ's data, exactly**: plates from HQ's own renderer configuration, which no site uses: clean crops (no
//! perspective, car context, neighbouring text, night exposure, motion blur, low resolution or JPEG), half loose
//! and half tight, from their own seed stream. The first 4/5 are what HQ distils and recalibrates on, the last 1/5
//! is HQ's tuning slice (the best site, the Fisher bound). Site plates never reach HQ; the validation set the
//! table reports is used by no choice.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use ferry_merge::hq::{Refined, Refiner, RoundConfig};
use ferry_merge::{MergeConfig, Strategy};
use ferry_train::data::{plates, Dataset, PlateStyle};
use ferry_train::distill::{ensemble_accuracy, pretrain, DistillConfig, PretrainConfig};
use ferry_train::fisher::FisherConfig;
use ferry_train::train::recalibrate_safetensors;
use ferry_train::{evaluate, Arch, Device, Model};

use crate::fed::{moved_paths, Federation, EVAL_BATCH};
use crate::progress::{spinner, TrainBars};
use crate::seed_table::{finish, point, Row, SeedTableConfig};
use crate::trips::{distill_refiner, select_refiner};
use ferry_site::recalibrate_site;
use ferry_train::data::CropStyle;

/// HQ's plates: `train` to distil and recalibrate on, `tune` to choose on.
pub struct HqPlates {
    /// The first 4/5.
    pub train: Dataset,
    /// The last 1/5.
    pub tune: Dataset,
}

/// `n` plates of HQ's clean renderer configuration (`plates:clean`, module docs), seed stream 7 of `seed`.
pub fn hq_plates(arch: Arch, n: usize, seed: u64) -> Result<HqPlates> {
    let s = spinner(format!("generating HQ's {n} clean plates"));
    // What `plates:clean:N:SEED` gives HQ's tools (`merge --distill`, `--recalibrate`, `init --pretrain`).
    let all = plates::generate_with(
        PlateStyle::Clean,
        n,
        seed.wrapping_mul(1000).wrapping_add(7),
        None,
        &plates::RenderConfig::for_classes(Some(arch.classes())),
    );
    s.finish_and_clear();
    let all = all?;
    let cut = n * 4 / 5;
    Ok(HqPlates {
        train: all.subset(&(0..cut).collect::<Vec<_>>()),
        tune: all.subset(&(cut..n).collect::<Vec<_>>()),
    })
}

/// HQ's warm start and its row.
pub struct Warm {
    /// Round 0 trained on HQ's plates (safetensors).
    pub weights: Vec<u8>,
    /// `hq-pretrained`: that round 0 on the validation set, no trip made.
    pub row: Row,
}

/// HQ trains round 0 on its own clean plates (`plates:clean`, stream 8 of the seed, as many as a site holds) for
/// `cfg.pretrain_epochs`, as `ferry-server init --pretrain` does.
pub fn hq_pretrained(arch: Arch, cfg: &SeedTableConfig, val: &Dataset) -> Result<Warm> {
    let start = Instant::now();
    let s = spinner(format!(
        "generating HQ's {} clean plates to pretrain on",
        cfg.samples_per_site
    ));
    let data = plates::generate_with(
        PlateStyle::Clean,
        cfg.samples_per_site,
        cfg.seed.wrapping_mul(1000).wrapping_add(8),
        None,
        &plates::RenderConfig::for_classes(Some(arch.classes())),
    );
    s.finish_and_clear();
    let data = data?;
    let mut model = Model::init(arch, cfg.seed, &Device::Cpu)?;
    let pcfg = PretrainConfig {
        epochs: cfg.pretrain_epochs,
        batch: cfg.batch,
        lr: cfg.lr,
        seed: cfg.seed,
    };
    pretrain(
        &mut model,
        &data,
        &pcfg,
        &mut TrainBars::new("HQ pretraining round 0"),
    )?;
    let mut row = finish(
        "hq-pretrained".into(),
        vec![point(0, &evaluate(&model, val, EVAL_BATCH)?)],
        0,
        0,
        start,
    );
    row.note = format!(
        "round 0 trained on {} of HQ's clean plates, {} epochs; no site involved",
        cfg.samples_per_site, cfg.pretrain_epochs
    );
    Ok(Warm {
        weights: model.to_safetensors()?,
        row,
    })
}

/// Everything the method rows share.
pub struct Methods<'a> {
    /// HQ's plates.
    pub hq: &'a HqPlates,
    /// The validation set the table reports.
    pub val: &'a Dataset,
    /// Site A's and site B's training plates (their Fisher estimates are taken on them, at the sites).
    pub sites: [&'a Dataset; 2],
    /// The Fisher bounds tried.
    pub bounds: &'a [f64],
    /// The epoch budget T (the x of the rows' last curve point).
    pub total_epochs: u32,
    /// Seed of the Fisher samples and the distillation order.
    pub seed: u64,
    /// The plate reader the sites train.
    pub arch: Arch,
    /// HQ's distillation settings (the defaults, with `seed`).
    pub distill: DistillConfig,
}

impl Methods<'_> {
    fn fisher_cfg(&self) -> FisherConfig {
        FisherConfig {
            seed: self.seed,
            ..FisherConfig::default()
        }
    }

    fn by_fisher(bound: f64) -> RoundConfig {
        RoundConfig {
            merge: MergeConfig {
                strategy: Strategy::Fisher,
                fisher_bound: bound,
                ..MergeConfig::default()
            },
            ..RoundConfig::default()
        }
    }

    /// `merge --distill` on HQ's training plates.
    fn distiller(&self) -> Refiner<'_> {
        distill_refiner(self.arch, &self.hq.train, &self.distill, "hq-clean-plates")
    }

    /// `merge --select` on HQ's tuning plates (the plates HQ makes its choices on).
    fn selector(&self) -> Refiner<'_> {
        select_refiner(self.arch, &self.hq.tune, "hq-tune-plates")
    }

    /// `merge --recalibrate` on HQ's training plates.
    fn recalibrator(&self) -> Refiner<'_> {
        Refiner {
            describe: "recalibrate data=hq-clean-plates".into(),
            run: Box::new(move |input| {
                recalibrate_safetensors(self.arch, input.merged, &self.hq.train, EVAL_BATCH)
                    .map(|(model, _)| Refined { model, note: None })
                    .map_err(|e| e.to_string())
            }),
        }
    }

    fn row(&self, fed: &Federation, name: &str, trips: u64, start: Instant) -> Result<Row> {
        let curve = vec![point(self.total_epochs, &fed.evaluate_global(self.val)?)];
        Ok(finish(
            name.into(),
            curve,
            trips,
            fed.bytes_carried(),
            start,
        ))
    }

    /// FedAvg of `updates` in a fork of `fed`, then HQ's step named by `name` (`…-distill`: distillation,
    /// `…-select`: the merge or a site's model, `…-recal`: BatchNorm re-estimation) on HQ's plates before the
    /// global is sealed.
    fn refined(
        &self,
        fed: &Federation,
        updates: &[PathBuf],
        name: &str,
        trips: u64,
        dir: &Path,
    ) -> Result<Row> {
        let start = Instant::now();
        let mut g = fed.fork(&dir.join(name))?;
        let moved = moved_paths(updates, &fed.root, &g.root);
        let (mut refiner, note) = if name.ends_with("distill") {
            (self.distiller(), "distilled on HQ's plates")
        } else if name.ends_with("select") {
            (
                self.selector(),
                "the merge or a site's model, whichever read HQ's tuning plates best,",
            )
        } else {
            (
                self.recalibrator(),
                "BatchNorm statistics re-estimated on HQ's plates",
            )
        };
        let s = spinner(format!("HQ: {name}"));
        let merged = g.merge_refined(&moved, &RoundConfig::default(), &mut refiner);
        s.finish_and_clear();
        let strategy = merged?.sealed.manifest.strategy.unwrap_or_default();
        let mut row = self.row(&g, name, trips, start)?;
        row.note = format!("FedAvg, the global {note} after the last merge [{strategy}]");
        Ok(row)
    }

    /// `two-trip-select`: `fed` holds both sites' trip-1 `updates`, not yet merged. In a fork, HQ merges them
    /// with `--select` (the merge or a site's model, on HQ's tuning plates), both sites train the chosen global
    /// for their second trip (`train`), and HQ merges again with `--select`.
    pub fn two_trip_select(
        &self,
        fed: &Federation,
        updates: &[PathBuf],
        dir: &Path,
        train: &mut dyn FnMut(&mut Federation) -> Result<Vec<PathBuf>>,
    ) -> Result<Row> {
        let start = Instant::now();
        let name = "two-trip-select";
        let mut g = fed.fork(&dir.join(name))?;
        let moved = moved_paths(updates, &fed.root, &g.root);
        let mut strategies = Vec::new();
        for trip in 1..=2 {
            let updates = if trip == 1 {
                moved.clone()
            } else {
                train(&mut g)?
            };
            let s = spinner(format!("HQ: {name}, merge {trip}"));
            let merged = g.merge_refined(&updates, &RoundConfig::default(), &mut self.selector());
            s.finish_and_clear();
            strategies.push(merged?.sealed.manifest.strategy.unwrap_or_default());
        }
        let mut row = self.row(&g, name, 2, start)?;
        row.note = format!(
            "both merges with --select on HQ's tuning plates [1: {}] [2: {}]",
            strategies[0], strategies[1]
        );
        Ok(row)
    }

    /// FedAvg of `updates` in a fork of `fed`, then every site imports the global and re-estimates its
    /// BatchNorm statistics on its own training plates (`ferry-client recalibrate`); each validation plate is
    /// read by the deployed model of the site of its crop style. Bytes: the trips' files (delivering the global
    /// for deployment is every row's last step, counted by none).
    fn site_recal(
        &self,
        fed: &Federation,
        updates: &[PathBuf],
        name: &str,
        trips: u64,
        dir: &Path,
    ) -> Result<Row> {
        let start = Instant::now();
        let mut g = fed.fork(&dir.join(name))?;
        let moved = moved_paths(updates, &fed.root, &g.root);
        let s = spinner(format!("HQ: {name}, FedAvg"));
        let merged = g.merge(&moved, &RoundConfig::default());
        s.finish_and_clear();
        merged?;
        let bytes = g.bytes_carried();
        let styles = self.val.styles.clone().unwrap_or_default();
        let (mut exact, mut chars, mut total) = (0.0, 0.0, 0usize);
        for (i, (data, style)) in self
            .sites
            .iter()
            .zip([CropStyle::Loose, CropStyle::Tight])
            .enumerate()
        {
            g.deliver(i)?;
            let site = &g.sites[i];
            let s = spinner(format!(
                "{}: recalibrating BatchNorm on its plates",
                site.id
            ));
            let r = {
                let lock = site.state.lock()?;
                recalibrate_site(&site.state, &lock, data, EVAL_BATCH, &Device::Cpu)
            };
            s.finish_and_clear();
            r?;
            let (_, weights) = site
                .state
                .deployed()?
                .ok_or_else(|| anyhow::anyhow!("{}: no deployed model", site.id))?;
            let model = Model::from_safetensors(self.arch, &weights, &Device::Cpu)?;
            let mine: Vec<usize> = (0..self.val.len())
                .filter(|&k| styles.get(k) == Some(&style))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let e = evaluate(&model, &self.val.subset(&mine), EVAL_BATCH)?;
            exact += e.accuracy * mine.len() as f64;
            chars += e.char_accuracy.unwrap_or(e.accuracy) * mine.len() as f64;
            total += mine.len();
        }
        let n = total.max(1) as f64;
        let mut row = finish(
            name.into(),
            vec![(self.total_epochs, exact / n, chars / n)],
            trips,
            bytes,
            start,
        );
        row.note = "FedAvg; each site re-estimates BatchNorm on its own plates and reads its own crop style".into();
        Ok(row)
    }

    /// Each site replaces its update with one carrying its Fisher estimate; then HQ merges by Fisher with each
    /// bound in `bounds` (each in its own fork). Returns (accuracy on HQ's tuning plates, bound, federation).
    fn fisher_merges(
        &self,
        fed: &Federation,
        dir: &Path,
        bounds: &[f64],
    ) -> Result<Vec<(f64, f64, Federation)>> {
        let mut f = fed.fork(&dir.join("fisher"))?;
        let mut updates = Vec::new();
        for (i, data) in self.sites.iter().enumerate() {
            let s = spinner(format!("{}: Fisher estimate", f.sites[i].id));
            let c = f.export_with_fisher(i, data, &self.fisher_cfg());
            s.finish_and_clear();
            updates.push(c?.path.clone());
        }
        let mut out = Vec::new();
        for (k, &bound) in bounds.iter().enumerate() {
            let mut g = f.fork(&dir.join(format!("fisher-b{k}")))?;
            let moved = moved_paths(&updates, &f.root, &g.root);
            let s = spinner(format!("HQ: Fisher merge, bound {bound}"));
            let merged = g.merge(&moved, &Methods::by_fisher(bound));
            s.finish_and_clear();
            merged?;
            let tune = evaluate(&g.global_model()?, &self.hq.tune, EVAL_BATCH)?.accuracy;
            println!(
                "  fisher bound {bound}: HQ's tuning plates {:.2}%",
                100.0 * tune
            );
            out.push((tune, bound, g));
        }
        Ok(out)
    }

    /// The one-trip rows. `fed` holds both sites' trip-1 `updates` (their T-epoch models, `weights`), not yet
    /// merged; it is only forked. Returns the rows and the Fisher bound HQ chose.
    pub fn one_trip(
        &self,
        fed: &Federation,
        updates: &[PathBuf],
        weights: [&[u8]; 2],
        dir: &Path,
    ) -> Result<(Vec<Row>, f64)> {
        let mut rows = Vec::new();
        let trips_bytes = fed.bytes_carried();
        let start = Instant::now();
        let models = [
            Model::from_safetensors(self.arch, weights[0], &Device::Cpu)?,
            Model::from_safetensors(self.arch, weights[1], &Device::Cpu)?,
        ];
        let tune: Vec<f64> = models
            .iter()
            .map(|m| Ok(evaluate(m, &self.hq.tune, EVAL_BATCH)?.accuracy))
            .collect::<Result<_>>()?;
        let best = usize::from(tune[1] > tune[0]);
        let mut row = finish(
            "best-site".into(),
            vec![point(
                self.total_epochs,
                &evaluate(&models[best], self.val, EVAL_BATCH)?,
            )],
            1,
            trips_bytes,
            start,
        );
        row.note = format!(
            "{}'s model alone (HQ's tuning plates: site-a {:.2} %, site-b {:.2} %)",
            fed.sites[best].id,
            100.0 * tune[0],
            100.0 * tune[1]
        );
        rows.push(row);

        let start = Instant::now();
        let s = spinner("evaluating the ensemble of the two site models");
        let ens = ensemble_accuracy(&models, self.val, EVAL_BATCH);
        s.finish_and_clear();
        let mut row = finish(
            "ensemble".into(),
            vec![(self.total_epochs, ens?, f64::NAN)],
            1,
            trips_bytes,
            start,
        );
        row.note = "average softmax of the two site models: not one model, the ceiling".into();
        rows.push(row);

        let start = Instant::now();
        let tried = self.fisher_merges(fed, &dir.join("one-shot"), self.bounds)?;
        // The best on HQ's tuning plates; on a tie the first (the smaller bound, closer to FedAvg).
        let Some((_, bound, f)) = tried
            .into_iter()
            .reduce(|best, x| if x.0 > best.0 { x } else { best })
        else {
            anyhow::bail!("--fisher-bounds is empty");
        };
        let mut row = self.row(&f, "one-shot-fisher", 1, start)?;
        row.note = format!(
            "Fisher-weighted, bound {bound} of {:?} (HQ's tuning plates)",
            self.bounds
        );
        rows.push(row);

        rows.push(self.refined(fed, updates, "one-shot-select", 1, dir)?);
        rows.push(self.refined(fed, updates, "one-shot-distill", 1, dir)?);
        rows.push(self.refined(fed, updates, "one-shot-recal", 1, dir)?);
        rows.push(self.site_recal(fed, updates, "one-shot-site-recal", 1, dir)?);
        Ok((rows, bound))
    }

    /// The two-trip rows: `fed` holds both sites' trip-2 `updates` (after a FedAvg first merge), not yet
    /// merged; it is only forked.
    pub fn two_trip(
        &self,
        fed: &Federation,
        updates: &[PathBuf],
        bound: f64,
        dir: &Path,
    ) -> Result<Vec<Row>> {
        let mut rows = Vec::new();
        let start = Instant::now();
        let tried = self.fisher_merges(fed, &dir.join("two-trip"), &[bound])?;
        if let Some((_, _, f)) = tried.into_iter().next() {
            let mut row = self.row(&f, "two-trip-fisher", 2, start)?;
            row.note = format!("FedAvg, then Fisher-weighted (bound {bound}) at the second merge");
            rows.push(row);
        }
        rows.push(self.refined(fed, updates, "two-trip-distill", 2, dir)?);
        rows.push(self.refined(fed, updates, "two-trip-recal", 2, dir)?);
        rows.push(self.site_recal(fed, updates, "two-trip-site-recal", 2, dir)?);
        Ok(rows)
    }
}
