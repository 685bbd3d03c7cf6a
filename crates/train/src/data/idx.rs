//! MNIST-style IDX files (MNIST, Fashion-MNIST, KMNIST...), raw or gzip-compressed.
//!
//! A directory holds `train-images-idx3-ubyte` + `train-labels-idx1-ubyte` and `t10k-*` for the
//! test split, each possibly with a `.gz` suffix (Debian's `dataset-fashion-mnist` ships the `.gz`
//! files in `/usr/share/datasets/fashion-mnist/`); the `train-images.idx3-ubyte` spelling is
//! accepted too. Compression is detected from the content, not the name.
//!
//! The header is checked before any body is read: exact magic (`0x00000803` images,
//! `0x00000801` labels), non-zero dimensions whose product fits, equal counts, and a body of
//! exactly the declared length (reading stops one byte past it, so a gzip bomb costs nothing).
//! The class count is `max(10, largest label + 1)`: 10 for every MNIST-like set, so sites agree
//! on the model head even when a shard lacks some classes.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::{DataError, Dataset, Split, Task};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// Loads one split of the IDX dataset in `dir`, pixels scaled to `[0, 1]`.
pub fn load(dir: &Path, split: Split) -> Result<Dataset, DataError> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_path = find(dir, &format!("{prefix}-images"), "idx3-ubyte")?;
    let labels_path = find(dir, &format!("{prefix}-labels"), "idx1-ubyte")?;
    let images = read_idx(&images_path, "images", IMAGES_MAGIC)?;
    let labels = read_idx(&labels_path, "labels", LABELS_MAGIC)?;
    let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    if n != labels.dims[0] {
        return Err(DataError::IdxCount {
            images_path,
            labels_path,
            images: n,
            labels: labels.dims[0],
        });
    }
    if n == 0 {
        return Err(DataError::Empty { path: images_path });
    }
    let classes = labels.body.iter().map(|&l| usize::from(l) + 1).max();
    Ok(Dataset {
        images: images.body.iter().map(|&p| f32::from(p) / 255.0).collect(),
        channels: 1,
        height: rows,
        width: cols,
        labels: labels.body.iter().map(|&l| u32::from(l)).collect(),
        task: Task::Classes {
            classes: classes.unwrap_or(0).max(10),
        },
        styles: None,
    })
}

