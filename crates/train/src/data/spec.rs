//! Dataset spec strings (`idx:DIR[:test]`, `plates:STYLE:N[:SEED]`, `folder:LABELS.csv[?OPTIONS]`,
//! `folder:DIR?labels=filename`): parsing, printing, and dispatch to the loaders. Parsing does no I/O;
//! [`DataSpec::load`] does it all.
//!
//! A folder spec's options follow the last `?`, joined by `&` (issue 16): `labels=filename` (labels from the
//! image file names, the path being a folder), `encoding=auto|utf-8|cp949` (the labels CSV's text encoding;
//! `auto`, the default, reads UTF-8 and falls back to CP949) and `skip-bad` (leave out and report bad images
//! and label lines instead of refusing the dataset). Being part of the spec, they are remembered with it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::folder::{BadFile, FolderOptions, LabelSource, TextEncoding};
use super::{folder, idx, plates, DataError, Dataset};

/// Which split of an IDX directory to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Split {
    /// `train-*` files.
    #[default]
    Train,
    /// `t10k-*` files.
    Test,
}

/// Crop style of generated plates (see [`super::CropStyle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlateStyle {
    /// Every sample loosely cropped.
    Loose,
    /// Every sample tightly cropped.
    Tight,
    /// Each sample loose or tight with equal probability, recorded in [`Dataset::styles`].
    Mixed,
    /// As `Mixed`, rendered clean: no perspective, car context, neighbouring text, night exposure, motion blur,
    /// low resolution or JPEG ([`plates::RenderConfig::clean`]). A renderer configuration no site trains on:
    /// HQ's own plates for distillation, recalibration and pretraining (issue 14).
    Clean,
}

impl PlateStyle {
    /// The spec-string name: `loose`, `tight` or `mixed`.
    pub fn name(self) -> &'static str {
        match self {
            PlateStyle::Loose => "loose",
            PlateStyle::Tight => "tight",
            PlateStyle::Mixed => "mixed",
            PlateStyle::Clean => "clean",
        }
    }
}

impl FromStr for PlateStyle {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self, DataError> {
        match s {
            "loose" => Ok(PlateStyle::Loose),
            "tight" => Ok(PlateStyle::Tight),
            "mixed" => Ok(PlateStyle::Mixed),
            "clean" => Ok(PlateStyle::Clean),
            _ => Err(DataError::Spec {
                spec: s.to_string(),
                reason: "plate style must be loose, tight, mixed or clean".into(),
            }),
        }
    }
}

/// Where a dataset comes from. Parse one from a string with [`str::parse`]; [`fmt::Display`]
/// prints it back in the same syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DataSpec {
    /// MNIST-style IDX files in a directory (`idx:DIR`, `idx:DIR:test`).
    Idx {
        /// The directory holding `train-images-idx3-ubyte[.gz]` etc.
        dir: PathBuf,
        /// Which split.
        split: Split,
    },
    /// Synthetic Korean licence plates (`plates:loose|tight|mixed|clean:N[:SEED]`, seed 0 by default).
    Plates {
        /// Crop style.
        style: PlateStyle,
        /// Number of samples.
        n: usize,
        /// Generator seed: the same seed gives bit-identical samples.
        seed: u64,
    },
    /// Image files listed in a CSV of `path,label` lines (`folder:LABELS.csv`), or the images of a folder
    /// labelled by their file names (`folder:DIR?labels=filename`).
    Folder {
        /// The CSV file (image paths in it are relative to its directory), or the folder.
        path: PathBuf,
        /// How to read it (`?labels=filename&encoding=cp949&skip-bad`).
        options: FolderOptions,
    },
}

/// Options for [`DataSpec::load`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadConfig {
    /// Keep at most this many samples (the first ones; for plates, fewer are generated).
    pub limit: Option<usize>,
    /// A TTF/OTF font to render plates with instead of the built-in Unifont bitmaps.
    pub font: Option<PathBuf>,
    /// `(C, H, W)` to convert and resize folder images to (C = 1 or 3); default
    /// `(1, PLATE_HEIGHT, PLATE_WIDTH)`. IDX and plate datasets have fixed sizes and ignore it.
    pub input: Option<(usize, usize, usize)>,
    /// Classes per slot of the model the plates are for: generated plates use no token beyond them (a reader
    /// without the region names, such as `plate-cnn`, gets no two-line plates). Default: all of them.
    pub classes: Option<usize>,
}

