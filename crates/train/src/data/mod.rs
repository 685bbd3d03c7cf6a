//! Datasets: the in-memory [`Dataset`] every trainer consumes, the [`DataSpec`] strings that name
//! one on the command line, and the three sources behind them: synthetic Korean licence plates
//! ([`plates`], the built-in default, no download), MNIST-style IDX files ([`idx`]) and an image
//! folder with a labels CSV ([`folder`]).
//!
//! All loaders treat files as untrusted: a bad file is a [`DataError`] naming the file, never a
//! panic.

mod error;
pub mod folder;
pub mod idx;
pub mod plates;
mod spec;

use std::path::Path;

pub use error::DataError;
pub use spec::{DataSpec, LoadConfig, PlateStyle, Split};

/// What the labels of a dataset mean, and so what head a model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// One label per sample, in `0..classes`.
    Classes {
        /// Number of classes.
        classes: usize,
    },
    /// A sequence of `slots` labels per sample, each in `0..classes` (class 0 is the blank used to
    /// pad short sequences; see [`plates::encode`] for the alignment).
    Plate {
        /// Labels per sample.
        slots: usize,
        /// Classes per slot, including the blank class 0.
        classes: usize,
    },
}

impl Task {
    /// Labels per sample: 1 for [`Task::Classes`].
    pub fn slots(&self) -> usize {
        match *self {
            Task::Classes { .. } => 1,
            Task::Plate { slots, .. } => slots,
        }
    }

    /// Classes per label (per slot for plates, blank included).
    pub fn classes(&self) -> usize {
        match *self {
            Task::Classes { classes } | Task::Plate { classes, .. } => classes,
        }
    }
}

/// How a plate image was cropped, mirroring a field study on CCTV plates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CropStyle {
    /// The plate is smaller than the crop, offset at random, with car body and clutter around it.
    Loose,
    /// The crop is fitted to the plate.
    Tight,
}

