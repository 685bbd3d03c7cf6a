//! The models (issue 4): plain structs of candle layers, with every tensor living in one `VarMap` under its PyTorch
//! `state_dict` name, seeded initialisation in sorted-name order, and safetensors export/import checked against the
//! architecture's tensor list ([`Arch::tensors`]).
//!
//! BatchNorm is ferry's own small layer rather than `candle_nn::BatchNorm`, because recalibration needs a
//! cumulative average of the batch statistics (PyTorch's `momentum=None`) while training uses PyTorch's
//! exponential average with momentum 0.1; candle's layer fixes the momentum at construction.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Uniform};
use safetensors::tensor::{Dtype, TensorView};

use crate::arch::{Arch, TensorKind, CTC_ROWS, PLATE_CONV, PLATE_HIDDEN};
use crate::block::{self, BlockNorm, Pool};
use crate::error::TrainError;
use crate::linear;
use crate::param_grads::Step;
use crate::workspace::Workspace;

/// PyTorch's BatchNorm defaults.
const BN_EPS: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1;

/// Which implementation of the layers a CPU forward (and backward) pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ops {
    /// Whole convolution blocks and linear layers as single fused CPU ops (issue 7).
    #[default]
    Fused,
    /// candle's generic ops (`conv2d`, elementwise BatchNorm, `matmul`, …), differentiated by candle.
    Generic,
}

/// How a forward pass treats BatchNorm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Inference: normalise with the running statistics, change nothing.
    Eval,
    /// Training: normalise with batch statistics and fold them into the running statistics with momentum 0.1.
    Train,
    /// Recalibration: normalise with batch statistics and fold them in with this weight (`n_batch / n_seen`, a
    /// cumulative average over samples).
    Recalibrate(f64),
}

/// BatchNorm2d's tensors, PyTorch's semantics; applied inside a convolution block ([`block::conv_block`]).
#[derive(Debug, Clone)]
struct BatchNorm2d {
    running_mean: Var,
    running_var: Var,
    weight: Tensor,
    bias: Tensor,
}

impl BatchNorm2d {
    fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let get = |name| vb.get(channels, name);
        Ok(BatchNorm2d {
            running_mean: Var::from_tensor(&get("running_mean")?)?,
            running_var: Var::from_tensor(&get("running_var")?)?,
            weight: get("weight")?,
            bias: get("bias")?,
        })
    }

    /// `max_pool(relu(bn(conv(x, weight))))` (`pool`'s windows), NCHW in and out; in training and recalibration the batch
    /// statistics are folded into the running statistics.
    fn conv_block(
        &self,
        x: &Tensor,
        weight: &Tensor,
        pool: Pool,
        mode: Mode,
        ws: Option<&Arc<Workspace>>,
    ) -> candle_core::Result<Tensor> {
        let affine = Tensor::stack(&[&self.weight, &self.bias], 0)?;
        let (factor, norm) = match mode {
            Mode::Eval => {
                let mean = self.running_mean.as_tensor().to_vec1::<f32>()?;
                let invstd = self
                    .running_var
                    .as_tensor()
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|&v| (1.0 / (f64::from(v) + BN_EPS).sqrt()) as f32)
                    .collect();
                (0.0, BlockNorm::Fixed { mean, invstd })
            }
            Mode::Train => (BN_MOMENTUM, BlockNorm::Batch { eps: BN_EPS }),
            Mode::Recalibrate(f) => (f, BlockNorm::Batch { eps: BN_EPS }),
        };
        let (b, _, h, w) = x.dims4()?;
        let (out, stats) = block::conv_block(x, weight, &affine, 1, pool, norm, ws)?;
        if let Some((mean, var)) = stats {
            let count = (b * h * w) as f64;
            // The running variance is the unbiased estimate, as in PyTorch.
            let unbias = if count > 1.0 {
                count / (count - 1.0)
            } else {
                1.0
            };
            let blend = |stat: &Var, batch: &[f32], k: f64| -> candle_core::Result<()> {
                let old = stat.as_tensor().to_vec1::<f32>()?;
                let v: Vec<f32> = old
                    .iter()
                    .zip(batch)
                    .map(|(&o, &n)| (f64::from(o) * (1.0 - factor) + f64::from(n) * k) as f32)
                    .collect();
                stat.set(&Tensor::from_vec(v, batch.len(), x.device())?)
            };
            blend(&self.running_mean, &mean, factor)?;
            blend(&self.running_var, &var, factor * unbias)?;
        }
        Ok(out)
    }
}

