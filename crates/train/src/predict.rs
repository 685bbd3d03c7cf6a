//! Reading images with a model, without labels (issue 16: `ferry-client predict`, so that an operator
//! corrects the model's readings instead of typing every label).

use candle_core::Tensor;

use crate::data::{plates, Task};
use crate::{Model, TrainError};

/// What `model` reads on each of `n` images given as `(C, H, W)` floats back to back (`images.len()` must be
/// `n` times the model's input size), `batch` at a time, BatchNorm in inference mode. Returns one label text
/// per image: the plate string for a plate reader, the class number for a classifier.
pub fn read(model: &Model, images: &[f32], batch: usize) -> Result<Vec<String>, TrainError> {
    let arch = model.arch();
    let (c, h, w) = arch.input();
    let per = c * h * w;
    if !images.len().is_multiple_of(per) {
        return Err(TrainError::DataMismatch {
            arch: arch.name(),
            detail: format!(
                "{} pixel values are not a whole number of {c}x{h}x{w} images",
                images.len()
            ),
        });
    }
    let slots = arch.slots();
    let mut out = Vec::with_capacity(images.len() / per);
    for chunk in images.chunks(batch.max(1) * per) {
        let n = chunk.len() / per;
        let x = Tensor::from_slice(chunk, (n, c, h, w), model.device())?;
        let logits = model.forward(&x, crate::Mode::Eval)?.detach();
        let scores = crate::train::reading_scores(model, &x, &logits)?;
        let ids = crate::train::predictions(arch, &scores)?;
        for p in ids.chunks(slots) {
            out.push(text(arch.task(), p));
        }
    }
    Ok(out)
}

/// A label's text: the plate string (blanks dropped) or the class number.
pub fn text(task: Task, labels: &[u32]) -> String {
    match task {
        Task::Plate { .. } => plates::decode(labels),
        Task::Classes { .. } => labels.first().map_or_else(String::new, u32::to_string),
    }
}
