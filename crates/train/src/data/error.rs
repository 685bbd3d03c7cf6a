//! The one error type of the dataset module. Datasets are untrusted input (a site's own files, or a
//! stick from elsewhere): every way a file can be wrong is a variant here, never a panic, and every
//! message names the file (and line) and says what to do.

use std::path::{Path, PathBuf};

/// A path in a message: control characters escaped (dataset file names are untrusted, issue 16).
fn shown(p: &Path) -> String {
    p.display().to_string().escape_debug().to_string()
}

/// Why a dataset could not be parsed, loaded, generated or saved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file could not be opened or read.
    #[error("cannot read {}: {source}; check the path and its permissions", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A dataset spec string (as given on the command line) is malformed.
    #[error(
        "bad dataset spec '{spec}': {reason}; expected idx:DIR[:test], \
         plates:loose|tight|mixed|clean:N[:SEED], folder:LABELS.csv[?encoding=cp949&skip-bad] or \
         folder:DIR?labels=filename"
    )]
    Spec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An IDX directory lacks one of the files it needs.
    #[error("no {name} (or {name}.gz) in {}; is this an MNIST-style IDX directory?", dir.display())]
    MissingIdx {
        /// The directory searched.
        dir: PathBuf,
        /// The file name looked for (without `.gz`).
        name: String,
    },
    /// An IDX file starts with the wrong magic number.
    #[error(
        "{}: not an IDX {kind} file (magic 0x{found:08x}, expected 0x{expected:08x}); \
         are the image and label files swapped or damaged?",
        path.display()
    )]
    IdxMagic {
        /// The file.
        path: PathBuf,
        /// "images" or "labels".
        kind: &'static str,
        /// The magic read.
        found: u32,
        /// The magic wanted.
        expected: u32,
    },
    /// An IDX header declares dimensions that are zero or too large to hold.
    #[error("{}: bad IDX dimensions {dims:?}: {reason}; the file is damaged", path.display())]
    IdxDims {
        /// The file.
        path: PathBuf,
        /// The dimensions as read from the header.
        dims: Vec<u32>,
        /// What is wrong with them.
        reason: &'static str,
    },
    /// An IDX file is shorter or longer than its header says.
    #[error(
        "{}: IDX data is {found} bytes but the header says {expected}; \
         the file is truncated or damaged, copy it again",
        path.display()
    )]
    IdxLength {
        /// The file.
        path: PathBuf,
        /// Bytes after the header, as the header declares.
        expected: u64,
        /// Bytes actually present (at most `expected + 1`: reading stops there).
        found: u64,
    },
    /// The image and label files of an IDX split disagree on the sample count.
    #[error(
        "{} holds {images} images but {} holds {labels} labels; \
         they must come from the same split",
        images_path.display(),
        labels_path.display()
    )]
    IdxCount {
        /// The image file.
        images_path: PathBuf,
        /// The label file.
        labels_path: PathBuf,
        /// Images declared.
        images: usize,
        /// Labels declared.
        labels: usize,
    },
    /// A labels CSV has a malformed line.
    #[error("{} line {line}: {reason}", shown(path))]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },
    /// An image named by a labels CSV could not be read or decoded.
    #[error("{} line {line}: cannot use image {}: {}; fix or remove it, or leave bad images out with --skip-bad", shown(csv), shown(image), reason.escape_debug())]
    Image {
        /// The CSV file naming the image.
        csv: PathBuf,
        /// 1-based line number in the CSV.
        line: usize,
        /// The image file, resolved against the CSV's directory.
        image: PathBuf,
        /// The decoder's or OS's message.
        reason: String,
    },
    /// A string is not a Korean licence plate this module can encode.
    #[error("'{text}' is not a plate string: {reason}; expected e.g. 12가3456 or 123가4567")]
    Plate {
        /// The string.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A TTF font for plate rendering could not be used.
    #[error("cannot use font {}: {reason}; pass a TTF/OTF font with digits and Hangul", path.display())]
    Font {
        /// The font file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A load option or argument is out of range.
    #[error("invalid dataset option: {0}")]
    Config(String),
    /// Datasets that cannot be concatenated (different shapes or tasks).
    #[error("cannot concatenate datasets: {0}")]
    Concat(String),
    /// A dataset source holds no samples.
    #[error("{} holds no samples; point at a non-empty dataset", path.display())]
    Empty {
        /// The file or directory.
        path: PathBuf,
    },
    /// A PNG could not be written.
    #[error("cannot write {}: {reason}", path.display())]
    Save {
        /// The output file.
        path: PathBuf,
        /// The encoder's or OS's message.
        reason: String,
    },
}
