//! Tensors as the merge engine sees them: a layout entry ([`TensorMeta`]), owned little-endian bytes
//! ([`OwnedTensor`]), and random-access sources ([`TensorSource`]) that hand out one tensor at a time so memory
//! stays near one tensor per input (issue 3, streaming). Also the dtype codecs the rules use.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorInfo;
use safetensors::{Dtype, SafeTensors};

use crate::MergeError;

/// One entry of the model layout: the name, dtype and shape every input must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// The tensor key, as in a PyTorch `state_dict`.
    pub name: String,
    /// The storage dtype.
    pub dtype: Dtype,
    /// The shape (empty for a rank-0 scalar).
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// The number of elements, or `None` when the shape overflows.
    pub fn numel(&self) -> Option<usize> {
        numel(&self.shape)
    }

    /// The data length in bytes, or `None` for an overflowing shape or a dtype without a whole-byte element.
    pub fn byte_len(&self) -> Option<usize> {
        self.numel()?.checked_mul(elem_size(self.dtype)?)
    }

    /// The layout of every tensor in a safetensors file, sorted by name.
    pub fn layout_of(st: &SafeTensors<'_>) -> Vec<TensorMeta> {
        let mut v: Vec<TensorMeta> = st
            .iter()
            .map(|(name, t)| TensorMeta {
                name: name.to_string(),
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

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
    /// default reads the whole tensor and cuts the slice out; file-backed sources should seek instead.
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

/// Elements `start..start + count` of a tensor, as bytes: the one bounds check behind every `read_elements`.
fn element_slice(
    t: &OwnedTensor,
    name: &str,
    start: usize,
    count: usize,
) -> Result<Vec<u8>, MergeError> {
    let size = elem_size(t.dtype).ok_or_else(|| MergeError::UnsupportedDtype {
        tensor: name.to_string(),
        dtype: t.dtype,
    })?;
    slice_bytes(&t.data, size, start, count)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| {
            MergeError::BadLayout(format!(
                "tensor {name} is shorter than the slice {start}+{count} the merge asked for"
            ))
        })
}

fn slice_bytes(data: &[u8], size: usize, start: usize, count: usize) -> Option<&[u8]> {
    let b = start.checked_mul(size)?;
    let e = start.checked_add(count)?.checked_mul(size)?;
    data.get(b..e)
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

/// The largest safetensors header [`SafetensorsFile`] accepts (the format's own limit is 100 MB).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// A safetensors file on disk (a verified payload the caller spooled), read tensor by tensor with seeks:
/// only the header is kept in memory.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    data_start: u64,
    index: HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    /// Open `path` and parse and check its header (every tensor's offsets lie inside the file and match its
    /// dtype and shape).
    pub fn open(path: &Path) -> Result<Self, MergeError> {
        let io = |source| MergeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bad = |reason: String| MergeError::BadTensorFile {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n)
            .map_err(|_| bad("shorter than a header".into()))?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_LEN || n.saturating_add(8) > file_len {
            return Err(bad(format!("header length {n} does not fit the file")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + n;
        let data_len = file_len - data_start;
        let mut index = HashMap::with_capacity(raw.len());
        for (name, v) in raw {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo =
                serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
            let (b, e) = info.data_offsets;
            let want = numel(&info.shape).and_then(|k| k.checked_mul(elem_size(info.dtype)?));
            if b > e || e as u64 > data_len || want != Some(e - b) {
                return Err(bad(format!(
                    "tensor {name} has offsets {b}..{e} that do not match its dtype and shape"
                )));
            }
            index.insert(name, info);
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            data_start,
            index,
        })
    }

    /// The layout of every tensor in the file, sorted by name.
    pub fn layout(&self) -> Vec<TensorMeta> {
        let mut v: Vec<TensorMeta> = self
            .index
            .iter()
            .map(|(name, i)| TensorMeta {
                name: name.clone(),
                dtype: i.dtype,
                shape: i.shape.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, MergeError> {
        let io = |source| MergeError::Io {
            path: self.path.clone(),
            source,
        };
        self.file
            .seek(SeekFrom::Start(self.data_start + offset))
            .map_err(io)?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact(&mut buf)
            .map_err(|source| MergeError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    fn info(&self, name: &str) -> Result<TensorInfo, MergeError> {
        self.index
            .get(name)
            .cloned()
            .ok_or_else(|| MergeError::MissingTensor {
                origin: self.path.display().to_string(),
                tensor: name.to_string(),
            })
    }
}

impl TensorSource for SafetensorsFile {
    fn read(&mut self, name: &str) -> Result<OwnedTensor, MergeError> {
        let info = self.info(name)?;
        let (b, e) = info.data_offsets;
        let data = self.read_at(b as u64, e - b)?;
        Ok(OwnedTensor {
            dtype: info.dtype,
            shape: info.shape,
            data,
        })
    }

    fn read_elements(
        &mut self,
        name: &str,
        start: usize,
        count: usize,
    ) -> Result<Vec<u8>, MergeError> {
        let info = self.info(name)?;
        let (b, e) = info.data_offsets;
        let size = elem_size(info.dtype).ok_or_else(|| MergeError::UnsupportedDtype {
            tensor: name.to_string(),
            dtype: info.dtype,
        })?;
        let range = start
            .checked_mul(size)
            .zip(start.checked_add(count).and_then(|x| x.checked_mul(size)))
            .filter(|&(s, t)| t <= e - b && s <= t);
        let Some((s, t)) = range else {
            return Err(MergeError::BadLayout(format!(
                "tensor {name} is shorter than the slice {start}+{count} the merge asked for"
            )));
        };
        self.read_at((b + s) as u64, t - s)
    }
}

pub(crate) fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Bytes per element of the dtypes ferry can merge; `None` for everything else.
pub(crate) fn elem_size(d: Dtype) -> Option<usize> {
    Some(match d {
        Dtype::BOOL | Dtype::U8 | Dtype::I8 => 1,
        Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
        Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
        Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        _ => return None,
    })
}

/// Whether the dtype is one of the floating-point types the engine averages.
pub(crate) fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Whether the dtype is an integer (or boolean) type, merged by the max rule.
pub(crate) fn is_int(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::I16
            | Dtype::U16
            | Dtype::I32
            | Dtype::U32
            | Dtype::I64
            | Dtype::U64
    )
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
    let size = elem_size(d)?;
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
