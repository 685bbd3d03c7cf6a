//! `ferry-lab`: the demo, the field study's table, FedAvg experiments and benchmarks (issue 5). Flags only; the
//! work is in the `ferry_lab` library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_lab::{bench, bench_io, demo, fedavg, gallery, seed_table, split::SplitKind, trips};
use ferry_merge::{Strategy, Weighting};
use ferry_train::data::DataSpec;
use ferry_train::Arch;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "ferry-lab",
    version,
    about = "ferry's demo and experiments, through real keys, signed bundles and state directories"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole air-gapped loop on synthetic plates: keys, round 0 from HQ's shipped start, rounds of
    /// train/export/merge/import (139 s measured on 2 CPU cores; the final global reads 87 % of the
    /// validation plates exactly, HQ's start 81 %).
    #[command(
        after_help = "Example:\n  cargo run --release -p ferry-lab -- demo\n  ferry-lab demo --rounds 5 --samples 8000 --dir lab-out/big-demo\n  ferry-lab demo --scratch --arch plate-ctc-v2 --rounds 5 --samples 3000 --epochs 2   # from random weights"
    )]
    Demo(DemoArgs),
    /// The field study's table (site A alone, site B alone, centralised, one-shot, FedAvg for each E) through real
    /// bundles.
    #[command(
        after_help = "Examples:\n  ferry-lab seed-table --json seed-table.json                 # the quick preset (~10 min on 2 cores)\n  ferry-lab seed-table --preset standard --json seed-table.json   # under 45 min on 2 cores\n  ferry-lab seed-table --preset field-study                  # the field study's scale (many hours)\n  ferry-lab seed-table --preset standard --hq-start          # every row from HQ's shipped start\n  ferry-lab seed-table --preset hq-deep                      # the deeper reader from HQ's start, E 1,5 (< 45 min)\n  ferry-lab seed-table --preset hq-v3                        # plate-ctc-deep-v3 from HQ's start, E 5 (< 45 min)\n  ferry-lab seed-table --preset hq-v4                        # plate-ctc-deep-v4 from HQ's start, E 5 (~37 min)\n  ferry-lab seed-table --preset standard --e-sweep 1,5       # a flag overrides the preset's setting"
    )]
    SeedTable(SeedTableArgs),
    /// Federated training on any dataset: K sites, a split, R rounds of E local epochs, any merge strategy.
    #[command(
        after_help = "Examples (the FedAvg paper's MNIST CNN setting on Fashion-MNIST):\n  ferry-lab fedavg --data idx:/usr/share/datasets/fashion-mnist --sites 10 --split iid --rounds 20 --local-epochs 5 --batch 10\n  ferry-lab fedavg --data idx:/usr/share/datasets/fashion-mnist --sites 10 --split shards --rounds 50 --local-epochs 5 --batch 10 --target 0.85\n  # issue 14: one and two trips against FedAvg (docs/experiments.md)\n  ferry-lab fedavg --data idx:/usr/share/datasets/fashion-mnist --sites 10 --split dirichlet:0.5 --rounds 8 --few-trips\n  ferry-lab fedavg --data plates:mixed:4000:1 --sites 2 --split by-style --rounds 5"
    )]
    Fedavg(FedAvgArgs),
    /// A PNG of generated plates, loose crops (site A) above tight crops (site B): what the demo trains on.
    #[command(
        after_help = "Example:\n  ferry-lab gallery                       # writes docs/img/plates.png\n  ferry-lab gallery --out sheet.png --per-style 48 --seed 7"
    )]
    Gallery(GalleryArgs),
    /// Images per second of a training or inference step.
    #[command(
        after_help = "Examples:\n  ferry-lab bench train --model plate-ctc --batch 64 --steps 50 --threads 2 --json\n  ferry-lab bench bundle --size-mb 256 --json\n  ferry-lab bench merge --sites 4 --size-mb 64 --python bench/merge_ref.py --json\n  ferry-lab bench merge --sites 50 --size-mb 500 --synthetic --json"
    )]
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Folder for everything (keys, HQ, sites, usb/, summary, plot); default lab-out/demo-<unix time>.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Rounds after round 0.
    #[arg(long, default_value_t = demo::DemoConfig::default().rounds)]
    rounds: u32,
    /// Training plates per site.
    #[arg(long, value_name = "N", default_value_t = demo::DemoConfig::default().samples)]
    samples: usize,
    /// Local epochs per round.
    #[arg(long, default_value_t = demo::DemoConfig::default().epochs)]
    epochs: u32,
    /// Validation plates (90% loose, 10% tight).
    #[arg(long, value_name = "N", default_value_t = demo::DemoConfig::default().val)]
    val: usize,
    /// Held-out plates per site for its local evaluation.
    #[arg(long, value_name = "N", default_value_t = demo::DemoConfig::default().local_test)]
    local_test: usize,
    /// The plate reader: plate-ctc-deep-v2, plate-ctc-deep-v3 (reads more per plate, about 1.35x the time per
    /// plate), plate-ctc-deep-v4 (reads the most per plate, about 1.1x plate-ctc-deep-v3's time), plate-ctc-v2
    /// (0.69x the time per plate, reads less), plate-ctc, plate-ctc-deep or plate-cnn.
    #[arg(long, value_name = "ARCH", default_value_t = demo::DemoConfig::default().arch)]
    arch: Arch,
    /// HQ's round 0: the weights in this safetensors file (a model of --arch that HQ trained on its own data)
    /// instead of HQ's shipped start.
    #[arg(long, value_name = "FILE")]
    start_from: Option<PathBuf>,
    /// HQ's round 0 from random weights (the seed) instead of HQ's shipped start (plate-ctc-deep-v4,
    /// plate-ctc-deep-v3, plate-ctc-deep-v2 or plate-ctc-v2 trained on HQ's own clean plates, no site data; other
    /// readers always start from random weights).
    #[arg(long, conflicts_with = "start_from")]
    scratch: bool,
    #[command(flatten)]
    train: TrainFlags,
}

