//! An image folder with labels: the site's own data (issue 4, issue 16).
//!
//! Two ways to say which image has which label ([`LabelSource`]):
//! - **a labels CSV** (`folder:LABELS.csv`): one `path,label` record per sample, paths relative to the CSV's
//!   directory (absolute paths allowed), an optional `path,label` header, blank lines and lines starting with
//!   `#` ignored. Read with the `csv` crate, so fields may be quoted (`"a, b.png",12가3456`); an unquoted line
//!   with more than two fields takes the last as the label and the rest as the path, so paths may contain
//!   commas. The text is UTF-8 (with or without a byte-order mark) or, when it is not valid UTF-8, CP949 —
//!   what Korean Excel saves ([`TextEncoding`]).
//! - **file names** (`folder:DIR?labels=filename`): every `.png`/`.jpg`/`.jpeg` in DIR, the label being the
//!   file name up to the first `_` or `.` (`12가3456.png`, `12가3456_cam2.jpg`).
//!
//! The task is decided from the labels: if the first is a plate string (`12가3456`) every label must be one
//! and the task is [`Task::Plate`] like the synthetic plates; if it is a whole number every label must be one
//! and the task is [`Task::Classes`] with `largest label + 1` classes. Images are decoded with the `image`
//! crate (PNG, JPEG), converted to grayscale or RGB and resized (bilinear) to the requested size.
//!
//! A bad image or label line is an error naming the file and line, unless [`FolderOptions::skip_bad`] is set:
//! then it is left out and listed in the result ([`BadFile`]) for the caller to report. [`check`] reads
//! everything without keeping pixels and reports what it found (`ferry-client check-data`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::plates;
use super::{DataError, Dataset, Task};

/// The most classes an integer-labelled CSV may declare (guards a typo like `1000000`).
pub const MAX_CLASSES: u32 = 100_000;

/// The largest labels CSV read (a typo pointing at a video file must not be read into memory).
pub const MAX_CSV_BYTES: u64 = 256 << 20;

/// Where the labels come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LabelSource {
    /// A labels CSV (the spec's path is the CSV).
    #[default]
    Csv,
    /// The image file names (the spec's path is a directory).
    FileName,
}

/// The text encoding of a labels CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TextEncoding {
    /// UTF-8 if the bytes are valid UTF-8 (a byte-order mark is dropped), else CP949.
    #[default]
    Auto,
    /// UTF-8 only.
    Utf8,
    /// CP949 (Windows code page 949, a superset of EUC-KR): Korean Excel's "CSV" format.
    Cp949,
}

impl TextEncoding {
    /// The spec-string name: `auto`, `utf-8` or `cp949`.
    pub fn name(self) -> &'static str {
        match self {
            TextEncoding::Auto => "auto",
            TextEncoding::Utf8 => "utf-8",
            TextEncoding::Cp949 => "cp949",
        }
    }
}

impl std::str::FromStr for TextEncoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(TextEncoding::Auto),
            "utf-8" | "utf8" => Ok(TextEncoding::Utf8),
            "cp949" | "euc-kr" | "windows-949" => Ok(TextEncoding::Cp949),
            _ => Err("the labels encoding must be auto, utf-8 or cp949".into()),
        }
    }
}

/// How to read a folder dataset; written in the spec after `?` (see [`super::DataSpec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FolderOptions {
    /// Where the labels come from.
    pub labels: LabelSource,
    /// The labels CSV's encoding.
    pub encoding: TextEncoding,
    /// Leave out unreadable images and bad label lines (reported) instead of refusing the dataset.
    pub skip_bad: bool,
}

/// A sample left out (with [`FolderOptions::skip_bad`]) or found wrong (by [`check`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BadFile {
    /// Line of the labels CSV, when the sample came from one.
    pub line: Option<usize>,
    /// The image file (as named; may be empty when the line named none).
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

/// One sample of the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Line of the labels CSV (None for file-name labels).
    pub line: Option<usize>,
    /// The image file, resolved against the CSV's directory.
    pub path: PathBuf,
    /// The label text (None when the folder is listed for its images only).
    pub label: Option<String>,
}

