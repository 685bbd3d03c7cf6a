//! Training-time augmentation: each training image is shifted by a few pixels and its contrast and brightness
//! changed a little, drawn afresh every epoch. A site trains many epochs on the same fixed set of crops; without
//! this the reader sees each crop exactly as before and stops generalising after a few epochs.
//!
//! The draws come from ChaCha8 seeded by `(seed, round, epoch)`, like the epoch's shuffle, so training stays
//! bit-identical run to run and a run resumed from an epoch checkpoint reproduces the uninterrupted one.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::arch::{Arch, Reader};
use crate::error::TrainError;

/// `--augment` / `[train] augment`: `none`, `plates`, or `key=value` pairs joined by commas (`shift=2`, or
/// `rows=`/`cols=` apart, `contrast=`, `brightness=`; a key left out is 0).
impl std::str::FromStr for Augment {
    type Err = String;

    fn from_str(s: &str) -> Result<Augment, String> {
        match s {
            "none" => return Ok(Augment::none()),
            "plates" => return Ok(Augment::plates()),
            _ => {}
        }
        let mut a = Augment::none();
        for part in s.split(',') {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("expected none, plates or key=value pairs such as shift=2,contrast=0.2, not {part:?}")
            })?;
            let pixels = || {
                value
                    .parse::<usize>()
                    .map_err(|_| format!("{key} takes a whole number of pixels, not {value:?}"))
            };
            let fraction = || {
                value
                    .parse::<f32>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| format!("{key} takes a fraction such as 0.2, not {value:?}"))
            };
            match key {
                "shift" => {
                    a.shift_rows = pixels()?;
                    a.shift_cols = a.shift_rows;
                }
                "rows" => a.shift_rows = pixels()?,
                "cols" => a.shift_cols = pixels()?,
                "contrast" => a.contrast = fraction()?,
                "brightness" => a.brightness = fraction()?,
                _ => {
                    return Err(format!(
                        "unknown augmentation {key:?}: shift, rows, cols, contrast or brightness"
                    ))
                }
            }
        }
        Ok(a)
    }
}

impl std::fmt::Display for Augment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_none() {
            return f.write_str("none");
        }
        if *self == Augment::plates() {
            return f.write_str("plates");
        }
        write!(
            f,
            "rows={},cols={},contrast={},brightness={}",
            self.shift_rows, self.shift_cols, self.contrast, self.brightness
        )
    }
}

/// How much each training image may change. [`Augment::none`] changes nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Largest shift in rows, up or down; the edge row repeats into the gap.
    pub shift_rows: usize,
    /// Largest shift in columns, left or right; the edge column repeats into the gap.
    pub shift_cols: usize,
    /// The contrast about the image's mean is scaled by a factor drawn from `[1 - contrast, 1 + contrast]`.
    pub contrast: f32,
    /// A brightness offset drawn from `[-brightness, brightness]` (pixels are roughly in `[0, 1]`).
    pub brightness: f32,
}

impl Augment {
    /// No change: training reads each image as it is.
    pub const fn none() -> Augment {
        Augment {
            shift_rows: 0,
            shift_cols: 0,
            contrast: 0.0,
            brightness: 0.0,
        }
    }

    /// What sites train plate readers with by default: up to three pixels each way, contrast ±30 %, brightness
    /// ±0.15. Chosen on the tuning set (`docs/experiments.md`, "Augmenting a site's fixed plates").
    pub const fn plates() -> Augment {
        Augment {
            shift_rows: 3,
            shift_cols: 3,
            contrast: 0.3,
            brightness: 0.15,
        }
    }

    /// What a site trains `arch` with when its recipe does not say: [`Augment::plates`] for the CTC plate
    /// readers, none for anything else (the slot reader and the image classifiers keep the recipes they were
    /// measured with).
    pub fn default_for(arch: Arch) -> Augment {
        match arch.reader() {
            Reader::Ctc { .. } => Augment::plates(),
            _ => Augment::none(),
        }
    }

    /// Whether this changes nothing.
    pub fn is_none(&self) -> bool {
        *self == Augment::none()
    }