/// How the learning rate moves after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LrSchedule {
    /// Constant.
    Flat,
    /// Cosine decay to 1 % of the peak over the planned run.
    Cosine,
}

/// Optimizer flags shared by the three experiments. The defaults differ per command (see `resolve`), so they are
/// options here: clap's derived defaults cannot vary with the subcommand.
#[derive(Debug, Args)]
struct TrainFlags {
    /// Adam's peak learning rate [default: demo 5e-4 from HQ's start, 2e-3 from random weights; seed-table and
    /// fedavg 1e-3; the field study used 2.5e-4 for 80k plates per site].
    #[arg(long)]
    lr: Option<f64>,
    /// Warm-up steps [default: 0.8 of a site's epoch, the field study's ratio: 1000 steps for 1250 per epoch].
    #[arg(long, value_name = "STEPS")]
    warmup: Option<u64>,
    /// Images per step [default: demo 32, seed-table 64, fedavg 10 (the FedAvg paper's B)].
    #[arg(long)]
    batch: Option<usize>,
    /// Learning rate after the warm-up: `cosine` decays it over each trainer's whole planned run (every round)
    /// to 1 % of the peak, `flat` keeps it (the field study) [default: flat].
    #[arg(long, value_name = "SCHEDULE")]
    lr_schedule: Option<LrSchedule>,
    /// Changes to each training image, drawn afresh every epoch: none, plates (3 px shifts, contrast ±30 %,
    /// brightness ±0.15) or pairs such as shift=2,contrast=0.2,brightness=0.1 [default: plates for the CTC plate
    /// readers, none otherwise, as at a site].
    #[arg(long, value_name = "SPEC")]
    augment: Option<ferry_train::Augment>,
    /// Seed of the initial weights, the data and the shuffles.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// `--preset` of `seed-table` (the settings are `seed_table::SeedTableConfig::preset`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SeedTablePreset {
    /// 2,000 plates per site, T = 10, 1,000 validation plates, batch 64, lr 1e-3: a smoke run (~10 min).
    Quick,
    /// 8,000 plates per site, T = 10, 2,000 validation plates, batch 32, lr 2e-3, cosine (< 45 min on 2 cores).
    Standard,
    /// The standard preset with plate-ctc-deep-v2, every row from HQ's shipped start (lr 5e-4), E 1,5 (< 45 min).
    HqDeep,
    /// The standard preset with plate-ctc-deep-v3, every row from HQ's shipped start (lr 5e-4), E 5 (< 45 min).
    HqV3,
    /// hq-v3 with plate-ctc-deep-v4, the reader that reads the most per plate (about 37 min).
    HqV4,
    /// The field study's scale: 80,000 plates per site, T = 70, E 1,5,10,20, lr 2.5e-4, warm-up 1000, batch 64.
    FieldStudy,
}