/// Samples in memory, ready for training: images as `f32` in NCHW order and integer labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// `len() * channels * height * width` pixel values, row-major NCHW, roughly in `[0, 1]`.
    pub images: Vec<f32>,
    /// Channels per image (1 = grayscale, 3 = RGB).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// `len() * task.slots()` labels, sample-major.
    pub labels: Vec<u32>,
    /// What the labels mean.
    pub task: Task,
    /// Crop style per sample, where known (synthetic plates); `None` otherwise.
    pub styles: Option<Vec<CropStyle>>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len() / self.slots().max(1)
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Labels per sample (see [`Task::slots`]).
    pub fn slots(&self) -> usize {
        self.task.slots()
    }

    /// Values per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of sample `i` (CHW). Panics if `i >= len()`.
    pub fn image(&self, i: usize) -> &[f32] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The labels of sample `i`. Panics if `i >= len()`.
    pub fn label(&self, i: usize) -> &[u32] {
        let s = self.slots();
        &self.labels[i * s..(i + 1) * s]
    }

    /// A new dataset holding samples `idx` in that order (repeats allowed). Panics on an index
    /// `>= len()`: indices come from the caller, not from a file.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(idx.len() * self.image_len());
        let mut labels = Vec::with_capacity(idx.len() * self.slots());
        for &i in idx {
            images.extend_from_slice(self.image(i));
            labels.extend_from_slice(self.label(i));
        }
        let styles = self
            .styles
            .as_ref()
            .map(|s| idx.iter().map(|&i| s[i]).collect());
        self.with_data(images, labels, styles)
    }

    /// Keeps at most the first `n` samples.
    pub fn limit(mut self, n: usize) -> Dataset {
        if n < self.len() {
            self.images.truncate(n * self.image_len());
            self.labels.truncate(n * self.slots());
            if let Some(s) = self.styles.as_mut() {
                s.truncate(n);
            }
        }
        self
    }

    /// Joins datasets of the same image shape and task, in order. Styles are kept only when every
    /// part has them.
    pub fn concat(parts: &[&Dataset]) -> Result<Dataset, DataError> {
        let Some(first) = parts.first() else {
            return Err(DataError::Concat("no datasets given".into()));
        };
        for (k, p) in parts.iter().enumerate().skip(1) {
            let (a, b) = (
                (first.channels, first.height, first.width),
                (p.channels, p.height, p.width),
            );
            if a != b {
                return Err(DataError::Concat(format!(
                    "part 0 has images of C,H,W {a:?} but part {k} has {b:?}"
                )));
            }
            if first.task != p.task {
                return Err(DataError::Concat(format!(
                    "part 0 is {:?} but part {k} is {:?}",
                    first.task, p.task
                )));
            }
        }
        let styles = if parts.iter().all(|p| p.styles.is_some()) {
            Some(
                parts
                    .iter()
                    .flat_map(|p| p.styles.iter().flatten().copied())
                    .collect(),
            )
        } else {
            None
        };
        Ok(first.with_data(
            parts
                .iter()
                .flat_map(|p| p.images.iter().copied())
                .collect(),
            parts
                .iter()
                .flat_map(|p| p.labels.iter().copied())
                .collect(),
            styles,
        ))
    }

    /// Writes sample `i` as an 8-bit PNG (grayscale for 1 channel, RGB for 3), for eyeballing.
    pub fn save_png(&self, i: usize, path: &Path) -> Result<(), DataError> {
        self.save_sheet(&[i], 1, path)
    }

    /// Writes samples `idx` as one PNG contact sheet, `cols` images per row with a 2-pixel gap.
    pub fn save_sheet(&self, idx: &[usize], cols: usize, path: &Path) -> Result<(), DataError> {
        let save_err = |reason: String| DataError::Save {
            path: path.to_path_buf(),
            reason,
        };
        if self.channels != 1 && self.channels != 3 {
            return Err(save_err(format!(
                "{} channels cannot be shown as PNG",
                self.channels
            )));
        }
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.len()) {
            return Err(save_err(format!(
                "sample {bad} out of range (dataset has {})",
                self.len()
            )));
        }
        let cols = cols.clamp(1, idx.len().max(1));
        let rows = idx.len().div_ceil(cols).max(1);
        let (h, w, c) = (self.height, self.width, self.channels);
        let sheet_w = cols * (w + 2);
        let sheet_h = rows * (h + 2);
        let mut buf = vec![0u8; sheet_w * sheet_h * 3];
        for (k, &i) in idx.iter().enumerate() {
            let (ox, oy) = ((k % cols) * (w + 2), (k / cols) * (h + 2));
            let img = self.image(i);
            for y in 0..h {
                for x in 0..w {
                    let o = ((oy + y) * sheet_w + ox + x) * 3;
                    for ch in 0..3 {
                        let v = img[(ch % c) * h * w + y * w + x];
                        buf[o + ch] = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
                    }
                }
            }
        }
        let to_u32 = |v: usize| u32::try_from(v).map_err(|_| save_err("sheet too large".into()));
        let img = image::RgbImage::from_raw(to_u32(sheet_w)?, to_u32(sheet_h)?, buf)
            .ok_or_else(|| save_err("internal buffer size mismatch".into()))?;
        let out: image::DynamicImage = if c == 1 {
            image::DynamicImage::ImageRgb8(img).into_luma8().into()
        } else {
            img.into()
        };
        out.save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| save_err(e.to_string()))
    }

    /// A dataset with this one's image shape and task but the given samples.
    fn with_data(
        &self,
        images: Vec<f32>,
        labels: Vec<u32>,
        styles: Option<Vec<CropStyle>>,
    ) -> Dataset {
        Dataset {
            images,
            channels: self.channels,
            height: self.height,
            width: self.width,
            labels,
            task: self.task,
            styles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize, base: u32) -> Dataset {
        Dataset {
            images: (0..n * 4).map(|v| v as f32).collect(),
            channels: 1,
            height: 2,
            width: 2,
            labels: (0..n as u32).map(|v| v + base).collect(),
            task: Task::Classes { classes: 10 },
            styles: None,
        }
    }

    #[test]
    fn accessors_subset_limit() {
        let d = tiny(3, 0);
        assert_eq!(d.len(), 3);
        assert!(!d.is_empty());
        assert_eq!(d.image(1), &[4.0, 5.0, 6.0, 7.0]);
        assert_eq!(d.label(2), &[2]);
        let s = d.subset(&[2, 0, 2]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.label(0), &[2]);
        assert_eq!(s.image(1), d.image(0));
        let l = d.clone().limit(2);
        assert_eq!(l.len(), 2);
        assert_eq!(l.images.len(), 8);
        assert_eq!(d.clone().limit(10), d);
    }

    #[test]
    fn concat_checks_shapes() {
        let (a, b) = (tiny(2, 0), tiny(1, 5));
        let c = Dataset::concat(&[&a, &b]).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.label(2), &[5]);
        let mut other = tiny(1, 0);
        other.width = 4;
        other.height = 1;
        assert!(matches!(
            Dataset::concat(&[&a, &other]),
            Err(DataError::Concat(_))
        ));
        other = tiny(1, 0);
        other.task = Task::Classes { classes: 3 };
        assert!(matches!(
            Dataset::concat(&[&a, &other]),
            Err(DataError::Concat(_))
        ));
        assert!(Dataset::concat(&[]).is_err());
    }

    #[test]
    fn save_sheet_writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let d = tiny(3, 0);
        let p = dir.path().join("s.png");
        d.save_sheet(&[0, 1, 2], 2, &p).unwrap();
        let img = image::open(&p).unwrap();
        assert_eq!((img.width(), img.height()), (8, 8));
        assert!(d.save_png(3, &p).is_err());
    }
}
