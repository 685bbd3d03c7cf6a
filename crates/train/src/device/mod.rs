//! Device selection (issue 4). CUDA is an optional backend behind the `cuda` cargo feature, built as a pair of
//! modules with the same signatures (`enabled.rs` / `disabled.rs`, as ripgrep does for optional backends): the
//! disabled side returns one clear error, so `--device cuda` on a CPU-only build explains itself.

use std::fmt;
use std::str::FromStr;

pub use candle_core::Device;

use crate::error::TrainError;

#[cfg(feature = "cuda")]
#[path = "enabled.rs"]
mod backend;
#[cfg(not(feature = "cuda"))]
#[path = "disabled.rs"]
mod backend;

/// Which device to train on, as given by `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU (all cores; set `RAYON_NUM_THREADS` to limit them).
    #[default]
    Cpu,
    /// The first CUDA GPU.
    Cuda,
}

impl FromStr for DeviceChoice {
    type Err = TrainError;
    fn from_str(s: &str) -> Result<Self, TrainError> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            other => Err(TrainError::UnknownDevice(other.to_string())),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// Whether this build has CUDA support.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Open the chosen device.
pub fn select(choice: &DeviceChoice) -> Result<Device, TrainError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => backend::cuda(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_opens_and_names_parse() {
        assert!(select(&DeviceChoice::Cpu).is_ok());
        assert_eq!(
            "cuda".parse::<DeviceChoice>().ok(),
            Some(DeviceChoice::Cuda)
        );
        assert!(matches!(
            "tpu".parse::<DeviceChoice>(),
            Err(TrainError::UnknownDevice(_))
        ));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_one_clear_error() {
        assert!(matches!(
            select(&DeviceChoice::Cuda),
            Err(TrainError::CudaNotBuilt)
        ));
    }
}
