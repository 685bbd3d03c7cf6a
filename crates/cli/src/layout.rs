//! Why weights do not fit a global's model (issue 17): `ferry-client pack` names the tensor that differs and
//! says how to fix it, for the mistakes PyTorch users make (a `module.` prefix, half-precision weights, a
//! `state_dict` without BatchNorm's buffers, an extra tensor) instead of "tensor names, dtypes or shapes differ".

use std::collections::BTreeMap;

use ferry_bundle::tensor::dtype_name;
use ferry_bundle::{escape, TensorEntry, TensorMeta};

/// The PyTorch `DataParallel` / `DistributedDataParallel` wrapper's prefix.
const MODULE_PREFIX: &str = "module.";

/// How many differences one message names before it counts the rest.
const SHOWN: usize = 3;

/// What differs between the model a global declares (`expected`) and the weights given (`got`), one sentence per
/// difference with the fix; empty when the layouts match. Tensor names are escaped.
pub fn differences(expected: &[TensorEntry], got: &[TensorMeta]) -> Vec<String> {
    let want: BTreeMap<&str, &TensorEntry> =
        expected.iter().map(|t| (t.name.as_str(), t)).collect();
    let have: BTreeMap<&str, &TensorMeta> = got.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();

    // A prefix on every name is one mistake, not one per tensor.
    let prefixed = got
        .iter()
        .filter(|t| {
            t.name
                .strip_prefix(MODULE_PREFIX)
                .is_some_and(|n| want.contains_key(n) && !have.contains_key(n))
        })
        .count();
    if prefixed > 0 {
        let first = got
            .iter()
            .find(|t| t.name.starts_with(MODULE_PREFIX))
            .map(|t| escape(&t.name))
            .unwrap_or_default();
        out.push(format!(
            "tensor names start with `module.` (e.g. \"{first}\"; saved from a DataParallel model): save \
             model.module.state_dict(), or strip the prefix: {{k.removeprefix(\"module.\"): v for k, v in sd.items()}}"
        ));
    }
    let unprefixed = |n: &str| -> bool {
        prefixed > 0
            && n.strip_prefix(MODULE_PREFIX)
                .is_some_and(|m| want.contains_key(m))
    };

    for t in got {
        let Some(w) = want.get(t.name.as_str()) else {
            if !unprefixed(&t.name) {
                out.push(format!(
                    "tensor \"{}\" is not in the base global's model: remove it before saving (HQ refuses extra tensors)",
                    escape(&t.name)
                ));
            }
            continue;
        };
        let dtype = dtype_name(t.dtype);
        if dtype != w.dtype {
            out.push(format!(
                "tensor \"{}\" is {dtype}, the base global's is {}: convert before saving (PyTorch: model.float() for F32)",
                escape(&t.name),
                escape(&w.dtype)
            ));
        }
        if t.shape != w.shape {
            out.push(format!(
                "tensor \"{}\" has shape {:?}, the base global's has {:?}: these weights are of another architecture \
                 (or number of classes); train the model the global holds",
                escape(&t.name),
                t.shape,
                w.shape
            ));
        }
    }
    for w in expected {
        let name = w.name.as_str();
        let renamed = prefixed > 0 && have.contains_key(format!("{MODULE_PREFIX}{name}").as_str());
        if have.contains_key(name) || renamed {
            continue;
        }
        let fix = if name.ends_with("num_batches_tracked")
            || name.ends_with("running_mean")
            || name.ends_with("running_var")
        {
            "save the whole model.state_dict(), which holds BatchNorm's buffers, not only model.parameters()"
        } else {
            "save the full state_dict of the model the global holds"
        };
        out.push(format!(
            "tensor \"{}\" ({} {:?}) is missing: {fix}",
            escape(name),
            escape(&w.dtype),
            w.shape
        ));
    }
    out
}

/// [`differences`] as one line: the first few, then how many more.
pub fn summary(expected: &[TensorEntry], got: &[TensorMeta]) -> Option<String> {
    let d = differences(expected, got);
    if d.is_empty() {
        return None;
    }
    let mut line = d[..d.len().min(SHOWN)].join("; ");
    if d.len() > SHOWN {
        line.push_str(&format!(
            "; and {}",
            crate::count((d.len() - SHOWN) as u64, "more difference")
        ));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_bundle::Dtype;

    fn entry(name: &str, dtype: &str, shape: &[usize]) -> TensorEntry {
        TensorEntry {
            name: name.into(),
            dtype: dtype.into(),
            shape: shape.to_vec(),
            sha256: String::new(),
        }
    }

    fn meta(name: &str, dtype: Dtype, shape: &[usize]) -> TensorMeta {
        TensorMeta {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn base() -> Vec<TensorEntry> {
        vec![
            entry("bn.num_batches_tracked", "I64", &[]),
            entry("bn.weight", "F32", &[4]),
            entry("fc.weight", "F32", &[2, 4]),
        ]
    }

    #[test]
    fn each_mistake_is_named_with_its_fix() {
        let same = [
            meta("bn.num_batches_tracked", Dtype::I64, &[]),
            meta("bn.weight", Dtype::F32, &[4]),
            meta("fc.weight", Dtype::F32, &[2, 4]),
        ];
        assert!(summary(&base(), &same).is_none());

        let prefixed: Vec<_> = same
            .iter()
            .map(|t| meta(&format!("module.{}", t.name), t.dtype, &t.shape))
            .collect();
        let d = differences(&base(), &prefixed);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].contains("module.") && d[0].contains("removeprefix"),
            "{d:?}"
        );

        let mut half = same.to_vec();
        half[2].dtype = Dtype::F16;
        let d = differences(&base(), &half);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].contains("\"fc.weight\" is F16") && d[0].contains("model.float()"),
            "{d:?}"
        );

        let d = differences(&base(), &same[1..]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(
            d[0].contains("\"bn.num_batches_tracked\"") && d[0].contains("state_dict()"),
            "{d:?}"
        );

        let mut extra = same.to_vec();
        extra.push(meta("head.bias", Dtype::F32, &[2]));
        let d = differences(&base(), &extra);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("\"head.bias\" is not in the base"), "{d:?}");

        let mut wide = same.to_vec();
        wide[2].shape = vec![3, 4];
        let d = differences(&base(), &wide);
        assert!(
            d[0].contains("shape [3, 4]") && d[0].contains("[2, 4]"),
            "{d:?}"
        );
    }

    #[test]
    fn names_are_escaped_and_long_lists_counted() {
        let evil: Vec<_> = (0..5)
            .map(|i| meta(&format!("x\u{1b}[2J{i}"), Dtype::F32, &[1]))
            .chain(base().iter().map(|e| {
                meta(
                    &e.name,
                    if e.dtype == "I64" {
                        Dtype::I64
                    } else {
                        Dtype::F32
                    },
                    &e.shape,
                )
            }))
            .collect();
        let line = summary(&base(), &evil).unwrap();
        assert!(
            !line.contains('\u{1b}') && line.contains("\\u{1b}"),
            "{line}"
        );
        assert!(line.ends_with("and 2 more differences"), "{line}");
    }
}