    /// Refuse settings that would wreck the images: a shift that leaves no pixel of the image, or a contrast
    /// factor that could reach zero or flip the image.
    pub fn check(&self, height: usize, width: usize) -> Result<(), TrainError> {
        if self.is_none() {
            return Ok(());
        }
        if self.shift_rows >= height || self.shift_cols >= width {
            return Err(TrainError::Config(format!(
                "an augmentation shift of {} rows and {} columns does not fit {height}x{width} images",
                self.shift_rows, self.shift_cols
            )));
        }
        if !(self.contrast.is_finite() && (0.0..1.0).contains(&self.contrast)) {
            return Err(TrainError::Config(format!(
                "the augmentation contrast must be in [0, 1), not {}",
                self.contrast
            )));
        }
        if !(self.brightness.is_finite() && (0.0..=1.0).contains(&self.brightness)) {
            return Err(TrainError::Config(format!(
                "the augmentation brightness must be in [0, 1], not {}",
                self.brightness
            )));
        }
        Ok(())
    }

    /// This augmentation's draws for epoch `epoch` of round `round`.
    pub(crate) fn for_epoch(&self, seed: u64, round: u64, epoch: u32) -> Augmenter {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        key[8..16].copy_from_slice(&round.to_le_bytes());
        key[16..20].copy_from_slice(&epoch.to_le_bytes());
        key[24..].copy_from_slice(b"ferryaug");
        Augmenter {
            aug: *self,
            rng: ChaCha8Rng::from_seed(key),
            scratch: Vec::new(),
        }
    }
}

/// One epoch's stream of draws; [`Augmenter::apply`] changes one image in place.
pub(crate) struct Augmenter {
    aug: Augment,
    rng: ChaCha8Rng,
    scratch: Vec<f32>,
}

impl Augmenter {
    /// Change one CHW image in place.
    pub(crate) fn apply(
        &mut self,
        image: &mut [f32],
        channels: usize,
        height: usize,
        width: usize,
    ) {
        let a = self.aug;
        let dy = draw_shift(&mut self.rng, a.shift_rows);
        let dx = draw_shift(&mut self.rng, a.shift_cols);
        let factor = 1.0 + a.contrast * self.rng.random_range(-1.0f32..=1.0);
        let offset = a.brightness * self.rng.random_range(-1.0f32..=1.0);
        if dy != 0 || dx != 0 {
            self.scratch.clear();
            self.scratch.extend_from_slice(image);
            let src = &self.scratch;
            for c in 0..channels {
                let plane = c * height * width;
                for y in 0..height {
                    let sy = clamp_index(y as isize - dy, height);
                    for x in 0..width {
                        let sx = clamp_index(x as isize - dx, width);
                        image[plane + y * width + x] = src[plane + sy * width + sx];
                    }
                }
            }
        }
        if factor != 1.0 || offset != 0.0 {
            let mean = image.iter().sum::<f32>() / image.len().max(1) as f32;
            for v in image.iter_mut() {
                *v = (*v - mean) * factor + mean + offset;
            }
        }
    }
}

fn draw_shift(rng: &mut ChaCha8Rng, max: usize) -> isize {
    if max == 0 {
        0
    } else {
        rng.random_range(-(max as i64)..=max as i64) as isize
    }
}

