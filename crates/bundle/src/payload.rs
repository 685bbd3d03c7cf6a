//! The payload: a canonical safetensors file.
//!
//! Ferry re-serialises every set of weights it ships in one canonical layout (tensors in sorted-name order,
//! packed without gaps, no `__metadata__`, header padded with spaces to 8 bytes), so that the payload carries
//! nothing but the declared tensors, and a reader can check the header by rebuilding it from the signed tensor
//! list and comparing bytes.

use safetensors::Dtype;

use crate::error::SealError;
use crate::manifest::TensorEntry;

/// Longest tensor name accepted.
pub const MAX_NAME_BYTES: usize = 1024;

/// A tensor's name, dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (`[]` for a scalar).
    pub shape: Vec<usize>,
}

/// A borrowed tensor: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Name.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: &'a [usize],
    /// Raw bytes.
    pub data: &'a [u8],
}

/// The dtypes ferry carries, with their safetensors names.
const DTYPES: &[(Dtype, &str)] = &[
    (Dtype::F64, "F64"),
    (Dtype::F32, "F32"),
    (Dtype::F16, "F16"),
    (Dtype::BF16, "BF16"),
    (Dtype::I64, "I64"),
    (Dtype::I32, "I32"),
    (Dtype::I16, "I16"),
    (Dtype::I8, "I8"),
    (Dtype::U64, "U64"),
    (Dtype::U32, "U32"),
    (Dtype::U16, "U16"),
    (Dtype::U8, "U8"),
    (Dtype::BOOL, "BOOL"),
];

/// The safetensors name of a supported dtype (`"?"` for others, which ferry never writes).
pub fn dtype_name(d: Dtype) -> &'static str {
    DTYPES
        .iter()
        .find(|(x, _)| *x == d)
        .map(|(_, n)| *n)
        .unwrap_or("?")
}

/// Parse a supported dtype name.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    DTYPES.iter().find(|(_, n)| *n == s).map(|(d, _)| *d)
}

/// Bytes per element of a supported dtype.
pub fn dtype_size(d: Dtype) -> usize {
    d.bitsize() / 8
}

/// Byte length of a tensor, or `None` on overflow.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    if !dtype.bitsize().is_multiple_of(8) {
        return None;
    }
    shape
        .iter()
        .try_fold(dtype.bitsize() / 8, |acc, &d| acc.checked_mul(d))
}

/// Check a tensor name: non-empty, at most [`MAX_NAME_BYTES`], no control characters.
pub fn check_name(name: &str) -> Result<(), SealError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(SealError::BadTensorName(crate::escape(name)));
    }
    Ok(())
}

/// Whether every element of a float tensor is finite (non-float tensors are always finite).
pub fn all_finite(dtype: Dtype, data: &[u8]) -> bool {
    match dtype {
        Dtype::F64 => data.chunks_exact(8).all(|c| {
            let b: [u8; 8] = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
            f64::from_le_bytes(b).is_finite()
        }),
        Dtype::F32 => data
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite()),
        // Exponent all ones means Inf or NaN in both 16-bit formats.
        Dtype::F16 => data
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 != 0x7c00),
        Dtype::BF16 => data
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80),
        _ => true,
    }
}

/// A canonical safetensors file with its signed tensor entries, ready to seal.
#[derive(Debug, Clone)]
pub struct Payload {
    pub(crate) bytes: Vec<u8>,
    pub(crate) entries: Vec<TensorEntry>,
    pub(crate) metas: Vec<TensorMeta>,
}

