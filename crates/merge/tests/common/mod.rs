//! Helpers shared by the ferry-merge integration tests: building tensors and running a merge into a map.
#![allow(dead_code)]

use std::collections::BTreeMap;

use ferry_bundle::tensor::TensorMeta;
use ferry_merge::{
    merge, Contribution, Dtype, MemorySource, MergeConfig, MergeError, MergeReport, OwnedTensor,
    ServerState,
};

pub fn f32t(shape: &[usize], v: &[f32]) -> OwnedTensor {
    OwnedTensor {
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn f16t(shape: &[usize], v: &[f64]) -> OwnedTensor {
    let data = v
        .iter()
        .flat_map(|&x| half::f16::from_f64(x).to_le_bytes())
        .collect();
    OwnedTensor {
        dtype: Dtype::F16,
        shape: shape.to_vec(),
        data,
    }
}

pub fn bf16t(shape: &[usize], v: &[f64]) -> OwnedTensor {
    let data = v
        .iter()
        .flat_map(|&x| half::bf16::from_f64(x).to_le_bytes())
        .collect();
    OwnedTensor {
        dtype: Dtype::BF16,
        shape: shape.to_vec(),
        data,
    }
}

pub fn i64t(shape: &[usize], v: &[i64]) -> OwnedTensor {
    OwnedTensor {
        dtype: Dtype::I64,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn source(label: &str, tensors: &[(&str, OwnedTensor)]) -> MemorySource {
    let mut s = MemorySource::new(label);
    for (n, t) in tensors {
        s.insert(*n, t.clone());
    }
    s
}

pub fn layout_of(s: &MemorySource) -> Vec<TensorMeta> {
    s.tensors()
        .iter()
        .map(|(n, t)| TensorMeta {
            name: n.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect()
}

/// A site: id, bundle hash, samples, tensors.
pub struct Site {
    pub id: String,
    pub bundle: String,
    pub samples: u64,
    pub src: MemorySource,
}

pub fn site(id: &str, bundle: &str, samples: u64, tensors: &[(&str, OwnedTensor)]) -> Site {
    Site {
        id: id.into(),
        bundle: bundle.into(),
        samples,
        src: source(id, tensors),
    }
}

pub type Out = BTreeMap<String, OwnedTensor>;

/// Merge `sites` onto `base` (layout taken from the base) and collect the output.
pub fn run(
    base: &MemorySource,
    sites: &mut [Site],
    config: &MergeConfig,
    state: &mut ServerState,
) -> Result<(Out, MergeReport), MergeError> {
    let layout = layout_of(base);
    let mut base = base.clone();
    let mut contributions: Vec<Contribution<'_>> = sites
        .iter_mut()
        .map(|s| Contribution {
            site: s.id.clone(),
            bundle: s.bundle.clone(),
            samples: s.samples,
            source: &mut s.src,
        })
        .collect();
    let mut out = Out::new();
    let mut order = Vec::new();
    let report = merge(
        &layout,
        &mut base,
        &mut contributions,
        config,
        state,
        |meta, data| {
            order.push(meta.name.clone());
            out.insert(
                meta.name.clone(),
                OwnedTensor {
                    dtype: meta.dtype,
                    shape: meta.shape.clone(),
                    data,
                },
            );
            Ok(())
        },
    )?;
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        order, sorted,
        "the sink must see tensors in sorted-name order"
    );
    Ok((out, report))
}

pub fn as_source(label: &str, out: &Out) -> MemorySource {
    let mut s = MemorySource::new(label);
    for (n, t) in out {
        s.insert(n.clone(), t.clone());
    }
    s
}
