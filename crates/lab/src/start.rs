//! HQ's round 0 in the lab's experiments: random weights from the seed, the start HQ ships (a reader trained on
//! HQ's own clean plates, no site data), or weights HQ trained and saved itself. `ferry-lab demo` and
//! `ferry-lab seed-table` both resolve it here, so they start the same way from the same files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferry_train::{Arch, Device, Model};

/// Where HQ's round 0 comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Random weights from the seed.
    Scratch,
    /// The start HQ ships for the architecture ([`shipped_start`]). For an architecture HQ ships none for, the
    /// demo falls back to random weights and the seed table refuses the run.
    Shipped,
    /// The weights in this safetensors file (a model of the run's architecture that HQ trained on its own data,
    /// such as `tune_plates` saves with `TUNE_SAVE`).
    Weights(PathBuf),
}

impl Start {
    /// How the start reads in a settings file: `scratch`, `shipped` or the file's path.
    pub fn describe(&self) -> String {
        match self {
            Start::Scratch => "scratch".into(),
            Start::Shipped => "shipped".into(),
            Start::Weights(path) => ferry_bundle::escape_path(path),
        }
    }

    /// Whether round 0 is a trained model for `arch` (not random weights).
    pub fn is_trained(&self, arch: Arch) -> bool {
        match self {
            Start::Scratch => false,
            Start::Shipped => shipped_start(arch).is_some(),
            Start::Weights(_) => true,
        }
    }

    /// The peak learning rate that suits the start: a fine-tuning rate from a trained start, a higher one from
    /// random weights.
    pub fn learning_rate(&self, arch: Arch) -> f64 {
        if self.is_trained(arch) {
            WARM_LR
        } else {
            SCRATCH_LR
        }
    }

    /// HQ's trained round 0 for `arch` with how to show its origin, or `None` for random weights. A file that is
    /// unreadable or holds another architecture is refused with a one-line error.
    pub fn trained_model(&self, arch: Arch) -> Result<Option<(Model, String)>> {
        match self {
            Start::Scratch => Ok(None),
            Start::Shipped => shipped_start(arch)
                .map(|bytes| -> Result<_> {
                    let model = Model::from_safetensors(arch, bytes, &Device::Cpu)
                        .context("HQ's shipped start")?;
                    Ok((
                        model,
                        "HQ's shipped start (trained on HQ's own clean plates, no site data)"
                            .to_string(),
                    ))
                })
                .transpose(),
            Start::Weights(path) => {
                let shown = ferry_bundle::escape_path(path);
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading HQ's start {shown}"))?;
                let model = Model::from_safetensors(arch, &bytes, &Device::Cpu)
                    .with_context(|| format!("HQ's start {shown}"))?;
                Ok(Some((model, format!("HQ's warm start from {shown}"))))
            }
        }
    }
}

/// The peak learning rate from random weights.
pub const SCRATCH_LR: f64 = 2e-3;
/// The peak learning rate from a trained start: fine-tuning HQ's start at [`SCRATCH_LR`] loses what it knows
/// (tuned with the demo's `--seed 2`, whose validation plates are not the reported ones, on plate-ctc-v2's start:
/// 67.4 % exact after 5 rounds at 2e-3, 74.4 % at 5e-4, 74.0 % at 2.5e-4; docs/experiments.md).
pub const WARM_LR: f64 = 5e-4;

/// HQ's start for `arch`, shipped inside ferry-lab: the reader trained by HQ on its own clean plates only
/// (`PlateStyle::Clean`, a renderer configuration no site trains on), for plate-ctc-deep-v4, plate-ctc-deep-v3,
/// plate-ctc-deep-v2 and plate-ctc-v2; how each was made is in `crates/lab/assets/README.md`.
pub fn shipped_start(arch: Arch) -> Option<&'static [u8]> {
    match arch {
        Arch::PlateCtcDeepV4 => Some(include_bytes!(
            "../assets/hq-start-plate-ctc-deep-v4.safetensors"
        )),
        Arch::PlateCtcDeepV3 => Some(include_bytes!(
            "../assets/hq-start-plate-ctc-deep-v3.safetensors"
        )),
        Arch::PlateCtcDeepV2 => Some(include_bytes!(
            "../assets/hq-start-plate-ctc-deep-v2.safetensors"
        )),
        Arch::PlateCtcV2 => Some(include_bytes!(
            "../assets/hq-start-plate-ctc-v2.safetensors"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_train::data::{plates, PlateStyle};

    /// Each shipped start is a trained reader, not random weights: it reads realistic loose plates it never saw
    /// (HQ trained it on clean plates only; random weights read none).
    #[test]
    fn hqs_shipped_starts_read_realistic_plates() {
        for arch in [
            Arch::PlateCtcDeepV4,
            Arch::PlateCtcDeepV3,
            Arch::PlateCtcDeepV2,
            Arch::PlateCtcV2,
        ] {
            let bytes = shipped_start(arch).expect("a shipped start");
            let model = Model::from_safetensors(arch, bytes, &Device::Cpu).unwrap();
            let render = plates::RenderConfig::for_classes(Some(arch.classes()));
            let loose =
                plates::generate_with(PlateStyle::Loose, 120, 424_242, None, &render).unwrap();
            let e = ferry_train::evaluate(&model, &loose, 64).unwrap();
            assert!(
                e.accuracy >= 0.35,
                "{arch}'s shipped start read {:.3}",
                e.accuracy
            );
            let random = Model::init(arch, 1, &Device::Cpu).unwrap();
            assert_eq!(
                ferry_train::evaluate(&random, &loose, 64).unwrap().accuracy,
                0.0
            );
        }
        assert!(shipped_start(Arch::PlateCtc).is_none());
    }

    /// A start file that is not a model of the run's architecture is refused by name, before anything runs.
    #[test]
    fn a_start_of_another_architecture_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.safetensors");
        std::fs::write(&path, shipped_start(Arch::PlateCtcV2).unwrap()).unwrap();
        let err = Start::Weights(path)
            .trained_model(Arch::PlateCtcDeepV2)
            .unwrap_err();
        assert!(format!("{err:#}").contains("HQ's start"), "{err:#}");
        assert!(Start::Scratch
            .trained_model(Arch::PlateCtcV2)
            .unwrap()
            .is_none());
        assert!(Start::Shipped
            .trained_model(Arch::PlateCtc)
            .unwrap()
            .is_none());
    }
}
