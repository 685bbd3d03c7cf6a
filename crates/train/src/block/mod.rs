//! One convolution block as one graph node (issue 7): `max_pool(relu(norm(conv(x, W))))`, stride 1, no
//! convolution bias, where `norm` is BatchNorm with this batch's statistics, a constant per-channel affine
//! (BatchNorm with running statistics), or a plain bias.
//!
//! candle's own ops (and this crate's earlier per-op custom ops) put the full-size convolution output and its
//! gradient in the autograd graph: each node allocates, zero-fills and adds a gradient as large as the activation,
//! and the im2col matrix (k² × the input) was materialised whole. Here, on the CPU:
//!
//! - the convolution is im2col + one `gemm` per chunk of images, the chunk's column matrix sized to stay in cache
//!   and recomputed in the backward pass instead of being kept;
//! - the convolution output `y` is kept inside the op (in a buffer from the model's [`Workspace`], reused from step
//!   to step) for the backward pass, never as a graph tensor;
//! - the backward pass computes `dy` (pool → ReLU → BatchNorm backward), then `dW = Σ dy·colsᵀ` and, only when
//!   the input needs it, `dx = col2im(Wᵀ·dy)`, chunk by chunk.
//!
//! Tensors at the block's boundary are NCHW, PyTorch's layout: the first block takes the images as they are, and
//! the last block's output flattens in PyTorch's order for free. Inside, `y` is stored chunk-major: chunk `j`
//! (images `j·nb ..`) is a row-major `(out_channels, images·ho·wo)` matrix, so a chunk's product is one contiguous
//! write and a channel's values are a few contiguous rows.
//!
//! On other devices (CUDA), or when asked for the reference path, the same function runs candle's generic ops
//! (`conv2d`, elementwise BatchNorm, `relu`, `max`), differentiated by candle. The tests check the fused op
//! against that path, values and gradients, on odd shapes, padding and kernel sizes; rayon splits every pass and
//! partial sums are combined in a fixed order, so results do not depend on the thread count.
//!
//! Files: `geometry` (sizes, chunking, im2col), `forward`, `backward`, and this file (the entry point, the op's
//! state and candle's generic path). The op holds everything it needs in its fields (issue 11): the geometry, the
//! normalisation, a shared slot for what the forward pass leaves to the caller and to the backward pass, and the
//! model's workspace (buffers, and the channel that hands the weight's gradient to the optimizer).
//!
//! # Using the block in a model
//!
//! A model owns one `Arc<Workspace>` ([`Workspace::new`]) and passes `Some(&workspace)` to every [`conv_block`]
//! (and [`crate::linear::linear`]) call of its forward pass, or `None` for candle's generic ops. Per block it keeps
//! the convolution weight `(out, in, k, k)` without a bias and two per-channel vectors stacked as `affine`
//! `(2, out)`: γ and β of a BatchNorm ([`BlockNorm::Batch`] in training, [`BlockNorm::Fixed`] with the running
//! statistics in inference, folding the returned [`BatchStats`] into the running statistics itself), or ones and
//! the convolution's bias ([`BlockNorm::Fixed`] with mean 0 and invstd 1). The trainer opens a step on the
//! workspace around forward and backward (`crate::train::train_step`), so nothing else is needed for the
//! gradients: a weight passed as the variable's own tensor has its gradient handed straight to the optimizer,
//! and a derived one (stacked, concatenated) gets it through candle as usual. `model.rs`'s
//! `BatchNorm2d::conv_block` and `MnistCnn::forward` are the two patterns.

mod backward;
mod forward;
mod geometry;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use crate::cpu::f32_slice;
use crate::workspace::{lock, Handle, Pooled, Workspace};
use geometry::Geometry;

