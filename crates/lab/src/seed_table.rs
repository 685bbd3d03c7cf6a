//! `ferry-lab seed-table` (issue 5): the field study's table, reproduced through real bundles. Two sites with
//! equal-sized plate sets (A loose, B tight), a validation set 90 % loose / 10 % tight, one initial seed, and a
//! total budget of T epochs per site. Rows:
//! - `site-a`, `site-b`: each site alone for T epochs; `centralised`: both sets pooled for T epochs (upper bound).
//!   No bundles: nothing crosses the air gap (centralised would carry the data itself).
//! - `one-shot`: each site trains T epochs from the same round-0 global and HQ averages once. The two local runs
//!   *are* the `site-a`/`site-b` runs (same seed, same data, same shuffles: `train_site` of round 0 runs exactly
//!   `train_epoch(.., round 0, epoch e)`), so they are reused, recorded in each site's state as its local model,
//!   then exported, verified and merged through real bundles.
//! - `fedavg-e<E>`: ceil(T/E) rounds of E local epochs (the last round gets what is left, so every row aggregates
//!   at epoch T), each site keeping its Adam state between rounds as in the field study, all through real
//!   bundles (`ferry_site::train_site`, `SiteState::export`, `hq::merge_round`, `SiteState::import`).
//!
//! Every row is evaluated on the validation set after every epoch-equivalent: standalone rows after each epoch,
//! federated rows after each merge.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use ferry_merge::hq::RoundConfig;
use ferry_train::data::Dataset;
use ferry_train::optim::Adam;
use ferry_train::train::train_epoch;
use ferry_train::{evaluate, AdamConfig, Arch, Augment, Device, Evaluation, Model, TrainConfig};
use serde::Serialize;

use crate::fed::{Federation, EVAL_BATCH};
use crate::plates::{field_data, planned_decay, require_plate_reader, scaled_warmup, FieldData};
use crate::progress::{spinner, TrainBars};
use crate::report::{plot_accuracy, write_table, Series};
use crate::seed_trips;
use crate::start::Start;

/// A named budget of the seed table (`ferry-lab seed-table --preset`): what each one costs and reads is measured
/// in docs/experiments.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// The built-in defaults: 2,000 plates per site, T = 10, about 10 minutes on 2 cores; a smoke run.
    Quick,
    /// 8,000 plates per site, T = 10, 2,000 validation plates, the CTC readers' tuned recipe (batch 32, lr 2e-3,
    /// cosine): sized to finish in under 45 minutes on 2 cores.
    Standard,
    /// The standard preset's plates and epochs with the deeper reader (plate-ctc-deep-v2), every row from HQ's
    /// shipped start at the fine-tuning rate, and FedAvg at E = 1 and 5 (10 and 2 trips): the E = 2 row is left
    /// out so that the deeper reader fits under 45 minutes on 2 cores.
    HqDeep,
    /// The standard preset's plates and epochs with plate-ctc-deep-v3, every row from HQ's shipped start at the
    /// fine-tuning rate, and FedAvg at E = 5 (2 trips): one FedAvg row, about 32 minutes on 2 cores (with E = 1 as
    /// well, about 42).
    HqV3,
    /// [`Preset::HqV3`] with plate-ctc-deep-v4 (the reader that reads the most per plate): about 37 minutes on 2
    /// cores.
    HqV4,
    /// The field study's own scale: 80,000 plates per site, T = 70, E in 1, 5, 10, 20, Adam 2.5e-4 after 1,000
    /// warm-up steps, batch 64 (many hours on 2 cores).
    FieldStudy,
}

impl SeedTableConfig {
    /// The augmentation every row trains with: the one set, else the reader's default.
    pub fn augment(&self) -> Augment {
        self.augment
            .unwrap_or_else(|| Augment::default_for(self.arch))
    }

