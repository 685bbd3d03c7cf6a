//! The tensor vocabulary every ferry crate shares: a tensor's name, dtype and shape ([`TensorMeta`]), a borrowed
//! tensor ([`TensorRef`]), the dtypes a bundle may carry and their sizes, the name rules, the finiteness check and
//! the model fingerprint. A leaf module: it depends on nothing else in ferry, so the manifest, the payload, the
//! merge engine and the trainer all name tensors the same way.

use safetensors::Dtype;

/// Longest tensor name accepted.
pub const MAX_NAME_BYTES: usize = 1024;

/// A tensor's name, dtype and shape: one entry of a model's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    /// The tensor key, as in a PyTorch `state_dict`.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (`[]` for a scalar).
    pub shape: Vec<usize>,
}

impl TensorMeta {
    /// Number of elements, or `None` when the shape overflows.
    pub fn numel(&self) -> Option<usize> {
        numel(&self.shape)
    }

    /// Data length in bytes, or `None` for an overflowing shape or a dtype ferry does not carry.
    pub fn byte_len(&self) -> Option<usize> {
        byte_len(self.dtype, &self.shape)
    }
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

impl TensorRef<'_> {
    /// The tensor's name, dtype and shape, owned.
    pub fn meta(&self) -> TensorMeta {
        TensorMeta {
            name: self.name.to_string(),
            dtype: self.dtype,
            shape: self.shape.to_vec(),
        }
    }
}

/// The dtypes ferry carries, with their safetensors names and element sizes in bytes.
const DTYPES: &[(Dtype, &str, usize)] = &[
    (Dtype::F64, "F64", 8),
    (Dtype::F32, "F32", 4),
    (Dtype::F16, "F16", 2),
    (Dtype::BF16, "BF16", 2),
    (Dtype::I64, "I64", 8),
    (Dtype::I32, "I32", 4),
    (Dtype::I16, "I16", 2),
    (Dtype::I8, "I8", 1),
    (Dtype::U64, "U64", 8),
    (Dtype::U32, "U32", 4),
    (Dtype::U16, "U16", 2),
    (Dtype::U8, "U8", 1),
    (Dtype::BOOL, "BOOL", 1),
];

/// The names of the carried dtypes, for messages.
pub const DTYPE_NAMES: &str = "F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL";

/// The safetensors name of a carried dtype (`"?"` for others, which ferry never writes).
pub fn dtype_name(d: Dtype) -> &'static str {
    DTYPES
        .iter()
        .find(|(x, _, _)| *x == d)
        .map_or("?", |(_, n, _)| *n)
}

/// Parse a carried dtype's name.
pub fn parse_dtype(s: &str) -> Option<Dtype> {
    DTYPES.iter().find(|(_, n, _)| *n == s).map(|(d, _, _)| *d)
}

/// Bytes per element of a carried dtype; `None` for every other dtype (FP8, FP4, complex...).
pub fn dtype_size(d: Dtype) -> Option<usize> {
    DTYPES.iter().find(|(x, _, _)| *x == d).map(|(_, _, s)| *s)
}

/// Whether the dtype is one of the floating-point types ferry carries.
pub fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Whether the dtype is a carried integer or boolean type.
pub fn is_int(d: Dtype) -> bool {
    dtype_size(d).is_some() && !is_float(d)
}

/// Number of elements of a shape, or `None` on overflow.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// Byte length of a tensor, or `None` on overflow or for a dtype ferry does not carry.
pub fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    numel(shape)?.checked_mul(dtype_size(dtype)?)
}

/// Whether a tensor name is allowed: non-empty, at most [`MAX_NAME_BYTES`], no control characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NAME_BYTES && !name.chars().any(char::is_control)
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

/// The model fingerprint: SHA-256 over one line `name\tDTYPE\tdim,dim,...\n` per tensor, in the order given
/// (callers pass sorted-name order). Two bundles with the same fingerprint hold the same model layout.
pub fn fingerprint<'a>(tensors: impl Iterator<Item = &'a TensorMeta>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for t in tensors {
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        h.update(format!("{}\t{}\t{}\n", t.name, dtype_name(t.dtype), shape.join(",")).as_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_table_round_trips_and_refuses_the_rest() {
        for (d, n, s) in DTYPES {
            assert_eq!(parse_dtype(n), Some(*d));
            assert_eq!(dtype_name(*d), *n);
            assert_eq!(dtype_size(*d), Some(*s));
            assert_eq!(s * 8, d.bitsize());
            assert!(DTYPE_NAMES.split(' ').any(|x| x == *n));
        }
        assert_eq!(DTYPE_NAMES.split(' ').count(), DTYPES.len());
        assert_eq!(dtype_size(Dtype::F8_E4M3), None);
        assert_eq!(byte_len(Dtype::F8_E4M3, &[2]), None);
        assert!(!is_int(Dtype::F8_E4M3) && !is_float(Dtype::F8_E4M3));
        assert!(is_int(Dtype::BOOL) && is_float(Dtype::BF16));
    }

    #[test]
    fn sizes_and_names() {
        assert_eq!(byte_len(Dtype::F32, &[2, 3]), Some(24));
        assert_eq!(byte_len(Dtype::I64, &[]), Some(8));
        assert_eq!(byte_len(Dtype::F32, &[usize::MAX, 2]), None);
        assert!(valid_name("bn1.running_mean"));
        assert!(!valid_name(""));
        assert!(!valid_name("a\nb"));
        assert!(!valid_name(&"x".repeat(MAX_NAME_BYTES + 1)));
        assert!(!all_finite(Dtype::F16, &0x7c00u16.to_le_bytes()));
        assert!(!all_finite(Dtype::BF16, &0x7fc0u16.to_le_bytes()));
        assert!(all_finite(Dtype::BF16, &0x3f80u16.to_le_bytes()));
    }

    #[test]
    fn fingerprint_is_the_documented_hash() {
        let metas = [TensorMeta {
            name: "w".into(),
            dtype: Dtype::F32,
            shape: vec![2, 3],
        }];
        // printf 'w\tF32\t2,3\n' | sha256sum
        assert_eq!(
            fingerprint(metas.iter()),
            crate::sha256_hex(b"w\tF32\t2,3\n")
        );
    }
}
