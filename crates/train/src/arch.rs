//! The architecture registry (issue 4): which models ferry can build, their input shape, their task and the exact
//! list of tensors they carry. The tensor names are PyTorch `state_dict` names and therefore ferry's wire format:
//! never rename them casually.

use std::fmt;
use std::str::FromStr;

use crate::block::Pool;
use crate::data::Task;
use crate::error::TrainError;

/// Character slots on a plate (the longest plate, `123가4567`, has 8 characters).
pub const PLATE_SLOTS: usize = crate::data::plates::SLOTS;
/// Classes per plate slot: blank (0), the 10 digits and the Hangul syllables used on plates.
pub const PLATE_CLASSES: usize = 51;

/// A model architecture ferry can build and train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Arch {
    /// Licence-plate reader (issue 12, the default): conv/BatchNorm blocks that keep 24 columns, a per-column
    /// classifier with two output rows (a two-line plate's top line, and the main line), trained with CTC.
    PlateCtc,
    /// plate-ctc with two more convolutions that keep their resolution (issue 12): the same columns, rows and
    /// reading, a deeper feature extractor.
    PlateCtcDeep,
    /// plate-ctc whose last pooling halves only the height (issue 12): 24 columns of 4 px, one CTC step each,
    /// every step read from its own column's features. The same tensors as plate-ctc except `fc2` (one step per
    /// column, not two).
    PlateCtcV2,
    /// plate-ctc-deep with plate-ctc-v2's last pooling: 24 columns, one CTC step each.
    PlateCtcDeepV2,
    /// plate-ctc-deep-v2 with a 16-channel convolution at full resolution before the first pooling (issue 12): the
    /// first pooling then keeps features of the strokes, not of the raw pixels. Reads more per plate; about 1.35×
    /// the time per plate.
    PlateCtcDeepV3,
    /// plate-ctc-deep-v3 with a 32-channel convolution at 16×48 before the second pooling (issue 12): the same
    /// idea one level down. About 1.1× plate-ctc-deep-v3's time per plate.
    PlateCtcDeepV4,
    /// The first licence-plate reader: conv/BatchNorm blocks, a shared hidden layer, one head per character
    /// slot (one-line plates only). Kept loadable and trainable for globals that name it.
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

/// The layers of a CTC plate reader: its convolution blocks, each conv 3×3 (padding 1) + BatchNorm + ReLU +
/// max-pool as one fused op, given as (output channels, pool window); the width of its per-column hidden layer;
/// and the CTC steps each column emits. The pools take 32×96 to 4 rows of 12 columns (8 px each) or 24 (4 px).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CtcLayout {
    pub(crate) convs: &'static [(usize, Pool)],
    pub(crate) hidden: usize,
    /// CTC steps per column and output row.
    pub(crate) sub: usize,
}

impl CtcLayout {
    /// The last block's output on `input` images: (channels, rows, columns).
    pub(crate) fn grid(self, input: (usize, usize, usize)) -> (usize, usize, usize) {
        self.convs.iter().fold(input, |(_, h, w), &(c, pool)| {
            (c, h / pool.rows, w / pool.cols)
        })
    }
}

/// plate-ctc's layers.
const CTC_SMALL: CtcLayout = CtcLayout {
    convs: &[(32, Pool::SQUARE), (64, Pool::SQUARE), (128, Pool::SQUARE)],
    hidden: 256,
    sub: 2,
};

/// plate-ctc-deep's layers: plate-ctc's, with a convolution that keeps the resolution after the second and the
/// third block (8×24 and 4×12), where they cost little.
const CTC_DEEP: CtcLayout = CtcLayout {
    convs: &[
        (32, Pool::SQUARE),
        (64, Pool::SQUARE),
        (64, Pool::NONE),
        (128, Pool::SQUARE),
        (128, Pool::NONE),
    ],
    hidden: 256,
    sub: 2,
};

/// plate-ctc-v2's layers: plate-ctc's, with the last pooling over two rows and one column. Its 24 columns are
/// read one CTC step each, so each 4-px step has features of its own; plate-ctc's two steps per 8-px column
/// share theirs, and a loose crop's 6-px digits then fall two to a column (measured in docs/experiments.md:
/// deletions were the commonest error).
const CTC_V2: CtcLayout = CtcLayout {
    convs: &[(32, Pool::SQUARE), (64, Pool::SQUARE), (128, Pool::ROWS)],
    hidden: 256,
    sub: 1,
};

/// plate-ctc-deep-v2's layers: plate-ctc-deep's, with plate-ctc-v2's last pooling.
const CTC_DEEP_V2: CtcLayout = CtcLayout {
    convs: &[
        (32, Pool::SQUARE),
        (64, Pool::SQUARE),
        (64, Pool::NONE),
        (128, Pool::ROWS),
        (128, Pool::NONE),
    ],
    hidden: 256,
    sub: 1,
};