/// Which images a folder spec names, with their labels, before any image is decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The samples, in CSV or file-name order.
    pub entries: Vec<Entry>,
    /// Lines that name no usable sample (only with `skip_bad` or `images_only`; otherwise an error).
    pub bad: Vec<BadFile>,
    /// The encoding the CSV was read in (`utf-8`, `cp949`), or `file names`.
    pub encoding: &'static str,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Decodes a labels CSV's bytes to text as `enc` says. Returns the text and the encoding used.
pub fn decode_text(
    path: &Path,
    bytes: &[u8],
    enc: TextEncoding,
) -> Result<(String, &'static str), DataError> {
    let utf8 = |b: &[u8]| -> Result<String, DataError> {
        let b = b.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(b);
        String::from_utf8(b.to_vec()).map_err(|e| DataError::Csv {
            path: path.to_path_buf(),
            line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count(),
            reason: "not valid UTF-8 text; save the CSV as UTF-8, or give the encoding \
                     (?encoding=cp949, --labels-encoding cp949)"
                .into(),
        })
    };
    let cp949 = |b: &[u8]| -> Result<String, DataError> {
        encoding_rs::EUC_KR
            .decode_without_bom_handling_and_without_replacement(b)
            .map(|t| t.into_owned())
            .ok_or_else(|| DataError::Csv {
                path: path.to_path_buf(),
                line: 1,
                reason: "neither UTF-8 nor CP949 text; save the CSV from Excel as \"CSV UTF-8\""
                    .into(),
            })
    };
    match enc {
        TextEncoding::Utf8 => Ok((utf8(bytes)?, "utf-8")),
        TextEncoding::Cp949 => Ok((cp949(bytes)?, "cp949")),
        TextEncoding::Auto => match utf8(bytes) {
            Ok(t) => Ok((t, "utf-8")),
            Err(_) => Ok((cp949(bytes)?, "cp949")),
        },
    }
}

/// Lists the samples a folder spec names. With `images_only` the labels are not needed: a directory is
/// listed for its images whatever `opts.labels` says (`ferry-client predict`).
pub fn list(path: &Path, opts: &FolderOptions, images_only: bool) -> Result<Listing, DataError> {
    if path.is_dir() {
        if opts.labels != LabelSource::FileName && !images_only {
            return Err(DataError::Config(format!(
                "{} is a folder: give its labels CSV (folder:{}/labels.csv) or take the labels from the file \
                 names (folder:{}?labels=filename)",
                shown(path),
                shown(path),
                shown(path)
            )));
        }
        return list_dir(path, opts, images_only);
    }
    if opts.labels == LabelSource::FileName {
        return Err(DataError::Config(format!(
            "labels=filename takes a folder of images, and {} is not one",
            shown(path)
        )));
    }
    let bytes = read_capped(path, MAX_CSV_BYTES)?;
    let (text, encoding) = decode_text(path, &bytes, opts.encoding)?;
    let (entries, bad) = parse(path, &text, opts.skip_bad || images_only)?;
    Ok(Listing {
        entries,
        bad,
        encoding,
    })
}

/// A path as shown to a person: control characters escaped (file names come from the site's disk or a stick).
fn shown(p: &Path) -> String {
    p.display().to_string().escape_debug().to_string()
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    if bytes.len() as u64 > max {
        return Err(DataError::Config(format!(
            "{} is over {} MiB: not a labels CSV",
            shown(path),
            max >> 20
        )));
    }
    Ok(bytes)
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// The label a file name carries: the name up to the first `_` or `.`.
pub fn label_of_file_name(p: &Path) -> Option<String> {
    let name = p.file_name()?.to_str()?;
    let end = name.find(['_', '.']).unwrap_or(name.len());
    let label = name[..end].trim();
    (!label.is_empty()).then(|| label.to_string())
}

fn list_dir(dir: &Path, opts: &FolderOptions, images_only: bool) -> Result<Listing, DataError> {
    let mut paths = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let p = e.map_err(io_err(dir))?.path();
        if p.is_file() && is_image_name(&p) {
            paths.push(p);
        }
    }
    paths.sort();
    let mut entries = Vec::with_capacity(paths.len());
    let mut bad = Vec::new();
    for p in paths {
        if images_only {
            entries.push(Entry {
                line: None,
                path: p,
                label: None,
            });
            continue;
        }
        match label_of_file_name(&p) {
            Some(label) => entries.push(Entry {
                line: None,
                path: p,
                label: Some(label),
            }),
            None if opts.skip_bad => bad.push(BadFile {
                line: None,
                path: p,
                reason: "the file name holds no label (not UTF-8, or empty before `_`)".into(),
            }),
            None => {
                return Err(DataError::Config(format!(
                    "{}: the file name holds no label (not UTF-8, or empty before `_`)",
                    shown(&p)
                )))
            }
        }
    }
    Ok(Listing {
        entries,
        bad,
        encoding: "file names",
    })
}