/// How the block normalises the convolution output before ReLU.
#[derive(Debug, Clone)]
pub(crate) enum BlockNorm {
    /// BatchNorm with this batch's mean and biased variance (training, recalibration); `conv_block` returns them
    /// so that the caller can update the running statistics.
    Batch {
        /// Added to the variance before the square root.
        eps: f64,
    },
    /// `z = (y − mean)·invstd·γ + β` with constant per-channel `mean` and `invstd`: BatchNorm with running
    /// statistics, or a plain bias (`mean` 0, `invstd` 1, `γ` 1).
    Fixed {
        /// Per-channel mean subtracted first.
        mean: Vec<f32>,
        /// Per-channel `1/√(var + eps)`.
        invstd: Vec<f32>,
    },
}

/// A batch's per-channel mean and biased variance.
pub(crate) type BatchStats = (Vec<f32>, Vec<f32>);

/// A block's max-pool window, which is also its stride, in rows and columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pool {
    /// Rows per window.
    pub(crate) rows: usize,
    /// Columns per window.
    pub(crate) cols: usize,
}

impl Pool {
    /// No pooling: the block keeps its resolution.
    pub(crate) const NONE: Pool = Pool { rows: 1, cols: 1 };
    /// 2×2 windows: half the height and half the width.
    pub(crate) const SQUARE: Pool = Pool { rows: 2, cols: 2 };
    /// 2×1 windows: half the height, every column kept (CRNN's later poolings: more columns for CTC to read).
    pub(crate) const ROWS: Pool = Pool { rows: 2, cols: 1 };
}

/// The block: `x` NCHW `(b, c, h, w)`, `weight` `(out, c, k, k)` (PyTorch's layout), `affine` `(2, out)` = γ then
/// β; `pool` the max-pool window and stride ([`Pool::NONE`], [`Pool::SQUARE`] or [`Pool::ROWS`]). Returns the
/// pooled output `(b, out, ho/rows, wo/cols)` (trailing rows and columns that fill no window dropped, as in
/// PyTorch) and,
/// for [`BlockNorm::Batch`], the batch statistics. With the model's workspace `ws` the fused op runs on the CPU;
/// without (or off the CPU) candle's generic ops.
pub(crate) fn conv_block(
    x: &Tensor,
    weight: &Tensor,
    affine: &Tensor,
    pad: usize,
    pool: Pool,
    norm: BlockNorm,
    ws: Option<&Arc<Workspace>>,
) -> Result<(Tensor, Option<BatchStats>)> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, k, k2) = weight.dims4()?;
    if wc != c || k != k2 {
        bail!(
            "convolution block: weight {:?} does not fit {c} input channels",
            weight.dims()
        )
    }
    if affine.dims() != [2, o] {
        bail!(
            "convolution block: affine parameters {:?} are not (2, {o})",
            affine.dims()
        )
    }
    if let BlockNorm::Fixed { mean, invstd } = &norm {
        if mean.len() != o || invstd.len() != o {
            bail!("convolution block: per-channel statistics do not match {o} channels")
        }
    }
    if b == 0 || c == 0 || o == 0 {
        bail!("convolution block: empty input or weight ({b} images, {c} channels, {o} outputs)")
    }
    let geo = Geometry::new((b, c, h, w), o, k, pad, pool)?;
    let Some(ws) = ws.filter(|_| x.device().is_cpu()) else {
        return generic_block(x, weight, affine, pad, pool, norm);
    };
    let keep = x.track_op() || weight.track_op() || affine.track_op();
    let shared = Arc::new(Mutex::new(BlockState::default()));
    let op = ConvBlockOp {
        geo,
        norm,
        keep,
        state: Arc::clone(&shared),
        ws: ws.handle(),
    };
    let out = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &affine.contiguous()?, op)?;
    let stats = lock(&shared).stats.take();
    Ok((out, stats))
}