impl Payload {
    /// Build from tensors in any order. Refuses unsupported dtypes, bad or duplicate names, wrong byte lengths
    /// and non-finite floats.
    pub fn from_tensors(tensors: &[TensorRef<'_>]) -> Result<Payload, SealError> {
        let mut sorted: Vec<&TensorRef<'_>> = tensors.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(b.name));
        for w in sorted.windows(2) {
            if w[0].name == w[1].name {
                return Err(SealError::DuplicateTensor(crate::escape(w[0].name)));
            }
        }
        let mut metas = Vec::with_capacity(sorted.len());
        for t in &sorted {
            check_name(t.name)?;
            if parse_dtype(dtype_name(t.dtype)).is_none() {
                return Err(SealError::UnsupportedDtype {
                    name: crate::escape(t.name),
                    dtype: format!("{:?}", t.dtype),
                });
            }
            if byte_len(t.dtype, t.shape) != Some(t.data.len()) {
                return Err(SealError::TensorLength(crate::escape(t.name)));
            }
            if !all_finite(t.dtype, t.data) {
                return Err(SealError::NonFinite(crate::escape(t.name)));
            }
            metas.push(TensorMeta {
                name: t.name.to_string(),
                dtype: t.dtype,
                shape: t.shape.to_vec(),
            });
        }
        let header = canonical_header(&metas)
            .ok_or_else(|| SealError::Safetensors("model is too large".into()))?;
        let total: usize = sorted.iter().map(|t| t.data.len()).sum();
        let mut bytes = Vec::with_capacity(header.len() + total);
        bytes.extend_from_slice(&header);
        let mut entries = Vec::with_capacity(sorted.len());
        for t in &sorted {
            bytes.extend_from_slice(t.data);
            entries.push(TensorEntry {
                name: t.name.to_string(),
                dtype: dtype_name(t.dtype).to_string(),
                shape: t.shape.to_vec(),
                sha256: crate::sha256_hex(t.data),
            });
        }
        Ok(Payload {
            bytes,
            entries,
            metas,
        })
    }

    /// Build from any safetensors file (e.g. one PyTorch saved): parsed, checked and re-serialised canonically.
    /// `__metadata__` is dropped.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Payload, SealError> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| SealError::Safetensors(e.to_string()))?;
        // safetensors parses the header into a map where the last of two equal keys silently wins: read the
        // raw JSON keys ourselves and refuse repeats.
        let header_len = header_len_of(bytes).saturating_sub(8);
        let header = bytes
            .get(8..8 + header_len)
            .ok_or_else(|| SealError::Safetensors("header runs past the end of the file".into()))?;
        let mut de = serde_json::Deserializer::from_slice(header);
        let mut keys = serde::Deserializer::deserialize_map(&mut de, KeyCollector)
            .map_err(|e| SealError::Safetensors(e.to_string()))?;
        keys.sort();
        if let Some(w) = keys.windows(2).find(|w| w[0] == w[1]) {
            return Err(SealError::DuplicateTensor(crate::escape(&w[0])));
        }
        let views = st.tensors();
        let refs: Vec<TensorRef<'_>> = views
            .iter()
            .map(|(name, v)| TensorRef {
                name,
                dtype: v.dtype(),
                shape: v.shape(),
                data: v.data(),
            })
            .collect();
        Payload::from_tensors(&refs)
    }

    /// The canonical safetensors bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Tensor names, dtypes and shapes in sorted order.
    pub fn metas(&self) -> &[TensorMeta] {
        &self.metas
    }

    /// The model fingerprint of this payload.
    pub fn fingerprint(&self) -> String {
        crate::manifest::fingerprint(self.metas.iter())
    }

    /// Iterate tensors in sorted-name order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef<'_>> {
        tensor_refs(&self.bytes, &self.metas)
    }
}

/// Collects the keys of a JSON object in order, duplicates included, ignoring the values.
struct KeyCollector;

impl<'de> serde::de::Visitor<'de> for KeyCollector {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Vec<String>, A::Error> {
        let mut keys = Vec::new();
        while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
            keys.push(k);
        }
        Ok(keys)
    }
}

/// The tensors of a canonical payload whose layout is `metas` (already verified to match).
pub(crate) fn tensor_refs<'a>(
    bytes: &'a [u8],
    metas: &'a [TensorMeta],
) -> impl Iterator<Item = TensorRef<'a>> {
    let header_len = header_len_of(bytes);
    let mut offset = header_len;
    metas.iter().map(move |m| {
        let len = byte_len(m.dtype, &m.shape).unwrap_or(0);
        let data = bytes.get(offset..offset + len).unwrap_or(&[]);
        offset += len;
        TensorRef {
            name: &m.name,
            dtype: m.dtype,
            shape: &m.shape,
            data,
        }
    })
}