/// The path of `{stem}-{suffix}` or `{stem}.{suffix}`, raw or `.gz`, in `dir`.
fn find(dir: &Path, stem: &str, suffix: &str) -> Result<PathBuf, DataError> {
    let names = [format!("{stem}-{suffix}"), format!("{stem}.{suffix}")];
    for name in &names {
        for candidate in [name.clone(), format!("{name}.gz")] {
            let p = dir.join(candidate);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DataError::MissingIdx {
        dir: dir.to_path_buf(),
        name: names[0].clone(),
    })
}

/// A parsed IDX file of unsigned bytes.
struct Idx {
    dims: Vec<usize>,
    body: Vec<u8>,
}

/// Reads an IDX file whose magic must be `magic` (type 0x08 = u8; low byte = number of dims).
fn read_idx(path: &Path, kind: &'static str, magic: u32) -> Result<Idx, DataError> {
    let io_err = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut raw = BufReader::new(File::open(path).map_err(io_err)?);
    let mut head = [0u8; 4];
    let got = read_full(&mut raw, &mut head).map_err(io_err)?;
    let gz = got >= 2 && head[..2] == [0x1f, 0x8b];
    let chained = std::io::Cursor::new(head[..got].to_vec()).chain(raw);
    let mut r: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(chained))
    } else {
        Box::new(chained)
    };
    let ndims = (magic & 0xff) as usize;
    let mut header = vec![0u8; 4 + 4 * ndims];
    let got = read_full(&mut r, &mut header).map_err(io_err)?;
    if got >= 4 {
        let found = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        if found != magic {
            return Err(DataError::IdxMagic {
                path: path.to_path_buf(),
                kind,
                found,
                expected: magic,
            });
        }
    }
    if got < header.len() {
        return Err(DataError::IdxLength {
            path: path.to_path_buf(),
            expected: header.len() as u64,
            found: got as u64,
        });
    }
    let raw_dims: Vec<u32> = header[4..]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let dims_err = |reason| DataError::IdxDims {
        path: path.to_path_buf(),
        dims: raw_dims.clone(),
        reason,
    };
    if raw_dims[1..].contains(&0) {
        return Err(dims_err("an image dimension is zero"));
    }
    let dims: Vec<usize> = raw_dims.iter().map(|&d| d as usize).collect();
    // Each byte becomes an f32 later: keep 4x the body addressable.
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&len| len.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| dims_err("their product overflows"))?;
    // Never trust the header for an allocation: grow with the data actually present.
    let mut body = Vec::new();
    r.take(expected as u64 + 1)
        .read_to_end(&mut body)
        .map_err(io_err)?;
    if body.len() != expected {
        return Err(DataError::IdxLength {
            path: path.to_path_buf(),
            expected: expected as u64,
            found: body.len() as u64,
        });
    }
    Ok(Idx { dims, body })
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(body);
        v
    }

    fn write(dir: &Path, name: &str, bytes: &[u8], gz: bool) {
        let mut f = File::create(dir.join(name)).unwrap();
        if gz {
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        } else {
            f.write_all(bytes).unwrap();
        }
    }

    /// Writes a 3-sample 2x3 split; returns the pixel bytes.
    fn write_split(dir: &Path, prefix: &str, gz: bool) -> Vec<u8> {
        let px: Vec<u8> = (0..18).map(|v| (v * 15) as u8).collect();
        let ext = if gz { ".gz" } else { "" };
        write(
            dir,
            &format!("{prefix}-images-idx3-ubyte{ext}"),
            &idx_bytes(IMAGES_MAGIC, &[3, 2, 3], &px),
            gz,
        );
        write(
            dir,
            &format!("{prefix}-labels-idx1-ubyte{ext}"),
            &idx_bytes(LABELS_MAGIC, &[3], &[7, 0, 9]),
            gz,
        );
        px
    }

    #[test]
    fn loads_raw_and_gz() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let px = write_split(dir.path(), "train", gz);
            write_split(dir.path(), "t10k", gz);
            for split in [Split::Train, Split::Test] {
                let d = load(dir.path(), split).unwrap();
                assert_eq!((d.len(), d.channels, d.height, d.width), (3, 1, 2, 3));
                assert_eq!(d.labels, vec![7, 0, 9]);
                assert_eq!(d.task, Task::Classes { classes: 10 });
                assert_eq!(d.image(1)[0], f32::from(px[6]) / 255.0);
                assert!(d.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
            }
        }
    }

    #[test]
    fn class_count_grows_past_ten() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "train", false);
        write(
            dir.path(),
            "train-labels-idx1-ubyte",
            &idx_bytes(LABELS_MAGIC, &[3], &[25, 0, 1]),
            false,
        );
        let d = load(dir.path(), Split::Train).unwrap();
        assert_eq!(d.task, Task::Classes { classes: 26 });
    }

    fn load_with_images(bytes: &[u8], gz: bool) -> Result<Dataset, DataError> {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "train", false);
        let _ = std::fs::remove_file(dir.path().join("train-images-idx3-ubyte"));
        write(dir.path(), "train-images-idx3-ubyte", bytes, gz);
        load(dir.path(), Split::Train)
    }

    #[test]
    fn rejects_corrupt_files() {
        let px = [0u8; 18];
        for gz in [false, true] {
            // Labels file put in place of images.
            let e = load_with_images(&idx_bytes(LABELS_MAGIC, &[3], &[1, 2, 3]), gz);
            assert!(
                matches!(e, Err(DataError::IdxMagic { found: 0x801, .. })),
                "{e:?}"
            );
            // Truncated body and truncated header.
            let e = load_with_images(&idx_bytes(IMAGES_MAGIC, &[3, 2, 3], &px[..17]), gz);
            assert!(
                matches!(
                    e,
                    Err(DataError::IdxLength {
                        expected: 18,
                        found: 17,
                        ..
                    })
                ),
                "{e:?}"
            );
            let e = load_with_images(&IMAGES_MAGIC.to_be_bytes()[..3], gz);
            assert!(matches!(e, Err(DataError::IdxLength { .. })), "{e:?}");
            let e = load_with_images(&idx_bytes(IMAGES_MAGIC, &[3, 2], &[]), gz);
            assert!(matches!(e, Err(DataError::IdxLength { .. })), "{e:?}");
            // Trailing garbage.
            let mut long = idx_bytes(IMAGES_MAGIC, &[3, 2, 3], &px);
            long.push(0);
            let e = load_with_images(&long, gz);
            assert!(
                matches!(e, Err(DataError::IdxLength { found: 19, .. })),
                "{e:?}"
            );
            // Count mismatch with the 3 labels.
            let e = load_with_images(&idx_bytes(IMAGES_MAGIC, &[2, 3, 3], &px), gz);
            assert!(
                matches!(
                    e,
                    Err(DataError::IdxCount {
                        images: 2,
                        labels: 3,
                        ..
                    })
                ),
                "{e:?}"
            );
            // Dimensions whose product overflows, and a zero dimension.
            let e = load_with_images(
                &idx_bytes(IMAGES_MAGIC, &[u32::MAX, u32::MAX, u32::MAX], &px),
                gz,
            );
            assert!(matches!(e, Err(DataError::IdxDims { .. })), "{e:?}");
            let e = load_with_images(&idx_bytes(IMAGES_MAGIC, &[3, 0, 3], &[]), gz);
            assert!(matches!(e, Err(DataError::IdxDims { .. })), "{e:?}");
            // A huge declared size with little data fails on length, without allocating it.
            let e = load_with_images(&idx_bytes(IMAGES_MAGIC, &[3, 60000, 60000], &px), gz);
            assert!(
                matches!(e, Err(DataError::IdxLength { found: 18, .. })),
                "{e:?}"
            );
        }
        // A damaged gzip stream is an I/O error naming the file.
        let mut bad_gz = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0];
        bad_gz.extend_from_slice(&[0xff; 20]);
        let e = load_with_images(&bad_gz, false);
        assert!(matches!(e, Err(DataError::Io { .. })), "{e:?}");
    }

    /// Random damage to a valid file (truncation, byte flips, header rewrites) is always an
    /// error or a well-formed dataset, never a panic.
    #[test]
    fn mutated_files_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let good = idx_bytes(IMAGES_MAGIC, &[3, 2, 3], &[7u8; 18]);
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), "train", false);
        let path = dir.path().join("train-images-idx3-ubyte");
        for round in 0..300 {
            let mut bytes = good.clone();
            bytes.truncate(rng.random_range(0..=bytes.len()));
            for _ in 0..rng.random_range(0..4) {
                if !bytes.is_empty() {
                    let k = rng.random_range(0..bytes.len().min(16));
                    bytes[k] = rng.random();
                }
            }
            write(
                dir.path(),
                "train-images-idx3-ubyte",
                &bytes,
                round % 2 == 1,
            );
            if let Ok(d) = load(dir.path(), Split::Train) {
                assert_eq!(d.images.len(), d.len() * d.height * d.width);
            }
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn empty_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(dir.path(), Split::Train);
        assert!(matches!(e, Err(DataError::MissingIdx { .. })), "{e:?}");
        write(
            dir.path(),
            "train-images-idx3-ubyte",
            &idx_bytes(IMAGES_MAGIC, &[0, 28, 28], &[]),
            false,
        );
        write(
            dir.path(),
            "train-labels-idx1-ubyte",
            &idx_bytes(LABELS_MAGIC, &[0], &[]),
            false,
        );
        let e = load(dir.path(), Split::Train);
        assert!(matches!(e, Err(DataError::Empty { .. })), "{e:?}");
        let msg = e.unwrap_err().to_string();
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    }

    #[test]
    fn real_fashion_mnist() {
        let dir = &ferry_testdata::fashion_mnist();
        let test = load(dir, Split::Test).unwrap();
        assert_eq!((test.len(), test.height, test.width), (10_000, 28, 28));
        assert_eq!(test.task, Task::Classes { classes: 10 });
        let mut counts = [0usize; 10];
        for &l in &test.labels {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [1000; 10]);
        let mean = test.images.iter().sum::<f32>() / test.images.len() as f32;
        assert!((0.2..0.4).contains(&mean), "mean pixel {mean}");
        let train = super::super::DataSpec::Idx {
            dir: dir.into(),
            split: Split::Train,
        }
        .load(&super::super::LoadConfig {
            limit: Some(100),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(train.len(), 100);
    }
}