/// The 1-based line where the record at csv position `p` starts, as the operator's editor counts lines.
///
/// A csv `Position` is where the reader stood when it *began* looking for the record: just after the previous
/// record's terminator. Blank lines and `#` comment lines in between are skipped by csv-core before the record
/// starts, so the position's byte offset (and its own line count) points at the first skipped line, one line or
/// more short. Skip those lines here exactly as csv-core's start-of-record state does (a `\r` or `\n` is
/// discarded; a `#` discards through the next `\n`), then count the newlines before the record's first byte.
fn line_at(text: &str, p: &csv::Position) -> usize {
    let bytes = text.as_bytes();
    let mut i = (p.byte() as usize).min(bytes.len());
    loop {
        match bytes.get(i) {
            Some(b'\r' | b'\n') => i += 1,
            Some(b'#') => match bytes[i..].iter().position(|&b| b == b'\n') {
                Some(n) => i += n + 1,
                None => i = bytes.len(),
            },
            _ => break,
        }
    }
    let end = i.min(bytes.len());
    1 + bytes[..end].iter().filter(|&&b| b == b'\n').count()
}

fn parse(csv_path: &Path, text: &str, skip: bool) -> Result<(Vec<Entry>, Vec<BadFile>), DataError> {
    let base = csv_path.parent().unwrap_or(Path::new(""));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let mut first = true;
    for rec in reader.records() {
        let rec = rec.map_err(|e| DataError::Csv {
            path: csv_path.to_path_buf(),
            line: e.position().map_or(0, |p| line_at(text, p)),
            reason: e.to_string(),
        })?;
        let line = rec.position().map_or(0, |p| line_at(text, p));
        let fields: Vec<&str> = rec.iter().collect();
        if fields.iter().all(|f| f.is_empty()) {
            continue;
        }
        let is_first = std::mem::replace(&mut first, false);
        let problem = |reason: &str, path: &str| BadFile {
            line: Some(line),
            path: base.join(path),
            reason: reason.to_string(),
        };
        let (path, label) = match fields.as_slice() {
            [_] => {
                let b = problem("expected 'path,label'", fields[0]);
                if skip {
                    bad.push(b);
                    continue;
                }
                return Err(csv_error(csv_path, b));
            }
            [rest @ .., label] => (rest.join(","), label.to_string()),
            [] => continue,
        };
        if is_first
            && ["path", "file", "image"].contains(&path.to_ascii_lowercase().as_str())
            && ["label", "plate"].contains(&label.to_ascii_lowercase().as_str())
        {
            continue;
        }
        let b = if path.is_empty() {
            Some(problem("the image path is empty", ""))
        } else if label.is_empty() {
            Some(problem("the label is empty", &path))
        } else {
            None
        };
        if let Some(b) = b {
            if skip {
                bad.push(b);
                continue;
            }
            return Err(csv_error(csv_path, b));
        }
        out.push(Entry {
            line: Some(line),
            path: base.join(&path),
            label: Some(label),
        });
    }
    Ok((out, bad))
}

fn csv_error(csv: &Path, b: BadFile) -> DataError {
    DataError::Csv {
        path: csv.to_path_buf(),
        line: b.line.unwrap_or(0),
        reason: b.reason,
    }
}

/// The task the labels describe, decided by the first label that is a plate or a class number.
fn task_of(entries: &[Entry]) -> Option<Task> {
    entries.iter().find_map(|e| {
        let l = e.label.as_deref()?;
        if plates::encode(l).is_ok() {
            Some(Task::Plate {
                slots: plates::SLOTS,
                classes: plates::charset().len(),
            })
        } else if l.parse::<u32>().is_ok() {
            Some(Task::Classes { classes: 0 })
        } else {
            None
        }
    })
}

