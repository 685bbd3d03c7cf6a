//! Tiny generated datasets for unit tests: each label is drawn into its image, so a model can learn it quickly.

use crate::arch::Arch;
use crate::data_api::Dataset;

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