/// The plain candle path: `conv2d`, BatchNorm as elementwise ops (differentiated through the batch statistics),
/// `relu`, max-pool.
fn generic_block(
    x: &Tensor,
    weight: &Tensor,
    affine: &Tensor,
    pad: usize,
    pool: Pool,
    norm: BlockNorm,
) -> Result<(Tensor, Option<BatchStats>)> {
    let y = x.conv2d(weight, pad, 1, 1, 1)?;
    let o = y.dim(1)?;
    let per_channel = |t: &Tensor| t.reshape((1, o, 1, 1));
    let gamma = per_channel(&affine.get(0)?)?;
    let beta = per_channel(&affine.get(1)?)?;
    let (z, stats) = match norm {
        BlockNorm::Batch { eps } => {
            let mean = y.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
            let centered = y.broadcast_sub(&mean)?;
            let var = centered
                .sqr()?
                .mean_keepdim(0)?
                .mean_keepdim(2)?
                .mean_keepdim(3)?;
            let z = centered.broadcast_div(&(&var + eps)?.sqrt()?)?;
            let stats = (
                mean.flatten_all()?.to_vec1::<f32>()?,
                var.flatten_all()?.to_vec1::<f32>()?,
            );
            (z, Some(stats))
        }
        BlockNorm::Fixed { mean, invstd } => {
            let dev = y.device();
            let mean = per_channel(&Tensor::from_vec(mean, o, dev)?)?;
            let invstd = per_channel(&Tensor::from_vec(invstd, o, dev)?)?;
            (y.broadcast_sub(&mean)?.broadcast_mul(&invstd)?, None)
        }
    };
    let z = z.broadcast_mul(&gamma)?.broadcast_add(&beta)?.relu()?;
    Ok((max_pool(&z, pool)?, stats))
}

/// Max-pool of an NCHW tensor with `pool`'s windows as its stride, by reshape and `max` (the tensor itself for
/// [`Pool::NONE`]). Not candle's `max_pool2d`: its backward in
/// candle 0.11 scales the gradient by the fraction of window maxima (¼ for a single maximum of a 2×2 window)
/// instead of dividing by their count, so gradients came out 4× too small.
fn max_pool(x: &Tensor, pool: Pool) -> Result<Tensor> {
    if pool == Pool::NONE {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    let Pool { rows, cols } = pool;
    let (ho, wo) = (h / rows, w / cols);
    x.narrow(2, 0, rows * ho)?
        .narrow(3, 0, cols * wo)?
        .reshape((b, c, ho, rows, wo, cols))?
        .max(5)?
        .max(3)
}

/// What the forward pass leaves for the caller (statistics) and for the backward pass.
#[derive(Default)]
struct BlockState {
    /// The batch statistics, taken by [`conv_block`] once candle has run the forward pass.
    stats: Option<BatchStats>,
    /// Taken (once) by the backward pass.
    saved: Option<Saved>,
}

/// The forward pass's convolution output and the normalisation it used.
struct Saved {
    y: Pooled,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

/// The fused CPU op over `(x, weight, affine)`.
struct ConvBlockOp {
    geo: Geometry,
    norm: BlockNorm,
    /// Whether to keep `y` for a backward pass (some input tracks gradients).
    keep: bool,
    /// Shared with [`conv_block`], which takes the statistics after the forward pass.
    state: Arc<Mutex<BlockState>>,
    /// The model's buffers and gradient channel.
    ws: Handle,
}

impl CustomOp3 for ConvBlockOp {
    fn name(&self) -> &'static str {
        "ferry-conv-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geo;
        let x = f32_slice(s1, l1, "convolution block input")?;
        let wt = f32_slice(s2, l2, "convolution block weight")?;
        let affine = f32_slice(s3, l3, "convolution block affine parameters")?;
        if x.len() != g.b * g.c * g.h * g.w || wt.len() != g.o * g.ckk() || affine.len() != 2 * g.o
        {
            bail!("convolution block: input sizes changed after the shape check")
        }
        self.forward(x, wt, affine)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        affine: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, weight, affine, grad)
    }
}
