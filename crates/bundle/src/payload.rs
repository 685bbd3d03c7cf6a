//! The payload: a canonical safetensors file.
//!
//! Ferry re-serialises every set of weights it ships in one canonical layout (tensors in sorted-name order,
//! packed without gaps, no `__metadata__`, header padded with spaces to 8 bytes), so that the payload carries
//! nothing but the declared tensors, and a reader can check the header by rebuilding it from the signed tensor
//! list and comparing bytes.

use crate::error::SealError;
use crate::tensor::{all_finite, byte_len, dtype_name, dtype_size, fingerprint, valid_name};
use crate::tensor::{TensorMeta, TensorRef};

/// A canonical safetensors file with its layout, ready to seal (the tensor hashes are computed while sealing).
#[derive(Debug, Clone)]
pub struct Payload {
    pub(crate) bytes: Vec<u8>,
    pub(crate) metas: Vec<TensorMeta>,
}

impl Payload {
    /// Build from tensors in any order. Refuses unsupported dtypes, bad or duplicate names, wrong byte lengths
    /// and non-finite floats.
    pub fn from_tensors(tensors: &[TensorRef<'_>]) -> Result<Payload, SealError> {
        let (sorted, metas) = checked_layout(tensors)?;
        let header = canonical_header(&metas)
            .ok_or_else(|| SealError::Safetensors("model is too large".into()))?;
        let total: usize = sorted.iter().map(|t| t.data.len()).sum();
        let mut bytes = Vec::with_capacity(header.len() + total);
        bytes.extend_from_slice(&header);
        for t in &sorted {
            bytes.extend_from_slice(t.data);
        }
        Ok(Payload { bytes, metas })
    }

    /// Build from any safetensors file (e.g. one PyTorch saved): parsed, checked and re-serialised canonically.
    /// `__metadata__` is dropped.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Payload, SealError> {
        let views = parse_safetensors(bytes)?.tensors();
        Payload::from_tensors(&tensor_refs_of(&views))
    }

    /// [`Payload::from_safetensors`] taking the file's bytes: when they already are the canonical file (as every
    /// file ferry writes is), they become the payload as they are, without a second copy of the model (issue 13).
    /// The same checks run either way.
    pub fn from_safetensors_vec(bytes: Vec<u8>) -> Result<Payload, SealError> {
        let canonical = {
            let views = parse_safetensors(&bytes)?.tensors();
            let refs = tensor_refs_of(&views);
            let (sorted, metas) = checked_layout(&refs)?;
            let header = canonical_header(&metas)
                .ok_or_else(|| SealError::Safetensors("model is too large".into()))?;
            let total: usize = sorted.iter().map(|t| t.data.len()).sum();
            // The canonical header fixes every tensor's offsets, so equal headers and lengths mean equal files.
            let same = bytes.len() == header.len() + total && bytes.starts_with(&header);
            if same {
                Some(metas)
            } else {
                None
            }
        };
        match canonical {
            Some(metas) => Ok(Payload { bytes, metas }),
            None => Payload::from_safetensors(&bytes),
        }
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
        fingerprint(self.metas.iter())
    }

    /// Iterate tensors in sorted-name order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorRef<'_>> {
        tensor_refs(&self.bytes, &self.metas)
    }
}

/// Parse a safetensors file, refusing repeated tensor names (safetensors parses the header into a map where the
/// last of two equal keys silently wins, so the raw JSON keys are read here as well).
fn parse_safetensors(bytes: &[u8]) -> Result<safetensors::SafeTensors<'_>, SealError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| SealError::Safetensors(e.to_string()))?;
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
    Ok(st)
}

/// The tensors of a parsed safetensors file (`SafeTensors::tensors`), as references.
fn tensor_refs_of<'a>(
    views: &'a [(String, safetensors::tensor::TensorView<'a>)],
) -> Vec<TensorRef<'a>> {
    views
        .iter()
        .map(|(name, v)| TensorRef {
            name,
            dtype: v.dtype(),
            shape: v.shape(),
            data: v.data(),
        })
        .collect()
}

/// The tensors sorted by name, and their layout, after refusing unsupported dtypes, bad or duplicate names, wrong
/// byte lengths and non-finite floats.
fn checked_layout<'t, 'a>(
    tensors: &'t [TensorRef<'a>],
) -> Result<(Vec<&'t TensorRef<'a>>, Vec<TensorMeta>), SealError> {
    let mut sorted: Vec<&TensorRef<'_>> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(b.name));
    for w in sorted.windows(2) {
        if w[0].name == w[1].name {
            return Err(SealError::DuplicateTensor(crate::escape(w[0].name)));
        }
    }
    let mut metas = Vec::with_capacity(sorted.len());
    for t in &sorted {
        if !valid_name(t.name) {
            return Err(SealError::BadTensorName(crate::escape(t.name)));
        }
        if dtype_size(t.dtype).is_none() {
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
    Ok((sorted, metas))
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
    use safetensors::Dtype;

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
    fn owned_bytes_are_kept_only_when_already_canonical() {
        let w: Vec<u8> = [1f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [0.5f32].iter().flat_map(|x| x.to_le_bytes()).collect();
        let views = [
            (
                "z.weight",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &w).unwrap(),
            ),
            (
                "a.bias",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![1], &b).unwrap(),
            ),
        ];
        // PyTorch-style: unsorted data and `__metadata__`: not canonical, so rebuilt.
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        let foreign =
            safetensors::serialize(views.iter().map(|(n, v)| (*n, v)), Some(meta)).unwrap();
        let canonical = Payload::from_safetensors(&foreign).unwrap();
        assert_ne!(canonical.bytes(), &foreign[..]);
        let from_vec = Payload::from_safetensors_vec(foreign).unwrap();
        assert_eq!(from_vec.bytes(), canonical.bytes());
        assert_eq!(from_vec.metas(), canonical.metas());
        // The canonical file itself is taken as it is (same bytes, same layout).
        let again = Payload::from_safetensors_vec(canonical.bytes().to_vec()).unwrap();
        assert_eq!(again.bytes(), canonical.bytes());
        assert_eq!(again.metas(), canonical.metas());
        // And the checks still run: a NaN in a canonical file is refused.
        let mut bad = canonical.bytes().to_vec();
        let at = bad.len() - 4;
        bad[at..].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(matches!(
            Payload::from_safetensors_vec(bad),
            Err(SealError::NonFinite(_))
        ));
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
    }
}
