//! Server-optimizer state (issue 3): the FedAvgM momentum or the FedAdam moments `m`, `v` of every trainable
//! float tensor, in f32, plus the step count. It lives in the HQ state dir as one safetensors file, written
//! atomically, bound to the hash of the global it goes with, so a restart between rounds continues exactly
//! where the last merge stopped and a state that belongs to another global is refused, not silently used.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::{MergeError, Strategy};

const FORMAT: &str = "ferry-server-state/1";

/// The moments of one tensor: `m` (momentum or first moment) and, for FedAdam, `v` (second moment).
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Moments {
    pub(crate) m: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

/// The server optimizer's memory between rounds. `ServerState::default()` is the empty state of a fresh
/// federation, or the result of a reset; stateless strategies leave an empty state empty.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerState {
    pub(crate) strategy: Option<Strategy>,
    pub(crate) step: u64,
    pub(crate) tensors: BTreeMap<String, Moments>,
}

impl ServerState {
    /// The empty state (a fresh federation, or a reset: the optimizer restarts from zero moments).
    pub fn new() -> Self {
        ServerState::default()
    }

    /// The strategy whose moments the state holds, `None` while empty.
    pub fn strategy(&self) -> Option<Strategy> {
        self.strategy
    }

    /// How many server-optimizer steps the state has taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Whether no moments are held.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The momentum (FedAvgM) or first moment (FedAdam) of a tensor.
    pub fn m(&self, tensor: &str) -> Option<&[f32]> {
        self.tensors.get(tensor).map(|t| t.m.as_slice())
    }

    /// The second moment (FedAdam only) of a tensor.
    pub fn v(&self, tensor: &str) -> Option<&[f32]> {
        self.tensors
            .get(tensor)
            .filter(|t| !t.v.is_empty())
            .map(|t| t.v.as_slice())
    }

    /// Serialize to safetensors bytes: `m:<tensor>` and `v:<tensor>` F32 vectors, strategy, step and global in
    /// the metadata.
    pub fn to_bytes(&self, global: &str) -> Result<Vec<u8>, MergeError> {
        let mut buffers: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (name, mo) in &self.tensors {
            for (key, vals) in [("m", &mo.m), ("v", &mo.v)] {
                if key == "v" && vals.is_empty() {
                    continue;
                }
                let bytes: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
                buffers.push((format!("{key}:{name}"), bytes, vals.len()));
            }
        }
        let mut views = Vec::with_capacity(buffers.len());
        for (key, bytes, len) in &buffers {
            let view = TensorView::new(Dtype::F32, vec![*len], bytes).map_err(|e| {
                MergeError::BadConfig(format!("cannot encode server state for {key}: {e}"))
            })?;
            views.push((key.as_str(), view));
        }
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("global".to_string(), global.to_string());
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "strategy".to_string(),
            self.strategy
                .map(|s| s.name())
                .unwrap_or("none")
                .to_string(),
        );
        safetensors::serialize(views, Some(meta))
            .map_err(|e| MergeError::BadConfig(format!("cannot encode server state: {e}")))
    }

    /// Parse bytes written by [`ServerState::to_bytes`]; returns the state and the global it is bound to.
    /// `path` is only used in error messages.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<(Self, String), MergeError> {
        let bad = |reason: String| MergeError::StateCorrupt {
            path: path.to_path_buf(),
            reason,
        };
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let meta = metadata.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| bad(format!("no {k} in the metadata")))
        };
        if get("format")? != FORMAT {
            return Err(bad(format!("format is not {FORMAT}")));
        }
        let global = get("global")?;
        let step: u64 = get("step")?
            .parse()
            .map_err(|_| bad("step is not a number".into()))?;
        let strategy = match get("strategy")?.as_str() {
            "none" => None,
            s => Some(
                s.parse::<Strategy>()
                    .map_err(|_| bad(format!("unknown strategy {s:?}")))?,
            ),
        };
        let mut tensors: BTreeMap<String, Moments> = BTreeMap::new();
        for (key, view) in st.iter() {
            if view.dtype() != Dtype::F32 || view.shape().len() != 1 {
                return Err(bad(format!("{key} is not an F32 vector")));
            }
            let vals: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let entry = match key.split_once(':') {
                Some(("m", name)) => &mut tensors.entry(name.to_string()).or_default().m,
                Some(("v", name)) => &mut tensors.entry(name.to_string()).or_default().v,
                _ => return Err(bad(format!("unexpected entry {key}"))),
            };
            *entry = vals;
        }
        for (name, mo) in &tensors {
            let v_ok = match strategy {
                Some(Strategy::FedAdam) => mo.v.len() == mo.m.len(),
                _ => mo.v.is_empty(),
            };
            if !v_ok || mo.m.is_empty() && !mo.v.is_empty() {
                return Err(bad(format!("the moments of {name} are incomplete")));
            }
        }
        if strategy.is_some_and(|s| !s.is_stateful()) || strategy.is_none() && !tensors.is_empty() {
            return Err(bad("the moments do not belong to a server optimizer".into()));
        }
        Ok((
            ServerState {
                strategy,
                step,
                tensors,
            },
            global,
        ))
    }
}