/// plate-ctc-deep-v3's layers: plate-ctc-deep-v2's after a 16-channel convolution at 32×96. One 3×3 convolution
/// and a 2×2 max-pool on the raw pixels keep only 32 edge maps of a stroke 1–2 px wide; a second convolution
/// before the pool lets the pooled features describe strokes (measured in docs/experiments.md: 3.1 points more of
/// the tuning set after 64,000 plates).
const CTC_DEEP_V3: CtcLayout = CtcLayout {
    convs: &[
        (16, Pool::NONE),
        (32, Pool::SQUARE),
        (64, Pool::SQUARE),
        (64, Pool::NONE),
        (128, Pool::ROWS),
        (128, Pool::NONE),
    ],
    hidden: 256,
    sub: 1,
};

/// plate-ctc-deep-v4's layers: plate-ctc-deep-v3's with a second 32-channel convolution at 16×48, between the
/// first and the second pooling (measured in docs/experiments.md).
const CTC_DEEP_V4: CtcLayout = CtcLayout {
    convs: &[
        (16, Pool::NONE),
        (32, Pool::SQUARE),
        (32, Pool::NONE),
        (64, Pool::SQUARE),
        (64, Pool::NONE),
        (128, Pool::ROWS),
        (128, Pool::NONE),
    ],
    hidden: 256,
    sub: 1,
};

/// A CTC reader's output rows: a two-line plate's top line (region and two digits; blank on one-line plates), then
/// the main line.
pub const CTC_ROWS: usize = 2;

/// How a plate reader's outputs map to a plate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// One class per label slot (`(batch, slots, classes)` logits), cross-entropy per slot.
    Slots,
    /// `rows` rows of `steps` columns (`(batch, rows·steps, classes)` logits, class 0 the CTC blank), each row
    /// a sequence trained with CTC, and read as the most likely valid plate (`ctc::decode_syntax`).
    Ctc {
        /// Output rows (lines of a plate).
        rows: usize,
        /// Columns per row.
        steps: usize,
    },
}

impl Arch {
    /// The plate reader ferry trains when none is named (`ferry-lab`'s default): measured to read the most per
    /// image and per minute on 2 CPU cores (docs/experiments.md).
    pub const DEFAULT_PLATE_READER: Arch = Arch::PlateCtcV2;

    /// All architectures, for listings.
    pub const ALL: [Arch; 8] = [
        Arch::PlateCtcV2,
        Arch::PlateCtcDeepV2,
        Arch::PlateCtcDeepV3,
        Arch::PlateCtcDeepV4,
        Arch::PlateCtc,
        Arch::PlateCtcDeep,
        Arch::PlateCnn,
        Arch::MnistCnn,
    ];

    /// The names of `archs` as an English list joined by `last` ("a, b and c"), for messages that say which
    /// architectures there are.
    pub fn listing(archs: impl IntoIterator<Item = Arch>, last: &str) -> String {
        let names: Vec<&str> = archs.into_iter().map(Arch::name).collect();
        match names.split_last() {
            None => String::new(),
            Some((only, [])) => (*only).to_string(),
            Some((end, rest)) => format!("{} {last} {end}", rest.join(", ")),
        }
    }

    /// Look an architecture up by its name as recorded in bundles (`plate-ctc`, `plate-cnn`, `mnist-cnn`).
    pub fn from_name(name: &str) -> Result<Arch, TrainError> {
        match name {
            "plate-ctc" => Ok(Arch::PlateCtc),
            "plate-ctc-deep" => Ok(Arch::PlateCtcDeep),
            "plate-ctc-v2" => Ok(Arch::PlateCtcV2),
            "plate-ctc-deep-v2" => Ok(Arch::PlateCtcDeepV2),
            "plate-ctc-deep-v3" => Ok(Arch::PlateCtcDeepV3),
            "plate-ctc-deep-v4" => Ok(Arch::PlateCtcDeepV4),
            "plate-cnn" => Ok(Arch::PlateCnn),
            "mnist-cnn" => Ok(Arch::MnistCnn),
            other => Err(TrainError::UnknownArch(other.to_string())),
        }
    }

