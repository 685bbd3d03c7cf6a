//! Recipe tuning helper (issue 12): trains a plate reader on fresh generated plates, chunk by chunk, and prints the
//! exact-match accuracy on a *tuning* set (seeds of its own, never the lab's validation set) after each chunk.
//!
//! `cargo run --release -p ferry-train --example tune_plates -- ARCH STYLE CHUNK CHUNKS LR BATCH WARMUP DECAY [TUNE_N [VAL_N]]`
//!
//! STYLE: loose, tight or mixed training plates; CHUNK: fresh plates per chunk (each chunk one pass);
//! DECAY: `none` (constant after warm-up) or `cos` (cosine to 0 over all chunks, set per chunk).
//! Prints one line per chunk: images seen, seconds, mean training loss, tuning exact and character accuracy.
//! With VAL_N > 0 the run is a measurement, not tuning: every line reports the *validation* set instead, the one
//! `ferry-lab seed-table --seed 1 --val VAL_N` uses (90 % loose from seed 1003, 10 % tight from seed 1004).
//! `TUNE_TWO_LINE=P` renders the *training* plates with two-line plates at rate P (the renderer's default is 5 %),
//! `TUNE_CLEAN_CHUNKS=N` renders the first N chunks as HQ's clean plates (`PlateStyle::Clean`: no camera effects),
//! a curriculum; `TUNE_PLAIN=1` without the camera effects (`RenderConfig::plain`); the tuning and validation sets keep the
//! default mix.
//! At the end it prints what ferry reads (shift-averaged, `train::reading_scores`; `TUNE_SHIFTS=DY:DX,...` reads
//! with those shifts instead, e.g. `1:0,0:1`, ferry's) against the unshifted reading by the plate syntax and
//! greedily, and where the errors are (loose / tight, one- / two-line plates, each label
//! slot, a few misread plates) and, with `TUNE_SAVE=FILE`, writes the model's safetensors there; `TUNE_LOAD=FILE`
//! starts from that model instead (with CHUNKS 0: only the breakdown of a saved model). `TUNE_PROBE=1` also
//! reads 1,000 loose and 1,000 tight tuning plates rendered with each camera or plate effect switched off in turn,
//! to show what each costs. `TUNE_DEVICE=cuda` trains on the GPU (a build with `--features cuda`; plates are still
//! rendered on the CPU); `TUNE_BUDGET_S=S` times the second chunk (the first carries the device's start-up, e.g.
//! CUDA compiling its kernels) and then sets CHUNKS so the run fits S seconds (the cosine then runs over the new
//! count); `TUNE_OPS=generic` trains the CPU with candle's generic ops, the path CUDA takes.
//! `TUNE_FIXED=1` trains as a site does, on one fixed pool of CHUNK plates (seed 500000), one epoch over it per
//! chunk; `TUNE_AUGMENT=SPEC` augments the training images (`ferry_train::Augment`'s spec: `plates`,
//! `shift=3,contrast=0.3,brightness=0.15`, ...; default none, since fresh plates are never seen twice).
use std::time::Instant;

