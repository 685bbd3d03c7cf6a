//! CUDA backend, built with `--features cuda`.

use candle_core::Device;

use crate::error::TrainError;

/// Open CUDA GPU number `ordinal`.
pub(super) fn cuda(ordinal: usize) -> Result<Device, TrainError> {
    Device::new_cuda(ordinal).map_err(|e| TrainError::CudaUnavailable(e.to_string()))
}