#[derive(Debug, Args)]
struct SeedTableArgs {
    /// The budget to start from; the flags below override its settings.
    #[arg(long, value_enum, default_value = "quick")]
    preset: SeedTablePreset,
    /// Epoch budget T per site (the field study: 70) [default: the preset's].
    #[arg(long, value_name = "T")]
    total_epochs: Option<u32>,
    /// Training plates per site (the field study: about 80000) [default: the preset's].
    #[arg(long, value_name = "N")]
    samples_per_site: Option<usize>,
    /// Validation plates (90% loose, 10% tight) [default: the preset's].
    #[arg(long, value_name = "N")]
    val: Option<usize>,
    /// Local epochs per round of the FedAvg rows (the field study: 1,5,10,20 of 70) [default: the preset's].
    #[arg(long, value_name = "E,E,..", value_delimiter = ',')]
    e_sweep: Option<Vec<u32>>,
    /// The plate reader every row trains: plate-ctc-v2, plate-ctc-deep-v2 (reads more per plate, its rows take
    /// about 1.35x as long), plate-ctc-deep-v3 (reads more per plate, its rows take about 1.1x
    /// plate-ctc-deep-v2's), plate-ctc-deep-v4, plate-ctc, plate-ctc-deep or plate-cnn [default: the preset's:
    /// plate-ctc-deep-v2 for hq-deep, plate-ctc-deep-v3 for hq-v3, plate-ctc-deep-v4 for hq-v4, plate-ctc-v2
    /// otherwise].
    #[arg(long, value_name = "ARCH")]
    arch: Option<Arch>,
    /// Add the few-trips rows (issue 14): best-site, ensemble, and one-shot-/two-trip- select, fisher, distill and
    /// recal, HQ's steps on HQ's own clean plates (docs/experiments.md says exactly what HQ holds).
    #[arg(long)]
    few_trips: bool,
    /// HQ's own plates for the few-trips rows (4/5 to distil and recalibrate on, 1/5 to choose on).
    #[arg(long, value_name = "N", default_value_t = 2000, requires = "few_trips")]
    hq_plates: usize,
    /// Fisher bounds tried in one-shot-fisher, chosen on HQ's tuning plates.
    #[arg(
        long,
        value_name = "B,B,..",
        value_delimiter = ',',
        default_value = "3,10,100",
        requires = "few_trips"
    )]
    fisher_bounds: Vec<f64>,
    /// Add the warm-start rows: HQ trains round 0 for N epochs on its own clean plates (as many as a site holds),
    /// then one-shot and two-trip FedAvg from it (both sites train again: about as long as two more FedAvg rows).
    #[arg(long, value_name = "N", default_value_t = 0, requires = "few_trips")]
    pretrain_epochs: u32,
    /// Start every row from HQ's shipped start (plate-ctc-v2, plate-ctc-deep-v2, -v3 or -v4 trained on HQ's own
    /// clean plates, no site data) instead of random weights, fine-tuned at lr 5e-4 unless --lr is given
    /// (`--preset hq-deep`, `hq-v3` and `hq-v4` start there already).
    #[arg(long, conflicts_with_all = ["start_from", "pretrain_epochs"])]
    hq_start: bool,
    /// Start every row from this safetensors model (one HQ trained on its own data, of --arch's architecture),
    /// fine-tuned at lr 5e-4 unless --lr is given.
    #[arg(long, value_name = "FILE", conflicts_with = "pretrain_epochs")]
    start_from: Option<PathBuf>,
    /// Also write the rows as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Output folder; default lab-out/seed-table-<unix time>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    train: TrainFlags,
}

