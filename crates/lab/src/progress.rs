//! Progress bars for the lab's long phases (issue 5: "progress bars for every long phase"). They draw on stderr
//! and hide themselves when stderr is not a terminal, so tests and logs stay clean.

use std::time::Duration;

use ferry_train::{EpochStats, StepStats, TrainObserver};
use indicatif::{ProgressBar, ProgressStyle};

/// A spinner for a phase without steps to count (generating data, merging, evaluating).
pub fn spinner(msg: impl Into<String>) -> ProgressBar {
    let s = ProgressBar::new_spinner().with_message(msg.into());
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

/// A training observer: one bar per epoch with loss, training accuracy and throughput.
#[derive(Debug)]
pub struct TrainBars {
    label: String,
    bar: Option<ProgressBar>,
    batches: usize,
}

impl TrainBars {
    /// Bars prefixed with `label` (e.g. the site id).
    pub fn new(label: impl Into<String>) -> TrainBars {
        TrainBars {
            label: label.into(),
            bar: None,
            batches: 0,
        }
    }

    fn style() -> ProgressStyle {
        ProgressStyle::with_template("  {prefix} [{bar:28}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }
}

impl TrainObserver for TrainBars {
    fn on_start(&mut self, _first: u32, _epochs: u32, batches: usize) {
        self.batches = batches;
    }

    fn on_step(&mut self, s: &StepStats) {
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(self.batches as u64).with_style(TrainBars::style());
            b.set_prefix(format!("{} epoch {}/{}", self.label, s.epoch + 1, s.epochs));
            b
        });
        bar.set_position(s.batch as u64);
        bar.set_message(format!(
            "loss {:.3}  train acc {:.1}%  {:.0} img/s",
            s.loss,
            100.0 * s.accuracy,
            s.images_per_sec
        ));
    }

    fn on_epoch(&mut self, _e: &EpochStats) {
        // The caller prints a summary line; the finished bar would only repeat it.
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn on_note(&mut self, note: &str) {
        match &self.bar {
            Some(bar) => bar.println(note),
            None => eprintln!("{note}"),
        }
    }
}