fn clamp_index(i: isize, len: usize) -> usize {
    i.clamp(0, len as isize - 1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Vec<f32> {
        (0..h * w).map(|i| i as f32 / (h * w) as f32).collect()
    }

    #[test]
    fn a_shift_moves_pixels_and_repeats_the_edge() {
        let (h, w) = (4, 5);
        let img = ramp(h, w);
        let aug = Augment {
            shift_rows: 1,
            shift_cols: 2,
            ..Augment::none()
        };
        let mut a = aug.for_epoch(3, 0, 0);
        let mut seen_shift = false;
        for _ in 0..40 {
            let mut out = img.clone();
            // Replay the same draws to know the shift this image got.
            let mut probe = ChaCha8Rng::clone(&a.rng);
            let dy = draw_shift(&mut probe, 1);
            let dx = draw_shift(&mut probe, 2);
            a.apply(&mut out, 1, h, w);
            for y in 0..h {
                for x in 0..w {
                    let sy = clamp_index(y as isize - dy, h);
                    let sx = clamp_index(x as isize - dx, w);
                    assert_eq!(
                        out[y * w + x],
                        img[sy * w + sx],
                        "dy {dy} dx {dx} at {y},{x}"
                    );
                }
            }
            seen_shift |= dy != 0 && dx != 0;
        }
        assert!(seen_shift, "40 draws never shifted both ways");
    }

    #[test]
    fn contrast_and_brightness_stay_in_their_ranges() {
        let (h, w) = (3, 4);
        let img = ramp(h, w);
        let mean = img.iter().sum::<f32>() / img.len() as f32;
        let aug = Augment {
            contrast: 0.2,
            brightness: 0.1,
            ..Augment::none()
        };
        let mut a = aug.for_epoch(1, 2, 3);
        let mut changed = 0;
        for _ in 0..50 {
            let mut out = img.clone();
            a.apply(&mut out, 1, h, w);
            // out = (img - mean) * f + mean + b: recover f and b from two pixels.
            let f = (out[11] - out[0]) / (img[11] - img[0]);
            let b = out[0] - ((img[0] - mean) * f + mean);
            assert!((0.8 - 1e-5..=1.2 + 1e-5).contains(&f), "factor {f}");
            assert!(b.abs() <= 0.1 + 1e-5, "offset {b}");
            changed += usize::from(out != img);
        }
        assert!(changed > 45, "only {changed} of 50 images changed");
    }

    #[test]
    fn the_draws_are_reproducible_and_differ_between_epochs() {
        let (h, w) = (6, 8);
        let img = ramp(h, w);
        let run = |epoch| {
            let mut a = Augment::plates().for_epoch(9, 1, epoch);
            (0..20)
                .flat_map(|_| {
                    let mut out = img.clone();
                    a.apply(&mut out, 1, h, w);
                    out
                })
                .collect::<Vec<f32>>()
        };
        assert_eq!(run(0), run(0));
        assert_ne!(run(0), run(1));
    }

    #[test]
    fn specs_parse_and_print_back() {
        for spec in [
            "none",
            "plates",
            "rows=1,cols=3,contrast=0.1,brightness=0.05",
        ] {
            let a: Augment = spec.parse().unwrap();
            assert_eq!(a.to_string(), spec);
        }
        let a: Augment = "shift=3,contrast=0.3,brightness=0.15".parse().unwrap();
        assert_eq!(a, Augment::plates());
        let a: Augment = "cols=4".parse().unwrap();
        assert_eq!((a.shift_rows, a.shift_cols, a.contrast), (0, 4, 0.0));
        for bad in [
            "",
            "shift",
            "shift=-1",
            "shift=1.5",
            "contrast=x",
            "contrast=-0.1",
            "zoom=2",
        ] {
            assert!(bad.parse::<Augment>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn plate_readers_augment_by_default_and_classifiers_do_not() {
        assert_eq!(Augment::default_for(Arch::PlateCtcV2), Augment::plates());
        assert_eq!(
            Augment::default_for(Arch::PlateCtcDeepV2),
            Augment::plates()
        );
        assert!(Augment::default_for(Arch::PlateCnn).is_none());
        assert!(Augment::default_for(Arch::MnistCnn).is_none());
    }

    #[test]
    fn settings_that_wreck_images_are_refused() {
        assert!(Augment::plates().check(32, 96).is_ok());
        assert!(Augment::none().check(1, 1).is_ok());
        let too_far = Augment {
            shift_rows: 32,
            ..Augment::plates()
        };
        assert!(too_far.check(32, 96).is_err());
        let flips = Augment {
            contrast: 1.5,
            ..Augment::plates()
        };
        assert!(flips.check(32, 96).is_err());
        let nan = Augment {
            brightness: f32::NAN,
            ..Augment::plates()
        };
        assert!(nan.check(32, 96).is_err());
    }
}
