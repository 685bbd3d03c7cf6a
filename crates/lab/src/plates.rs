//! The field study's data, synthesised (issue 5): two sites with equal-sized plate sets, site A loose crops and
//! site B tight crops, and a validation set that is 90 % loose and 10 % tight. Every set has its own generator
//! seed derived from the experiment's seed, so no plate is in two sets.

use anyhow::Result;
use ferry_train::data::{plates, Dataset, PlateStyle};
use ferry_train::{Arch, CosineDecay, TrainConfig};

use crate::progress::spinner;

/// The two sites' training sets, their held-out local test sets, and the shared validation set.
#[derive(Debug, Clone)]
pub struct FieldData {
    /// Site A: loose crops.
    pub a: Dataset,
    /// Site B: tight crops.
    pub b: Dataset,
    /// Site A's own held-out plates (loose), for its local evaluation.
    pub a_test: Dataset,
    /// Site B's own held-out plates (tight).
    pub b_test: Dataset,
    /// 90 % loose, 10 % tight.
    pub val: Dataset,
}

/// Refuses, for the command `what`, a model that reads no plates (before anything is written).
pub fn require_plate_reader(arch: Arch, what: &str) -> Result<()> {
    if !matches!(arch.task(), ferry_train::data::Task::Plate { .. }) {
        let readers = Arch::ALL
            .into_iter()
            .filter(|a| matches!(a.task(), ferry_train::data::Task::Plate { .. }));
        anyhow::bail!(
            "{what} trains a plate reader ({}), not {arch}",
            Arch::listing(readers, "or")
        );
    }
    Ok(())
}

/// Generate `per_site` plates for each site, `val` validation plates and `local_test` held-out plates per site, for
/// a reader of `arch` (no two-line plates for one without the region names).
pub fn field_data(
    arch: Arch,
    per_site: usize,
    val: usize,
    local_test: usize,
    seed: u64,
) -> Result<FieldData> {
    let s = spinner(format!(
        "generating {} synthetic plates (2 x {per_site} training, {val} validation, 2 x {local_test} local test)",
        2 * per_site + val + 2 * local_test
    ));
    let render = plates::RenderConfig::for_classes(Some(arch.classes()));
    let gen = |style, n, stream: u64| {
        let seed = seed.wrapping_mul(1000).wrapping_add(stream);
        plates::generate_with(style, n, seed, None, &render)
    };
    let val_loose = (val * 9).div_ceil(10);
    let result = (|| -> Result<FieldData> {
        let vl = gen(PlateStyle::Loose, val_loose, 3)?;
        let vt = gen(PlateStyle::Tight, val - val_loose, 4)?;
        Ok(FieldData {
            a: gen(PlateStyle::Loose, per_site, 1)?,
            b: gen(PlateStyle::Tight, per_site, 2)?,
            a_test: gen(PlateStyle::Loose, local_test, 5)?,
            b_test: gen(PlateStyle::Tight, local_test, 6)?,
            val: Dataset::concat(&[&vl, &vt])?,
        })
    })();
    s.finish_and_clear();
    result
}

/// The warm-up used when none is given: 0.8 of an epoch of `samples` at `batch`, as in the field study
/// (1000 warm-up steps for 80k crops at batch 64, i.e. 1250 steps per epoch). Its default of 1000 steps would
/// swallow a small run whole.
pub fn scaled_warmup(samples: usize, batch: usize) -> u64 {
    ((samples.div_ceil(batch.max(1)) as f64) * 0.8)
        .round()
        .max(1.0) as u64
}

/// `cfg` with its learning rate decaying on a cosine over a trainer's whole planned run (`epochs` passes over
/// `samples` images: the steps an optimizer that lives across rounds takes in total), when `cosine` is set;
/// `cfg` unchanged otherwise.
pub fn planned_decay(cfg: &TrainConfig, cosine: bool, samples: usize, epochs: u32) -> TrainConfig {
    let mut cfg = cfg.clone();
    if cosine {
        let until = samples.div_ceil(cfg.batch.max(1)) as u64 * u64::from(epochs);
        cfg.adam.decay = Some(CosineDecay {
            until,
            floor: CosineDecay::DEFAULT_FLOOR,
        });
    }
    cfg
}