/// A fully connected layer's tensors, PyTorch's `Linear` layout: weight `(out, in)`, bias `(out)`.
#[derive(Debug, Clone)]
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn new(inputs: usize, outputs: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Dense {
            weight: vb.get((outputs, inputs), "weight")?,
            bias: vb.get(outputs, "bias")?,
        })
    }

    /// `relu?(x·Wᵀ + b)`: one fused op on the CPU given the workspace, candle's ops elsewhere or without.
    fn forward(
        &self,
        x: &Tensor,
        relu: bool,
        ws: Option<&Arc<Workspace>>,
    ) -> candle_core::Result<Tensor> {
        linear::linear(x, &self.weight, &self.bias, relu, ws)
    }
}

#[derive(Debug, Clone)]
struct PlateCnn {
    /// (conv weight, BatchNorm) per block.
    blocks: Vec<(Tensor, BatchNorm2d)>,
    fc1: Dense,
    /// One classifier per character slot, applied as one `(slots·classes, hidden)` layer.
    heads: Vec<Dense>,
}

impl PlateCnn {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let arch = Arch::PlateCnn;
        let (mut cin, h, w) = arch.input();
        let mut blocks = Vec::new();
        for (i, &cout) in PLATE_CONV.iter().enumerate() {
            let n = i + 1;
            let weight = vb.get((cout, cin, 3, 3), &format!("conv{n}.weight"))?;
            let bn = BatchNorm2d::new(cout, vb.pp(format!("bn{n}")))?;
            blocks.push((weight, bn));
            cin = cout;
        }
        let flat = cin * (h >> PLATE_CONV.len()) * (w >> PLATE_CONV.len());
        let fc1 = Dense::new(flat, PLATE_HIDDEN, vb.pp("fc1"))?;
        let heads = (0..arch.slots())
            .map(|s| Dense::new(PLATE_HIDDEN, arch.classes(), vb.pp(format!("heads.{s}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(PlateCnn { blocks, fc1, heads })
    }

    fn forward(
        &self,
        x: &Tensor,
        mode: Mode,
        ws: Option<&Arc<Workspace>>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (weight, bn) in &self.blocks {
            x = bn.conv_block(&x, weight, Pool::SQUARE, mode, ws)?;
        }
        let x = self.fc1.forward(&x.flatten_from(1)?, true, ws)?;
        let weights: Vec<&Tensor> = self.heads.iter().map(|h| &h.weight).collect();
        let biases: Vec<&Tensor> = self.heads.iter().map(|h| &h.bias).collect();
        let heads = Dense {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
        };
        let (b, slots) = (x.dim(0)?, self.heads.len());
        heads.forward(&x, false, ws)?.reshape((b, slots, ()))
    }
}

/// The sequence reader (issue 12): fused conv blocks down to 12 or 24 columns, then one fused two-layer classifier
/// applied to every column, emitting [`CTC_ROWS`] rows × the layout's steps × classes per column; the logits are
/// `(batch, rows·steps, classes)`, row-major by row, for CTC (`crate::ctc`).
#[derive(Debug, Clone)]
struct PlateCtc {
    /// (conv weight, BatchNorm, pool window) per block.
    blocks: Vec<(Tensor, BatchNorm2d, Pool)>,
    fc1: Dense,
    fc2: Dense,
    /// CTC steps per column and row.
    sub: usize,
}

impl PlateCtc {
    fn new(arch: Arch, vb: VarBuilder) -> candle_core::Result<Self> {
        let Some(widths) = arch.ctc_layout() else {
            candle_core::bail!("{arch} is not a CTC plate reader")
        };
        let mut cin = arch.input().0;
        let mut blocks = Vec::new();
        for (i, &(cout, pool)) in widths.convs.iter().enumerate() {
            let n = i + 1;
            let weight = vb.get((cout, cin, 3, 3), &format!("conv{n}.weight"))?;
            let bn = BatchNorm2d::new(cout, vb.pp(format!("bn{n}")))?;
            blocks.push((weight, bn, pool));
            cin = cout;
        }
        let (c, h, _) = widths.grid(arch.input());
        let classes = arch.classes();
        let fc1 = Dense::new(c * h, widths.hidden, vb.pp("fc1"))?;
        let fc2 = Dense::new(widths.hidden, CTC_ROWS * widths.sub * classes, vb.pp("fc2"))?;
        Ok(PlateCtc {
            blocks,
            fc1,
            fc2,
            sub: widths.sub,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mode: Mode,
        ws: Option<&Arc<Workspace>>,
    ) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (weight, bn, pool) in &self.blocks {
            x = bn.conv_block(&x, weight, *pool, mode, ws)?;
        }
        // One row per column, features in (channel, row) order: PyTorch's `permute(0, 3, 1, 2)`.
        let (b, c, h, w) = x.dims4()?;
        let cols = x
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .reshape((b * w, c * h))?;
        let hidden = self.fc1.forward(&cols, true, ws)?;
        let out = self.fc2.forward(&hidden, false, ws)?;
        // (b, w, rows, sub, k) → (b, rows, w, sub, k): each row's steps left to right.
        out.reshape((b, w, CTC_ROWS, self.sub, ()))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?
            .reshape((b, CTC_ROWS * w * self.sub, ()))
    }
}

#[derive(Debug, Clone)]
struct MnistCnn {
    /// (weight, bias) of the two 5×5 'same' convolutions.
    convs: [(Tensor, Tensor); 2],
    fc1: Dense,
    fc2: Dense,
}

impl MnistCnn {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let conv = |cin: usize, cout: usize, name: &str| -> candle_core::Result<(Tensor, Tensor)> {
            Ok((
                vb.get((cout, cin, 5, 5), &format!("{name}.weight"))?,
                vb.get(cout, &format!("{name}.bias"))?,
            ))
        };
        Ok(MnistCnn {
            convs: [conv(1, 32, "conv1")?, conv(32, 64, "conv2")?],
            fc1: Dense::new(3136, 512, vb.pp("fc1"))?,
            fc2: Dense::new(512, 10, vb.pp("fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor, ws: Option<&Arc<Workspace>>) -> candle_core::Result<Tensor> {
        let mut x = x.clone();
        for (weight, bias) in &self.convs {
            // conv + bias + ReLU + pool as one block: the bias is the affine shift with unit scale.
            let o = bias.dim(0)?;
            let ones = Tensor::ones(o, DType::F32, bias.device())?;
            let affine = Tensor::stack(&[&ones, bias], 0)?;
            let norm = BlockNorm::Fixed {
                mean: vec![0.0; o],
                invstd: vec![1.0; o],
            };
            x = block::conv_block(&x, weight, &affine, 2, Pool::SQUARE, norm, ws)?.0;
        }
        let x = self.fc1.forward(&x.flatten_from(1)?, true, ws)?;
        self.fc2.forward(&x, false, ws)?.unsqueeze(1)
    }
}

#[derive(Debug, Clone)]
enum Net {
    Ctc(PlateCtc),
    Plate(PlateCnn),
    Mnist(MnistCnn),
}

/// A host copy of one tensor, as stored in a weights file.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    /// An F32 tensor (weights, biases, BatchNorm statistics).
    F32(Vec<f32>),
    /// An I64 scalar (`num_batches_tracked`).
    I64(i64),
}

/// A model: its architecture, its tensors (in a `VarMap`, on one device) and the network reading them.
pub struct Model {
    arch: Arch,
    device: Device,
    varmap: VarMap,
    net: Net,
    /// Whether forward passes on the CPU use the fused convolution blocks (always, but for the tests that compare
    /// them with candle's generic ops).
    fused: bool,
    /// The fused ops' buffers and gradient channel (issue 11): every op a forward pass builds holds a handle.
    workspace: Arc<Workspace>,
    /// `num_batches_tracked` per BatchNorm layer, by full tensor name. Kept on the host: candle has no such counter.
    batches_tracked: BTreeMap<String, i64>,
}

impl Model {
    /// A freshly initialised model. Same `arch` and `seed` give bit-identical weights on every machine: tensors are
    /// visited in sorted-name order and drawn from one ChaCha8 stream, PyTorch's default scheme (weights and biases
    /// uniform in ±1/√fan_in, i.e. Kaiming-uniform with a=√5; BatchNorm γ=1, β=0, mean 0, var 1).
    pub fn init(arch: Arch, seed: u64, device: &Device) -> Result<Model, TrainError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for spec in arch.tensors() {
            let n = spec.numel();
            let t = match spec.kind {
                TensorKind::Weight { fan_in } | TensorKind::Bias { fan_in } => {
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    let dist = Uniform::new(-bound, bound)
                        .map_err(|e| TrainError::Config(e.to_string()))?;
                    HostTensor::F32((0..n).map(|_| dist.sample(&mut rng)).collect())
                }
                TensorKind::BnWeight | TensorKind::RunningVar => HostTensor::F32(vec![1.0; n]),
                TensorKind::BnBias | TensorKind::RunningMean => HostTensor::F32(vec![0.0; n]),
                TensorKind::BatchesTracked => HostTensor::I64(0),
            };
            tensors.insert(spec.name, t);
        }
        Model::from_host(arch, tensors, device)
    }

    /// Build a model from host tensors, which must match `arch` exactly (names, kinds and sizes).
    pub fn from_host(
        arch: Arch,
        mut tensors: BTreeMap<String, HostTensor>,
        device: &Device,
    ) -> Result<Model, TrainError> {
        let mismatch = |detail: String| TrainError::WeightsMismatch {
            arch: arch.name(),
            detail,
        };
        let varmap = VarMap::new();
        let mut batches_tracked = BTreeMap::new();
        let specs = arch.tensors();
        {
            let mut vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for spec in &specs {
                match (spec.kind, tensors.remove(&spec.name)) {
                    (_, None) => {
                        return Err(mismatch(format!("tensor `{}` is missing", spec.name)))
                    }
                    (TensorKind::BatchesTracked, Some(HostTensor::I64(n))) => {
                        batches_tracked.insert(spec.name.clone(), n);
                    }
                    (TensorKind::BatchesTracked, Some(HostTensor::F32(_))) => {
                        return Err(mismatch(format!(
                            "tensor `{}` should be an I64 scalar",
                            spec.name
                        )))
                    }
                    (_, Some(HostTensor::I64(_))) => {
                        return Err(mismatch(format!("tensor `{}` should be F32", spec.name)))
                    }
                    (_, Some(HostTensor::F32(v))) => {
                        if v.len() != spec.numel() {
                            return Err(mismatch(format!(
                                "tensor `{}` has {} values, expected shape {:?}",
                                spec.name,
                                v.len(),
                                spec.shape
                            )));
                        }
                        if v.iter().any(|x| !x.is_finite()) {
                            return Err(mismatch(format!(
                                "tensor `{}` contains NaN or infinite values",
                                spec.name
                            )));
                        }
                        let t = Tensor::from_vec(v, spec.shape.as_slice(), device)?;
                        vars.insert(spec.name.clone(), Var::from_tensor(&t)?);
                    }
                }
            }
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(mismatch(format!("unexpected tensor `{extra}`")));
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let net = match arch {
            Arch::PlateCtc
            | Arch::PlateCtcDeep
            | Arch::PlateCtcV2
            | Arch::PlateCtcDeepV2
            | Arch::PlateCtcDeepV3
            | Arch::PlateCtcDeepV4 => Net::Ctc(PlateCtc::new(arch, vb)?),
            Arch::PlateCnn => Net::Plate(PlateCnn::new(vb)?),
            Arch::MnistCnn => Net::Mnist(MnistCnn::new(vb)?),
        };
        // The network must not have created a tensor the architecture does not list (that would be trained but
        // never exported): a programming error, reported rather than silently diverging from the wire format.
        let expected: BTreeSet<&str> = specs
            .iter()
            .filter(|s| s.kind != TensorKind::BatchesTracked)
            .map(|s| s.name.as_str())
            .collect();
        let built = varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        if built != expected.len() {
            return Err(mismatch(format!(
                "the network built {built} tensors, the architecture lists {}",
                expected.len()
            )));
        }
        Ok(Model {
            arch,
            device: device.clone(),
            varmap,
            net,
            fused: true,
            workspace: Workspace::new(),
            batches_tracked,
        })
    }

    /// Load a model from safetensors bytes (F32 tensors plus I64 `num_batches_tracked` scalars), checking every name,
    /// dtype and shape against `arch`. Never memory-maps: the bytes are the verified ones.
    pub fn from_safetensors(
        arch: Arch,
        bytes: &[u8],
        device: &Device,
    ) -> Result<Model, TrainError> {
        Model::from_host(arch, read_safetensors(arch, bytes)?, device)
    }

    /// Export every tensor as safetensors bytes, PyTorch `state_dict` names, loadable with `strict=True`.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, TrainError> {
        write_safetensors(&self.to_host()?, Some(self.arch))
    }

    /// Host copies of every tensor, by name.
    pub fn to_host(&self) -> Result<BTreeMap<String, HostTensor>, TrainError> {
        let vars = self.vars();
        let mut out = BTreeMap::new();
        for spec in self.arch.tensors() {
            let t = if spec.kind == TensorKind::BatchesTracked {
                HostTensor::I64(self.batches_tracked.get(&spec.name).copied().unwrap_or(0))
            } else {
                let var = vars
                    .get(&spec.name)
                    .ok_or_else(|| TrainError::WeightsMismatch {
                        arch: self.arch.name(),
                        detail: format!("tensor `{}` is missing", spec.name),
                    })?;
                HostTensor::F32(var.as_tensor().flatten_all()?.to_vec1::<f32>()?)
            };
            out.insert(spec.name, t);
        }
        Ok(out)
    }

    /// The architecture.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The device the tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits of shape `(batch, slots, classes)` (plate-ctc: `(batch, rows·steps, classes)`, see
    /// [`Arch::reader`]) for images of shape `(batch, channels, height, width)`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor, TrainError> {
        Ok(self.forward_mode(x, mode)?)
    }

    /// The forward pass behind [`Model::forward`] and `ModuleT`: the fused ops get the model's workspace, the
    /// generic ones none.
    fn forward_mode(&self, x: &Tensor, mode: Mode) -> candle_core::Result<Tensor> {
        let ws = self.fused.then_some(&self.workspace);
        match &self.net {
            Net::Ctc(n) => n.forward(x, mode, ws),
            Net::Plate(n) => n.forward(x, mode, ws),
            Net::Mnist(n) => n.forward(x, ws),
        }
    }

    /// Opens a training step on the model's gradient channel ([`crate::param_grads`]): the fused ops of forward
    /// passes run before the returned guard is dropped hand their parameters' gradients to its
    /// [`Step::backward`] instead of candle's store.
    pub(crate) fn open_step(&self) -> Step<'_> {
        self.workspace.grads.open()
    }

    /// Choose the ops forward passes use on the CPU: the fused blocks (the default) or candle's generic ops (the
    /// reference the tests compare with, the baseline `ferry-lab bench --ops generic` times, and the path CUDA
    /// always takes).
    pub fn set_ops(&mut self, ops: Ops) {
        self.fused = ops == Ops::Fused;
    }

    /// The model's variables by name, sorted.
    pub(crate) fn vars(&self) -> BTreeMap<String, Var> {
        let vars = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Count one training batch in every BatchNorm layer (`num_batches_tracked += 1`).
    pub(crate) fn count_batch(&mut self) {
        for n in self.batches_tracked.values_mut() {
            *n = n.saturating_add(1);
        }
    }

    /// Set every BatchNorm layer's `num_batches_tracked`.
    pub(crate) fn set_batches_tracked(&mut self, value: i64) {
        for n in self.batches_tracked.values_mut() {
            *n = value;
        }
    }

    /// Whether the model has BatchNorm layers.
    pub fn has_batch_norm(&self) -> bool {
        !self.batches_tracked.is_empty()
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("arch", &self.arch)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl ModuleT for Model {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mode = if train { Mode::Train } else { Mode::Eval };
        self.forward_mode(x, mode)
    }
}

/// Serialise host tensors as safetensors (F32 little-endian and I64 scalars), recording the architecture name in
/// the metadata when given.
pub(crate) fn write_safetensors(
    tensors: &BTreeMap<String, HostTensor>,
    arch: Option<Arch>,
) -> Result<Vec<u8>, TrainError> {
    let metadata = arch.map(|a| HashMap::from([("ferry.arch".to_string(), a.name().to_string())]));
    write_safetensors_with(tensors, arch, metadata)
}

/// [`write_safetensors`] with explicit metadata. Tensors without a shape in `arch` are stored flat.
pub(crate) fn write_safetensors_with(
    tensors: &BTreeMap<String, HostTensor>,
    arch: Option<Arch>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TrainError> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>, Dtype)> = tensors
        .iter()
        .map(|(name, t)| match t {
            HostTensor::F32(v) => (
                name.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                vec![v.len()],
                Dtype::F32,
            ),
            HostTensor::I64(n) => (name.clone(), n.to_le_bytes().to_vec(), vec![], Dtype::I64),
        })
        .collect();
    let shapes: BTreeMap<String, Vec<usize>> = match arch {
        Some(a) => a.tensors().into_iter().map(|s| (s.name, s.shape)).collect(),
        None => BTreeMap::new(),
    };
    let mut views = Vec::with_capacity(bytes.len());
    for (name, data, flat, dtype) in &bytes {
        let shape = shapes.get(name).cloned().unwrap_or_else(|| flat.clone());
        let view = TensorView::new(*dtype, shape, data)
            .map_err(|e| TrainError::WeightsFormat(e.to_string()))?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, metadata).map_err(|e| TrainError::WeightsFormat(e.to_string()))
}

/// Parse safetensors bytes into host tensors, checking names, dtypes and shapes against `arch`.
pub(crate) fn read_safetensors(
    arch: Arch,
    bytes: &[u8],
) -> Result<BTreeMap<String, HostTensor>, TrainError> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| TrainError::WeightsFormat(e.to_string()))?;
    let mismatch = |detail: String| TrainError::WeightsMismatch {
        arch: arch.name(),
        detail,
    };
    let specs = arch.tensors();
    let known: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    if let Some(extra) = names.iter().find(|n| !known.contains(n.as_str())) {
        return Err(mismatch(format!("unexpected tensor `{extra}`")));
    }
    let mut out = BTreeMap::new();
    for spec in specs {
        let view = st
            .tensor(&spec.name)
            .map_err(|_| mismatch(format!("tensor `{}` is missing", spec.name)))?;
        if view.shape() != spec.shape.as_slice() {
            return Err(mismatch(format!(
                "tensor `{}` has shape {:?}, expected {:?}",
                spec.name,
                view.shape(),
                spec.shape
            )));
        }
        let t = match (spec.kind, view.dtype()) {
            (TensorKind::BatchesTracked, Dtype::I64) => {
                let b: [u8; 8] = view
                    .data()
                    .try_into()
                    .map_err(|_| mismatch(format!("tensor `{}` is truncated", spec.name)))?;
                HostTensor::I64(i64::from_le_bytes(b))
            }
            (TensorKind::BatchesTracked, d) => {
                return Err(mismatch(format!(
                    "tensor `{}` is {d:?}, expected I64",
                    spec.name
                )))
            }
            (_, Dtype::F32) => HostTensor::F32(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            (_, d) => {
                return Err(mismatch(format!(
                    "tensor `{}` is {d:?}, expected F32",
                    spec.name
                )))
            }
        };
        out.insert(spec.name, t);
    }
    Ok(out)
}

/// Tensors by name plus the file's metadata.
pub(crate) type StateFile = (BTreeMap<String, HostTensor>, HashMap<String, String>);

/// Parse any safetensors file of F32 tensors and I64 scalars into flat host tensors plus its metadata, for ferry's own
/// state files (optimizer moments, checkpoints); callers check names and sizes.
pub(crate) fn read_any_safetensors(bytes: &[u8]) -> Result<StateFile, TrainError> {
    let fmt = |e: safetensors::SafeTensorError| TrainError::WeightsFormat(e.to_string());
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(fmt)?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(fmt)?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = match (view.dtype(), view.shape()) {
            (Dtype::I64, []) => {
                let b: [u8; 8] = view.data().try_into().map_err(|_| {
                    TrainError::WeightsFormat(format!("tensor `{name}` is truncated"))
                })?;
                HostTensor::I64(i64::from_le_bytes(b))
            }
            (Dtype::F32, _) => HostTensor::F32(
                view.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            (d, s) => {
                return Err(TrainError::WeightsFormat(format!(
                    "tensor `{name}` is {d:?} {s:?}, not F32 or an I64 scalar"
                )))
            }
        };
        out.insert(name, t);
    }
    Ok((out, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> Device {
        Device::Cpu
    }

    #[test]
    fn same_seed_gives_bit_identical_weights_and_another_seed_does_not() {
        for arch in Arch::ALL {
            let a = Model::init(arch, 7, &cpu())
                .unwrap()
                .to_safetensors()
                .unwrap();
            let b = Model::init(arch, 7, &cpu())
                .unwrap()
                .to_safetensors()
                .unwrap();
            let c = Model::init(arch, 8, &cpu())
                .unwrap()
                .to_safetensors()
                .unwrap();
            assert_eq!(a, b, "{arch}");
            assert_ne!(a, c, "{arch}");
        }
    }

    #[test]
    fn save_load_round_trips_bit_exactly() {
        for arch in Arch::ALL {
            let m = Model::init(arch, 3, &cpu()).unwrap();
            let bytes = m.to_safetensors().unwrap();
            let back = Model::from_safetensors(arch, &bytes, &cpu()).unwrap();
            assert_eq!(m.to_host().unwrap(), back.to_host().unwrap());
            assert_eq!(back.to_safetensors().unwrap(), bytes);
        }
    }

    #[test]
    fn exported_file_has_pytorch_names_shapes_and_counters() {
        let bytes = Model::init(Arch::PlateCnn, 1, &cpu())
            .unwrap()
            .to_safetensors()
            .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let n = st.tensor("bn1.num_batches_tracked").unwrap();
        assert_eq!((n.dtype(), n.shape()), (Dtype::I64, &[][..]));
        let w = st.tensor("conv1.weight").unwrap();
        assert_eq!(
            (w.dtype(), w.shape()),
            (Dtype::F32, &[PLATE_CONV[0], 1, 3, 3][..])
        );
        assert!(st.tensor("heads.7.bias").is_ok());
        assert_eq!(st.len(), Arch::PlateCnn.tensors().len());
    }

    #[test]
    fn loading_refuses_what_does_not_fit() {
        let plate = Model::init(Arch::PlateCnn, 1, &cpu()).unwrap();
        let err = Model::from_safetensors(Arch::MnistCnn, &plate.to_safetensors().unwrap(), &cpu())
            .unwrap_err();
        assert!(matches!(err, TrainError::WeightsMismatch { .. }), "{err}");
        assert!(matches!(
            Model::from_safetensors(Arch::MnistCnn, b"not safetensors", &cpu()),
            Err(TrainError::WeightsFormat(_))
        ));
        let mut host = plate.to_host().unwrap();
        host.insert("fc1.bias".into(), HostTensor::F32(vec![f32::NAN; 256]));
        let bytes = write_safetensors(&host, Some(Arch::PlateCnn)).unwrap();
        let err = Model::from_safetensors(Arch::PlateCnn, &bytes, &cpu()).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        let mut host = plate.to_host().unwrap();
        host.remove("bn2.running_var");
        let bytes = write_safetensors(&host, Some(Arch::PlateCnn)).unwrap();
        let err = Model::from_safetensors(Arch::PlateCnn, &bytes, &cpu()).unwrap_err();
        assert!(err.to_string().contains("bn2.running_var"), "{err}");
    }

    #[test]
    fn forward_gives_one_row_of_logits_per_slot() {
        for arch in Arch::ALL {
            let m = Model::init(arch, 1, &cpu()).unwrap();
            let (c, h, w) = arch.input();
            let x = Tensor::zeros((2, c, h, w), DType::F32, &cpu()).unwrap();
            let y = m.forward(&x, Mode::Eval).unwrap();
            let steps = match arch.reader() {
                crate::arch::Reader::Slots => arch.slots(),
                crate::arch::Reader::Ctc { rows, steps } => rows * steps,
            };
            assert_eq!(y.dims(), &[2, steps, arch.classes()]);
        }
    }
}
