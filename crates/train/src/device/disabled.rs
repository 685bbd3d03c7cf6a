//! CUDA backend stand-in for builds without the `cuda` feature: the same signature, one clear error.

use candle_core::Device;

use crate::error::TrainError;

/// Always fails: this build has no CUDA support.
pub(super) fn cuda(_ordinal: usize) -> Result<Device, TrainError> {
    Err(TrainError::CudaNotBuilt)
}
