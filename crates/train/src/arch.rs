//! The architecture registry (issue 4): which models ferry can build, their input shape, their task and the exact
//! list of tensors they carry. The tensor names are PyTorch `state_dict` names and therefore ferry's wire format:
//! never rename them casually.

use std::fmt;
use std::str::FromStr;

use crate::data_api::Task;
use crate::error::TrainError;

/// Character slots on a plate (the longest plate, `123가4567`, has 8 characters).
pub const PLATE_SLOTS: usize = crate::data::plates::SLOTS;
/// Classes per plate slot: blank (0), the 10 digits and the Hangul syllables used on plates.
pub const PLATE_CLASSES: usize = 51;

/// A model architecture ferry can build and train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Arch {
    /// Licence-plate reader: conv/BatchNorm blocks, a shared hidden layer, one head per character slot.
    PlateCnn,
    /// The FedAvg paper's MNIST CNN (McMahan et al. 2017): 1,663,370 parameters, no BatchNorm.
    MnistCnn,
}

/// What role a tensor plays, which decides how it is initialised and whether the optimizer updates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    /// A convolution or linear weight with this fan-in.
    Weight {
        /// Inputs per output unit (in_channels × kernel area, or in_features).
        fan_in: usize,
    },
    /// A convolution or linear bias belonging to a weight with this fan-in.
    Bias {
        /// The fan-in of the matching weight.
        fan_in: usize,
    },
    /// BatchNorm scale (γ).
    BnWeight,
    /// BatchNorm shift (β).
    BnBias,
    /// BatchNorm running mean (a statistic, not trained by gradient).
    RunningMean,
    /// BatchNorm running variance (a statistic, not trained by gradient).
    RunningVar,
    /// PyTorch's `num_batches_tracked` counter: I64, rank 0.
    BatchesTracked,
}

impl TensorKind {
    /// Whether the optimizer updates this tensor.
    pub fn is_trainable(self) -> bool {
        matches!(
            self,
            TensorKind::Weight { .. }
                | TensorKind::Bias { .. }
                | TensorKind::BnWeight
                | TensorKind::BnBias
        )
    }

    /// Whether this is a BatchNorm statistic (changed by recalibration, never by the optimizer).
    pub fn is_bn_stat(self) -> bool {
        matches!(
            self,
            TensorKind::RunningMean | TensorKind::RunningVar | TensorKind::BatchesTracked
        )
    }
}

/// One tensor of an architecture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The `state_dict` name, e.g. `bn1.running_mean`.
    pub name: String,
    /// The shape (empty for a scalar).
    pub shape: Vec<usize>,
    /// Its role.
    pub kind: TensorKind,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The plate-cnn's convolution widths, one BatchNorm + 2×2 max-pool block each.
pub(crate) const PLATE_CONV: [usize; 3] = [16, 32, 64];
/// Width of the plate-cnn's shared hidden layer.
pub(crate) const PLATE_HIDDEN: usize = 256;

impl Arch {
    /// All architectures, for listings.
    pub const ALL: [Arch; 2] = [Arch::PlateCnn, Arch::MnistCnn];

    /// Look an architecture up by its name as recorded in bundles (`plate-cnn`, `mnist-cnn`).
    pub fn from_name(name: &str) -> Result<Arch, TrainError> {
        match name {
            "plate-cnn" => Ok(Arch::PlateCnn),
            "mnist-cnn" => Ok(Arch::MnistCnn),
            other => Err(TrainError::UnknownArch(other.to_string())),
        }
    }

