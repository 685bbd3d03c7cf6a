//! The one error type of ferry-train (issue 4). Every variant reads as a sentence a control-centre operator can act
//! on: what went wrong, then what to do about it.

/// Why a training, evaluation or recalibration step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The architecture name is not one ferry knows.
    #[error(
        "unknown model architecture `{0}`: ferry knows {known}",
        known = crate::Arch::listing(crate::Arch::ALL, "and")
    )]
    UnknownArch(String),
    /// The bytes are not a readable safetensors file.
    #[error("the weights are not a valid safetensors file ({0}); the file is damaged or not a ferry model")]
    WeightsFormat(String),
    /// The weights are readable but do not fit the architecture.
    #[error(
        "the weights do not fit {arch}: {detail}; was this model made for another architecture?"
    )]
    WeightsMismatch {
        /// The architecture the weights were checked against.
        arch: &'static str,
        /// The first difference found.
        detail: String,
    },
    /// The dataset does not fit the model (input shape or label layout).
    #[error("the dataset does not fit {arch}: {detail}; choose a dataset made for this model")]
    DataMismatch {
        /// The model's architecture.
        arch: &'static str,
        /// The first difference found.
        detail: String,
    },
    /// There is nothing to train or evaluate on.
    #[error("the dataset is empty: check --data and --limit")]
    EmptyDataset,
    /// A training setting is out of range.
    #[error("invalid training setting: {0}")]
    Config(String),
    /// The loss became NaN or infinite.
    #[error("training diverged (loss {loss} at step {step}): lower --lr or raise --warmup and train again")]
    Diverged {
        /// The loss value seen.
        loss: f32,
        /// The optimizer step at which it was seen.
        step: u64,
    },
    /// Saved optimizer state cannot be used.
    #[error("the saved optimizer state is unusable ({0})")]
    OptimizerState(String),
    /// `--device cuda` was asked of a build without CUDA support.
    #[error("this build of ferry has no CUDA support: use --device cpu, or rebuild with `--features cuda`")]
    CudaNotBuilt,
    /// CUDA support is built in but no GPU could be opened.
    #[error("no usable CUDA GPU ({0}): check the driver with nvidia-smi, or use --device cpu")]
    CudaUnavailable(String),
    /// A device name other than cpu or cuda.
    #[error("unknown device `{0}`: use cpu or cuda")]
    UnknownDevice(String),
    /// The tensor library reported an error (a bug or an out-of-memory condition, not bad input).
    #[error("the tensor computation failed ({0}); if memory is short, lower --batch")]
    Tensor(#[from] candle_core::Error),
}