use candle_core::Tensor;
use ferry_train::data::{plates, Dataset, PlateStyle};
use ferry_train::train::{
    predictions, predictions_with, reading_scores, reading_scores_with, Decoding,
};
use ferry_train::{
    evaluate, train_epoch, Adam, AdamConfig, Arch, Augment, Mode, Model, TrainConfig,
};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arch = Arch::from_name(&a[1]).unwrap();
    let style: PlateStyle = a[2].parse().unwrap();
    let chunk: usize = a[3].parse().unwrap();
    let mut chunks: u64 = a[4].parse().unwrap();
    let lr: f64 = a[5].parse().unwrap();
    let batch: usize = a[6].parse().unwrap();
    let warmup: u64 = a[7].parse().unwrap();
    let cosine = a[8] == "cos";
    let tune_n: usize = a.get(9).map_or(1000, |s| s.parse().unwrap());
    let render = plates::RenderConfig::for_classes(Some(arch.classes()));
    let gen = |style, n, seed| plates::generate_with(style, n, seed, None, &render).unwrap();
    let mut train_render = if std::env::var("TUNE_PLAIN").is_ok() {
        plates::RenderConfig::plain()
    } else {
        render.clone()
    };
    if let Ok(p) = std::env::var("TUNE_TWO_LINE") {
        train_render.two_line = p.parse().unwrap();
    }
    // The tuning set: 90 % loose, 10 % tight, like the validation set, from seeds the lab never uses.
    let tl = (tune_n * 9).div_ceil(10);
    let val_n: usize = a.get(10).map_or(0, |s| s.parse().unwrap());
    let tune = if val_n > 0 {
        let vl = (val_n * 9).div_ceil(10);
        Dataset::concat(&[
            &gen(PlateStyle::Loose, vl, 1003),
            &gen(PlateStyle::Tight, val_n - vl, 1004),
        ])
    } else {
        Dataset::concat(&[
            &gen(PlateStyle::Loose, tl, 777_001),
            &gen(PlateStyle::Tight, tune_n - tl, 777_002),
        ])
    }
    .unwrap();
    let what = if val_n > 0 { "val" } else { "tune" };
    let dev = ferry_train::device::select(
        &std::env::var("TUNE_DEVICE")
            .unwrap_or_else(|_| "cpu".into())
            .parse()
            .unwrap(),
    )
    .unwrap();
    let budget_s: Option<f64> = std::env::var("TUNE_BUDGET_S")
        .ok()
        .map(|v| v.parse().unwrap());
    let mut model = match std::env::var("TUNE_LOAD") {
        Ok(path) => Model::from_safetensors(arch, &std::fs::read(path).unwrap(), &dev).unwrap(),
        Err(_) => Model::init(arch, 1, &dev).unwrap(),
    };
    if std::env::var("TUNE_OPS").is_ok_and(|o| o == "generic") {
        model.set_ops(ferry_train::model::Ops::Generic);
    }
    let mut adam = Adam::new(arch, &dev).unwrap();
    let start = Instant::now();
    let mut seen = 0;
    // A curriculum: the first N chunks rendered as HQ's clean plates (`plates:clean`), the rest as STYLE.
    let clean_chunks: u64 = std::env::var("TUNE_CLEAN_CHUNKS").map_or(0, |v| v.parse().unwrap());
    let fixed = std::env::var_os("TUNE_FIXED")
        .map(|_| plates::generate_with(style, chunk, 500_000, None, &train_render).unwrap());
    let augment = std::env::var("TUNE_AUGMENT").map_or(Augment::none(), |v| v.parse().unwrap());
    println!("augment {augment:?}, fixed pool: {}", fixed.is_some());
    let mut c = 0;
    while c < chunks {
        let chunk_start = Instant::now();
        let chunk_style = if c < clean_chunks {
            PlateStyle::Clean
        } else {
            style
        };
        // TUNE_FIXED=1: one fixed pool of CHUNK plates, one epoch over it per chunk, as a site trains.
        let fresh;
        let data = match &fixed {
            Some(pool) => pool,
            None => {
                fresh = plates::generate_with(chunk_style, chunk, 500_000 + c, None, &train_render)
                    .unwrap();
                &fresh
            }
        };
        let peak = lr;
        let lr_now = if cosine {
            // The chunk's midpoint on a cosine from the peak to 0.
            let t = (c as f64 + 0.5) / chunks as f64;
            peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        } else {
            peak
        };
        let cfg = TrainConfig {
            epochs: 1,
            batch,
            seed: 1,
            adam: AdamConfig {
                lr: lr_now,
                warmup,
                ..AdamConfig::default()
            },
            augment,
        };
        let st = train_epoch(&mut model, &mut adam, data, &cfg, c, 0, &mut ()).unwrap();
        seen += data.len();
        let ev = evaluate(&model, &tune, 256).unwrap();
        println!(
            "images {seen:>7}  {:>6.0} s  lr {lr_now:.2e}  loss {:.4}  train-exact {:.3}  {what}-exact {:.4}  chars {:.4}",
            start.elapsed().as_secs_f64(),
            st.loss,
            st.accuracy,
            ev.accuracy,
            ev.char_accuracy.unwrap_or(f64::NAN)
        );
        if let (1, Some(budget)) = (c, budget_s) {
            let (spent, per_chunk) = (
                start.elapsed().as_secs_f64(),
                chunk_start.elapsed().as_secs_f64(),
            );
            chunks = 2 + ((budget - spent).max(0.0) / per_chunk) as u64;
            println!("budget {budget} s: {chunks} chunks");
        }
        c += 1;
    }
    breakdown(&model, &tune);
    if std::env::var_os("TUNE_PROBE").is_some() {
        probe(&model, &render);
    }
    if let Ok(path) = std::env::var("TUNE_SAVE") {
        std::fs::write(&path, model.to_safetensors().unwrap()).unwrap();
        println!("model written to {path}");
    }
}

