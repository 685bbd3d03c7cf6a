//! Test helpers: tiny generated datasets (each label is drawn into its image, so a model can learn it quickly),
//! and the tensors and comparisons the fused-op tests share.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

use crate::arch::Arch;
use crate::data::Dataset;

/// Deterministic pseudo-random values in [-0.5, 0.5).
pub(crate) fn rnd(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 10_007) as f32 / 10_007.0 - 0.5
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `|a - b| ≤ tol·max(1, max|b|)` elementwise.
pub(crate) fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    let d = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        d <= tol * scale,
        "{what}: max difference {d} (scale {scale})"
    );
}

/// The gradients of `Σ t·probe`: a random linear functional of `t`, so every element's gradient is exercised.
pub(crate) fn probe_grads(t: &Tensor, probe: &Tensor) -> GradStore {
    (t * probe).unwrap().sum_all().unwrap().backward().unwrap()
}

/// `n` samples for `arch`: every slot's class is painted as a bright column band whose brightness encodes the
/// class, with a little xorshift noise; deterministic.
pub(crate) fn tiny(arch: Arch, n: usize, seed: u64) -> Dataset {
    let (c, h, w) = arch.input();
    let slots = arch.slots();
    let classes = arch.classes() as u64;
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut images = Vec::with_capacity(n * c * h * w);
    let mut labels = Vec::with_capacity(n * slots);
    for _ in 0..n {
        let lab: Vec<u32> = (0..slots).map(|_| (next() % classes) as u32).collect();
        for _ in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let slot = x * slots / w;
                    let class = lab[slot] as usize;
                    // A bar whose vertical position encodes the class.
                    let row = class * h / classes as usize;
                    let v = if y == row || y == row + 1 { 1.0 } else { 0.0 };
                    images.push(v * 0.8 + (next() % 100) as f32 / 500.0);
                }
            }
        }
        labels.extend(lab);
    }
    Dataset {
        images,
        channels: c,
        height: h,
        width: w,
        labels,
        task: arch.task(),
        styles: None,
    }
}