#[derive(Debug, Args)]
struct FedAvgArgs {
    /// Training data: plates:loose|tight|mixed|clean:N[:SEED], idx:DIR or folder:LABELS.csv.
    #[arg(long, value_name = "SPEC")]
    data: DataSpec,
    /// Test data; default the IDX test split, fresh plates of the same style, or a sixth of a folder held out.
    #[arg(long, value_name = "SPEC")]
    test_data: Option<DataSpec>,
    /// Model: plate-ctc-v2, plate-ctc-deep-v2, plate-ctc-deep-v3, plate-ctc-deep-v4, plate-ctc, plate-ctc-deep,
    /// plate-cnn or mnist-cnn; default mnist-cnn for IDX data, plate-ctc-v2 otherwise.
    #[arg(long, value_name = "ARCH")]
    model: Option<Arch>,
    /// Number of sites K (1: centralised training on all the data, through the same bundles: the baseline).
    #[arg(long, value_name = "K", default_value_t = 2)]
    sites: usize,
    /// iid, by-style (plates:mixed), shards[:N] (N shards per site, default 2) or dirichlet:ALPHA.
    #[arg(long, default_value = "iid")]
    split: SplitKind,
    /// Rounds R.
    #[arg(long, value_name = "R", default_value_t = 10)]
    rounds: u32,
    /// Local epochs per round E.
    #[arg(long, value_name = "E", default_value_t = 1)]
    local_epochs: u32,
    /// fedavg, fedavgm, fedadam, median, trimmed-mean or fisher.
    #[arg(long, default_value = "fedavg")]
    strategy: Strategy,
    /// Weights of the averaging strategies: samples or equal.
    #[arg(long, default_value = "samples")]
    weights: Weighting,
    /// Report the first round whose test accuracy reaches ACC (0..1).
    #[arg(long, value_name = "ACC")]
    target: Option<f64>,
    /// Use the first N training samples in total (split across the sites).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// Use the first N test samples.
    #[arg(long, value_name = "N")]
    test_limit: Option<usize>,
    /// Also write `{"rows": [{round, accuracy, bytes_carried}, ..]}` here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Output folder; default lab-out/fedavg-<unix time>.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    #[command(flatten)]
    train: TrainFlags,
    #[command(flatten)]
    few: FewTripsArgs,
}

