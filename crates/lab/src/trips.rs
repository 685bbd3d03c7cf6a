//! `ferry-lab fedavg --few-trips` (issue 14, "fewer trips"): how much accuracy one and two trips buy, through
//! real bundles, against FedAvg for 1..R trips. Rows: `best-site`, `ensemble` (the average softmax of the site
//! models, evaluated in the lab: the ceiling of a one-trip merge), `one-shot-avg`, `one-shot-<method>`,
//! `two-trip-<method>` and `fedavg-<k>`, each with its trips, bytes carried, test accuracy and accuracy on
//! HQ's tuning slice (the number hyperparameters are chosen by).
//!
//! HQ's data (never site data): for an IDX training set, the **last `hq_samples` images of the training file**;
//! the sites split the images before them (`--limit` of them). The first 4/5 of HQ's slice is what HQ
//! distils and pretrains on (`hq-train`), the last 1/5 is HQ's tuning slice (`hq-tune`). The reported
//! accuracy is on the test set, which no choice looks at.
//!
//! Every HQ step goes through the tools' own path: distillation is `ferry_merge::hq::merge_round_with`
//! with the refiner `ferry-server merge --distill` builds from `ferry_train::distill`; the warm start is the
//! training `ferry-server init --pretrain` runs; the server step is `--strategy fedavgm`; the choice between
//! the merge and the site models is the refiner of `ferry-server merge --select`, on hq-tune.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_merge::hq::{Refined, Refiner, RoundConfig};
use ferry_merge::{MergeConfig, Strategy};
use ferry_train::data::{DataSpec, Dataset, LoadConfig, Split};
use ferry_train::distill::{
    distill_safetensors, ensemble_accuracy, pretrain, DistillConfig, PretrainConfig,
};
use ferry_train::fisher::FisherConfig;
use ferry_train::select::merge_or_site;
use ferry_train::{evaluate, Arch, Device, Model, TrainConfig};
use serde::Serialize;

use crate::fed::{human_bytes, moved_paths, Federation, EVAL_BATCH};
use crate::fedavg::FedAvgConfig;
use crate::progress::{spinner, TrainBars};
use crate::report::{plot_accuracy, write_table, Series};
use crate::split::split;

/// Settings of the few-trips experiment besides the FedAvg ones (`rounds` is the longest FedAvg run).
#[derive(Debug, Clone, Serialize)]
pub struct TripsConfig {
    /// Images at the end of the training file that are HQ's and no site's.
    pub hq_samples: usize,
    /// Distillation settings (HQ).
    pub distill_epochs: u32,
    /// Distillation learning rate.
    pub distill_lr: f64,
    /// Pretraining epochs on HQ's data for the warm-start rows (0: no warm-start rows).
    pub pretrain_epochs: u32,
    /// FedAvgM server learning rates tried for the two-trip server-step row, chosen on HQ's tuning slice.
    pub server_lrs: Vec<f64>,
    /// Bounds B of the Fisher-weighted merge tried for the one-trip row, chosen on HQ's tuning slice; the
    /// two-trip row keeps the chosen one.
    pub fisher_bounds: Vec<f64>,
    /// The row groups to run besides best-site, ensemble and FedAvg (default: all).
    pub groups: Vec<RowGroup>,
}

/// A group of rows of the few-trips table (`--rows`), so one method can be measured without the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RowGroup {
    /// `one-shot-distill`, `two-trip-distill`.
    Distill,
    /// `two-trip-fedavgm`.
    Fedavgm,
    /// `hq-pretrained`, `one-shot-pretrain(-distill)`, `two-trip-pretrain(-distill)`.
    Pretrain,
    /// `one-shot-fisher`, `two-trip-fisher`.
    Fisher,
    /// `one-shot-select`, `two-trip-select`.
    Select,
}

impl RowGroup {
    /// Every group.
    pub const ALL: [RowGroup; 5] = [
        RowGroup::Distill,
        RowGroup::Fedavgm,
        RowGroup::Pretrain,
        RowGroup::Fisher,
        RowGroup::Select,
    ];
}

