//! A training checkpoint as one safetensors file: the model (`model.*`), the optimizer (`adam.*`) and a note
//! from the caller that identifies the run (in the metadata), so a run can resume after its last finished epoch.
//! Where the file lives and when it is written is the caller's business (a site's state directory).

use std::collections::{BTreeMap, HashMap};

use candle_core::Device;

use crate::model::{read_any_safetensors, write_safetensors_with};
use crate::{Adam, Arch, Model, TrainError};

const NOTE_KEY: &str = "ferry.checkpoint";

/// Serialize `model` and `adam` with `note`.
pub fn encode(model: &Model, adam: &Adam, note: &str) -> Result<Vec<u8>, TrainError> {
    let mut all = BTreeMap::new();
    for (k, v) in model.to_host()? {
        all.insert(format!("model.{k}"), v);
    }
    for (k, v) in adam.to_host()? {
        all.insert(format!("adam.{k}"), v);
    }
    write_safetensors_with(
        &all,
        None,
        Some(HashMap::from([(NOTE_KEY.to_string(), note.to_string())])),
    )
}

/// The note of a checkpoint, without building its model.
pub fn note(bytes: &[u8]) -> Result<String, TrainError> {
    let (_, meta) = read_any_safetensors(bytes)?;
    meta.get(NOTE_KEY)
        .cloned()
        .ok_or_else(|| TrainError::WeightsFormat("a checkpoint without its run note".into()))
}

/// The model, optimizer and note of a checkpoint of `arch`.
pub fn decode(
    arch: Arch,
    bytes: &[u8],
    device: &Device,
) -> Result<(Model, Adam, String), TrainError> {
    let note = note(bytes)?;
    let (all, _) = read_any_safetensors(bytes)?;
    let (mut m, mut a) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in all {
        if let Some(n) = k.strip_prefix("model.") {
            m.insert(n.to_string(), v);
        } else if let Some(n) = k.strip_prefix("adam.") {
            a.insert(n.to_string(), v);
        } else {
            return Err(TrainError::WeightsFormat(format!(
                "unexpected tensor `{k}` in a checkpoint"
            )));
        }
    }
    let model = Model::from_host(arch, m, device)?;
    let adam = Adam::from_host(arch, a, device)?;
    Ok((model, adam, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_round_trips_and_refuses_stray_tensors() {
        let dev = Device::Cpu;
        let model = Model::init(Arch::MnistCnn, 3, &dev).unwrap();
        let adam = Adam::new(Arch::MnistCnn, &dev).unwrap();
        let bytes = encode(&model, &adam, "run 7").unwrap();
        assert_eq!(note(&bytes).unwrap(), "run 7");
        let (m, a, n) = decode(Arch::MnistCnn, &bytes, &dev).unwrap();
        assert_eq!(n, "run 7");
        assert_eq!(m.to_safetensors().unwrap(), model.to_safetensors().unwrap());
        assert_eq!(a.step(), adam.step());
        // The same bytes do not fit another architecture, and a plain model file is not a checkpoint.
        assert!(decode(Arch::PlateCnn, &bytes, &dev).is_err());
        assert!(note(&model.to_safetensors().unwrap()).is_err());
        assert!(decode(Arch::MnistCnn, &bytes[..bytes.len() / 2], &dev).is_err());
    }
}