    /// The settings of `preset` (the output folder is the default's).
    pub fn preset(preset: Preset) -> SeedTableConfig {
        let quick = SeedTableConfig::default();
        match preset {
            Preset::Quick => quick,
            Preset::Standard => SeedTableConfig {
                samples_per_site: 8000,
                total_epochs: 10,
                val: 2000,
                lr: 2e-3,
                batch: 32,
                cosine: true,
                ..quick
            },
            Preset::HqDeep => SeedTableConfig {
                e_sweep: vec![1, 5],
                arch: Arch::PlateCtcDeepV2,
                ..SeedTableConfig::preset(Preset::Standard)
            }
            .starting_from(Start::Shipped),
            Preset::HqV3 => SeedTableConfig {
                e_sweep: vec![5],
                arch: Arch::PlateCtcDeepV3,
                ..SeedTableConfig::preset(Preset::Standard)
            }
            .starting_from(Start::Shipped),
            Preset::HqV4 => SeedTableConfig {
                arch: Arch::PlateCtcDeepV4,
                ..SeedTableConfig::preset(Preset::HqV3)
            },
            Preset::FieldStudy => SeedTableConfig {
                samples_per_site: 80_000,
                total_epochs: 70,
                val: 2000,
                e_sweep: vec![1, 5, 10, 20],
                lr: 2.5e-4,
                warmup: Some(1000),
                batch: 64,
                cosine: false,
                ..quick
            },
        }
    }

    /// These settings with every row starting from `start`: from a trained start at the fine-tuning rate
    /// ([`crate::start::WARM_LR`]), which a learning rate set afterwards overrides.
    pub fn starting_from(self, start: Start) -> SeedTableConfig {
        let lr = if start.is_trained(self.arch) {
            start.learning_rate(self.arch)
        } else {
            self.lr
        };
        SeedTableConfig { start, lr, ..self }
    }
}

/// The start as its description in the JSON settings.
fn start_name<S: serde::Serializer>(start: &Start, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&start.describe())
}

/// Settings of a seed-table run.
#[derive(Debug, Clone, Serialize)]
pub struct SeedTableConfig {
    /// Output folder.
    pub out: PathBuf,
    /// Epoch budget T per site.
    pub total_epochs: u32,
    /// Training plates per site.
    pub samples_per_site: usize,
    /// Validation plates.
    pub val: usize,
    /// Local epochs per round of each FedAvg row.
    pub e_sweep: Vec<u32>,
    /// Adam's peak learning rate.
    pub lr: f64,
    /// Warm-up steps (`None`: 0.8 of a site's epoch, the field study's ratio).
    pub warmup: Option<u64>,
    /// Images per step.
    pub batch: usize,
    /// Cosine learning-rate decay over each trainer's whole run (all T epochs), rather than the field study's flat
    /// rate.
    pub cosine: bool,
    /// Seed of the initial weights, the data and the shuffles.
    pub seed: u64,
    /// Changes to each training image (`None`: the reader's default, [`Augment::default_for`]).
    #[serde(serialize_with = "crate::report::display_opt")]
    pub augment: Option<Augment>,
    /// The plate reader every row trains (a CTC reader or plate-cnn).
    #[serde(serialize_with = "crate::report::display")]
    pub arch: Arch,
    /// Add the few-trips rows (issue 14, `crate::seed_trips`): best-site, ensemble, one-shot-/two-trip-fisher,
    /// -distill and -recal.
    pub few_trips: bool,
    /// HQ's own plates for those rows (its clean renderer configuration; 4/5 to distil and recalibrate on, 1/5
    /// to choose on).
    pub hq_plates: usize,
    /// Fisher bounds tried in the one-trip Fisher row, chosen on HQ's tuning plates.
    pub fisher_bounds: Vec<f64>,
    /// The warm-start rows (`hq-pretrained`, `one-shot-pretrain`, `two-trip-pretrain`): HQ trains round 0 on
    /// this many epochs of its own clean plates (as many as a site holds, a stream of their own) before the first
    /// trip; 0: none. Each row trains both sites again from that round 0.
    pub pretrain_epochs: u32,
    /// Round 0 of every row (each site alone, centralised, one-shot, FedAvg): random weights from the seed (the
    /// field study's setting), or a start HQ trained on its own plates.
    #[serde(serialize_with = "start_name")]
    pub start: Start,
}

