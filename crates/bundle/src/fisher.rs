//! Fisher tensors: a site's diagonal Fisher estimate, shipped inside its update for HQ's `--strategy fisher`
//! merge (issue 14; `docs/bundle-format.md` §6.6).
//!
//! They live in the payload next to the model under a reserved name space, `ferry.fisher/<model tensor>`, so the
//! format, the signature and the hashes cover them like any tensor and no new manifest field (no version change)
//! is needed. The rules, checked by [`check_tensor_list`] as part of manifest validation:
//! - only an update may hold them (a global never does: sites deploy globals);
//! - `ferry.fisher/X` needs a model tensor `X` of a float dtype, and is F32 with `X`'s shape.
//!
//! The model's layout is the tensor list without them ([`model_metas`]), and so is the fingerprint HQ compares
//! with the global's ([`model_fingerprint`]). `unpack` hands out the model alone ([`split`]).

use std::collections::BTreeMap;

use safetensors::Dtype;

use crate::error::SealError;
use crate::payload::Payload;
use crate::tensor::{fingerprint, is_float, TensorMeta, TensorRef};

/// The reserved name prefix of Fisher tensors.
pub const PREFIX: &str = "ferry.fisher/";

/// The Fisher tensor's name for model tensor `model`.
pub fn name_for(model: &str) -> String {
    format!("{PREFIX}{model}")
}

/// The model tensor a Fisher tensor belongs to, or `None` for a model tensor.
pub fn model_name_of(name: &str) -> Option<&str> {
    name.strip_prefix(PREFIX)
}

/// The model's tensors of a layout: every tensor but the Fisher ones, in the same order.
pub fn model_metas(metas: &[TensorMeta]) -> Vec<TensorMeta> {
    metas
        .iter()
        .filter(|m| model_name_of(&m.name).is_none())
        .cloned()
        .collect()
}

/// Whether a layout carries Fisher tensors.
pub fn has_fisher(metas: &[TensorMeta]) -> bool {
    metas.iter().any(|m| model_name_of(&m.name).is_some())
}

/// The model fingerprint of a layout without its Fisher tensors: what an update's model is compared by. Equal to
/// the signed `model_fingerprint` when the update carries none.
pub fn model_fingerprint(metas: &[TensorMeta]) -> String {
    fingerprint(model_metas(metas).iter())
}

