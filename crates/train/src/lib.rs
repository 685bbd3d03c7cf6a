//! Local training for ferry sites: candle models, datasets, the trainer, evaluation and BatchNorm
//! recalibration. The only ferry crate that knows candle.
#![deny(missing_docs)]
// One module may use `unsafe`: `matmul`, the bounds-checked wrapper around gemm's raw-pointer API.
#![deny(unsafe_code)]

pub mod arch;
pub mod augment;
pub mod bench;
mod block;
pub mod checkpoint;
mod cpu;
// Used by the trainer once plate-crnn lands (issue 12); tested on its own until then.
#[cfg_attr(not(test), allow(dead_code))]
mod ctc;
pub mod data;
pub mod device;
pub mod distill;
pub mod error;
pub mod fisher;
mod linear;
#[allow(unsafe_code)]
mod matmul;
pub mod model;
pub mod optim;
mod param_grads;
pub mod predict;
pub mod select;
#[cfg(test)]
mod testutil;
pub mod train;
mod workspace;

pub use arch::{Arch, TensorKind, TensorSpec};
pub use augment::Augment;
pub use device::{Device, DeviceChoice};
pub use error::TrainError;
pub use model::{HostTensor, Mode, Model, Ops};
pub use optim::{Adam, AdamConfig, CosineDecay};
pub use train::{
    evaluate, recalibrate, train, train_epoch, train_epochs, EpochStats, Evaluation, Recalibration,
    StepStats, TrainConfig, TrainObserver, TrainSummary,
};