impl DataSpec {
    /// Loads (or generates) the dataset. Samples a `skip-bad` folder spec leaves out are dropped here;
    /// [`DataSpec::load_checked`] returns them for the caller to report.
    pub fn load(&self, opts: &LoadConfig) -> Result<Dataset, DataError> {
        Ok(self.load_checked(opts)?.0)
    }

    /// [`DataSpec::load`], also returning the samples a `skip-bad` folder spec left out (always empty for
    /// the other kinds, and without `skip-bad`: a bad sample is then an error).
    pub fn load_checked(&self, opts: &LoadConfig) -> Result<(Dataset, Vec<BadFile>), DataError> {
        if let DataSpec::Folder { path, options } = self {
            return folder::load_with(
                path,
                options,
                opts.input
                    .unwrap_or((1, plates::PLATE_HEIGHT, plates::PLATE_WIDTH)),
                opts.limit,
            );
        }
        Ok((self.load_other(opts)?, Vec::new()))
    }

    /// Read the dataset for a report (`ferry-client check-data`), without keeping a folder's pixels: counts,
    /// label histogram, bad samples, and plate characters outside the alphabet of a model with `opts.classes`
    /// classes per slot.
    pub fn check(&self, opts: &LoadConfig) -> Result<folder::DataCheck, DataError> {
        match self {
            DataSpec::Folder { path, options } => folder::check(path, options, opts.classes),
            DataSpec::Idx { .. } => Ok(folder::summarize(&self.load_other(opts)?, "idx")),
            DataSpec::Plates { .. } => Ok(folder::summarize(&self.load_other(opts)?, "generated")),
        }
    }

    /// The folder options, for a folder spec.
    pub fn folder_options_mut(&mut self) -> Option<&mut FolderOptions> {
        match self {
            DataSpec::Folder { options, .. } => Some(options),
            _ => None,
        }
    }

    fn load_other(&self, opts: &LoadConfig) -> Result<Dataset, DataError> {
        let limit = opts.limit.unwrap_or(usize::MAX);
        match self {
            DataSpec::Idx { dir, split } => Ok(idx::load(dir, *split)?.limit(limit)),
            DataSpec::Plates { style, n, seed } => plates::generate_with(
                *style,
                (*n).min(limit),
                *seed,
                opts.font.as_deref(),
                &plates::RenderConfig::for_classes(opts.classes),
            ),
            DataSpec::Folder { .. } => Ok(self.load_checked(opts)?.0),
        }
    }
}