    /// The name recorded in bundles.
    pub fn name(self) -> &'static str {
        match self {
            Arch::PlateCtc => "plate-ctc",
            Arch::PlateCtcDeep => "plate-ctc-deep",
            Arch::PlateCtcV2 => "plate-ctc-v2",
            Arch::PlateCtcDeepV2 => "plate-ctc-deep-v2",
            Arch::PlateCtcDeepV3 => "plate-ctc-deep-v3",
            Arch::PlateCtcDeepV4 => "plate-ctc-deep-v4",
            Arch::PlateCnn => "plate-cnn",
            Arch::MnistCnn => "mnist-cnn",
        }
    }

    /// Input shape `(channels, height, width)`.
    pub fn input(self) -> (usize, usize, usize) {
        match self {
            Arch::PlateCtc
            | Arch::PlateCtcDeep
            | Arch::PlateCtcV2
            | Arch::PlateCtcDeepV2
            | Arch::PlateCtcDeepV3
            | Arch::PlateCtcDeepV4
            | Arch::PlateCnn => (
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
            Arch::PlateCtc
            | Arch::PlateCtcDeep
            | Arch::PlateCtcV2
            | Arch::PlateCtcDeepV2
            | Arch::PlateCtcDeepV3
            | Arch::PlateCtcDeepV4 => Task::Plate {
                slots: PLATE_SLOTS,
                classes: crate::data::plates::charset().len(),
            },
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

    /// How the outputs read as a plate (or a class).
    pub fn reader(self) -> Reader {
        match self.ctc_layout() {
            Some(layout) => Reader::Ctc {
                rows: CTC_ROWS,
                steps: layout.grid(self.input()).2 * layout.sub,
            },
            None => Reader::Slots,
        }
    }

    /// A CTC plate reader's layers (`None` for the other models).
    pub(crate) fn ctc_layout(self) -> Option<CtcLayout> {
        match self {
            Arch::PlateCtc => Some(CTC_SMALL),
            Arch::PlateCtcDeep => Some(CTC_DEEP),
            Arch::PlateCtcV2 => Some(CTC_V2),
            Arch::PlateCtcDeepV2 => Some(CTC_DEEP_V2),
            Arch::PlateCtcDeepV3 => Some(CTC_DEEP_V3),
            Arch::PlateCtcDeepV4 => Some(CTC_DEEP_V4),
            Arch::PlateCnn | Arch::MnistCnn => None,
        }
    }

    /// Every tensor of the model, sorted by name (the order used for initialisation and optimizer state).
    pub fn tensors(self) -> Vec<TensorSpec> {
        let mut out = Vec::new();
        let mut push =
            |name: String, shape: Vec<usize>, kind| out.push(TensorSpec { name, shape, kind });
        match self {
            Arch::PlateCtc => ctc_tensors(self.input(), CTC_SMALL, &mut push),
            Arch::PlateCtcDeep => ctc_tensors(self.input(), CTC_DEEP, &mut push),
            Arch::PlateCtcV2 => ctc_tensors(self.input(), CTC_V2, &mut push),
            Arch::PlateCtcDeepV2 => ctc_tensors(self.input(), CTC_DEEP_V2, &mut push),
            Arch::PlateCtcDeepV3 => ctc_tensors(self.input(), CTC_DEEP_V3, &mut push),
            Arch::PlateCtcDeepV4 => ctc_tensors(self.input(), CTC_DEEP_V4, &mut push),
            Arch::PlateCnn => {
                let (c0, h, w) = self.input();
                let mut cin = c0;
                for (i, &cout) in PLATE_CONV.iter().enumerate() {
                    conv_batch_norm(&mut push, i + 1, cin, cout);
                    cin = cout;
                }
                let flat = cin * (h >> PLATE_CONV.len()) * (w >> PLATE_CONV.len());
                linear(&mut push, "fc1", flat, PLATE_HIDDEN);
                for s in 0..PLATE_SLOTS {
                    linear(
                        &mut push,
                        &format!("heads.{s}"),
                        PLATE_HIDDEN,
                        PLATE_CLASSES,
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
                linear(&mut push, "fc1", 3136, 512);
                linear(&mut push, "fc2", 512, 10);
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

/// The tensors of a CTC plate reader with `layout` on `input` `(channels, height, width)` images.
fn ctc_tensors(
    input: (usize, usize, usize),
    layout: CtcLayout,
    push: &mut impl FnMut(String, Vec<usize>, TensorKind),
) {
    let mut cin = input.0;
    for (i, &(cout, _)) in layout.convs.iter().enumerate() {
        conv_batch_norm(push, i + 1, cin, cout);
        cin = cout;
    }
    // Per column: the column's features (channels × remaining rows) → hidden → rows × sub-steps × classes.
    let (c, h, _) = layout.grid(input);
    let out = CTC_ROWS * layout.sub * crate::data::plates::charset().len();
    linear(push, "fc1", c * h, layout.hidden);
    linear(push, "fc2", layout.hidden, out);
}

/// Convolution `conv{n}` (3×3, `cin` → `cout`, no bias: the BatchNorm shift that follows makes it redundant,
/// PyTorch `bias=False`) and its BatchNorm `bn{n}`.
fn conv_batch_norm(
    push: &mut impl FnMut(String, Vec<usize>, TensorKind),
    n: usize,
    cin: usize,
    cout: usize,
) {
    push(
        format!("conv{n}.weight"),
        vec![cout, cin, 3, 3],
        TensorKind::Weight { fan_in: cin * 9 },
    );
    batch_norm(push, n, cout);
}

/// A fully connected layer `name` (PyTorch `Linear`: weight `(outputs, inputs)`, bias `(outputs)`).
fn linear(
    push: &mut impl FnMut(String, Vec<usize>, TensorKind),
    name: &str,
    inputs: usize,
    outputs: usize,
) {
    push(
        format!("{name}.weight"),
        vec![outputs, inputs],
        TensorKind::Weight { fan_in: inputs },
    );
    push(
        format!("{name}.bias"),
        vec![outputs],
        TensorKind::Bias { fan_in: inputs },
    );
}

/// The five tensors of BatchNorm layer `bn{n}` over `c` channels.
fn batch_norm(push: &mut impl FnMut(String, Vec<usize>, TensorKind), n: usize, c: usize) {
    push(format!("bn{n}.weight"), vec![c], TensorKind::BnWeight);
    push(format!("bn{n}.bias"), vec![c], TensorKind::BnBias);
    push(
        format!("bn{n}.running_mean"),
        vec![c],
        TensorKind::RunningMean,
    );
    push(
        format!("bn{n}.running_var"),
        vec![c],
        TensorKind::RunningVar,
    );
    push(
        format!("bn{n}.num_batches_tracked"),
        vec![],
        TensorKind::BatchesTracked,
    );
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
        let refused = Arch::from_name("resnet");
        assert!(matches!(refused, Err(TrainError::UnknownArch(_))));
        let message = refused.unwrap_err().to_string();
        for a in Arch::ALL {
            assert!(message.contains(a.name()), "{message} names {a}");
        }
        assert_eq!(
            Arch::listing([Arch::PlateCtcV2, Arch::PlateCnn, Arch::MnistCnn], "or"),
            "plate-ctc-v2, plate-cnn or mnist-cnn"
        );
        assert_eq!(Arch::listing([Arch::PlateCnn], "or"), "plate-cnn");
    }

    #[test]
    fn plate_cnn_predicts_every_one_line_character() {
        assert_eq!(PLATE_CLASSES, crate::data::plates::BASE_CLASSES);
    }

    #[test]
    fn ctc_readers_pool_to_the_columns_their_reader_reads() {
        let mut columns = Vec::new();
        for a in Arch::ALL {
            let Some(layout) = a.ctc_layout() else {
                continue;
            };
            let (_, rows, cols) = layout.grid(a.input());
            assert_eq!(rows, 4, "{a}: four rows left for the per-column classifier");
            let Reader::Ctc { steps, .. } = a.reader() else {
                panic!("{a} is read with CTC")
            };
            // 24 steps of 4 px per output row, whichever way they are made.
            assert_eq!(steps, 24, "{a}");
            assert_eq!(steps, cols * layout.sub, "{a}");
            columns.push((a, cols));
        }
        assert!(columns.contains(&(Arch::PlateCtc, 12)));
        assert!(columns.contains(&(Arch::PlateCtcV2, 24)));
        assert!(columns.contains(&(Arch::PlateCtcDeepV2, 24)));
        assert_eq!(Arch::PlateCtc.parameter_count(), 294_128);
        assert_eq!(Arch::PlateCtcDeep.parameter_count(), 478_832);
        // plate-ctc's tensors but fc2: 256 → 2 rows × 1 step × 68 classes instead of × 2 steps.
        assert_eq!(
            Arch::PlateCtcV2.parameter_count(),
            294_128 - 256 * 2 * 68 - 2 * 68
        );
        assert_eq!(
            Arch::PlateCtcDeepV2.parameter_count(),
            478_832 - 256 * 2 * 68 - 2 * 68
        );
        // plate-ctc-deep-v2's, with conv1 1 → 16 (and bn1) in front and conv2 reading 16 channels, not 1.
        assert!(columns.contains(&(Arch::PlateCtcDeepV3, 24)));
        assert_eq!(
            Arch::PlateCtcDeepV3.parameter_count(),
            Arch::PlateCtcDeepV2.parameter_count() + 16 * 9 + 2 * 16 + 32 * 15 * 9
        );
        // plate-ctc-deep-v3's, with conv3 32 → 32 (and bn3) at 16×48.
        assert!(columns.contains(&(Arch::PlateCtcDeepV4, 24)));
        assert_eq!(
            Arch::PlateCtcDeepV4.parameter_count(),
            Arch::PlateCtcDeepV3.parameter_count() + 32 * 32 * 9 + 2 * 32
        );
    }

    #[test]
    fn tensors_are_sorted_and_unique() {
        for a in Arch::ALL {
            let t = a.tensors();
            assert!(t.windows(2).all(|w| w[0].name < w[1].name), "{a}");
        }
    }
}
