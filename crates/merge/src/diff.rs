//! How far apart two verified bundles are, tensor by tensor (issue 16: `ferry-server diff`): the L2 norm of
//! the difference, that norm relative to the first bundle's tensor, and the largest absolute difference. Float
//! tensors are compared exactly in f64, integer tensors (BatchNorm's `num_batches_tracked`) as integers.

use ferry_bundle::Bundle;
use safetensors::Dtype;
use serde::Serialize;

use crate::tensor::{decode_int, for_each_f64};

/// One tensor's distance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorDiff {
    /// The tensor name.
    pub name: String,
    /// Its dtype, as safetensors writes it.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// L2 norm of `b - a`.
    pub l2: f64,
    /// `l2` divided by the L2 norm of `a`'s tensor (`None` when that is 0).
    pub relative: Option<f64>,
    /// Largest `|b - a|` over the elements.
    pub max_abs: f64,
}

/// Both bundles' tensors, compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BundleDiff {
    /// Every tensor both hold, in name order.
    pub tensors: Vec<TensorDiff>,
    /// L2 norm of the whole difference over the float tensors.
    pub total_l2: f64,
}

/// Why two bundles cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiffError {
    /// Their tensors differ in names, dtypes or shapes.
    #[error("the bundles hold different models: {0}")]
    Layout(String),
    /// A tensor of a dtype ferry does not compare.
    #[error("tensor {name}: dtype {dtype} cannot be compared")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
}

/// Compare `b` against `a`, tensor by tensor. Both must hold the same tensors (names, dtypes, shapes).
pub fn diff(a: &Bundle, b: &Bundle) -> Result<BundleDiff, DiffError> {
    if a.metas() != b.metas() {
        let names_a: Vec<_> = a.metas().iter().map(|m| m.name.as_str()).collect();
        let names_b: Vec<_> = b.metas().iter().map(|m| m.name.as_str()).collect();
        let why = match a.metas().iter().zip(b.metas()).find(|(x, y)| x != y) {
            _ if names_a.len() != names_b.len() => {
                format!("{} tensors against {}", names_a.len(), names_b.len())
            }
            Some((x, y)) if x.name != y.name => {
                format!(
                    "tensor {:?} against {:?}",
                    ferry_bundle::escape(&x.name),
                    ferry_bundle::escape(&y.name)
                )
            }
            Some((x, y)) => format!(
                "tensor {}: {} {:?} against {} {:?}",
                ferry_bundle::escape(&x.name),
                ferry_bundle::tensor::dtype_name(x.dtype),
                x.shape,
                ferry_bundle::tensor::dtype_name(y.dtype),
                y.shape
            ),
            None => "tensor lists differ".into(),
        };
        return Err(DiffError::Layout(why));
    }
    let mut tensors = Vec::new();
    let mut total = 0f64;
    for (ta, tb) in a.tensors().zip(b.tensors()) {
        let dtype = ferry_bundle::tensor::dtype_name(ta.dtype).to_string();
        let (mut sq, mut norm_a, mut max_abs) = (0f64, 0f64, 0f64);
        if matches!(ta.dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            let mut va = Vec::new();
            for_each_f64(ta.dtype, ta.data, |_, x| {
                va.push(x);
                true
            });
            for_each_f64(tb.dtype, tb.data, |i, y| {
                let x = va.get(i).copied().unwrap_or(0.0);
                let d = y - x;
                sq += d * d;
                norm_a += x * x;
                max_abs = max_abs.max(d.abs());
                true
            });
            total += sq;
        } else {
            let (mut ia, mut ib) = (Vec::new(), Vec::new());
            if !decode_int(ta.dtype, ta.data, &mut ia) || !decode_int(tb.dtype, tb.data, &mut ib) {
                return Err(DiffError::Dtype {
                    name: ferry_bundle::escape(ta.name),
                    dtype,
                });
            }
            for (x, y) in ia.iter().zip(&ib) {
                let d = (y - x) as f64;
                sq += d * d;
                norm_a += (*x as f64) * (*x as f64);
                max_abs = max_abs.max(d.abs());
            }
        }
        let l2 = sq.sqrt();
        let na = norm_a.sqrt();
        tensors.push(TensorDiff {
            name: ferry_bundle::escape(ta.name),
            dtype,
            shape: ta.shape.to_vec(),
            l2,
            relative: (na > 0.0).then(|| l2 / na),
            max_abs,
        });
    }
    Ok(BundleDiff {
        tensors,
        total_l2: total.sqrt(),
    })
}