/// The labels of one entry under `task`, or why they do not fit.
fn labels_of(task: Task, label: &str) -> Result<Vec<u32>, String> {
    match task {
        Task::Plate { .. } => plates::encode(label)
            .map_err(|err| format!("earlier labels are plates, but this one is not: {err}")),
        Task::Classes { .. } => match label.parse::<u32>() {
            Ok(v) if v < MAX_CLASSES => Ok(vec![v]),
            Ok(v) => Err(format!(
                "class {v} is too large (at most {})",
                MAX_CLASSES - 1
            )),
            Err(_) => Err(format!(
                "earlier labels are class numbers, but '{label}' is not"
            )),
        },
    }
}

/// Decodes one image file to `(C, H, W)` floats in `[0, 1]` (C = 1 or 3, bilinear resize).
pub fn decode_image(path: &Path, input: (usize, usize, usize)) -> Result<Vec<f32>, String> {
    let (c, h, w) = input;
    let img = image::ImageReader::open(path)
        .map_err(|e| e.to_string())?
        .with_guessed_format()
        .map_err(|e| e.to_string())?
        .decode()
        .map_err(|e| e.to_string())?;
    let (h32, w32) = (h as u32, w as u32);
    if c == 1 {
        let g = image::imageops::resize(&img.to_luma8(), w32, h32, FilterType::Triangle);
        Ok(g.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect())
    } else {
        let rgb = image::imageops::resize(&img.to_rgb8(), w32, h32, FilterType::Triangle);
        let raw = rgb.as_raw();
        let mut out = Vec::with_capacity(3 * h * w);
        for ch in 0..3 {
            out.extend(raw.chunks_exact(3).map(|p| f32::from(p[ch]) / 255.0));
        }
        Ok(out)
    }
}

/// Checks `input = (C, H, W)`: C = 1 or 3, sides 1 to 4096.
pub fn check_input(input: (usize, usize, usize)) -> Result<(), DataError> {
    let (c, h, w) = input;
    if c != 1 && c != 3 {
        return Err(DataError::Config(format!(
            "folder images need 1 or 3 channels, not {c}"
        )));
    }
    if !(1..=4096).contains(&h) || !(1..=4096).contains(&w) {
        return Err(DataError::Config(format!(
            "folder image size {h}x{w} must be between 1x1 and 4096x4096"
        )));
    }
    Ok(())
}

/// Loads the dataset listed in `csv` with the default options (see [`load_with`]).
pub fn load(
    csv: &Path,
    input: (usize, usize, usize),
    limit: Option<usize>,
) -> Result<Dataset, DataError> {
    Ok(load_with(csv, &FolderOptions::default(), input, limit)?.0)
}