impl Default for TripsConfig {
    fn default() -> Self {
        TripsConfig {
            hq_samples: 5000,
            distill_epochs: DistillConfig::default().epochs,
            distill_lr: DistillConfig::default().lr,
            pretrain_epochs: 2,
            server_lrs: vec![1.0, 1.5, 2.0],
            fisher_bounds: vec![3.0, 10.0, 100.0],
            groups: RowGroup::ALL.to_vec(),
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct TripRow {
    /// `best-site`, `ensemble`, `one-shot-avg`, `two-trip-distill`, `fedavg-3`, ...
    pub name: String,
    /// Round trips to the sites.
    pub round_trips: u32,
    /// Bytes carried across the air gap, both ways, all sites.
    pub bytes_carried: u64,
    /// Test accuracy, 0..1.
    pub accuracy: f64,
    /// Accuracy on HQ's tuning slice (what choices are made on), 0..1.
    pub hq_tune_accuracy: f64,
    /// The fewest FedAvg trips reaching `accuracy` (`None`: not within the FedAvg run).
    pub fedavg_trips_to_match: Option<u32>,
    /// What the row is.
    pub note: String,
}

struct Data {
    sites: Vec<Dataset>,
    hq_train: Dataset,
    hq_tune: Dataset,
    test: Dataset,
}

fn load(spec: &DataSpec, limit: Option<usize>, arch: Arch) -> Result<Dataset> {
    let s = spinner(format!("loading {spec}"));
    let d = spec.load(&LoadConfig {
        limit,
        font: None,
        input: Some(arch.input()),
        classes: Some(arch.classes()),
    });
    s.finish_and_clear();
    d.with_context(|| format!("loading {spec}"))
}

fn datasets(cfg: &FedAvgConfig, t: &TripsConfig, arch: Arch) -> Result<(Data, Vec<usize>)> {
    let DataSpec::Idx {
        dir,
        split: Split::Train,
    } = &cfg.data
    else {
        bail!("--few-trips needs an IDX training set (idx:DIR): HQ's data is a slice of it no site holds");
    };
    let all = load(&cfg.data, None, arch)?;
    let n = all.len();
    if t.hq_samples < 10 || t.hq_samples >= n {
        bail!(
            "--hq-samples must be between 10 and {} (the training file has {n})",
            n - 1
        );
    }
    let pool = cfg.limit.unwrap_or(n).min(n - t.hq_samples);
    let hq_start = n - t.hq_samples;
    let tune_start = hq_start + t.hq_samples * 4 / 5;
    let hq_train = all.subset(&(hq_start..tune_start).collect::<Vec<_>>());
    let hq_tune = all.subset(&(tune_start..n).collect::<Vec<_>>());
    let pool_set = all.subset(&(0..pool).collect::<Vec<_>>());
    drop(all);
    let parts = split(&pool_set, cfg.sites, cfg.split, cfg.seed)?;
    let sizes = parts.iter().map(Vec::len).collect();
    let sites = parts.iter().map(|p| pool_set.subset(p)).collect();
    let test_spec = cfg.test_data.clone().unwrap_or(DataSpec::Idx {
        dir: dir.clone(),
        split: Split::Test,
    });
    let test = load(&test_spec, cfg.test_limit, arch)?;
    println!(
        "HQ's data: training-file images {hq_start}..{tune_start} (hq-train, distillation and pretraining) and \
         {tune_start}..{n} (hq-tune, where choices are made); sites split images 0..{pool}; test: {} images of {test_spec}",
        test.len()
    );
    Ok((
        Data {
            sites,
            hq_train,
            hq_tune,
            test,
        },
        sizes,
    ))
}

/// Runs the experiment; writes `trips.md`, `trips.csv`, `trips.json` and `trips.png` into `cfg.out`.
pub fn run(cfg: &FedAvgConfig, t: &TripsConfig) -> Result<Vec<TripRow>> {
    let start = Instant::now();
    if cfg.rounds < 2 || cfg.local_epochs == 0 || cfg.batch == 0 {
        bail!("--few-trips needs --rounds of at least 2 (the FedAvg run compared with), --local-epochs and --batch of at least 1");
    }
    let arch = cfg.model.unwrap_or(Arch::MnistCnn);
    let (data, sizes) = datasets(cfg, t, arch)?;
    let active: Vec<usize> = (0..cfg.sites).filter(|&k| sizes[k] > 0).collect();
    if active.len() < 2 {
        bail!("fewer than two sites got samples");
    }
    let tcfg = cfg.local_training(arch, &sizes);
    let warmup = tcfg.adam.warmup;
    let ids: Vec<String> = (1..=cfg.sites).map(|k| format!("site-{k:02}")).collect();
    println!(
        "ferry-lab fedavg --few-trips into {}: {arch}, {} sites ({} split, samples {sizes:?}), {} local epochs, batch {}, lr {}, warm-up {warmup}; FedAvg up to {} trips",
        cfg.out.display(),
        cfg.sites,
        cfg.split,
        cfg.local_epochs,
        cfg.batch,
        cfg.lr,
        cfg.rounds
    );
    let fedavg = RoundConfig {
        merge: MergeConfig {
            strategy: Strategy::FedAvg,
            weighting: cfg.weighting,
            ..MergeConfig::default()
        },
        ..RoundConfig::default()
    };
    let dcfg = DistillConfig {
        epochs: t.distill_epochs,
        lr: t.distill_lr,
        seed: cfg.seed,
        ..DistillConfig::default()
    };
    let ctx = Ctx {
        data: &data,
        active: &active,
        ids: &ids,
        tcfg: &tcfg,
        dcfg: &dcfg,
        arch,
    };
    let mut rows: Vec<TripRow> = Vec::new();
    let push = |rows: &mut Vec<TripRow>, r: TripRow| {
        println!(
            "{:<28} trips {}  test {:.2}%  hq-tune {:.2}%  {} carried  ({:.0} s)",
            r.name,
            r.round_trips,
            100.0 * r.accuracy,
            100.0 * r.hq_tune_accuracy,
            human_bytes(r.bytes_carried),
            start.elapsed().as_secs_f64()
        );
        rows.push(r);
    };

    // Trip 1 from the plain round 0: shared by every row that starts there.
    let mut a = Federation::create(&cfg.out.join("fedavg"), arch, cfg.seed, &ids)?;
    let u1 = ctx.trip(&mut a, 1)?;
    let bytes1 = a.bytes_carried();
    let site_models: Vec<Model> = u1
        .iter()
        .map(|p| a.update_model(p))
        .collect::<Result<_>>()?;
    let (mut best, mut best_tune) = (0.0f64, 0.0f64);
    let mut best_name = String::new();
    for (m, &k) in site_models.iter().zip(&active) {
        let tune = ctx.acc(m, &data.hq_tune)?;
        // The best site is the one HQ would pick: best on HQ's tuning slice.
        if tune > best_tune {
            (best_tune, best_name) = (tune, ids[k].clone());
            best = ctx.acc(m, &data.test)?;
        }
    }
    push(
        &mut rows,
        TripRow {
            name: "best-site".into(),
            round_trips: 1,
            bytes_carried: bytes1,
            accuracy: best,
            hq_tune_accuracy: best_tune,
            fedavg_trips_to_match: None,
            note: format!("{best_name}'s update alone (best on hq-tune)"),
        },
    );
    let s = spinner("evaluating the ensemble of the site models");
    let ens = ensemble_accuracy(&site_models, &data.test, EVAL_BATCH)?;
    let ens_tune = ensemble_accuracy(&site_models, &data.hq_tune, EVAL_BATCH)?;
    s.finish_and_clear();
    drop(site_models);
    push(
        &mut rows,
        TripRow {
            name: "ensemble".into(),
            round_trips: 1,
            bytes_carried: bytes1,
            accuracy: ens,
            hq_tune_accuracy: ens_tune,
            fedavg_trips_to_match: None,
            note: "average softmax of the site models (not one model: the ceiling)".into(),
        },
    );

    // Branches on the same trip-1 updates, before HQ merges them.
    let want = |g: RowGroup| t.groups.contains(&g);
    let fork = |a: &Federation, g: RowGroup, name: &str| -> Result<Option<Federation>> {
        Ok(if want(g) {
            Some(a.fork(&cfg.out.join(name))?)
        } else {
            None
        })
    };
    let d = fork(&a, RowGroup::Distill, "distill")?;
    let m = fork(&a, RowGroup::Fedavgm, "fedavgm")?;
    let fi = fork(&a, RowGroup::Fisher, "fisher")?;
    let sel = fork(&a, RowGroup::Select, "select")?;

    // FedAvg: 1..R trips.
    let mut curve = Vec::new();
    let u1a = moved_paths(&u1, &a.root, &a.root);
    ctx.merge(&mut a, &u1a, &fedavg, None)?;
    curve.push(ctx.row(&a, "one-shot-avg", 1, "plain FedAvg, one trip")?);
    for r in 2..=cfg.rounds {
        let u = ctx.trip(&mut a, r)?;
        ctx.merge(&mut a, &u, &fedavg, None)?;
        curve.push(ctx.row(&a, &format!("fedavg-{r}"), r, "plain FedAvg")?);
    }

    // Distillation at HQ after each merge.
    if let Some(mut d) = d {
        let u1d = moved_paths(&u1, &a.root, &d.root);
        ctx.merge(&mut d, &u1d, &fedavg, Some(&mut ctx.refiner()))?;
        push(
            &mut rows,
            ctx.row(
                &d,
                "one-shot-distill",
                1,
                "FedAvg, then distilled on hq-train",
            )?,
        );
        let u = ctx.trip(&mut d, 2)?;
        ctx.merge(&mut d, &u, &fedavg, Some(&mut ctx.refiner()))?;
        push(
            &mut rows,
            ctx.row(&d, "two-trip-distill", 2, "distilled after both merges")?,
        );
    }

    // HQ's choice after each merge: the merge or one site's model, whichever reads hq-tune best.
    if let Some(mut sel) = sel {
        let u1s = moved_paths(&u1, &a.root, &sel.root);
        let mut selector = select_refiner(arch, &data.hq_tune, "hq-tune");
        let kept = ctx.merge(&mut sel, &u1s, &fedavg, Some(&mut selector))?;
        push(&mut rows, ctx.row(&sel, "one-shot-select", 1, &kept)?);
        let u = ctx.trip(&mut sel, 2)?;
        let kept = ctx.merge(&mut sel, &u, &fedavg, Some(&mut selector))?;
        push(&mut rows, ctx.row(&sel, "two-trip-select", 2, &kept)?);
    }

    // The server step for round 2: FedAvgM (β 0.9), its lr chosen on hq-tune.
    let fedavgm = |lr: f64| RoundConfig {
        merge: MergeConfig {
            strategy: Strategy::FedAvgM,
            weighting: cfg.weighting,
            fedavgm: ferry_merge::FedAvgMConfig { lr, beta: 0.9 },
            ..MergeConfig::default()
        },
        ..RoundConfig::default()
    };
    if let Some(mut m) = m {
        let u1m = moved_paths(&u1, &a.root, &m.root);
        // Round 1 with lr 1 is FedAvg; it seeds the momentum the second merge extrapolates with.
        ctx.merge(&mut m, &u1m, &fedavgm(1.0), None)?;
        let u2 = ctx.trip(&mut m, 2)?;
        let mut tried = Vec::new();
        for (i, &lr) in t.server_lrs.iter().enumerate() {
            let mut f = m.fork(&cfg.out.join(format!("fedavgm-lr{i}")))?;
            let u = moved_paths(&u2, &m.root, &f.root);
            ctx.merge(&mut f, &u, &fedavgm(lr), None)?;
            let r = ctx.row(
                &f,
                "two-trip-fedavgm",
                2,
                &format!(
                    "FedAvgM beta 0.9, server lr {lr} (of {:?}, chosen on hq-tune)",
                    t.server_lrs
                ),
            )?;
            println!(
                "  fedavgm server lr {lr}: hq-tune {:.2}%",
                100.0 * r.hq_tune_accuracy
            );
            tried.push(r);
        }
        if let Some(best) = tried
            .into_iter()
            .max_by(|x, y| x.hq_tune_accuracy.total_cmp(&y.hq_tune_accuracy))
        {
            push(&mut rows, best);
        }
    }

    // Fisher-weighted merge: each site ships its diagonal Fisher estimate (`ferry-client fisher`, `export
    // --fisher`), HQ merges with `--strategy fisher`; the bound B chosen on hq-tune.
    if let Some(mut fi) = fi {
        let fcfg = FisherConfig {
            seed: cfg.seed,
            ..FisherConfig::default()
        };
        let mut uf = Vec::new();
        for &k in &active {
            uf.push(
                fi.export_with_fisher(k, &data.sites[k], &fcfg)?
                    .path
                    .clone(),
            );
        }
        let by_fisher = |bound: f64| RoundConfig {
            merge: MergeConfig {
                strategy: Strategy::Fisher,
                weighting: cfg.weighting,
                fisher_bound: bound,
                ..MergeConfig::default()
            },
            ..RoundConfig::default()
        };
        let mut tried = Vec::new();
        for (i, &bound) in t.fisher_bounds.iter().enumerate() {
            let mut f = fi.fork(&cfg.out.join(format!("fisher-b{i}")))?;
            let u = moved_paths(&uf, &fi.root, &f.root);
            ctx.merge(&mut f, &u, &by_fisher(bound), None)?;
            let r = ctx.row(
                &f,
                "one-shot-fisher",
                1,
                &format!(
                    "Fisher-weighted, bound {bound} (of {:?}, chosen on hq-tune)",
                    t.fisher_bounds
                ),
            )?;
            println!(
                "  fisher bound {bound}: hq-tune {:.2}%",
                100.0 * r.hq_tune_accuracy
            );
            tried.push((r, f, bound));
        }
        if let Some((best, mut f, bound)) = tried
            .into_iter()
            .max_by(|x, y| x.0.hq_tune_accuracy.total_cmp(&y.0.hq_tune_accuracy))
        {
            push(&mut rows, best);
            let u = ctx.trip_with(&mut f, 2, Some(&fcfg))?;
            ctx.merge(&mut f, &u, &by_fisher(bound), None)?;
            push(
                &mut rows,
                ctx.row(
                    &f,
                    "two-trip-fisher",
                    2,
                    &format!("Fisher-weighted both merges, bound {bound}"),
                )?,
            );
        }
    }

    // Warm start: round 0 trained on hq-train, as `ferry-server init --pretrain` does.
    if t.pretrain_epochs > 0 && want(RowGroup::Pretrain) {
        // As `ferry-server init --pretrain` does.
        let mut model = Model::init(arch, cfg.seed, &Device::Cpu)?;
        let pcfg = PretrainConfig {
            epochs: t.pretrain_epochs,
            seed: cfg.seed,
            ..PretrainConfig::default()
        };
        pretrain(
            &mut model,
            &data.hq_train,
            &pcfg,
            &mut TrainBars::new("HQ pretraining round 0"),
        )?;
        let mut p = Federation::create_from(&cfg.out.join("pretrain"), model, &ids)?;
        push(
            &mut rows,
            ctx.row(&p, "hq-pretrained", 0, "round 0 trained on hq-train only")?,
        );
        let up1 = ctx.trip(&mut p, 1)?;
        let mut pd = p.fork(&cfg.out.join("pretrain-distill"))?;
        ctx.merge(&mut p, &up1, &fedavg, None)?;
        push(
            &mut rows,
            ctx.row(&p, "one-shot-pretrain", 1, "warm start, FedAvg")?,
        );
        let u = moved_paths(&up1, &p.root, &pd.root);
        ctx.merge(&mut pd, &u, &fedavg, Some(&mut ctx.refiner()))?;
        push(
            &mut rows,
            ctx.row(
                &pd,
                "one-shot-pretrain-distill",
                1,
                "warm start, FedAvg, distilled",
            )?,
        );
        let u = ctx.trip(&mut p, 2)?;
        ctx.merge(&mut p, &u, &fedavg, None)?;
        push(
            &mut rows,
            ctx.row(&p, "two-trip-pretrain", 2, "warm start, FedAvg twice")?,
        );
        let u = ctx.trip(&mut pd, 2)?;
        ctx.merge(&mut pd, &u, &fedavg, Some(&mut ctx.refiner()))?;
        push(
            &mut rows,
            ctx.row(
                &pd,
                "two-trip-pretrain-distill",
                2,
                "warm start, FedAvg + distillation twice",
            )?,
        );
    }

    for c in &curve {
        push(&mut rows, c.clone());
    }
    // FedAvg trips needed to match each row (FedAvg's own rows included).
    for r in rows.iter_mut() {
        r.fedavg_trips_to_match = curve
            .iter()
            .find(|c| c.accuracy >= r.accuracy)
            .map(|c| c.round_trips);
    }
    write_outputs(cfg, t, &rows, &curve)?;
    Ok(rows)
}

struct Ctx<'a> {
    data: &'a Data,
    active: &'a [usize],
    ids: &'a [String],
    tcfg: &'a TrainConfig,
    dcfg: &'a DistillConfig,
    arch: Arch,
}

impl Ctx<'_> {
    /// Carry the current global to every site, train, carry the updates back. Returns the updates' paths.
    fn trip(&self, fed: &mut Federation, trip: u32) -> Result<Vec<PathBuf>> {
        self.trip_with(fed, trip, None)
    }

    /// [`Ctx::trip`], each site shipping its Fisher estimate with the update when `fisher` is given.
    fn trip_with(
        &self,
        fed: &mut Federation,
        trip: u32,
        fisher: Option<&FisherConfig>,
    ) -> Result<Vec<PathBuf>> {
        let mut updates = Vec::new();
        for &k in self.active {
            fed.deliver(k)?;
            let label = format!(
                "{} trip {trip} {}",
                fed.root
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default(),
                self.ids[k]
            );
            fed.train(
                k,
                &self.data.sites[k],
                self.tcfg,
                &mut TrainBars::new(label),
            )?;
            let crossing = match fisher {
                Some(f) => fed.export_with_fisher(k, &self.data.sites[k], f)?,
                None => fed.export(k)?,
            };
            updates.push(crossing.path.clone());
        }
        Ok(updates)
    }

    /// HQ merges `updates`; returns the strategy the new global records (after `--select`: what HQ kept).
    fn merge(
        &self,
        fed: &mut Federation,
        updates: &[PathBuf],
        cfg: &RoundConfig,
        refiner: Option<&mut Refiner<'_>>,
    ) -> Result<String> {
        let s = spinner(format!("HQ: merging {} updates", updates.len()));
        let r = match refiner {
            Some(r) => fed.merge_refined(updates, cfg, r),
            None => fed.merge(updates, cfg),
        };
        s.finish_and_clear();
        Ok(r?.sealed.manifest.strategy.unwrap_or_default())
    }

    /// The refiner of `ferry-server merge --distill`, on hq-train.
    fn refiner(&self) -> Refiner<'_> {
        distill_refiner(self.arch, &self.data.hq_train, self.dcfg, "hq-train")
    }