/// The format's rules on Fisher tensors over a bundle's tensor list (§6.6), as one line for the caller's error.
pub fn check_tensor_list(is_update: bool, metas: &[TensorMeta]) -> Result<(), String> {
    let by_name: BTreeMap<&str, &TensorMeta> = metas.iter().map(|m| (m.name.as_str(), m)).collect();
    for m in metas {
        let Some(model) = model_name_of(&m.name) else {
            continue;
        };
        if !is_update {
            return Err(format!(
                "a global carries the Fisher tensor {:?}; only updates may",
                crate::escape(&m.name)
            ));
        }
        let target = by_name
            .get(model)
            .filter(|t| model_name_of(&t.name).is_none());
        match target {
            None => {
                return Err(format!(
                    "Fisher tensor {:?} has no model tensor {:?}",
                    crate::escape(&m.name),
                    crate::escape(model)
                ))
            }
            Some(t) if !is_float(t.dtype) => {
                return Err(format!(
                    "Fisher tensor {:?} belongs to {:?}, which is not a float tensor",
                    crate::escape(&m.name),
                    crate::escape(model)
                ))
            }
            Some(t) if m.dtype != Dtype::F32 || m.shape != t.shape => {
                return Err(format!(
                    "Fisher tensor {:?} must be F32 with shape {:?}, like its model tensor",
                    crate::escape(&m.name),
                    t.shape
                ))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The payload of an update carrying `fisher` (model tensor name → F32 values, one per element, ≥ 0 and
/// finite) next to `model`. Every name must be a float tensor of the model, with as many values as it has
/// elements; tensors the estimate does not cover simply have none (HQ's `fisher` merge then refuses the update).
pub fn attach(model: &Payload, fisher: &BTreeMap<String, Vec<f32>>) -> Result<Payload, SealError> {
    if has_fisher(model.metas()) {
        return Err(SealError::InvalidDraft(
            "the model already holds Fisher tensors".into(),
        ));
    }
    let metas: BTreeMap<&str, &TensorMeta> =
        model.metas().iter().map(|m| (m.name.as_str(), m)).collect();
    let mut names = Vec::with_capacity(fisher.len());
    let mut bytes = Vec::with_capacity(fisher.len());
    for (name, values) in fisher {
        let meta = metas.get(name.as_str()).ok_or_else(|| {
            SealError::InvalidDraft(format!(
                "the Fisher estimate names {:?}, which the model does not hold",
                crate::escape(name)
            ))
        })?;
        if !is_float(meta.dtype) || meta.numel() != Some(values.len()) {
            return Err(SealError::InvalidDraft(format!(
                "the Fisher estimate of {:?} has {} values; the model tensor is {} {:?}",
                crate::escape(name),
                values.len(),
                meta.dtype,
                meta.shape
            )));
        }
        if let Some(bad) = values.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
            return Err(SealError::InvalidDraft(format!(
                "the Fisher estimate of {:?} holds {bad}; Fisher values are finite and >= 0",
                crate::escape(name)
            )));
        }
        names.push((name_for(name), meta.shape.clone()));
        bytes.push(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let mut refs: Vec<TensorRef<'_>> = model.tensors().collect();
    for ((name, shape), data) in names.iter().zip(&bytes) {
        refs.push(TensorRef {
            name,
            dtype: Dtype::F32,
            shape,
            data,
        });
    }
    Payload::from_tensors(&refs)
}

/// A payload split into the model and its Fisher estimate (model tensor name → values; empty when it carries
/// none). What `unpack` writes is the model alone, so a PyTorch `load_state_dict(strict=True)` still loads it.
pub fn split(payload: &Payload) -> Result<(Payload, BTreeMap<String, Vec<f32>>), SealError> {
    if !has_fisher(payload.metas()) {
        return Ok((payload.clone(), BTreeMap::new()));
    }
    let mut model = Vec::new();
    let mut fisher = BTreeMap::new();
    for t in payload.tensors() {
        match model_name_of(t.name) {
            None => model.push(t),
            Some(of) => {
                let values = t
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                fisher.insert(of.to_string(), values);
            }
        }
    }
    Ok((Payload::from_tensors(&model)?, fisher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Payload {
        let w: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = [0.5f32, -0.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let steps: Vec<u8> = 7i64.to_le_bytes().to_vec();
        Payload::from_tensors(&[
            TensorRef {
                name: "fc.weight",
                dtype: Dtype::F32,
                shape: &[2, 2],
                data: &w,
            },
            TensorRef {
                name: "fc.bias",
                dtype: Dtype::F32,
                shape: &[2],
                data: &b,
            },
            TensorRef {
                name: "steps",
                dtype: Dtype::I64,
                shape: &[],
                data: &steps,
            },
        ])
        .unwrap()
    }

    #[test]
    fn attached_fisher_is_checked_by_the_format_and_split_gives_the_model_back() {
        let m = model();
        let fisher = BTreeMap::from([("fc.weight".to_string(), vec![0.1f32, 0.2, 0.0, 4.0])]);
        let with = attach(&m, &fisher).unwrap();
        let names: Vec<&str> = with.metas().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["fc.bias", "fc.weight", "ferry.fisher/fc.weight", "steps"]
        );
        check_tensor_list(true, with.metas()).unwrap();
        assert!(check_tensor_list(false, with.metas())
            .unwrap_err()
            .contains("only updates"));
        assert_eq!(model_fingerprint(with.metas()), m.fingerprint());
        assert_ne!(with.fingerprint(), m.fingerprint());
        let (back, f) = split(&with).unwrap();
        assert_eq!(back.bytes(), m.bytes());
        assert_eq!(f, fisher);

        // Sealing: an update may carry them, a global never.
        let hq = crate::SecretKey::from_seed(crate::Role::Hq, "hq", [1; 32]);
        let site = crate::SecretKey::from_seed(crate::Role::Site, "site-a", [2; 32]);
        let err = crate::seal(crate::Draft::initial("city", None), &with, &hq, 3).unwrap_err();
        assert!(err.to_string().contains("only updates"), "{err}");
        let g = crate::seal(crate::Draft::initial("city", None), &m, &hq, 3).unwrap();
        let draft = crate::Draft::update_for(&g.manifest, &g.hash, "site-a", 5);
        let u = crate::seal(draft, &with, &site, 3).unwrap();
        assert_eq!(
            model_fingerprint(&u.manifest.tensor_metas()),
            g.manifest.model_fingerprint
        );
    }

    #[test]
    fn fisher_for_a_missing_integer_or_misshapen_tensor_or_with_bad_values_is_refused() {
        let m = model();
        for (name, values, why) in [
            ("fc.gone", vec![1.0f32], "does not hold"),
            ("steps", vec![1.0], "values"),
            ("fc.bias", vec![1.0, 2.0, 3.0], "values"),
            ("fc.bias", vec![1.0, -2.0], ">= 0"),
            ("fc.bias", vec![1.0, f32::NAN], ">= 0"),
        ] {
            let fisher = BTreeMap::from([(name.to_string(), values)]);
            let err = attach(&m, &fisher).unwrap_err().to_string();
            assert!(err.contains(why), "{name}: {err}");
        }
        let meta = |name: &str, dtype, shape: &[usize]| TensorMeta {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        };
        let base = vec![
            meta("fc.bias", Dtype::F32, &[2]),
            meta("steps", Dtype::I64, &[]),
        ];
        for (extra, why) in [
            (
                meta("ferry.fisher/fc.other", Dtype::F32, &[2]),
                "no model tensor",
            ),
            (meta("ferry.fisher/steps", Dtype::F32, &[]), "not a float"),
            (
                meta("ferry.fisher/fc.bias", Dtype::F16, &[2]),
                "must be F32",
            ),
            (
                meta("ferry.fisher/fc.bias", Dtype::F32, &[3]),
                "must be F32",
            ),
            (
                meta("ferry.fisher/ferry.fisher/fc.bias", Dtype::F32, &[2]),
                "no model tensor",
            ),
        ] {
            let mut list = base.clone();
            list.push(extra);
            let err = check_tensor_list(true, &list).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