/// Loads a folder dataset, images converted to `input = (C, H, W)` with C = 1 or 3; at most `limit` images
/// are decoded (all labels are still read, so the class count does not depend on the limit). Returns the
/// samples left out under `opts.skip_bad` (empty otherwise: any problem is an error).
pub fn load_with(
    path: &Path,
    opts: &FolderOptions,
    input: (usize, usize, usize),
    limit: Option<usize>,
) -> Result<(Dataset, Vec<BadFile>), DataError> {
    check_input(input)?;
    let (c, h, w) = input;
    let listing = list(path, opts, false)?;
    let mut bad = listing.bad;
    let Some(mut task) = task_of(&listing.entries) else {
        return match listing.entries.first() {
            None => Err(DataError::Empty {
                path: path.to_path_buf(),
            }),
            Some(e) => Err(entry_error(
                path,
                e,
                format!(
                    "label '{}' is neither a class number nor a plate like 12가3456",
                    e.label.as_deref().unwrap_or("").escape_debug()
                ),
            )),
        };
    };
    // Every label first (the class count does not depend on the limit), then the images.
    let mut labelled = Vec::with_capacity(listing.entries.len());
    for e in listing.entries {
        match labels_of(task, e.label.as_deref().unwrap_or("")) {
            Ok(l) => labelled.push((e, l)),
            Err(reason) if opts.skip_bad => bad.push(BadFile {
                line: e.line,
                path: e.path,
                reason,
            }),
            Err(reason) => return Err(entry_error(path, &e, reason)),
        }
    }
    if let Task::Classes { classes } = &mut task {
        *classes = labelled
            .iter()
            .map(|(_, l)| l[0] as usize + 1)
            .max()
            .unwrap_or(0);
    }
    let keep = limit.unwrap_or(usize::MAX);
    let mut images = Vec::with_capacity(keep.min(labelled.len()) * c * h * w);
    let mut labels = Vec::with_capacity(keep.min(labelled.len()) * task.slots());
    let mut n = 0;
    for (e, l) in &labelled {
        if n == keep {
            break;
        }
        match decode_image(&e.path, input) {
            Ok(px) => {
                images.extend(px);
                labels.extend_from_slice(l);
                n += 1;
            }
            Err(reason) if opts.skip_bad => bad.push(BadFile {
                line: e.line,
                path: e.path.clone(),
                reason: format!("cannot use the image: {reason}"),
            }),
            Err(reason) => {
                return Err(match e.line {
                    Some(line) => DataError::Image {
                        csv: path.to_path_buf(),
                        line,
                        image: e.path.clone(),
                        reason,
                    },
                    None => DataError::Config(format!(
                        "cannot use image {}: {reason}; fix or remove it, or add ?skip-bad (--skip-bad) to leave bad images out",
                        shown(&e.path)
                    )),
                })
            }
        }
    }
    if n == 0 {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok((
        Dataset {
            images,
            channels: c,
            height: h,
            width: w,
            labels,
            task,
            styles: None,
        },
        bad,
    ))
}

fn entry_error(path: &Path, e: &Entry, reason: String) -> DataError {
    match e.line {
        Some(line) => DataError::Csv {
            path: path.to_path_buf(),
            line,
            reason,
        },
        None => DataError::Config(format!("{}: {reason}", shown(&e.path))),
    }
}

/// The tokens of a plate label that are not in `alphabet`: a leading region name as a whole, then single
/// characters (spaces ignored).
fn outside_alphabet(label: &str, alphabet: &[String]) -> Vec<String> {
    let mut rest = label.trim_start();
    let mut out = Vec::new();
    if let Some(r) = plates::REGIONS.iter().find(|r| rest.starts_with(**r)) {
        if !alphabet.iter().any(|a| a.as_str() == *r) {
            out.push(r.to_string());
        }
        rest = &rest[r.len()..];
    }
    for ch in rest.chars().filter(|c| !c.is_whitespace()) {
        let s = ch.to_string();
        if !alphabet.contains(&s) {
            out.push(s);
        }
    }
    out
}

/// What [`check`] found in a dataset (`ferry-client check-data`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DataCheck {
    /// How the labels were read (`utf-8`, `cp949`, `file names`; `generated`, `idx` for the other kinds).
    pub encoding: &'static str,
    /// Samples named.
    pub listed: usize,
    /// Samples whose image decodes and whose label fits the task.
    pub usable: usize,
    /// `plate` or `classes` (None when no label is either).
    pub task: Option<&'static str>,
    /// Per label token (a plate's characters) or class number: how many times it occurs in usable samples.
    pub histogram: BTreeMap<String, usize>,
    /// Characters of plate labels outside the model's alphabet, with their counts.
    pub outside_alphabet: BTreeMap<String, usize>,
    /// Everything wrong: bad lines, unreadable images, labels that do not fit.
    pub bad: Vec<BadFile>,
}