impl FromStr for DataSpec {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, DataError> {
        let bad = |reason: &str| DataError::Spec {
            spec: s.to_string(),
            reason: reason.to_string(),
        };
        let (kind, rest) = s
            .split_once(':')
            .ok_or_else(|| bad("no ':' after the kind"))?;
        match kind {
            "idx" => {
                // The split is a suffix so that directories may contain ':'.
                let (dir, split) = if let Some(d) = rest.strip_suffix(":test") {
                    (d, Split::Test)
                } else if let Some(d) = rest.strip_suffix(":train") {
                    (d, Split::Train)
                } else {
                    (rest, Split::Train)
                };
                if dir.is_empty() {
                    return Err(bad("the directory is empty"));
                }
                Ok(DataSpec::Idx {
                    dir: PathBuf::from(dir),
                    split,
                })
            }
            "plates" => {
                let parts: Vec<&str> = rest.split(':').collect();
                if !(2..=3).contains(&parts.len()) {
                    return Err(bad("plates takes STYLE:N or STYLE:N:SEED"));
                }
                let style = parts[0]
                    .parse::<PlateStyle>()
                    .map_err(|_| bad("plate style must be loose, tight or mixed"))?;
                let n = parts[1]
                    .parse::<usize>()
                    .map_err(|_| bad("N must be a whole number"))?;
                if n == 0 {
                    return Err(bad("N must be at least 1"));
                }
                let seed = match parts.get(2) {
                    Some(t) => t
                        .parse::<u64>()
                        .map_err(|_| bad("SEED must be a whole number"))?,
                    None => 0,
                };
                Ok(DataSpec::Plates { style, n, seed })
            }
            "folder" => {
                let (path, query) = match rest.rsplit_once('?') {
                    Some((p, q)) => (p, Some(q)),
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err(bad("the CSV path is empty"));
                }
                let mut options = FolderOptions::default();
                for opt in query.into_iter().flat_map(|q| q.split('&')) {
                    match opt.split_once('=') {
                        Some(("labels", "filename")) => options.labels = LabelSource::FileName,
                        Some(("labels", "csv")) => options.labels = LabelSource::Csv,
                        Some(("encoding", e)) => {
                            options.encoding = e.parse::<TextEncoding>().map_err(|r| bad(&r))?
                        }
                        None if opt == "skip-bad" => options.skip_bad = true,
                        _ => {
                            return Err(bad(
                                "folder options are labels=filename|csv, encoding=auto|utf-8|cp949 and skip-bad, joined by &",
                            ))
                        }
                    }
                }
                Ok(DataSpec::Folder {
                    path: PathBuf::from(path),
                    options,
                })
            }
            _ => Err(bad("unknown kind")),
        }
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Idx { dir, split } => {
                write!(f, "idx:{}", dir.display())?;
                if *split == Split::Test {
                    f.write_str(":test")?;
                }
                Ok(())
            }
            DataSpec::Plates { style, n, seed } => {
                write!(f, "plates:{}:{n}:{seed}", style.name())
            }
            DataSpec::Folder { path, options } => {
                write!(f, "folder:{}", path.display())?;
                let mut opts = Vec::new();
                if options.labels == LabelSource::FileName {
                    opts.push("labels=filename".to_string());
                }
                if options.encoding != TextEncoding::Auto {
                    opts.push(format!("encoding={}", options.encoding.name()));
                }
                if options.skip_bad {
                    opts.push("skip-bad".into());
                }
                if !opts.is_empty() {
                    write!(f, "?{}", opts.join("&"))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_good_specs() {
        let cases = [
            (
                "idx:/data/mnist",
                DataSpec::Idx {
                    dir: "/data/mnist".into(),
                    split: Split::Train,
                },
            ),
            (
                "idx:rel/dir:test",
                DataSpec::Idx {
                    dir: "rel/dir".into(),
                    split: Split::Test,
                },
            ),
            (
                "idx:c:/x:train",
                DataSpec::Idx {
                    dir: "c:/x".into(),
                    split: Split::Train,
                },
            ),
            (
                "plates:loose:100",
                DataSpec::Plates {
                    style: PlateStyle::Loose,
                    n: 100,
                    seed: 0,
                },
            ),
            (
                "plates:mixed:5:42",
                DataSpec::Plates {
                    style: PlateStyle::Mixed,
                    n: 5,
                    seed: 42,
                },
            ),
            (
                "folder:site/labels.csv",
                DataSpec::Folder {
                    path: "site/labels.csv".into(),
                    options: FolderOptions::default(),
                },
            ),
            (
                "folder:site/plates?labels=filename&skip-bad",
                DataSpec::Folder {
                    path: "site/plates".into(),
                    options: FolderOptions {
                        labels: LabelSource::FileName,
                        skip_bad: true,
                        ..Default::default()
                    },
                },
            ),
            (
                "folder:excel.csv?encoding=cp949",
                DataSpec::Folder {
                    path: "excel.csv".into(),
                    options: FolderOptions {
                        encoding: TextEncoding::Cp949,
                        ..Default::default()
                    },
                },
            ),
        ];
        for (s, want) in cases {
            let got: DataSpec = s.parse().unwrap();
            assert_eq!(got, want, "{s}");
            // Display round-trips.
            assert_eq!(got.to_string().parse::<DataSpec>().unwrap(), want, "{s}");
        }
    }

    #[test]
    fn rejects_bad_specs() {
        for s in [
            "",
            "idx",
            "idx:",
            "idx::test",
            "mnist:/x",
            "plates:loose",
            "plates:round:10",
            "plates:tight:ten",
            "plates:tight:0",
            "plates:tight:-1",
            "plates:tight:10:x",
            "plates:tight:10:1:2",
            "folder:",
            "folder:?skip-bad",
            "folder:x.csv?labels=name",
            "folder:x.csv?encoding=latin1",
            "folder:x.csv?skipbad",
        ] {
            match s.parse::<DataSpec>() {
                Err(DataError::Spec { spec, .. }) => assert_eq!(spec, s),
                other => panic!("{s:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn limit_applies_to_plates() {
        let d = DataSpec::Plates {
            style: PlateStyle::Tight,
            n: 50,
            seed: 1,
        }
        .load(&LoadConfig {
            limit: Some(3),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.len(), 3);
    }
}
