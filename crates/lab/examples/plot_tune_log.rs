//! Plot the accuracy-against-images curve of a `tune_plates` run (issue 12) from its printed lines.
//!
//! `cargo run --release -p ferry-lab --example plot_tune_log -- RUN.log OUT.png [TITLE]`
//!
//! Reads every line that starts with `images` (`images N  S s  lr X  loss L  train-exact A  val-exact B  chars C`;
//! `tune-exact` in a tuning run) and draws exact match and characters read on the evaluated set, and exact match
//! on the chunk just trained on, against the images seen.
use std::path::Path;

use ferry_plot::{plot_accuracy, Series};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        eprintln!("usage: plot_tune_log RUN.log OUT.png [TITLE]");
        std::process::exit(2);
    }
    let text = match std::fs::read_to_string(&a[1]) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("plot_tune_log: {}: {e}", a[1]);
            std::process::exit(1);
        }
    };
    let mut exact = Vec::new();
    let mut chars = Vec::new();
    let mut train = Vec::new();
    let mut set = "validation";
    for line in text.lines().filter(|l| l.starts_with("images")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let value = |key: &str| {
            f.iter()
                .position(|w| *w == key)
                .and_then(|i| f.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        let Some(images) = f.get(1).and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let x = images / 1000.0;
        if value("tune-exact").is_some() {
            set = "tuning";
        }
        if let Some(v) = value("val-exact").or_else(|| value("tune-exact")) {
            exact.push((x, v));
        }
        if let Some(v) = value("chars") {
            chars.push((x, v));
        }
        if let Some(v) = value("train-exact") {
            train.push((x, v));
        }
    }
    if exact.is_empty() {
        eprintln!("plot_tune_log: {}: no `images` lines", a[1]);
        std::process::exit(1);
    }
    let title = a
        .get(3)
        .cloned()
        .unwrap_or_else(|| "plate reader, fresh plates".into());
    let series = [
        Series {
            name: format!("{set} set, plates read exactly"),
            points: exact,
        },
        Series {
            name: format!("{set} set, characters read"),
            points: chars,
        },
        Series {
            name: "the chunk just trained on, plates read exactly".into(),
            points: train,
        },
    ];
    if let Err(e) = plot_accuracy(
        Path::new(&a[2]),
        &title,
        "thousands of images trained on",
        &series,
    ) {
        eprintln!("plot_tune_log: {e}");
        std::process::exit(1);
    }
}