/// Reads a folder dataset as [`load_with`] would with `skip_bad`, decoding every image without keeping it,
/// and reports counts, the label histogram, the bad samples and the label characters outside the alphabet
/// of a model with `classes` classes per slot (all of [`plates::charset`] when `None`).
pub fn check(
    path: &Path,
    opts: &FolderOptions,
    classes: Option<usize>,
) -> Result<DataCheck, DataError> {
    let opts = FolderOptions {
        skip_bad: true,
        ..*opts
    };
    let listing = list(path, &opts, false)?;
    let mut bad = listing.bad;
    let task = task_of(&listing.entries);
    let alphabet = &plates::charset()[..classes.unwrap_or(usize::MAX).min(plates::charset().len())];
    let mut histogram = BTreeMap::new();
    let mut outside = BTreeMap::new();
    let mut usable = 0;
    for e in &listing.entries {
        let label = e.label.as_deref().unwrap_or("");
        let labels = match task {
            Some(t) => labels_of(t, label),
            None => Err(format!(
                "label '{}' is neither a class number nor a plate like 12가3456",
                label.escape_debug()
            )),
        };
        if matches!(task, Some(Task::Plate { .. }) | None) {
            for token in outside_alphabet(label, alphabet) {
                *outside.entry(token).or_insert(0) += 1;
            }
        }
        let labels = match labels {
            Ok(l) => l,
            Err(reason) => {
                bad.push(BadFile {
                    line: e.line,
                    path: e.path.clone(),
                    reason,
                });
                continue;
            }
        };
        if let Err(reason) = decode_image(&e.path, (1, 1, 1)) {
            bad.push(BadFile {
                line: e.line,
                path: e.path.clone(),
                reason: format!("cannot use the image: {reason}"),
            });
            continue;
        }
        usable += 1;
        match task {
            Some(Task::Plate { .. }) => {
                for l in labels.iter().filter(|&&l| l != 0) {
                    *histogram.entry(plates::decode(&[*l])).or_insert(0) += 1;
                }
            }
            _ => *histogram.entry(labels[0].to_string()).or_insert(0) += 1,
        }
    }
    bad.sort_by(|a, b| a.line.cmp(&b.line).then(a.path.cmp(&b.path)));
    Ok(DataCheck {
        encoding: listing.encoding,
        listed: listing.entries.len(),
        usable,
        task: task.map(|t| match t {
            Task::Plate { .. } => "plate",
            Task::Classes { .. } => "classes",
        }),
        histogram,
        outside_alphabet: outside,
        bad,
    })
}

