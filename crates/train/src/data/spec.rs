//! Dataset spec strings (`idx:DIR[:test]`, `plates:STYLE:N[:SEED]`, `folder:LABELS.csv`): parsing,
//! printing, and dispatch to the loaders. Parsing does no I/O; [`DataSpec::load`] does it all.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

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
}

impl PlateStyle {
    /// The spec-string name: `loose`, `tight` or `mixed`.
    pub fn name(self) -> &'static str {
        match self {
            PlateStyle::Loose => "loose",
            PlateStyle::Tight => "tight",
            PlateStyle::Mixed => "mixed",
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
            _ => Err(DataError::Spec {
                spec: s.to_string(),
                reason: "plate style must be loose, tight or mixed".into(),
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
    /// Synthetic Korean licence plates (`plates:loose|tight|mixed:N[:SEED]`, seed 0 by default).
    Plates {
        /// Crop style.
        style: PlateStyle,
        /// Number of samples.
        n: usize,
        /// Generator seed: the same seed gives bit-identical samples.
        seed: u64,
    },
    /// Image files listed in a CSV of `path,label` lines (`folder:LABELS.csv`).
    Folder {
        /// The CSV file; image paths in it are relative to its directory.
        csv: PathBuf,
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
    /// Loads (or generates) the dataset.
    pub fn load(&self, opts: &LoadConfig) -> Result<Dataset, DataError> {
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
            DataSpec::Folder { csv } => folder::load(
                csv,
                opts.input
                    .unwrap_or((1, plates::PLATE_HEIGHT, plates::PLATE_WIDTH)),
                opts.limit,
            ),
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
                if rest.is_empty() {
                    return Err(bad("the CSV path is empty"));
                }
                Ok(DataSpec::Folder {
                    csv: PathBuf::from(rest),
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
            DataSpec::Folder { csv } => write!(f, "folder:{}", csv.display()),
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
                    csv: "site/labels.csv".into(),
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
