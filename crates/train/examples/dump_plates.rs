//! Research helper (issue 12): writes generated plates as raw files for experiments outside ferry.
//! `cargo run --release -p ferry-train --example dump_plates -- STYLE N SEED OUT_PREFIX [FONT]`
//! writes OUT_PREFIX.u8 (N*32*96 bytes, pixel*255 rounded), OUT_PREFIX.labels (N*8 bytes), OUT_PREFIX.styles (N bytes, 1 = loose).
use std::io::Write;
use std::path::Path;

use ferry_train::data::{plates, CropStyle, PlateStyle};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let style: PlateStyle = a[1].parse().unwrap();
    let n: usize = a[2].parse().unwrap();
    let seed: u64 = a[3].parse().unwrap();
    let out = &a[4];
    let font = a.get(5).filter(|f| !f.is_empty()).map(Path::new);
    let mut cfg = plates::RenderConfig::default();
    // Overrides: FERRY_RENDER="jpeg=0,night=0.2,..." or "plain" first.
    if let Ok(spec) = std::env::var("FERRY_RENDER") {
        for kv in spec.split(',').filter(|s| !s.is_empty()) {
            if kv == "plain" {
                cfg = plates::RenderConfig::plain();
                continue;
            }
            let (k, v) = kv.split_once('=').unwrap();
            let v: f64 = v.parse().unwrap();
            match k {
                "two_line" => cfg.two_line = v,
                "yellow" => cfg.yellow = v,
                "perspective" => cfg.perspective = v as f32,
                "context" => cfg.context = v,
                "distractors" => cfg.distractors = v,
                "night" => cfg.night = v,
                "motion_blur" => cfg.motion_blur = v,
                "low_res" => cfg.low_res = v,
                "jpeg" => cfg.jpeg = v,
                _ => panic!("unknown {k}"),
            }
        }
    }
    eprintln!("{cfg:?}");
    let t = std::time::Instant::now();
    let d = plates::generate_with(style, n, seed, font, &cfg).unwrap();
    eprintln!("{n} plates in {:.2}s", t.elapsed().as_secs_f64());
    let img: Vec<u8> = d
        .images
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    std::fs::File::create(format!("{out}.u8"))
        .unwrap()
        .write_all(&img)
        .unwrap();
    let lab: Vec<u8> = d.labels.iter().map(|&l| l as u8).collect();
    std::fs::File::create(format!("{out}.labels"))
        .unwrap()
        .write_all(&lab)
        .unwrap();
    let st: Vec<u8> = d
        .styles
        .unwrap()
        .iter()
        .map(|&s| u8::from(s == CropStyle::Loose))
        .collect();
    std::fs::File::create(format!("{out}.styles"))
        .unwrap()
        .write_all(&st)
        .unwrap();
}