fn header_len_of(bytes: &[u8]) -> usize {
    match bytes.get(..8) {
        Some(b) => {
            8 + u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as usize
        }
        None => 0,
    }
}

/// The canonical safetensors header for tensors in sorted order: 8-byte little-endian length, then the JSON
/// padded with spaces to a multiple of 8. `None` if offsets overflow.
pub(crate) fn canonical_header(metas: &[TensorMeta]) -> Option<Vec<u8>> {
    let mut json = String::from("{");
    let mut offset: usize = 0;
    for (i, m) in metas.iter().enumerate() {
        let len = byte_len(m.dtype, &m.shape)?;
        let end = offset.checked_add(len)?;
        if i > 0 {
            json.push(',');
        }
        // serde_json string escaping is deterministic; names have already been checked.
        let name = serde_json::to_string(&m.name).ok()?;
        let shape: Vec<String> = m.shape.iter().map(|d| d.to_string()).collect();
        json.push_str(&format!(
            "{name}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            dtype_name(m.dtype),
            shape.join(",")
        ));
        offset = end;
    }
    json.push('}');
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_payload_is_read_by_safetensors() {
        let a = [1f32, 2.0, 3.0, 4.0];
        let a_bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        let n = 7i64.to_le_bytes();
        let p = Payload::from_tensors(&[
            TensorRef {
                name: "z.weight",
                dtype: Dtype::F32,
                shape: &[2, 2],
                data: &a_bytes,
            },
            TensorRef {
                name: "a.num_batches_tracked",
                dtype: Dtype::I64,
                shape: &[],
                data: &n,
            },
            TensorRef {
                name: "empty",
                dtype: Dtype::U8,
                shape: &[0, 3],
                data: &[],
            },
        ])
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(p.bytes()).unwrap();
        assert_eq!(st.tensor("z.weight").unwrap().data(), &a_bytes[..]);
        assert_eq!(
            st.tensor("a.num_batches_tracked").unwrap().shape(),
            &[] as &[usize]
        );
        assert_eq!(st.tensor("empty").unwrap().shape(), &[0, 3]);
        // Re-canonicalising the canonical bytes is the identity.
        assert_eq!(
            Payload::from_safetensors(p.bytes()).unwrap().bytes(),
            p.bytes()
        );
        let names: Vec<&str> = p.tensors().map(|t| t.name).collect();
        assert_eq!(names, ["a.num_batches_tracked", "empty", "z.weight"]);
    }

    #[test]
    fn refuses_bad_tensors() {
        let nan = f32::NAN.to_le_bytes();
        let one = 1f32.to_le_bytes();
        let t = |name, dtype, data| TensorRef {
            name,
            dtype,
            shape: &[1],
            data,
        };
        assert!(matches!(
            Payload::from_tensors(&[t("x", Dtype::F32, &nan)]),
            Err(SealError::NonFinite(_))
        ));
        assert!(matches!(
            Payload::from_tensors(&[t("x", Dtype::F32, &one[..3])]),
            Err(SealError::TensorLength(_))
        ));
        assert!(matches!(
            Payload::from_tensors(&[t("x", Dtype::F32, &one), t("x", Dtype::F32, &one)]),
            Err(SealError::DuplicateTensor(_))
        ));
        assert!(matches!(
            Payload::from_tensors(&[t("", Dtype::F32, &one)]),
            Err(SealError::BadTensorName(_))
        ));
        assert!(matches!(
            Payload::from_tensors(&[t("a\nb", Dtype::F32, &one)]),
            Err(SealError::BadTensorName(_))
        ));
        assert!(matches!(
            Payload::from_tensors(&[t("x", Dtype::F8_E4M3, &one[..1])]),
            Err(SealError::UnsupportedDtype { .. })
        ));
        let h16 = 0x7c00u16.to_le_bytes();
        assert!(!all_finite(Dtype::F16, &h16));
        assert!(!all_finite(Dtype::BF16, &0x7fc0u16.to_le_bytes()));
        assert!(all_finite(Dtype::BF16, &0x3f80u16.to_le_bytes()));
    }
}
