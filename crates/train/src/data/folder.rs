//! An image folder described by a labels CSV: one `path,label` line per sample, paths relative to
//! the CSV's directory (absolute paths allowed), an optional `path,label` header, blank lines and
//! lines starting with `#` ignored. The label is everything after the last comma, so paths may
//! contain commas.
//!
//! The task is decided from the labels: if the first is a plate string (`12가3456`) every label
//! must be one and the task is [`Task::Plate`] like the synthetic plates; if it is a whole number
//! every label must be one and the task is [`Task::Classes`] with `largest label + 1` classes.
//! Images are decoded with the `image` crate (PNG, JPEG), converted to grayscale or RGB and
//! resized (bilinear) to the requested size.

use std::path::{Path, PathBuf};

use image::imageops::FilterType;

use super::plates;
use super::{DataError, Dataset, Task};

/// The most classes an integer-labelled CSV may declare (guards a typo like `1000000`).
pub const MAX_CLASSES: u32 = 100_000;

/// Loads the dataset listed in `csv`, images converted to `input = (C, H, W)` with C = 1 or 3;
/// at most `limit` images are decoded (all labels are still read, so the class count does not
/// depend on the limit).
pub fn load(
    csv: &Path,
    input: (usize, usize, usize),
    limit: Option<usize>,
) -> Result<Dataset, DataError> {
    let (c, h, w) = input;
    if c != 1 && c != 3 {
        return Err(DataError::Config(format!(
            "folder images need 1 or 3 channels, not {c}"
        )));
    }
    let (h32, w32) = match (u32::try_from(h), u32::try_from(w)) {
        (Ok(h32), Ok(w32)) if h32 > 0 && w32 > 0 && h32 <= 4096 && w32 <= 4096 => (h32, w32),
        _ => {
            return Err(DataError::Config(format!(
                "folder image size {h}x{w} must be between 1x1 and 4096x4096"
            )))
        }
    };
    let text = std::fs::read(csv).map_err(|source| DataError::Io {
        path: csv.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(text).map_err(|e| DataError::Csv {
        path: csv.to_path_buf(),
        line: 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count(),
        reason: "not valid UTF-8 text; save the CSV as UTF-8".into(),
    })?;
    let entries = parse(csv, &text)?;
    if entries.is_empty() {
        return Err(DataError::Empty {
            path: csv.to_path_buf(),
        });
    }
    let task = task_of(csv, &entries)?;
    let base = csv.parent().unwrap_or(Path::new(""));
    let keep = limit.unwrap_or(usize::MAX).min(entries.len());
    let mut images = Vec::with_capacity(keep * c * h * w);
    let mut labels = Vec::with_capacity(keep * task.slots());
    for e in &entries[..keep] {
        let image = base.join(&e.path);
        let img_err = |reason: String| DataError::Image {
            csv: csv.to_path_buf(),
            line: e.line,
            image: image.clone(),
            reason,
        };
        let img = image::ImageReader::open(&image)
            .map_err(|err| img_err(err.to_string()))?
            .with_guessed_format()
            .map_err(|err| img_err(err.to_string()))?
            .decode()
            .map_err(|err| img_err(err.to_string()))?;
        if c == 1 {
            let g = image::imageops::resize(&img.to_luma8(), w32, h32, FilterType::Triangle);
            images.extend(g.as_raw().iter().map(|&v| f32::from(v) / 255.0));
        } else {
            let rgb = image::imageops::resize(&img.to_rgb8(), w32, h32, FilterType::Triangle);
            let raw = rgb.as_raw();
            for ch in 0..3 {
                images.extend(raw.chunks_exact(3).map(|p| f32::from(p[ch]) / 255.0));
            }
        }
        match task {
            Task::Plate { .. } => labels.extend(plate_label(csv, e)?),
            Task::Classes { .. } => labels.push(class_label(csv, e)?),
        }
    }
    Ok(Dataset {
        images,
        channels: c,
        height: h,
        width: w,
        labels,
        task,
        styles: None,
    })
}

/// One sample line.
struct Entry {
    line: usize,
    path: PathBuf,
    label: String,
}

fn parse(csv: &Path, text: &str) -> Result<Vec<Entry>, DataError> {
    let mut out = Vec::new();
    for (k, raw) in text.lines().enumerate() {
        let line = k + 1;
        let l = raw.trim().trim_start_matches('\u{feff}');
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let csv_err = |reason: &str| DataError::Csv {
            path: csv.to_path_buf(),
            line,
            reason: reason.to_string(),
        };
        let (path, label) = l
            .rsplit_once(',')
            .ok_or_else(|| csv_err("expected 'path,label'"))?;
        let (path, label) = (path.trim(), label.trim());
        if out.is_empty()
            && path.eq_ignore_ascii_case("path")
            && label.eq_ignore_ascii_case("label")
        {
            continue;
        }
        if path.is_empty() {
            return Err(csv_err("the image path is empty"));
        }
        if label.is_empty() {
            return Err(csv_err("the label is empty"));
        }
        out.push(Entry {
            line,
            path: PathBuf::from(path),
            label: label.to_string(),
        });
    }
    Ok(out)
}

/// Decides the task from the first label and checks every label against it.
fn task_of(csv: &Path, entries: &[Entry]) -> Result<Task, DataError> {
    let first = &entries[0];
    if plates::encode(&first.label).is_ok() {
        for e in entries {
            plate_label(csv, e)?;
        }
        Ok(Task::Plate {
            slots: plates::SLOTS,
            classes: plates::charset().len(),
        })
    } else if first.label.parse::<u32>().is_ok() {
        let mut max = 0;
        for e in entries {
            max = max.max(class_label(csv, e)?);
        }
        Ok(Task::Classes {
            classes: max as usize + 1,
        })
    } else {
        Err(DataError::Csv {
            path: csv.to_path_buf(),
            line: first.line,
            reason: format!(
                "label '{}' is neither a class number nor a plate like 12가3456",
                first.label
            ),
        })
    }
}

fn plate_label(csv: &Path, e: &Entry) -> Result<Vec<u32>, DataError> {
    plates::encode(&e.label).map_err(|err| DataError::Csv {
        path: csv.to_path_buf(),
        line: e.line,
        reason: format!("earlier labels are plates, but this one is not: {err}"),
    })
}

fn class_label(csv: &Path, e: &Entry) -> Result<u32, DataError> {
    match e.label.parse::<u32>() {
        Ok(v) if v < MAX_CLASSES => Ok(v),
        Ok(v) => Err(DataError::Csv {
            path: csv.to_path_buf(),
            line: e.line,
            reason: format!("class {v} is too large (at most {})", MAX_CLASSES - 1),
        }),
        Err(_) => Err(DataError::Csv {
            path: csv.to_path_buf(),
            line: e.line,
            reason: format!("earlier labels are class numbers, but '{}' is not", e.label),
        }),
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
        let d = DataSpec::Folder { csv }
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
            ("ok.png,1\n\nok.png,999999999\n", 3),
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