impl Default for SeedTableConfig {
    fn default() -> Self {
        SeedTableConfig {
            out: PathBuf::from(format!("lab-out/seed-table-{}", ferry_bundle::unix_now())),
            total_epochs: 10,
            samples_per_site: 2000,
            val: 1000,
            e_sweep: vec![1, 2, 5],
            lr: 1e-3,
            warmup: None,
            batch: 64,
            cosine: false,
            seed: 1,
            augment: None,
            arch: Arch::DEFAULT_PLATE_READER,
            few_trips: false,
            hq_plates: 2000,
            fisher_bounds: vec![3.0, 10.0, 100.0],
            pretrain_epochs: 0,
            start: Start::Scratch,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `site-a`, `site-b`, `centralised`, `one-shot` or `fedavg-e<E>`.
    pub name: String,
    /// Validation accuracy at the end (plates read exactly), 0..1.
    pub accuracy: f64,
    /// Validation accuracy per character at the end, 0..1.
    pub char_accuracy: f64,
    /// Round trips (one each way per round); 0 for the rows that send nothing.
    pub round_trips: u64,
    /// Bytes of bundle files carried across the air gap, both ways (a global counts once per site it reaches).
    pub bytes_carried: u64,
    /// (epochs per site so far, exact accuracy, character accuracy) after every epoch-equivalent.
    pub curve: Vec<(u32, f64, f64)>,
    /// Wall-clock seconds for the row.
    pub seconds: f64,
    /// What the row is, when its name does not say it all (the few-trips rows).
    pub note: String,
}

pub(crate) fn point(epoch: u32, e: &Evaluation) -> (u32, f64, f64) {
    (epoch, e.accuracy, e.char_accuracy.unwrap_or(e.accuracy))
}

pub(crate) fn finish(
    name: String,
    curve: Vec<(u32, f64, f64)>,
    round_trips: u64,
    bytes: u64,
    start: Instant,
) -> Row {
    let last = *curve.last().expect("a curve has its epoch-0 point");
    Row {
        name,
        accuracy: last.1,
        char_accuracy: last.2,
        round_trips,
        bytes_carried: bytes,
        curve,
        seconds: start.elapsed().as_secs_f64(),
        note: String::new(),
    }
}

fn eval(model: &Model, val: &Dataset) -> Result<Evaluation> {
    Ok(evaluate(model, val, EVAL_BATCH)?)
}

/// One model trained alone for T epochs from the round-0 weights, evaluated after every epoch. Returns the row,
/// the final weights and the optimizer steps taken.
fn standalone(
    name: &str,
    data: &Dataset,
    val: &Dataset,
    cfg: &SeedTableConfig,
    tcfg: &TrainConfig,
    round0: &[u8],
) -> Result<(Row, Vec<u8>, u64)> {
    let start = Instant::now();
    let arch = cfg.arch;
    let mut model = Model::from_safetensors(arch, round0, &Device::Cpu)?;
    let mut adam = Adam::new(arch, &Device::Cpu)?;
    let mut curve = vec![point(0, &eval(&model, val)?)];
    let tcfg = TrainConfig {
        epochs: cfg.total_epochs,
        ..planned_decay(tcfg, cfg.cosine, data.len(), cfg.total_epochs)
    };
    for epoch in 0..cfg.total_epochs {
        // Round 0's shuffles, exactly what `train_site` runs on a round-0 global.
        train_epoch(
            &mut model,
            &mut adam,
            data,
            &tcfg,
            0,
            epoch,
            &mut TrainBars::new(name),
        )?;
        curve.push(point(epoch + 1, &eval(&model, val)?));
    }
    let row = finish(name.to_string(), curve, 0, 0, start);
    Ok((row, model.to_safetensors()?, adam.step()))
}

fn site_ids() -> Vec<String> {
    vec!["site-a".to_string(), "site-b".to_string()]
}

/// One-shot averaging of the two standalone models through real bundles.
fn one_shot(
    dir: &Path,
    data: &FieldData,
    cfg: &SeedTableConfig,
    trained: [(&[u8], u64); 2],
    round0: &[u8],
    before_merge: Option<BeforeMerge<'_>>,
) -> Result<Row> {
    let start = Instant::now();
    let model = Model::from_safetensors(cfg.arch, round0, &Device::Cpu)?;
    let mut fed = Federation::create_from(dir, model, &site_ids())?;
    let mut curve = vec![point(0, &fed.evaluate_global(&data.val)?)];
    let mut updates = Vec::new();
    for (i, (weights, steps)) in trained.into_iter().enumerate() {
        fed.deliver(i)?;
        fed.record_local(
            i,
            weights,
            cfg.samples_per_site as u64,
            cfg.total_epochs,
            steps,
        )?;
        updates.push(fed.export(i)?.path.clone());
    }
    if let Some(hook) = before_merge {
        hook(&fed, &updates)?;
    }
    let s = spinner("one-shot: HQ verifying and averaging the two updates");
    let merged = fed.merge(&updates, &RoundConfig::default());
    s.finish_and_clear();
    merged?;
    curve.push(point(cfg.total_epochs, &fed.evaluate_global(&data.val)?));
    Ok(finish(
        "one-shot".into(),
        curve,
        1,
        fed.bytes_carried(),
        start,
    ))
}

/// Called with a federation whose sites' updates are on the stick and not yet merged (the few-trips rows fork
/// it there).
type BeforeMerge<'a> = &'a mut dyn FnMut(&Federation, &[PathBuf]) -> Result<()>;

/// [`BeforeMerge`] for every round of a FedAvg run, with the round's index (0: the first trip).
type BeforeEachMerge<'a> = &'a mut dyn FnMut(u32, &Federation, &[PathBuf]) -> Result<()>;

/// FedAvg with `e` local epochs per round, through real bundles.
fn fedavg(
    dir: &Path,
    data: &FieldData,
    cfg: &SeedTableConfig,
    tcfg: &TrainConfig,
    e: u32,
    round0: &[u8],
    before_merge: Option<BeforeEachMerge<'_>>,
) -> Result<Row> {
    fedavg_from(
        dir,
        data,
        cfg,
        tcfg,
        e,
        (&format!("fedavg-e{e}"), round0),
        before_merge,
    )
}

/// [`fedavg`] from the round-0 weights `round0.1` (the run's start, or HQ's pretrained round 0:
/// `ferry-server init --pretrain`), as row `round0.0`.
fn fedavg_from(
    dir: &Path,
    data: &FieldData,
    cfg: &SeedTableConfig,
    tcfg: &TrainConfig,
    e: u32,
    round0: (&str, &[u8]),
    mut before_merge: Option<BeforeEachMerge<'_>>,
) -> Result<Row> {
    let start = Instant::now();
    let name = round0.0.to_string();
    let model = Model::from_safetensors(cfg.arch, round0.1, &Device::Cpu)?;
    let mut fed = Federation::create_from(dir, model, &site_ids())?;
    let mut curve = vec![point(0, &fed.evaluate_global(&data.val)?)];
    let rounds = cfg.total_epochs.div_ceil(e);
    let mut done = 0;
    for r in 0..rounds {
        let epochs = e.min(cfg.total_epochs - done);
        let label = format!("{name} round {}/{rounds}", r + 1);
        let updates = site_round(&mut fed, data, cfg, tcfg, epochs, &label)?;
        if let Some(hook) = before_merge.as_mut() {
            hook(r, &fed, &updates)?;
        }
        let s = spinner(format!("{name}: HQ verifying and merging round {}", r + 1));
        let merged = fed.merge(&updates, &RoundConfig::default());
        s.finish_and_clear();
        merged?;
        done += epochs;
        curve.push(point(done, &fed.evaluate_global(&data.val)?));
    }
    Ok(finish(
        name,
        curve,
        u64::from(rounds),
        fed.bytes_carried(),
        start,
    ))
}

/// One trip's local work: both sites import the current global, train it for `epochs` on their plates and
/// export their updates (returned). Each site's optimizer lives across the rounds, so its decay spans all T
/// epochs.
pub(crate) fn site_round(
    fed: &mut Federation,
    data: &FieldData,
    cfg: &SeedTableConfig,
    tcfg: &TrainConfig,
    epochs: u32,
    label: &str,
) -> Result<Vec<PathBuf>> {
    let mut updates = Vec::new();
    for (i, set) in [&data.a, &data.b].into_iter().enumerate() {
        fed.deliver(i)?;
        let site_cfg = planned_decay(tcfg, cfg.cosine, set.len(), cfg.total_epochs);
        fed.train(
            i,
            set,
            &TrainConfig { epochs, ..site_cfg },
            &mut TrainBars::new(format!("{label} {}", fed.sites[i].id)),
        )?;
        updates.push(fed.export(i)?.path.clone());
    }
    Ok(updates)
}

/// The field study's numbers (% plates read exactly), for the rows that have a direct counterpart.
fn field_study(name: &str) -> Option<f64> {
    match name {
        "site-a" => Some(93.67),
        "site-b" => Some(63.87),
        "centralised" => Some(98.64),
        "one-shot" => Some(0.04),
        _ => None,
    }
}

/// Run every row, writing the table (`table.md`), `table.csv`, `results.json` and `accuracy.png` into `cfg.out`.
pub fn run(cfg: &SeedTableConfig) -> Result<Vec<Row>> {
    require_plate_reader(cfg.arch, "the seed table")?;
    if cfg.total_epochs == 0 || cfg.samples_per_site == 0 || cfg.val == 0 {
        bail!("--total-epochs, --samples-per-site and --val must be at least 1");
    }
    if cfg.e_sweep.contains(&0) {
        bail!("--e-sweep values must be at least 1");
    }
    if cfg.pretrain_epochs > 0 && cfg.start != Start::Scratch {
        bail!("--pretrain-epochs trains HQ's round 0 from random weights; it cannot be combined with a start");
    }
    if cfg.out.join("rows").exists() {
        bail!(
            "{} already holds a seed table; choose a new --out",
            cfg.out.display()
        );
    }
    let warmup = cfg
        .warmup
        .unwrap_or_else(|| scaled_warmup(cfg.samples_per_site, cfg.batch));
    let tcfg = TrainConfig {
        epochs: 1,
        batch: cfg.batch,
        seed: cfg.seed,
        adam: AdamConfig {
            lr: cfg.lr,
            warmup,
            ..AdamConfig::default()
        },
        augment: cfg.augment(),
    };
    println!(
        "ferry-lab seed-table into {}: T = {} epochs, {} plates per site, {} validation plates, E in {:?}, batch {}, Adam lr {}, warm-up {warmup} steps{}, augmentation {}",
        cfg.out.display(),
        cfg.total_epochs,
        cfg.samples_per_site,
        cfg.val,
        cfg.e_sweep,
        cfg.batch,
        cfg.lr,
        if cfg.warmup.is_none() {
            " (0.8 of a site's epoch, the field study's ratio: its 1000 steps were for 80k plates)"
        } else {
            ""
        },
        tcfg.augment
    );
    // Every row starts from the same round 0.
    let (round0, origin) = match cfg.start.trained_model(cfg.arch)? {
        Some((model, origin)) => (model.to_safetensors()?, origin),
        None if cfg.start == Start::Scratch => (
            Model::init(cfg.arch, cfg.seed, &Device::Cpu)?.to_safetensors()?,
            format!("random weights from seed {}", cfg.seed),
        ),
        None => bail!(
            "HQ ships no start for {} (it ships one for {})",
            cfg.arch,
            Arch::listing(
                Arch::ALL
                    .into_iter()
                    .filter(|&a| crate::start::shipped_start(a).is_some()),
                "and"
            )
        ),
    };
    println!("round 0 of every row: {} {origin}", cfg.arch);
    let data = field_data(cfg.arch, cfg.samples_per_site, cfg.val, 0, cfg.seed)?;
    let rows_dir = cfg.out.join("rows");
    let mut rows = Vec::new();
    let report = |r: &Row| {
        println!(
            "{:<16} {:>6.2}% exact, {:>6}% chars, {} round trips, {} bytes carried ({:.0} s)",
            r.name,
            100.0 * r.accuracy,
            if r.char_accuracy.is_nan() {
                "-".to_string()
            } else {
                format!("{:.2}", 100.0 * r.char_accuracy)
            },
            r.round_trips,
            r.bytes_carried,
            r.seconds
        )
    };
    let (a, wa, sa) = standalone("site-a", &data.a, &data.val, cfg, &tcfg, &round0)?;
    report(&a);
    rows.push(a);
    let (b, wb, sb) = standalone("site-b", &data.b, &data.val, cfg, &tcfg, &round0)?;
    report(&b);
    rows.push(b);
    let both = Dataset::concat(&[&data.a, &data.b])?;
    let (c, _, _) = standalone("centralised", &both, &data.val, cfg, &tcfg, &round0)?;
    report(&c);
    rows.push(c);
    let hq = if cfg.few_trips {
        Some(seed_trips::hq_plates(cfg.arch, cfg.hq_plates, cfg.seed)?)
    } else {
        None
    };
    let methods = hq.as_ref().map(|hq| seed_trips::Methods {
        hq,
        val: &data.val,
        sites: [&data.a, &data.b],
        bounds: &cfg.fisher_bounds,
        total_epochs: cfg.total_epochs,
        seed: cfg.seed,
        arch: cfg.arch,
        distill: ferry_train::distill::DistillConfig {
            seed: cfg.seed,
            ..Default::default()
        },
    });
    let mut trip_rows: Vec<Row> = Vec::new();
    let mut bound = ferry_merge::DEFAULT_FISHER_BOUND;
    let trips_dir = cfg.out.join("trips");
    let mut one_trip = |fed: &Federation, updates: &[PathBuf]| -> Result<()> {
        if let Some(m) = &methods {
            let (r, b) = m.one_trip(fed, updates, [&wa, &wb], &trips_dir)?;
            r.iter().for_each(report);
            trip_rows.extend(r);
            bound = b;
        }
        Ok(())
    };
    let o = one_shot(
        &rows_dir.join("one-shot"),
        &data,
        cfg,
        [(&wa, sa), (&wb, sb)],
        &round0,
        Some(&mut one_trip),
    )?;
    report(&o);
    rows.push(o);
    // The two-trip rows fork the FedAvg run of T/2 epochs per round before its second merge; it is run for
    // them when --e-sweep lacks it.
    let half = cfg.total_epochs.div_ceil(2);
    // Before the first merge: `two-trip-select` (its own second trip); before the second: the other two-trip
    // rows (forks of the second merge).
    let mut two_trip = |round: u32, fed: &Federation, updates: &[PathBuf]| -> Result<()> {
        let Some(m) = &methods else { return Ok(()) };
        let r = match round {
            0 => vec![
                m.two_trip_select(fed, updates, &trips_dir, &mut |f: &mut Federation| {
                    site_round(f, &data, cfg, &tcfg, half, "two-trip-select round 2/2")
                })?,
            ],
            1 => m.two_trip(fed, updates, bound, &trips_dir)?,
            _ => Vec::new(),
        };
        r.iter().for_each(report);
        trip_rows.extend(r);
        Ok(())
    };
    let mut sweep = cfg.e_sweep.clone();
    if cfg.few_trips && cfg.total_epochs >= 2 && !sweep.contains(&half) {
        sweep.push(half);
    }
    for &e in &sweep {
        let hook: Option<BeforeEachMerge<'_>> =
            if cfg.few_trips && e == half && cfg.total_epochs >= 2 {
                Some(&mut two_trip)
            } else {
                None
            };
        let r = fedavg(
            &rows_dir.join(format!("fedavg-e{e}")),
            &data,
            cfg,
            &tcfg,
            e,
            &round0,
            hook,
        )?;
        report(&r);
        rows.push(r);
    }
    rows.extend(trip_rows);
    if cfg.few_trips && cfg.pretrain_epochs > 0 {
        let warm = seed_trips::hq_pretrained(cfg.arch, cfg, &data.val)?;
        report(&warm.row);
        rows.push(warm.row);
        for (name, e) in [
            ("one-shot-pretrain", cfg.total_epochs),
            ("two-trip-pretrain", half.max(1)),
        ] {
            let r = fedavg_from(
                &trips_dir.join(name),
                &data,
                cfg,
                &tcfg,
                e,
                (name, &warm.weights),
                None,
            )?;
            let mut r = r;
            r.note = format!("FedAvg from HQ's pretrained round 0, {e} epochs per round");
            report(&r);
            rows.push(r);
        }
    }
    write_outputs(cfg, warmup, &rows)?;
    Ok(rows)
}

fn write_outputs(cfg: &SeedTableConfig, warmup: u64, rows: &[Row]) -> Result<()> {
    let header = [
        "row",
        "accuracy % (exact)",
        "characters %",
        "round trips",
        "bytes carried",
        "field study %",
        "seconds",
        "what",
    ];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.name.clone(),
                format!("{:.2}", 100.0 * r.accuracy),
                if r.char_accuracy.is_nan() {
                    "-".into()
                } else {
                    format!("{:.2}", 100.0 * r.char_accuracy)
                },
                r.round_trips.to_string(),
                r.bytes_carried.to_string(),
                field_study(&r.name).map_or("-".into(), |v| format!("{v:.2}")),
                format!("{:.0}", r.seconds),
                r.note.clone(),
            ]
        })
        .collect();
    write_table(&cfg.out, "table", "", &header, &table)?;
    let mut json = json(cfg, rows);
    json["warmup"] = warmup.into();
    std::fs::write(
        cfg.out.join("results.json"),
        serde_json::to_vec_pretty(&json)?,
    )?;
    let title = format!(
        "seed table: {} plates per site, T = {} epochs",
        cfg.samples_per_site, cfg.total_epochs
    );
    let mut series: Vec<Series> = rows
        .iter()
        .map(|r| Series {
            name: format!("{} (exact)", r.name),
            points: r.curve.iter().map(|p| (f64::from(p.0), p.1)).collect(),
        })
        .collect();
    series.extend(rows.iter().map(|r| Series {
        name: format!("{} (chars)", r.name),
        points: r.curve.iter().map(|p| (f64::from(p.0), p.2)).collect(),
    }));
    plot_accuracy(
        &cfg.out.join("accuracy.png"),
        &title,
        "epochs per site",
        &series[..rows.len()],
    )?;
    plot_accuracy(
        &cfg.out.join("accuracy-chars.png"),
        &format!("{title} (characters)"),
        "epochs per site",
        &series[rows.len()..],
    )?;
    // Accuracy against round trips: a federated row's curve has one point per merge, a one-merge method row one
    // point, and a row that carries nothing (a site alone, centralised) is a level to compare with.
    let max_trips = rows.iter().map(|r| r.round_trips).max().unwrap_or(1).max(1);
    let by_trips: Vec<Series> = rows
        .iter()
        .map(|r| Series {
            name: r.name.clone(),
            points: if r.round_trips == 0 {
                vec![(0.0, r.accuracy), (max_trips as f64, r.accuracy)]
            } else if r.curve.len() as u64 == r.round_trips + 1 {
                r.curve
                    .iter()
                    .enumerate()
                    .map(|(k, p)| (k as f64, p.1))
                    .collect()
            } else {
                vec![(r.round_trips as f64, r.accuracy)]
            },
        })
        .collect();
    plot_accuracy(
        &cfg.out.join("trips.png"),
        &format!("{title}: plates read exactly against round trips"),
        "round trips",
        &by_trips,
    )?;
    println!(
        "wrote table.md, table.csv, results.json, accuracy.png (plates exact), accuracy-chars.png and trips.png in {}",
        cfg.out.display()
    );
    Ok(())
}

/// The JSON `--json` writes: `{"rows": [{name, accuracy, char_accuracy, round_trips, bytes_carried, ...}]}`.
pub fn json(cfg: &SeedTableConfig, rows: &[Row]) -> serde_json::Value {
    // The augmentation the rows trained with, not "default".
    let cfg = SeedTableConfig {
        augment: Some(cfg.augment()),
        ..cfg.clone()
    };
    serde_json::json!({ "config": cfg, "rows": rows })
}
