//! Tensors as the merge engine reads them: owned little-endian bytes ([`OwnedTensor`]) and random-access sources
//! ([`TensorSource`]) that hand out one tensor (or one slice of one) at a time, so memory stays near one tensor
//! per input (issue 3, streaming). Layout entries, dtypes and sizes are ferry-bundle's ([`ferry_bundle::tensor`]);
//! this module adds the numeric codecs the merge rules use.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ferry_bundle::fsutil;
use ferry_bundle::tensor::{dtype_size, TensorMeta};
use ferry_bundle::Bundle;
use safetensors::{Dtype, SafeTensors};

use crate::MergeError;

/// A tensor's dtype, shape and raw little-endian data, as stored in a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedTensor {
    /// The storage dtype.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<usize>,
    /// Row-major little-endian bytes.
    pub data: Vec<u8>,
}

/// Random access to the tensors of one input (the base global or one update). The engine reads each tensor
/// when it needs it and drops it afterwards; it may read a tensor more than once (validation pass, merge pass).
pub trait TensorSource {
    /// The whole tensor `name`.
    fn read(&mut self, name: &str) -> Result<OwnedTensor, MergeError>;

    /// `count` elements of tensor `name` starting at element `start`, as raw bytes. Robust strategies read
    /// tensors in slices through this so that n inputs of one large tensor are never in memory at once. The
    /// default reads the whole tensor and cuts the slice out; file-backed sources seek instead.
    fn read_elements(
        &mut self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<u8>, MergeError> {
        let t = self.read(name)?;
        element_slice(&t, name, start, count)
    }
}

/// Bytes per element of a dtype the engine merges, or the error naming the tensor.
pub(crate) fn elem_size(dtype: Dtype, tensor: &str) -> Result<usize, MergeError> {
    dtype_size(dtype).ok_or_else(|| MergeError::UnsupportedDtype {
        tensor: tensor.to_string(),
        dtype,
    })
}

/// The byte range of elements `start..start + count`, or `None` on overflow.
fn slice_range(size: usize, start: usize, count: usize) -> Option<(usize, usize)> {
    Some((
        start.checked_mul(size)?,
        start.checked_add(count)?.checked_mul(size)?,
    ))
}

fn short_slice(name: &str, start: usize, count: usize) -> MergeError {
    MergeError::BadLayout(format!(
        "tensor {name} is shorter than the slice {start}+{count} the merge asked for"
    ))
}

/// Elements `start..start + count` of a tensor, as bytes: the bounds check behind the in-memory `read_elements`.
fn element_slice(
    t: &OwnedTensor,
    name: &str,
    start: usize,
    count: usize,
) -> Result<Vec<u8>, MergeError> {
    let size = elem_size(t.dtype, name)?;
    slice_range(size, start, count)
        .and_then(|(b, e)| t.data.get(b..e))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| short_slice(name, start, count))
}

/// An in-memory source: a map from names to tensors, with a label used in error messages.
#[derive(Debug, Clone, Default)]
pub struct MemorySource {
    label: String,
    tensors: BTreeMap<String, OwnedTensor>,
}

impl MemorySource {
    /// An empty source called `label` in errors (e.g. `site a`).
    pub fn new(label: impl Into<String>) -> Self {
        MemorySource {
            label: label.into(),
            tensors: BTreeMap::new(),
        }
    }

    /// Add (or replace) a tensor.
    pub fn insert(&mut self, name: impl Into<String>, tensor: OwnedTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Copy every tensor out of a parsed safetensors file.
    pub fn from_safetensors(label: impl Into<String>, st: &SafeTensors<'_>) -> Self {
        let mut s = MemorySource::new(label);
        for (name, t) in st.iter() {
            s.insert(
                name,
                OwnedTensor {
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    data: t.data().to_vec(),
                },
            );
        }
        s
    }

    /// The tensors held.
    pub fn tensors(&self) -> &BTreeMap<String, OwnedTensor> {
        &self.tensors
    }

    fn get(&self, name: &str) -> Result<&OwnedTensor, MergeError> {
        self.tensors
            .get(name)
            .ok_or_else(|| MergeError::MissingTensor {
                origin: self.label.clone(),
                tensor: name.to_string(),
            })
    }
}

impl TensorSource for MemorySource {
    fn read(&mut self, name: &str) -> Result<OwnedTensor, MergeError> {
        self.get(name).cloned()
    }

    fn read_elements(
        &mut self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<u8>, MergeError> {
        let t = self.get(name)?;
        element_slice(t, name, start, count)
    }
}

/// A verified bundle's payload in a scratch file, read back tensor by tensor with seeks: the one file-backed
/// [`TensorSource`]. It can only be made from a [`Bundle`], whose tensors `open` has already checked against
/// their signed hashes, so its index is trusted and never parsed from the file.
#[derive(Debug)]
pub struct PayloadFile {
    file: File,
    path: PathBuf,
    /// (layout entry, byte offset in the file, byte length), sorted by name.
    index: Vec<(TensorMeta, u64, usize)>,
}

impl PayloadFile {
    /// Write `bundle`'s payload to `dir/<label>.safetensors` (a new file) and open it for reading.
    pub fn spool(dir: &Path, label: &str, bundle: &Bundle) -> Result<PayloadFile, MergeError> {
        let path = dir.join(format!("{label}.safetensors"));
        fsutil::write_new(&path, bundle.payload())?;
        let file = File::open(&path).map_err(|source| MergeError::Io {
            path: path.clone(),
            source,
        })?;
        let data_len: usize = bundle.tensors().map(|t| t.data.len()).sum();
        let mut offset = (bundle.payload().len() - data_len) as u64;
        let mut index = Vec::with_capacity(bundle.metas().len());
        for t in bundle.tensors() {
            index.push((t.meta(), offset, t.data.len()));
            offset += t.data.len() as u64;
        }
        Ok(PayloadFile { file, path, index })
    }