    /// The name recorded in bundles.
    pub fn name(self) -> &'static str {
        match self {
            Arch::PlateCnn => "plate-cnn",
            Arch::MnistCnn => "mnist-cnn",
        }
    }

    /// Input shape `(channels, height, width)`.
    pub fn input(self) -> (usize, usize, usize) {
        match self {
            Arch::PlateCnn => (
                1,
                crate::data::plates::PLATE_HEIGHT,
                crate::data::plates::PLATE_WIDTH,
            ),
            Arch::MnistCnn => (1, 28, 28),
        }
    }

    /// The task (label layout) the model predicts.
    pub fn task(self) -> Task {
        match self {
            Arch::PlateCnn => Task::Plate {
                slots: PLATE_SLOTS,
                classes: PLATE_CLASSES,
            },
            Arch::MnistCnn => Task::Classes { classes: 10 },
        }
    }

    /// Character slots per sample (1 for plain classification).
    pub fn slots(self) -> usize {
        match self.task() {
            Task::Classes { .. } => 1,
            Task::Plate { slots, .. } => slots,
        }
    }

    /// Classes per slot.
    pub fn classes(self) -> usize {
        match self.task() {
            Task::Classes { classes } | Task::Plate { classes, .. } => classes,
        }
    }

    /// Every tensor of the model, sorted by name (the order used for initialisation and optimizer state).
    pub fn tensors(self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let mut push =
            |name: String, shape: Vec<usize>, kind| out.push(TensorSpec { name, shape, kind });
        match self {
            Arch::PlateCnn => {
                let (c0, h, w) = self.input();
                let mut cin = c0;
                for (i, &cout) in PLATE_CONV.iter().enumerate() {
                    let n = i + 1;
                    // No conv bias: the BatchNorm shift that follows makes it redundant (PyTorch `bias=False`).
                    push(
                        format!("conv{n}.weight"),
                        vec![cout, cin, 3, 3],
                        TensorKind::Weight { fan_in: cin * 9 },
                    );
                    push(format!("bn{n}.weight"), vec![cout], TensorKind::BnWeight);
                    push(format!("bn{n}.bias"), vec![cout], TensorKind::BnBias);
                    push(
                        format!("bn{n}.running_mean"),
                        vec![cout],
                        TensorKind::RunningMean,
                    );
                    push(
                        format!("bn{n}.running_var"),
                        vec![cout],
                        TensorKind::RunningVar,
                    );
                    push(
                        format!("bn{n}.num_batches_tracked"),
                        vec![],
                        TensorKind::BatchesTracked,
                    );
                    cin = cout;
                }
                let flat = cin * (h >> PLATE_CONV.len()) * (w >> PLATE_CONV.len());
                push(
                    "fc1.weight".into(),
                    vec![PLATE_HIDDEN, flat],
                    TensorKind::Weight { fan_in: flat },
                );
                push(
                    "fc1.bias".into(),
                    vec![PLATE_HIDDEN],
                    TensorKind::Bias { fan_in: flat },
                );
                for s in 0..PLATE_SLOTS {
                    let fan_in = PLATE_HIDDEN;
                    push(
                        format!("heads.{s}.weight"),
                        vec![PLATE_CLASSES, fan_in],
                        TensorKind::Weight { fan_in },
                    );
                    push(
                        format!("heads.{s}.bias"),
                        vec![PLATE_CLASSES],
                        TensorKind::Bias { fan_in },
                    );
                }
            }
            Arch::MnistCnn => {
                push(
                    "conv1.weight".into(),
                    vec![32, 1, 5, 5],
                    TensorKind::Weight { fan_in: 25 },
                );
                push(
                    "conv1.bias".into(),
                    vec![32],
                    TensorKind::Bias { fan_in: 25 },
                );
                push(
                    "conv2.weight".into(),
                    vec![64, 32, 5, 5],
                    TensorKind::Weight { fan_in: 800 },
                );
                push(
                    "conv2.bias".into(),
                    vec![64],
                    TensorKind::Bias { fan_in: 800 },
                );
                push(
                    "fc1.weight".into(),
                    vec![512, 3136],
                    TensorKind::Weight { fan_in: 3136 },
                );
                push(
                    "fc1.bias".into(),
                    vec![512],
                    TensorKind::Bias { fan_in: 3136 },
                );
                push(
                    "fc2.weight".into(),
                    vec![10, 512],
                    TensorKind::Weight { fan_in: 512 },
                );
                push(
                    "fc2.bias".into(),
                    vec![10],
                    TensorKind::Bias { fan_in: 512 },
                );
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Number of trainable parameters (what papers count: BatchNorm statistics excluded).
    pub fn parameter_count(self) -> usize {
        self.tensors()
            .iter()
            .filter(|t| t.kind.is_trainable())
            .map(TensorSpec::numel)
            .sum()
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Arch, TrainError> {
        Arch::from_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_cnn_has_the_papers_parameter_count() {
        assert_eq!(Arch::MnistCnn.parameter_count(), 1_663_370);
    }

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for a in Arch::ALL {
            assert_eq!(Arch::from_name(a.name()).ok(), Some(a));
        }
        assert!(matches!(
            Arch::from_name("resnet"),
            Err(TrainError::UnknownArch(_))
        ));
    }

    #[test]
    fn plate_cnn_predicts_every_one_line_character() {
        assert_eq!(PLATE_CLASSES, crate::data::plates::BASE_CLASSES);
    }

    #[test]
    fn tensors_are_sorted_and_unique() {
        for a in Arch::ALL {
            let t = a.tensors();
            assert!(t.windows(2).all(|w| w[0].name < w[1].name), "{a}");
        }
    }
}