/// The report of a dataset that loaded whole (generated plates, IDX files): counts and the histogram.
pub fn summarize(data: &Dataset, encoding: &'static str) -> DataCheck {
    let mut histogram = BTreeMap::new();
    for i in 0..data.len() {
        let l = data.label(i);
        match data.task {
            Task::Plate { .. } => {
                for t in l.iter().filter(|&&t| t != 0) {
                    *histogram.entry(plates::decode(&[*t])).or_insert(0) += 1;
                }
            }
            Task::Classes { .. } => *histogram.entry(l[0].to_string()).or_insert(0) += 1,
        }
    }
    DataCheck {
        encoding,
        listed: data.len(),
        usable: data.len(),
        task: Some(match data.task {
            Task::Plate { .. } => "plate",
            Task::Classes { .. } => "classes",
        }),
        histogram,
        outside_alphabet: BTreeMap::new(),
        bad: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DataSpec, LoadConfig};

    fn png(dir: &Path, name: &str, w: u32, h: u32, v: u8) {
        image::GrayImage::from_pixel(w, h, image::Luma([v]))
            .save(dir.join(name))
            .unwrap();
    }

    #[test]
    fn loads_class_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("img")).unwrap();
        png(&dir.path().join("img"), "a.png", 10, 7, 255);
        png(dir.path(), "b,1.png", 5, 5, 0);
        image::RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 0]))
            .save(dir.path().join("c.png"))
            .unwrap();
        let csv = dir.path().join("labels.csv");
        std::fs::write(
            &csv,
            "path,label\n# comment\nimg/a.png,2\n\n  b,1.png , 0\nc.png,4\n",
        )
        .unwrap();
        let d = load(&csv, (1, 6, 8), None).unwrap();
        assert_eq!((d.len(), d.channels, d.height, d.width), (3, 1, 6, 8));
        assert_eq!(d.labels, vec![2, 0, 4]);
        assert_eq!(d.task, Task::Classes { classes: 5 });
        assert!(d.image(0).iter().all(|&v| v == 1.0));
        assert!(d.image(1).iter().all(|&v| v == 0.0));
        let rgb = load(&csv, (3, 4, 4), Some(3)).unwrap();
        assert_eq!(rgb.image(2)[0], 1.0); // red plane
        assert_eq!(rgb.image(2)[16], 0.0); // green plane
                                           // The limit decodes fewer images but keeps the class count.
        let one = load(&csv, (1, 6, 8), Some(1)).unwrap();
        assert_eq!((one.len(), one.task), (1, Task::Classes { classes: 5 }));
    }

    #[test]
    fn loads_plate_folder_at_default_size() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "p.png", 120, 30, 128);
        let csv = dir.path().join("plates.csv");
        std::fs::write(&csv, "p.png,12가3456\np.png,123호4567\n").unwrap();
        let d = DataSpec::Folder {
            path: csv,
            options: FolderOptions::default(),
        }
        .load(&LoadConfig::default())
        .unwrap();
        assert_eq!(
            d.task,
            Task::Plate {
                slots: 8,
                classes: plates::charset().len()
            }
        );
        assert_eq!(
            (d.height, d.width),
            (plates::PLATE_HEIGHT, plates::PLATE_WIDTH)
        );
        assert_eq!(plates::decode(d.label(0)), "12가3456");
        assert_eq!(plates::decode(d.label(1)), "123호4567");
    }

    #[test]
    fn quoted_fields_and_cp949() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "a, b.png", 8, 4, 10);
        png(dir.path(), "c.png", 8, 4, 200);
        let text = "\"path\",\"label\"\n\"a, b.png\",\"12가3456\"\nc.png,서울12바3456\n";
        // As Korean Excel saves it: CP949, no byte-order mark.
        let (bytes, _, bad) = encoding_rs::EUC_KR.encode(text);
        assert!(!bad);
        assert!(std::str::from_utf8(&bytes).is_err());
        let csv = dir.path().join("excel.csv");
        std::fs::write(&csv, &bytes).unwrap();
        let (d, skipped) = load_with(&csv, &FolderOptions::default(), (1, 4, 8), None).unwrap();
        assert!(skipped.is_empty());
        assert_eq!(plates::decode(d.label(0)), "12가3456");
        assert_eq!(plates::decode(d.label(1)), "서울12바3456");
        // Forced UTF-8 refuses the same bytes, naming the way out.
        let utf8 = FolderOptions {
            encoding: TextEncoding::Utf8,
            ..Default::default()
        };
        let e = load_with(&csv, &utf8, (1, 4, 8), None).unwrap_err();
        assert!(e.to_string().contains("cp949"), "{e}");
        // UTF-8 with a byte-order mark (Excel's "CSV UTF-8").
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(text.as_bytes());
        std::fs::write(&csv, &bom).unwrap();
        let (d2, _) = load_with(&csv, &FolderOptions::default(), (1, 4, 8), None).unwrap();
        assert_eq!(d2.labels, d.labels);
        assert_eq!(d2.images, d.images);
    }

    #[test]
    fn labels_from_file_names() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "12가3456.png", 8, 4, 10);
        png(dir.path(), "34나5678_cam2.PNG", 8, 4, 20);
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let opts = FolderOptions {
            labels: LabelSource::FileName,
            ..Default::default()
        };
        let (d, bad) = load_with(dir.path(), &opts, (1, 4, 8), None).unwrap();
        assert!(bad.is_empty());
        assert_eq!(d.len(), 2);
        assert_eq!(plates::decode(d.label(0)), "12가3456");
        assert_eq!(plates::decode(d.label(1)), "34나5678");
        // A folder without labels=filename says how to name the labels.
        let e = load_with(dir.path(), &FolderOptions::default(), (1, 4, 8), None).unwrap_err();
        assert!(e.to_string().contains("labels=filename"), "{e}");
    }

    #[test]
    fn skip_bad_reports_and_continues() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "ok.png", 4, 4, 9);
        std::fs::write(dir.path().join("bad.png"), b"not a png at all").unwrap();
        let csv = dir.path().join("l.csv");
        std::fs::write(
            &csv,
            "ok.png,1\nbad.png,2\nmissing.png,3\nok.png,cat\nok.png,0\n",
        )
        .unwrap();
        let e = load_with(&csv, &FolderOptions::default(), (1, 4, 4), None).unwrap_err();
        assert!(matches!(e, DataError::Csv { line: 4, .. }), "{e}");
        let opts = FolderOptions {
            skip_bad: true,
            ..Default::default()
        };
        let (d, bad) = load_with(&csv, &opts, (1, 4, 4), None).unwrap();
        assert_eq!(d.labels, vec![1, 0]);
        // The class count comes from every valid label, whether or not its image reads (as with --limit).
        assert_eq!(d.task, Task::Classes { classes: 4 });
        let lines: Vec<_> = bad.iter().map(|b| b.line.unwrap()).collect();
        assert_eq!(lines, vec![4, 2, 3]);
        assert!(
            bad[1].reason.contains("cannot use the image"),
            "{:?}",
            bad[1]
        );
        // check sees the same, with the histogram.
        let c = check(&csv, &FolderOptions::default(), None).unwrap();
        assert_eq!((c.listed, c.usable, c.task), (5, 2, Some("classes")));
        assert_eq!(c.bad.len(), 3);
        assert_eq!(c.histogram.get("1"), Some(&1));
        assert_eq!(c.histogram.get("0"), Some(&1));
    }

    #[test]
    fn check_reports_characters_outside_the_alphabet() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "p.png", 8, 4, 9);
        let csv = dir.path().join("l.csv");
        std::fs::write(&csv, "p.png,12가3456\np.png,12가345X\np.png,서울12바3456\n").unwrap();
        let c = check(&csv, &FolderOptions::default(), None).unwrap();
        assert_eq!((c.listed, c.usable), (3, 2));
        assert_eq!(c.outside_alphabet.get("X"), Some(&1));
        assert_eq!(c.histogram.get("가"), Some(&1));
        assert_eq!(c.histogram.get("서울"), Some(&1));
        // A model without region names (plate-cnn's classes) reads no 서울.
        let c = check(&csv, &FolderOptions::default(), Some(plates::BASE_CLASSES)).unwrap();
        assert_eq!(c.outside_alphabet.get("서울"), Some(&1));
        assert_eq!(c.outside_alphabet.len(), 2, "{:?}", c.outside_alphabet);
    }

    fn err_of(csv_text: &str) -> DataError {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "ok.png", 4, 4, 9);
        std::fs::write(dir.path().join("bad.png"), b"not a png at all").unwrap();
        let csv = dir.path().join("l.csv");
        std::fs::write(&csv, csv_text).unwrap();
        load(&csv, (1, 4, 4), None).unwrap_err()
    }

    #[test]
    fn errors_name_the_line() {
        let line_of = |e: &DataError| match e {
            DataError::Csv { line, .. } | DataError::Image { line, .. } => *line,
            other => panic!("unexpected {other:?}"),
        };
        let cases = [
            ("ok.png,1\nmissing.png,2\n", 2),
            ("ok.png,1\nbad.png,2\n", 2),
            ("ok.png,1\nok.png\n", 2),
            ("ok.png,1\n,3\n", 2),
            ("ok.png,\n", 1),
            ("ok.png,cat\n", 1),
            ("ok.png,1\nok.png,12가3456\n", 2),
            ("ok.png,12가3456\nok.png,7\n", 2),
            // Blank lines, comment lines and CRLF line ends before a bad line: the line the editor shows.
            ("ok.png,1\n\nok.png,999999999\n", 3),
            ("ok.png,1\n\n\n\nok.png\n", 5),
            ("ok.png,1\n# a comment\n\n# another\nok.png,cat\n", 5),
            ("ok.png,1\r\n\r\nok.png,\r\n", 3),
            ("\n\nmissing.png,1\n", 3),
            ("# header comment\nok.png,1\n \nbad.png,2\n", 4),
        ];
        for (text, line) in cases {
            let e = err_of(text);
            assert_eq!(line_of(&e), line, "{text:?}: {e}");
            assert!(e.to_string().contains("l.csv"), "{e}");
        }
        assert!(matches!(err_of("path,label\n"), DataError::Empty { .. }));
        let dir = tempfile::tempdir().unwrap();
        let e = load(&dir.path().join("none.csv"), (1, 4, 4), None).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }), "{e}");
        assert!(matches!(
            load(&dir.path().join("none.csv"), (2, 4, 4), None),
            Err(DataError::Config(_))
        ));
    }
}