/// Issue 14: the one- and two-trip rows against FedAvg for 1..--rounds trips.
#[derive(Debug, Args)]
struct FewTripsArgs {
    /// Run the few-trips table (best-site, ensemble, one-shot-*, two-trip-*, fedavg-1..R) instead of one
    /// FedAvg run. IDX data only: HQ's data is the end of the training file (--hq-samples), which no site holds.
    #[arg(long)]
    few_trips: bool,
    /// Images at the end of the training file that belong to HQ (4/5 to distil and pretrain on, 1/5 to tune on).
    #[arg(long, value_name = "N", default_value_t = trips::TripsConfig::default().hq_samples, requires = "few_trips")]
    hq_samples: usize,
    /// HQ's distillation epochs.
    #[arg(long, value_name = "N", default_value_t = trips::TripsConfig::default().distill_epochs, requires = "few_trips")]
    distill_epochs: u32,
    /// HQ's distillation learning rate.
    #[arg(long, value_name = "LR", default_value_t = trips::TripsConfig::default().distill_lr, requires = "few_trips")]
    distill_lr: f64,
    /// HQ's pretraining epochs for the warm-start rows (0: none).
    #[arg(long, value_name = "N", default_value_t = trips::TripsConfig::default().pretrain_epochs, requires = "few_trips")]
    pretrain_epochs: u32,
    /// FedAvgM server learning rates tried in round 2, chosen on HQ's tuning slice.
    #[arg(
        long,
        value_name = "LR,LR,..",
        value_delimiter = ',',
        default_value = "1,1.5,2",
        requires = "few_trips"
    )]
    server_lrs: Vec<f64>,
    /// Bounds B of the Fisher-weighted merge tried in round 1 (`--strategy fisher --fisher-bound B`), chosen on
    /// HQ's tuning slice.
    #[arg(
        long,
        value_name = "B,B,..",
        value_delimiter = ',',
        default_value = "3,10,100",
        requires = "few_trips"
    )]
    fisher_bounds: Vec<f64>,
    /// The row groups to run besides best-site, ensemble and FedAvg (default: all). Example: --rows fisher
    #[arg(
        long,
        value_name = "GROUP,..",
        value_delimiter = ',',
        requires = "few_trips"
    )]
    rows: Vec<trips::RowGroup>,
}