    fn acc(&self, m: &Model, d: &Dataset) -> Result<f64> {
        Ok(evaluate(m, d, EVAL_BATCH)?.accuracy)
    }

    fn row(&self, fed: &Federation, name: &str, trips: u32, note: &str) -> Result<TripRow> {
        let m = fed.global_model()?;
        Ok(TripRow {
            name: name.into(),
            round_trips: trips,
            bytes_carried: fed.bytes_carried(),
            accuracy: self.acc(&m, &self.data.test)?,
            hq_tune_accuracy: self.acc(&m, &self.data.hq_tune)?,
            fedavg_trips_to_match: None,
            note: note.into(),
        })
    }
}

fn write_outputs(
    cfg: &FedAvgConfig,
    t: &TripsConfig,
    rows: &[TripRow],
    curve: &[TripRow],
) -> Result<()> {
    let header = [
        "row",
        "round_trips",
        "bytes_carried",
        "accuracy %",
        "hq-tune %",
        "FedAvg trips to match",
        "what",
    ];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                r.round_trips.to_string(),
                r.bytes_carried.to_string(),
                format!("{:.2}", 100.0 * r.accuracy),
                format!("{:.2}", 100.0 * r.hq_tune_accuracy),
                r.fedavg_trips_to_match
                    .map_or_else(|| format!(">{}", cfg.rounds), |k| k.to_string()),
                r.note.clone(),
            ]
        })
        .collect();
    write_table(&cfg.out, "trips", "", &header, &table)?;
    std::fs::write(
        cfg.out.join("trips.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "config": cfg, "few_trips": t, "rows": rows,
        }))?,
    )?;
    let mut series = vec![Series {
        name: "fedavg".into(),
        points: curve
            .iter()
            .map(|r| (f64::from(r.round_trips), r.accuracy))
            .collect(),
    }];
    // One series per method: its one- and two-trip rows joined.
    let mut methods: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for r in rows
        .iter()
        .filter(|r| !r.name.starts_with("fedavg-") && r.name != "one-shot-avg")
    {
        let method = r
            .name
            .trim_start_matches("one-shot-")
            .trim_start_matches("two-trip-")
            .to_string();
        let p = (f64::from(r.round_trips), r.accuracy);
        match methods.iter_mut().find(|(n, _)| *n == method) {
            Some((_, pts)) => pts.push(p),
            None => methods.push((method, vec![p])),
        }
    }
    series.extend(
        methods
            .into_iter()
            .map(|(name, points)| Series { name, points }),
    );
    plot_accuracy(
        &cfg.out.join("trips.png"),
        &format!(
            "ferry-lab fedavg --few-trips: {} sites, {}",
            cfg.sites, cfg.split
        ),
        "round trips",
        &series,
    )?;
    println!(
        "wrote trips.md, trips.csv, trips.json and trips.png in {}",
        cfg.out.display()
    );
    Ok(())
}