/// What each render effect costs (`TUNE_PROBE=1`): exact match on 1,000 loose and 1,000 tight tuning plates
/// (seeds 777001 and 777002, the tuning set's), rendered with the defaults, then with one effect switched off
/// at a time, then with all of them off.
fn probe(model: &Model, render: &plates::RenderConfig) {
    type Off = fn(&mut plates::RenderConfig);
    let variants: [(&str, Off); 11] = [
        ("defaults", |_| {}),
        ("no two-line", |c| c.two_line = 0.0),
        ("no yellow", |c| c.yellow = 0.0),
        ("no perspective", |c| c.perspective = 0.0),
        ("no context", |c| c.context = 0.0),
        ("no distractors", |c| c.distractors = 0.0),
        ("no night", |c| c.night = 0.0),
        ("no motion blur", |c| c.motion_blur = 0.0),
        ("no low-res", |c| c.low_res = 0.0),
        ("no jpeg", |c| c.jpeg = 0.0),
        ("plain", |c| *c = plates::RenderConfig::plain()),
    ];
    for (name, off) in variants {
        let mut cfg = render.clone();
        off(&mut cfg);
        let mut line = format!("  probe {name:<15}");
        for (style, seed) in [(PlateStyle::Loose, 777_001), (PlateStyle::Tight, 777_002)] {
            let set = plates::generate_with(style, 1000, seed, None, &cfg).unwrap();
            let ev = evaluate(model, &set, 256).unwrap();
            line += &format!(
                "  {style:?} exact {:5.1} % chars {:5.1} %",
                100.0 * ev.accuracy,
                100.0 * ev.char_accuracy.unwrap_or(f64::NAN)
            );
        }
        println!("{line}");
    }
}

/// Where the errors are: exact match by crop style and by line count, and the error rate of each label slot.
fn breakdown(model: &Model, set: &Dataset) {
    let arch = model.arch();
    let slots = set.slots();
    let mut pred = Vec::with_capacity(set.labels.len());
    let mut greedy = Vec::with_capacity(set.labels.len());
    let mut plain = Vec::with_capacity(set.labels.len());
    let all: Vec<usize> = (0..set.len()).collect();
    for idx in all.chunks(256) {
        let b = set.subset(idx);
        let x = Tensor::from_vec(
            b.images.clone(),
            (b.len(), b.channels, b.height, b.width),
            model.device(),
        )
        .unwrap();
        let logits = model.forward(&x, Mode::Eval).unwrap();
        let scores = match std::env::var("TUNE_SHIFTS") {
            Ok(v) => reading_scores_with(model, &x, &logits, &shifts(&v)).unwrap(),
            Err(_) => reading_scores(model, &x, &logits).unwrap(),
        };
        pred.extend(predictions(arch, &scores).unwrap());
        plain.extend(predictions(arch, &logits).unwrap());
        greedy.extend(predictions_with(arch, &logits, Decoding::Greedy).unwrap());
    }
    let exact_of = |p: &[u32]| {
        let n = p
            .chunks(slots)
            .zip(set.labels.chunks(slots))
            .filter(|(p, l)| p == l)
            .count();
        100.0 * n as f64 / set.len().max(1) as f64
    };
    println!(
        "reading: shift-averaged {:.2} % exact; unshifted: plate syntax {:.2} %, greedy {:.2} % (greedy's overlong readings cut to {slots} slots)",
        exact_of(&pred),
        exact_of(&plain),
        exact_of(&greedy)
    );
    // (plates, exact) by group; errors by slot.
    let mut groups: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    let mut slot_err = vec![0usize; slots];
    let mut shown = [0; 2];
    for i in 0..set.len() {
        let (p, l) = (&pred[i * slots..(i + 1) * slots], set.label(i));
        let exact = p == l;
        let two = !plates::lines(l)[0].is_empty();
        if !exact && shown[usize::from(two)] < 8 {
            println!(
                "  {} misread: {} read as {}",
                if two { "two-line" } else { "one-line" },
                plates::decode(l),
                plates::decode(p)
            );
            shown[usize::from(two)] += 1;
        }
        let style = set
            .styles
            .as_ref()
            .map_or("?".to_string(), |s| format!("{:?}", s[i]).to_lowercase());
        let lines = if two { "two-line" } else { "one-line" };
        for g in [style, lines.to_string()] {
            let e = groups.entry(g).or_default();
            e.0 += 1;
            e.1 += usize::from(exact);
        }
        for (k, (a, b)) in p.iter().zip(l).enumerate() {
            slot_err[k] += usize::from(a != b);
        }
    }
    for (g, (n, e)) in &groups {
        println!(
            "  {g:<9} {n:>5} plates  exact {:.1} %",
            100.0 * *e as f64 / *n as f64
        );
    }
    let rates: Vec<String> = slot_err
        .iter()
        .map(|e| format!("{:.1}", 100.0 * *e as f64 / set.len() as f64))
        .collect();
    println!(
        "  error % by label slot (left to right): {}",
        rates.join(" ")
    );
}

/// `TUNE_SHIFTS`: "DY:DX,DY:DX,..." (rows down, columns right), the image itself always included; "" for none.
fn shifts(v: &str) -> Vec<(isize, isize)> {
    v.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (y, x) = t.split_once(':').expect("a shift is DY:DX");
            (y.parse().unwrap(), x.parse().unwrap())
        })
        .collect()
}
