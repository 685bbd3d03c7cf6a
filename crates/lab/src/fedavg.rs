//! `ferry-lab fedavg` (issue 5): general federated experiments through real bundles. Any dataset ferry loads
//! (synthetic plates, IDX, image folder), K sites, a split (IID, by crop style, the FedAvg paper's shards,
//! Dirichlet label skew), R rounds of E local epochs, any merge strategy. It runs the FedAvg paper's MNIST CNN
//! setting (McMahan et al. 2017: `--model mnist-cnn`, K sites, IID or 2 shards per site) on any IDX dataset,
//! with Adam instead of the paper's plain SGD (ferry's trainer is Adam, as in the field study).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_merge::hq::RoundConfig;
use ferry_merge::{MergeConfig, Strategy, Weighting};
use ferry_train::data::{DataSpec, Dataset, LoadConfig, Split};
use ferry_train::fisher::FisherConfig;
use ferry_train::{AdamConfig, Arch, Augment, Evaluation, TrainConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::fed::{human_bytes, Federation};
use crate::plates::scaled_warmup;
use crate::progress::{spinner, TrainBars};
use crate::report::{plot_accuracy, write_table, Series};
use crate::split::{split, SplitKind};

/// Settings of a FedAvg experiment.
#[derive(Debug, Clone, Serialize)]
pub struct FedAvgConfig {
    /// Output folder.
    pub out: PathBuf,
    /// Training data, split between the sites.
    #[serde(serialize_with = "crate::report::display")]
    pub data: DataSpec,
    /// Test data (`None`: the IDX test split, fresh plates of the same style, or 1/6 of a folder held out).
    #[serde(serialize_with = "crate::report::display_opt")]
    pub test_data: Option<DataSpec>,
    /// Model (`None`: mnist-cnn for IDX data, [`Arch::DEFAULT_PLATE_READER`] otherwise).
    #[serde(serialize_with = "crate::report::display_opt")]
    pub model: Option<Arch>,
    /// Number of sites K.
    pub sites: usize,
    /// How the data is split.
    #[serde(serialize_with = "crate::report::display")]
    pub split: SplitKind,
    /// Rounds R.
    pub rounds: u32,
    /// Local epochs per round E.
    pub local_epochs: u32,
    /// Images per step B.
    pub batch: usize,
    /// Adam's peak learning rate.
    pub lr: f64,
    /// Warm-up steps (`None`: 0.8 of an average site's epoch).
    pub warmup: Option<u64>,
    /// Merge strategy.
    #[serde(serialize_with = "crate::report::display")]
    pub strategy: Strategy,
    /// Weighting of the averaging strategies.
    #[serde(serialize_with = "crate::report::display")]
    pub weighting: Weighting,
    /// Report the first round whose accuracy reaches this (0..1).
    pub target: Option<f64>,
    /// Training samples used in total (the first N), before splitting.
    pub limit: Option<usize>,
    /// Test samples used (the first N).
    pub test_limit: Option<usize>,
    /// Seed of the initial weights, the split and the shuffles.
    pub seed: u64,
    /// Changes to each training image (`None`: the model's default, [`Augment::default_for`]).
    #[serde(serialize_with = "crate::report::display_opt")]
    pub augment: Option<Augment>,
}

impl FedAvgConfig {
    /// Each site's training per trip: `local_epochs`, `batch`, `seed`, Adam at `lr` with `warmup`, or, without
    /// one, a warm-up of 0.8 of the mean non-empty site's epoch (`site_samples`: samples per site), and `arch`'s
    /// augmentation unless one is set.
    pub fn local_training(&self, arch: Arch, site_samples: &[usize]) -> TrainConfig {
        let active = site_samples.iter().filter(|&&n| n > 0).count().max(1);
        let mean = site_samples.iter().sum::<usize>() / active;
        TrainConfig {
            epochs: self.local_epochs,
            batch: self.batch,
            seed: self.seed,
            adam: AdamConfig {
                lr: self.lr,
                warmup: self
                    .warmup
                    .unwrap_or_else(|| scaled_warmup(mean, self.batch)),
                ..AdamConfig::default()
            },
            augment: self.augment.unwrap_or_else(|| Augment::default_for(arch)),
        }
    }
}

/// One round's result.
#[derive(Debug, Clone, Serialize)]
pub struct RoundRow {
    /// The global's round (0 = the initial weights).
    pub round: u64,
    /// Test accuracy of that global, 0..1 (plates: read exactly).
    pub accuracy: f64,
    /// Per-character accuracy for plates.
    pub char_accuracy: Option<f64>,
    /// Bytes carried across the air gap up to and including this round (each global once per site it reached,
    /// plus every update).
    pub bytes_carried: u64,
    /// Seconds since the experiment started.
    pub seconds: f64,
}

/// An experiment's result.
#[derive(Debug, Clone, Serialize)]
pub struct FedAvgResult {
    /// The model trained.
    pub model: String,
    /// Samples per site.
    pub site_samples: Vec<usize>,
    /// Test samples.
    pub test_samples: usize,
    /// Warm-up used.
    pub warmup: u64,
    /// First round reaching `target`, if any.
    pub target_round: Option<u64>,
    /// One row per round, round 0 first.
    pub rows: Vec<RoundRow>,
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

/// The train and test sets.
fn datasets(cfg: &FedAvgConfig, arch: Arch) -> Result<(Dataset, Dataset)> {
    let train = load(&cfg.data, cfg.limit, arch)?;
    let test_spec = match (&cfg.test_data, &cfg.data) {
        (Some(t), _) => Some(t.clone()),
        (None, DataSpec::Idx { dir, .. }) => Some(DataSpec::Idx {
            dir: dir.clone(),
            split: Split::Test,
        }),
        (None, DataSpec::Plates { style, n, seed }) => Some(DataSpec::Plates {
            style: *style,
            n: cfg.test_limit.unwrap_or((*n / 5).max(1)),
            seed: seed.wrapping_add(1_000_003),
        }),
        (None, _) => None,
    };
    match test_spec {
        Some(t) => Ok((train, load(&t, cfg.test_limit, arch)?)),
        None => {
            // A folder without --test-data: hold out a sixth, chosen with the seed.
            let mut idx: Vec<usize> = (0..train.len()).collect();
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(cfg.seed));
            let cut = train.len() / 6;
            if cut == 0 {
                bail!("too few samples to hold out a test set; give --test-data");
            }
            let mut test = train.subset(&idx[..cut]);
            if let Some(l) = cfg.test_limit {
                test = test.limit(l);
            }
            Ok((train.subset(&idx[cut..]), test))
        }
    }
}

/// Run the experiment, writing `rounds.md`, `rounds.csv`, `results.json` and `accuracy.png` into `cfg.out`.
pub fn run(cfg: &FedAvgConfig) -> Result<FedAvgResult> {
    let start = Instant::now();
    if cfg.rounds == 0 || cfg.local_epochs == 0 || cfg.batch == 0 {
        bail!("--rounds, --local-epochs and --batch must be at least 1");
    }
    let arch = cfg.model.unwrap_or(match cfg.data {
        DataSpec::Idx { .. } => Arch::MnistCnn,
        _ => Arch::DEFAULT_PLATE_READER,
    });
    let (train, test) = datasets(cfg, arch)?;
    let parts = split(&train, cfg.sites, cfg.split, cfg.seed)?;
    let site_samples: Vec<usize> = parts.iter().map(Vec::len).collect();
    let active: Vec<usize> = (0..cfg.sites).filter(|&k| site_samples[k] > 0).collect();
    if active.is_empty() {
        bail!("no site got any samples");
    }
    let tcfg = cfg.local_training(arch, &site_samples);
    let warmup = tcfg.adam.warmup;
    let site_data: Vec<Dataset> = parts.iter().map(|p| train.subset(p)).collect();
    drop(train);
    let ids: Vec<String> = (1..=cfg.sites).map(|k| format!("site-{k:02}")).collect();
    println!(
        "ferry-lab fedavg into {}: {arch}, {} sites ({} split, samples {:?}), {} rounds x {} local epochs, batch {}, Adam lr {}, warm-up {warmup} steps{}, strategy {} ({} weights), {} test samples",
        cfg.out.display(),
        cfg.sites,
        cfg.split,
        site_samples,
        cfg.rounds,
        cfg.local_epochs,
        cfg.batch,
        cfg.lr,
        if cfg.warmup.is_none() { " (0.8 of a site's epoch)" } else { "" },
        cfg.strategy,
        cfg.weighting,
        test.len()
    );
    for k in (0..cfg.sites).filter(|k| site_samples[*k] == 0) {
        println!("note: {} got no samples and sends no updates", ids[k]);
    }
    let mut fed = Federation::create(&cfg.out, arch, cfg.seed, &ids)?;
    let round_cfg = RoundConfig {
        merge: MergeConfig {
            strategy: cfg.strategy,
            weighting: cfg.weighting,
            ..MergeConfig::default()
        },
        // One site is the centralised baseline through the same bundles: its "merge" is its own update.
        min_sites: cfg.sites.min(ferry_merge::hq::DEFAULT_MIN_SITES),
        ..RoundConfig::default()
    };
    let row = |fed: &Federation, e: Evaluation| RoundRow {
        round: fed.round,
        accuracy: e.accuracy,
        char_accuracy: e.char_accuracy,
        bytes_carried: fed.bytes_carried(),
        seconds: start.elapsed().as_secs_f64(),
    };
    let print = |r: &RoundRow| {
        let chars = r
            .char_accuracy
            .map(|c| format!(" ({:.2}% chars)", 100.0 * c))
            .unwrap_or_default();
        println!(
            "round {:>3}: test accuracy {:.2}%{chars}, {} carried, {:.0} s",
            r.round,
            100.0 * r.accuracy,
            human_bytes(r.bytes_carried),
            r.seconds
        );
    };
    let mut rows = vec![row(&fed, evaluate(&fed, &test)?)];
    print(&rows[0]);
    let mut target_round = None;
    for r in 1..=cfg.rounds {
        let mut updates = Vec::new();
        for &k in &active {
            fed.deliver(k)?;
            let label = format!("round {r}/{} {}", cfg.rounds, ids[k]);
            fed.train(k, &site_data[k], &tcfg, &mut TrainBars::new(label))?;
            // `--strategy fisher` merges by the sites' Fisher estimates, so each site ships one.
            let crossing = if cfg.strategy == Strategy::Fisher {
                let f = FisherConfig {
                    seed: cfg.seed,
                    ..FisherConfig::default()
                };
                fed.export_with_fisher(k, &site_data[k], &f)?
            } else {
                fed.export(k)?
            };
            updates.push(crossing.path.clone());
        }
        let s = spinner(format!("HQ: verifying and merging round {r}"));
        let merged = fed.merge(&updates, &round_cfg);
        s.finish_and_clear();
        merged?;
        let rr = row(&fed, evaluate(&fed, &test)?);
        print(&rr);
        if target_round.is_none() && cfg.target.is_some_and(|t| rr.accuracy >= t) {
            target_round = Some(rr.round);
            println!(
                "reached the target {:.2}% at round {}",
                100.0 * cfg.target.unwrap_or(0.0),
                rr.round
            );
        }
        rows.push(rr);
    }
    if let (Some(t), None) = (cfg.target, target_round) {
        println!(
            "did not reach the target {:.2}% in {} rounds",
            100.0 * t,
            cfg.rounds
        );
    }
    let result = FedAvgResult {
        model: arch.name().to_string(),
        site_samples,
        test_samples: test.len(),
        warmup,
        target_round,
        rows,
    };
    write_outputs(cfg, &result)?;
    Ok(result)
}

fn evaluate(fed: &Federation, test: &Dataset) -> Result<Evaluation> {
    let s = spinner(format!(
        "evaluating global-r{} on {} test samples",
        fed.round,
        test.len()
    ));
    let e = fed.evaluate_global(test);
    s.finish_and_clear();
    e
}

/// The JSON `--json` writes: `{"config": .., "target_round": .., "rows": [{round, accuracy, bytes_carried, ..}]}`.
pub fn json(cfg: &FedAvgConfig, r: &FedAvgResult) -> serde_json::Value {
    serde_json::json!({
        "config": cfg,
        "model": r.model,
        "site_samples": r.site_samples,
        "test_samples": r.test_samples,
        "warmup": r.warmup,
        "target_round": r.target_round,
        "rows": r.rows,
    })
}

fn write_outputs(cfg: &FedAvgConfig, r: &FedAvgResult) -> Result<()> {
    let header = [
        "round",
        "accuracy %",
        "characters %",
        "bytes carried",
        "seconds",
    ];
    let table: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.round.to_string(),
                format!("{:.2}", 100.0 * x.accuracy),
                x.char_accuracy
                    .map_or("-".into(), |c| format!("{:.2}", 100.0 * c)),
                x.bytes_carried.to_string(),
                format!("{:.0}", x.seconds),
            ]
        })
        .collect();
    write_table(&cfg.out, "rounds", "", &header, &table)?;
    std::fs::write(
        cfg.out.join("results.json"),
        serde_json::to_vec_pretty(&json(cfg, r))?,
    )?;
    let mut series = vec![Series {
        name: format!(
            "{} {} K={} E={}",
            cfg.strategy, cfg.split, cfg.sites, cfg.local_epochs
        ),
        points: r
            .rows
            .iter()
            .map(|x| (x.round as f64, x.accuracy))
            .collect(),
    }];
    if r.rows.iter().all(|x| x.char_accuracy.is_some()) {
        series.push(Series {
            name: "characters".into(),
            points: r
                .rows
                .iter()
                .map(|x| (x.round as f64, x.char_accuracy.unwrap_or(0.0)))
                .collect(),
        });
    }
    plot_accuracy(
        &cfg.out.join("accuracy.png"),
        &format!("ferry-lab fedavg: {} on {}", r.model, cfg.data),
        "round",
        &series,
    )?;
    println!(
        "wrote rounds.md, rounds.csv, results.json and accuracy.png in {}",
        cfg.out.display()
    );
    Ok(())
}