    fn find(&self, name: &str) -> Result<&(TensorMeta, u64, usize), MergeError> {
        self.index
            .binary_search_by(|(m, _, _)| m.name.as_str().cmp(name))
            .map(|i| &self.index[i])
            .map_err(|_| MergeError::MissingTensor {
                origin: self.path.display().to_string(),
                tensor: name.to_string(),
            })
    }

    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, MergeError> {
        let mut buf = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(&mut buf))
            .map_err(|source| MergeError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }
}

impl TensorSource for PayloadFile {
    fn read(&mut self, name: &str) -> Result<OwnedTensor, MergeError> {
        let (meta, offset, len) = self.find(name)?.clone();
        let data = self.read_at(offset, len)?;
        Ok(OwnedTensor {
            dtype: meta.dtype,
            shape: meta.shape,
            data,
        })
    }

    fn read_elements(
        &mut self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<u8>, MergeError> {
        let (meta, offset, len) = self.find(name)?.clone();
        let size = elem_size(meta.dtype, name)?;
        let Some((b, e)) = slice_range(size, start, count).filter(|&(_, e)| e <= len) else {
            return Err(short_slice(name, start, count));
        };
        self.read_at(offset + b as u64, e - b)
    }
}

fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(c);
    a
}

/// Call `f(i, x)` for every element of float data `bytes` of dtype `d`, converted exactly to f64.
/// Returns `false` (and stops) when `f` returns `false`.
pub(crate) fn for_each_f64(d: Dtype, bytes: &[u8], mut f: impl FnMut(usize, f64) -> bool) -> bool {
    macro_rules! go {
        ($n:literal, $conv:expr) => {{
            for (i, c) in bytes.chunks_exact($n).enumerate() {
                if !f(i, $conv(arr::<$n>(c))) {
                    return false;
                }
            }
            true
        }};
    }
    match d {
        Dtype::F64 => go!(8, f64::from_le_bytes),
        Dtype::F32 => go!(4, |a| f32::from_le_bytes(a) as f64),
        Dtype::F16 => go!(2, |a| half::f16::from_le_bytes(a).to_f64()),
        Dtype::BF16 => go!(2, |a| half::bf16::from_le_bytes(a).to_f64()),
        _ => false,
    }
}

/// Decode float data into f64 values.
pub(crate) fn decode_f64(d: Dtype, bytes: &[u8], out: &mut Vec<f64>) {
    out.clear();
    for_each_f64(d, bytes, |_, x| {
        out.push(x);
        true
    });
}

/// Round f64 values to the nearest value of dtype `d` (ties to even) and encode them little-endian.
/// Returns `None` when a value is not finite after rounding (overflow of F16's range, for instance).
pub(crate) fn encode_f64(d: Dtype, vals: &[f64]) -> Option<Vec<u8>> {
    let size = dtype_size(d)?;
    let mut out = Vec::with_capacity(vals.len() * size);
    for &x in vals {
        match d {
            Dtype::F64 => {
                if !x.is_finite() {
                    return None;
                }
                out.extend_from_slice(&x.to_le_bytes());
            }
            Dtype::F32 => {
                let y = x as f32;
                if !y.is_finite() {
                    return None;
                }
                out.extend_from_slice(&y.to_le_bytes());
            }
            Dtype::F16 => {
                let y = half::f16::from_f64(x);
                if !y.is_finite() {
                    return None;
                }
                out.extend_from_slice(&y.to_le_bytes());
            }
            Dtype::BF16 => {
                let y = half::bf16::from_f64(x);
                if !y.is_finite() {
                    return None;
                }
                out.extend_from_slice(&y.to_le_bytes());
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Element-wise maximum of integer (or boolean) data: `acc[i] = max(acc[i], other[i])`, compared in `d`'s
/// own signedness. `false` for a dtype that is not an integer.
pub(crate) fn max_into(d: Dtype, acc: &mut [u8], other: &[u8]) -> bool {
    fn go<const N: usize, T: PartialOrd>(acc: &mut [u8], other: &[u8], dec: fn([u8; N]) -> T) {
        for (a, o) in acc.chunks_exact_mut(N).zip(other.chunks_exact(N)) {
            if dec(arr::<N>(o)) > dec(arr::<N>(a)) {
                a.copy_from_slice(o);
            }
        }
    }
    match d {
        Dtype::BOOL | Dtype::U8 => go::<1, u8>(acc, other, u8::from_le_bytes),
        Dtype::I8 => go::<1, i8>(acc, other, i8::from_le_bytes),
        Dtype::I16 => go::<2, i16>(acc, other, i16::from_le_bytes),
        Dtype::U16 => go::<2, u16>(acc, other, u16::from_le_bytes),
        Dtype::I32 => go::<4, i32>(acc, other, i32::from_le_bytes),
        Dtype::U32 => go::<4, u32>(acc, other, u32::from_le_bytes),
        Dtype::I64 => go::<8, i64>(acc, other, i64::from_le_bytes),
        Dtype::U64 => go::<8, u64>(acc, other, u64::from_le_bytes),
        _ => return false,
    }
    true
}

/// Float element-wise maximum, for counters stored as floats.
pub(crate) fn max_f64_into(acc: &mut [f64], d: Dtype, other: &[u8]) {
    for_each_f64(d, other, |i, x| {
        if let Some(a) = acc.get_mut(i) {
            if x > *a {
                *a = x;
            }
        }
        true
    });
}