#[derive(Debug, Args)]
struct GalleryArgs {
    /// The PNG to write.
    #[arg(long, value_name = "FILE", default_value = "docs/img/plates.png")]
    out: PathBuf,
    /// Plates of each crop style.
    #[arg(long, value_name = "N", default_value_t = gallery::GalleryConfig::default().per_style)]
    per_style: usize,
    /// Plates per row.
    #[arg(long, default_value_t = gallery::GalleryConfig::default().cols)]
    cols: usize,
    /// Screen pixels per plate pixel (1-8).
    #[arg(long, default_value_t = gallery::GalleryConfig::default().scale)]
    scale: usize,
    /// Generator seed (tight crops use SEED + 1).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum BenchWhat {
    /// Training steps (forward, loss, backward, Adam).
    Train,
    /// Inference forward passes.
    Infer,
    /// `ferry-client pack` and `verify` against `zstd | sha256sum` on the same bytes (issue 13).
    Bundle,
    /// `ferry-server merge` against `zstd -d | sha256sum` and, with --python, the Python reference (issue 13).
    Merge,
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// What to time.
    what: BenchWhat,
    /// plate-ctc-v2, plate-ctc-deep-v2, plate-ctc-deep-v3, plate-ctc-deep-v4, plate-ctc, plate-ctc-deep, plate-cnn
    /// or mnist-cnn.
    #[arg(long, value_name = "ARCH", default_value_t = Arch::DEFAULT_PLATE_READER)]
    model: Arch,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Worker threads (default: all cores, or RAYON_NUM_THREADS).
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
    /// Layer implementation: fused (ferry's CPU ops) or generic (candle's own ops, the baseline).
    #[arg(long, value_enum, default_value = "fused")]
    ops: OpsArg,
    /// bundle, merge: model size in MiB (merge --synthetic: in MB).
    #[arg(long, default_value_t = 64)]
    size_mb: usize,
    /// merge: number of site updates.
    #[arg(long, default_value_t = 4)]
    sites: usize,
    /// merge: fedavg, fedavgm, fedadam, median, trimmed-mean or fisher.
    #[arg(long, default_value = "fedavg")]
    strategy: Strategy,
    /// bundle, merge: alternating rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// bundle, merge: working folder; generated inputs are kept there and reused.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// bundle, merge: the ferry-client / ferry-server to measure [default: the one next to ferry-lab].
    #[arg(long, value_name = "PATH")]
    tool: Option<PathBuf>,
    /// bundle, merge: an older ferry-client / ferry-server measured in the same rounds.
    #[arg(long, value_name = "PATH")]
    before: Option<PathBuf>,
    /// merge: the Python reference (bench/merge_ref.py), run with python3 in the same rounds.
    #[arg(long, value_name = "FILE")]
    python: Option<PathBuf>,
    /// merge: run the merge engine in this process on generated inputs that are never written to disk.
    #[arg(long)]
    synthetic: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OpsArg {
    /// ferry's fused CPU ops.
    Fused,
    /// candle's generic ops.
    Generic,
}

fn write_json(path: &PathBuf, v: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn out_dir(given: &Option<PathBuf>, what: &str) -> PathBuf {
    given
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("lab-out/{what}-{}", ferry_bundle::unix_now())))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Demo(a) => {
            let d = demo::DemoConfig::default();
            let cfg = demo::DemoConfig {
                dir: out_dir(&a.dir, "demo"),
                rounds: a.rounds,
                samples: a.samples,
                epochs: a.epochs,
                val: a.val,
                local_test: a.local_test,
                lr: a.train.lr,
                warmup: a.train.warmup,
                batch: a.train.batch.unwrap_or(d.batch),
                cosine: a
                    .train
                    .lr_schedule
                    .map_or(d.cosine, |s| s == LrSchedule::Cosine),
                seed: a.train.seed,
                augment: a.train.augment,
                arch: a.arch,
                start: match (a.start_from, a.scratch) {
                    (Some(path), _) => ferry_lab::start::Start::Weights(path),
                    (None, true) => ferry_lab::start::Start::Scratch,
                    (None, false) => ferry_lab::start::Start::Shipped,
                },
            };
            demo::run(&cfg)?;
        }
        Command::SeedTable(a) => {
            let d = seed_table::SeedTableConfig::preset(match a.preset {
                SeedTablePreset::Quick => seed_table::Preset::Quick,
                SeedTablePreset::Standard => seed_table::Preset::Standard,
                SeedTablePreset::HqDeep => seed_table::Preset::HqDeep,
                SeedTablePreset::HqV3 => seed_table::Preset::HqV3,
                SeedTablePreset::HqV4 => seed_table::Preset::HqV4,
                SeedTablePreset::FieldStudy => seed_table::Preset::FieldStudy,
            });
            let start = match (a.start_from, a.hq_start) {
                (Some(path), _) => ferry_lab::start::Start::Weights(path),
                (None, true) => ferry_lab::start::Start::Shipped,
                (None, false) => d.start.clone(),
            };
            let mut cfg = seed_table::SeedTableConfig {
                out: out_dir(&a.out, "seed-table"),
                total_epochs: a.total_epochs.unwrap_or(d.total_epochs),
                samples_per_site: a.samples_per_site.unwrap_or(d.samples_per_site),
                val: a.val.unwrap_or(d.val),
                e_sweep: a.e_sweep.unwrap_or(d.e_sweep),
                lr: d.lr,
                warmup: a.train.warmup.or(d.warmup),
                batch: a.train.batch.unwrap_or(d.batch),
                cosine: a
                    .train
                    .lr_schedule
                    .map_or(d.cosine, |s| s == LrSchedule::Cosine),
                seed: a.train.seed,
                augment: a.train.augment,
                arch: a.arch.unwrap_or(d.arch),
                few_trips: a.few_trips,
                hq_plates: a.hq_plates,
                fisher_bounds: a.fisher_bounds,
                pretrain_epochs: a.pretrain_epochs,
                start: ferry_lab::start::Start::Scratch,
            }
            .starting_from(start);
            if let Some(lr) = a.train.lr {
                cfg.lr = lr;
            }
            let rows = seed_table::run(&cfg)?;
            if let Some(p) = &a.json {
                write_json(p, &seed_table::json(&cfg, &rows))?;
            }
        }
        Command::Fedavg(a) => {
            let cfg = fedavg::FedAvgConfig {
                out: out_dir(&a.out, "fedavg"),
                data: a.data,
                test_data: a.test_data,
                model: a.model,
                sites: a.sites,
                split: a.split,
                rounds: a.rounds,
                local_epochs: a.local_epochs,
                batch: a.train.batch.unwrap_or(10),
                lr: a.train.lr.unwrap_or(1e-3),
                warmup: a.train.warmup,
                strategy: a.strategy,
                weighting: a.weights,
                target: a.target,
                limit: a.limit,
                test_limit: a.test_limit,
                seed: a.train.seed,
                augment: a.train.augment,
            };
            if a.few.few_trips {
                let t = trips::TripsConfig {
                    hq_samples: a.few.hq_samples,
                    distill_epochs: a.few.distill_epochs,
                    distill_lr: a.few.distill_lr,
                    pretrain_epochs: a.few.pretrain_epochs,
                    server_lrs: a.few.server_lrs,
                    fisher_bounds: a.few.fisher_bounds,
                    groups: if a.few.rows.is_empty() {
                        trips::RowGroup::ALL.to_vec()
                    } else {
                        a.few.rows
                    },
                };
                let rows = trips::run(&cfg, &t)?;
                if let Some(p) = &a.json {
                    write_json(
                        p,
                        &serde_json::json!({ "config": cfg, "few_trips": t, "rows": rows }),
                    )?;
                }
                return Ok(());
            }
            let r = fedavg::run(&cfg)?;
            if let Some(p) = &a.json {
                write_json(p, &fedavg::json(&cfg, &r))?;
            }
        }
        Command::Bench(a) if matches!(a.what, BenchWhat::Bundle | BenchWhat::Merge) => {
            let bundle = matches!(a.what, BenchWhat::Bundle);
            let tool = match &a.tool {
                Some(t) => t.clone(),
                None if a.synthetic => PathBuf::new(),
                None => bench_io::sibling(if bundle {
                    "ferry-client"
                } else {
                    "ferry-server"
                })?,
            };
            let cfg = bench_io::IoBenchConfig {
                dir: a.dir.clone().unwrap_or_else(|| {
                    PathBuf::from(format!(
                        "lab-out/bench-{}-{}",
                        if bundle { "bundle" } else { "merge" },
                        a.size_mb
                    ))
                }),
                size_mb: a.size_mb,
                sites: a.sites,
                strategy: a.strategy,
                rounds: a.rounds.max(1),
                tool,
                before: a.before.clone(),
                python: a.python.clone(),
            };
            if bundle {
                bench_io::bundle(&cfg)?;
            } else if a.synthetic {
                bench_io::synthetic(&cfg)?;
            } else {
                bench_io::merge(&cfg)?;
            }
        }
        Command::Gallery(a) => gallery::run(&gallery::GalleryConfig {
            out: a.out,
            per_style: a.per_style,
            cols: a.cols,
            scale: a.scale,
            seed: a.seed,
        })?,
        Command::Bench(a) => {
            if let Some(t) = a.threads {
                if t == 0 {
                    anyhow::bail!("--threads must be at least 1");
                }
                // candle sizes its CPU work by RAYON_NUM_THREADS; set it before any thread starts.
                std::env::set_var("RAYON_NUM_THREADS", t.to_string());
            }
            let kind = match a.what {
                BenchWhat::Train => bench::BenchKind::Train,
                _ => bench::BenchKind::Infer,
            };
            let ops = match a.ops {
                OpsArg::Fused => ferry_train::Ops::Fused,
                OpsArg::Generic => ferry_train::Ops::Generic,
            };
            let r = bench::run(kind, a.model, a.batch, a.steps, a.warmup, a.threads, ops)?;
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} {:?} ({:?} ops) on {} threads, batch {}: {:.1} img/s, {:.1} ms/step ({} parameters)",
                    r.model, a.what, r.ops, r.threads, r.batch, r.img_per_s, r.ms_per_step, r.params
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