/// The refiner `ferry-server merge --distill` builds, on HQ's `data` (named `data_name` in the ledger's
/// description and the progress line): the few-trips rows of `fedavg` and of `seed-table` both use it.
pub(crate) fn distill_refiner<'a>(
    arch: Arch,
    data: &'a Dataset,
    cfg: &'a DistillConfig,
    data_name: &'a str,
) -> Refiner<'a> {
    Refiner {
        describe: format!(
            "distill epochs={} lr={} t={} data={data_name}",
            cfg.epochs, cfg.lr, cfg.temperature
        ),
        run: Box::new(move |input| {
            let teachers: Vec<&[u8]> = input.updates.iter().map(|u| u.model.as_slice()).collect();
            let (model, s) = distill_safetensors(
                arch,
                input.merged,
                &teachers,
                data,
                cfg,
                &mut TrainBars::new("HQ distilling"),
            )
            .map_err(|e| e.to_string())?;
            println!(
                "  distilled {} site models on {} {data_name} samples: KL to the ensemble {:.4} -> {:.4} ({:.0} s)",
                s.teachers, s.samples, s.kl_before, s.kl_after, s.seconds
            );
            Ok(Refined { model, note: None })
        }),
    }
}

/// `merge --select` on HQ's labelled `data` (`data_name` in the description), as `ferry-server merge --select`
/// builds it: the merge or one site's model, whichever reads `data` best.
pub(crate) fn select_refiner<'a>(arch: Arch, data: &'a Dataset, data_name: &'a str) -> Refiner<'a> {
    Refiner {
        describe: format!("select data={data_name}"),
        run: Box::new(move |input| {
            let sites: Vec<(String, &[u8])> = input
                .updates
                .iter()
                .map(|u| (u.site.clone(), u.model.as_slice()))
                .collect();
            let (model, s) = merge_or_site(arch, input.merged, &sites, data, EVAL_BATCH)
                .map_err(|e| e.to_string())?;
            println!("  HQ's selection on {data_name}: {}", s.note());
            Ok(Refined {
                model,
                note: Some(s.note()),
            })
        }),
    }
}
