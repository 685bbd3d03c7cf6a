//! One convolution block as one graph node (issue 7): `max_pool_2x2(relu(norm(conv(x, W))))`, stride 1, no
//! convolution bias, where `norm` is BatchNorm with this batch's statistics, a constant per-channel affine
//! (BatchNorm with running statistics), or a plain bias.
//!
//! candle's own ops (and this crate's earlier per-op custom ops) put the full-size convolution output and its
//! gradient in the autograd graph: each node allocates, zero-fills and adds a gradient as large as the activation,
//! and the im2col matrix (k² × the input) was materialised whole. Here, on the CPU:
//!
//! - the convolution is im2col + one `gemm` per chunk of images, the chunk's column matrix sized to stay in cache
//!   and recomputed in the backward pass instead of being kept;
//! - the convolution output `y` is kept inside the op (in a buffer reused from step to step) for the backward pass,
//!   never as a graph tensor;
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

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{f32_slice, with_f32};
use crate::matmul::{matmul, MatMut, MatRef};

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

/// The block: `x` NCHW `(b, c, h, w)`, `weight` `(out, c, k, k)` (PyTorch's layout), `affine` `(2, out)` = γ then
/// β. Returns the pooled output `(b, out, ho/2, wo/2)` (odd trailing rows and columns dropped, as in PyTorch) and,
/// for [`BlockNorm::Batch`], the batch statistics. `fused` selects the CPU op; otherwise (or off the CPU) candle's
/// generic ops run.
pub(crate) fn conv_block(
    x: &Tensor,
    weight: &Tensor,
    affine: &Tensor,
    pad: usize,
    norm: BlockNorm,
    fused: bool,
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
    let geo = Geometry::new(b, c, h, w, o, k, pad)?;
    if !(fused && x.device().is_cpu()) {
        return generic_block(x, weight, affine, pad, norm);
    }
    let keep = x.track_op() || weight.track_op() || affine.track_op();
    let shared = Arc::new(Mutex::new(BlockState::default()));
    let op = ConvBlockOp {
        geo,
        norm,
        keep,
        state: Arc::clone(&shared),
    };
    let out = x
        .contiguous()?
        .apply_op3(&weight.contiguous()?, &affine.contiguous()?, op)?;
    let stats = lock(&shared).stats.take();
    Ok((out, stats))
}

/// The plain candle path: `conv2d`, BatchNorm as elementwise ops (differentiated through the batch statistics),
/// `relu`, 2×2 max-pool.
fn generic_block(
    x: &Tensor,
    weight: &Tensor,
    affine: &Tensor,
    pad: usize,
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
    Ok((max_pool2(&z)?, stats))
}

/// 2×2 max-pool, stride 2, of an NCHW tensor by reshape and `max`. Not candle's `max_pool2d`: its backward in
/// candle 0.11 scales the gradient by the fraction of window maxima (¼ for a single maximum) instead of dividing
/// by their count, so gradients came out 4× too small.
fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    x.narrow(2, 0, 2 * ho)?
        .narrow(3, 0, 2 * wo)?
        .reshape((b, c, ho, 2, wo, 2))?
        .max(5)?
        .max(3)
}

/// Sizes of one block and its chunking.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    pad: usize,
    ho: usize,
    wo: usize,
    /// Images per chunk.
    nb: usize,
}

/// Column-matrix values per chunk: ~768 KiB, inside a core's L2 cache next to the weight.
const CHUNK_VALUES: usize = 192 * 1024;

/// Fixed number of partial weight gradients summed at the end: more than the cores used here, and independent of
/// the thread count so that the sum's rounding is too.
const GRAD_GROUPS: usize = 4;

impl Geometry {
    fn new(b: usize, c: usize, h: usize, w: usize, o: usize, k: usize, pad: usize) -> Result<Self> {
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        if k == 0 || hp < k || wp < k {
            bail!("convolution block: {h}x{w} input (padding {pad}) is smaller than the {k}x{k} kernel")
        }
        let (ho, wo) = (hp - k + 1, wp - k + 1);
        let per_image = (c * k * k * ho * wo).max(1);
        let mut nb = (CHUNK_VALUES / per_image).clamp(1, b.max(1));
        // gemm skips a packing copy of the column matrix when a chunk's column count is a multiple of the SIMD
        // width (16 f32 lanes): round the chunk up to such a count when a few more images get there.
        let target = nb * 4;
        let mut n = nb;
        while n < target.min(b) && !(n * ho * wo).is_multiple_of(16) {
            n += 1;
        }
        if (n * ho * wo).is_multiple_of(16) {
            nb = n;
        }
        Ok(Geometry {
            b,
            c,
            h,
            w,
            o,
            k,
            pad,
            ho,
            wo,
            nb,
        })
    }

    fn hw(&self) -> usize {
        self.ho * self.wo
    }

    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    fn chunks(&self) -> usize {
        self.b.div_ceil(self.nb)
    }

    /// First image and image count of chunk `j`.
    fn chunk(&self, j: usize) -> (usize, usize) {
        let b0 = j * self.nb;
        (b0, self.nb.min(self.b - b0))
    }

    /// Offset of chunk `j` in the chunk-major `y` buffer.
    fn chunk_offset(&self, j: usize) -> usize {
        self.o * j * self.nb * self.hw()
    }

    /// Offset of image `bi`'s plane of channel `oc` in `y`.
    fn plane(&self, bi: usize, oc: usize) -> usize {
        let (j, i) = (bi / self.nb, bi % self.nb);
        let (_, n) = self.chunk(j);
        self.chunk_offset(j) + (oc * n + i) * self.hw()
    }

    fn pooled(&self) -> (usize, usize) {
        (self.ho / 2, self.wo / 2)
    }

    /// For kernel column `kx`: the output columns `lo..hi` whose input column lies inside the image.
    fn cols(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).min(self.wo);
        let hi = (self.w + self.pad).saturating_sub(kx).min(self.wo);
        (lo, hi.max(lo))
    }

    /// im2col of images `b0 .. b0 + n` of the NCHW input into `(c·k·k, n·ho·wo)`, rows `(c, ky, kx)`.
    fn im2col(&self, x: &[f32], b0: usize, n: usize, cols: &mut [f32]) {
        let (k, hw, plane) = (self.k, self.hw(), self.h * self.w);
        for (row, dst_row) in cols.chunks_exact_mut(n * hw).enumerate() {
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let (lo, hi) = self.cols(kx);
            for (i, dst) in dst_row.chunks_exact_mut(hw).enumerate() {
                let src = &x[((b0 + i) * self.c + ci) * plane..][..plane];
                if self.pad > 0 {
                    dst.fill(0.0);
                }
                for oy in 0..self.ho {
                    let Some(iy) = (oy + ky).checked_sub(self.pad).filter(|&iy| iy < self.h) else {
                        continue;
                    };
                    let s0 = iy * self.w + lo + kx - self.pad;
                    dst[oy * self.wo + lo..oy * self.wo + hi]
                        .copy_from_slice(&src[s0..s0 + hi - lo]);
                }
            }
        }
    }

    /// The adjoint of [`Geometry::im2col`]: adds a column gradient `(c·k·k, n·ho·wo)` into the NCHW images
    /// `dx` (images `b0 ..` of the batch, `dx` holding exactly those).
    fn col2im(&self, dcols: &[f32], n: usize, dx: &mut [f32]) {
        let (k, hw, plane) = (self.k, self.hw(), self.h * self.w);
        for (row, src_row) in dcols.chunks_exact(n * hw).enumerate() {
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let (lo, hi) = self.cols(kx);
            for (i, src) in src_row.chunks_exact(hw).enumerate() {
                let dst = &mut dx[(i * self.c + ci) * plane..][..plane];
                for oy in 0..self.ho {
                    let Some(iy) = (oy + ky).checked_sub(self.pad).filter(|&iy| iy < self.h) else {
                        continue;
                    };
                    let d0 = iy * self.w + lo + kx - self.pad;
                    for (d, s) in dst[d0..d0 + hi - lo]
                        .iter_mut()
                        .zip(&src[oy * self.wo + lo..oy * self.wo + hi])
                    {
                        *d += s;
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread scratch for one chunk's column matrix and its gradient, reused across chunks and steps.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A buffer of exactly `len` values for the caller to overwrite entirely, reused from an earlier step when one of
/// that length was returned (training repeats the same shapes every step; fresh multi-megabyte allocations cost
/// page faults and zeroing).
fn take_buffer(len: usize) -> Vec<f32> {
    let mut pool = lock(&POOL);
    match pool.iter().position(|v| v.len() == len) {
        Some(i) => pool.swap_remove(i),
        None => vec![0.0; len],
    }
}

/// Values the pool may hold in all (256 MiB): a training step of either model needs well under a tenth of that,
/// and a change of shapes (an evaluation with large batches) cannot make the pool grow without limit.
const POOL_VALUES: usize = 64 << 20;

/// Returns a buffer to the pool, dropping the oldest ones beyond [`POOL_VALUES`].
fn give_buffer(v: Vec<f32>) {
    if v.len() > POOL_VALUES {
        return;
    }
    let mut pool = lock(&POOL);
    pool.push(v);
    let mut held: usize = pool.iter().map(Vec::len).sum();
    while held > POOL_VALUES {
        held -= pool.remove(0).len();
    }
}

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A pooled buffer, returned to the pool when dropped.
struct Pooled(Vec<f32>);

impl Drop for Pooled {
    fn drop(&mut self) {
        give_buffer(std::mem::take(&mut self.0));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the forward pass leaves for the caller (statistics) and for the backward pass.
#[derive(Default)]
struct BlockState {
    stats: Option<BatchStats>,
    saved: Option<Saved>,
}

/// The forward pass's convolution output and the normalisation it used.
struct Saved {
    y: Pooled,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

struct ConvBlockOp {
    geo: Geometry,
    norm: BlockNorm,
    /// Whether to keep `y` for a backward pass (some input tracks gradients).
    keep: bool,
    state: Arc<Mutex<BlockState>>,
}

/// Sum and sum of squares of a slice in f64 (f32 lanes flushed every few thousand values).
fn sum_sq(x: &[f32]) -> (f64, f64) {
    let (mut s, mut q) = (0f64, 0f64);
    for block in x.chunks(4096) {
        let (mut a, mut a2) = ([0f32; 16], [0f32; 16]);
        let mut it = block.chunks_exact(16);
        for c in &mut it {
            for i in 0..16 {
                a[i] += c[i];
                a2[i] += c[i] * c[i];
            }
        }
        for &v in it.remainder() {
            a[0] += v;
            a2[0] += v * v;
        }
        s += a.iter().map(|&v| f64::from(v)).sum::<f64>();
        q += a2.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    (s, q)
}

/// Index (top-left, top-right, bottom-left, bottom-right) and value of a 2×2 window's first maximum: PyTorch's
/// choice on ties.
#[inline]
fn window_max(v: [f32; 4]) -> (usize, f32) {
    let mut best = (0, v[0]);
    for (i, &x) in v.iter().enumerate().skip(1) {
        if x > best.1 {
            best = (i, x);
        }
    }
    best
}

impl ConvBlockOp {
    /// `y = W·im2col(x)`, chunk by chunk, into a chunk-major buffer.
    fn convolve(&self, x: &[f32], wt: &[f32]) -> Result<Vec<f32>> {
        let g = self.geo;
        let (hw, ckk) = (g.hw(), g.ckk());
        let mut y = take_buffer(g.o * g.b * hw);
        let chunk_len = g.o * g.nb * hw;
        y.par_chunks_mut(chunk_len)
            .enumerate()
            .try_for_each(|(j, yc)| -> Result<()> {
                let (b0, n) = g.chunk(j);
                SCRATCH.with_borrow_mut(|(cols, _)| {
                    cols.resize(ckk * n * hw, 0.0);
                    g.im2col(x, b0, n, cols);
                    matmul(
                        MatMut::row_major(yc, g.o, n * hw)?,
                        MatRef::row_major(wt, g.o, ckk)?,
                        MatRef::row_major(cols, ckk, n * hw)?,
                        false,
                        1,
                    )
                })
            })?;
        Ok(y)
    }

    /// Per-channel mean and biased variance of `y`, partial sums per (channel, chunk) added in chunk order.
    fn batch_stats(&self, y: &[f32]) -> BatchStats {
        let g = self.geo;
        let chunks = g.chunks();
        let parts: Vec<(f64, f64)> = (0..g.o * chunks)
            .into_par_iter()
            .map(|i| {
                let (oc, j) = (i / chunks, i % chunks);
                let (_, n) = g.chunk(j);
                let row = g.chunk_offset(j) + oc * n * g.hw();
                sum_sq(&y[row..row + n * g.hw()])
            })
            .collect();
        let count = (g.b * g.hw()) as f64;
        let mut mean = vec![0f32; g.o];
        let mut var = vec![0f32; g.o];
        for oc in 0..g.o {
            let (s, q) = parts[oc * chunks..(oc + 1) * chunks]
                .iter()
                .fold((0f64, 0f64), |(s, q), &(a, b)| (s + a, q + b));
            let m = s / count;
            mean[oc] = m as f32;
            var[oc] = (q / count - m * m).max(0.0) as f32;
        }
        (mean, var)
    }

    /// `max_pool_2x2(relu(y·scale + shift))` into NCHW.
    fn pool(&self, y: &[f32], coeffs: &[(f32, f32)]) -> Vec<f32> {
        let g = self.geo;
        let (hp, wp) = g.pooled();
        let mut out = vec![0f32; g.b * g.o * hp * wp];
        if out.is_empty() {
            return out;
        }
        out.par_chunks_mut(hp * wp)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (bi, oc) = (idx / g.o, idx % g.o);
                let (scale, shift) = coeffs[oc];
                let src = &y[g.plane(bi, oc)..][..g.hw()];
                for py in 0..hp {
                    let (r0, r1) = (
                        &src[2 * py * g.wo..][..g.wo],
                        &src[(2 * py + 1) * g.wo..][..g.wo],
                    );
                    for (px, d) in dst[py * wp..(py + 1) * wp].iter_mut().enumerate() {
                        let z = |v: f32| v * scale + shift;
                        let m = z(r0[2 * px])
                            .max(z(r0[2 * px + 1]))
                            .max(z(r1[2 * px]))
                            .max(z(r1[2 * px + 1]));
                        *d = m.max(0.0);
                    }
                }
            });
        out
    }

    /// The gradient of the convolution output from the pooled output's gradient `gout` (NCHW), through pool, ReLU
    /// and the normalisation; also `(Σ dz·ŷ, Σ dz)` per channel (γ's and β's gradients).
    fn dy(
        &self,
        saved: &Saved,
        gamma: &[f32],
        beta: &[f32],
        gout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let g = self.geo;
        let (hp, wp) = g.pooled();
        let hw = g.hw();
        let y = &saved.y.0;
        let coeffs = coefficients(gamma, beta, &saved.mean, &saved.invstd);
        let mut dy = take_buffer(y.len());
        // Pass 1, one task per chunk: route each pooled gradient to its window's first maximum (if that passed the
        // ReLU), zero elsewhere, and sum dz and dz·ŷ per channel.
        let parts: Vec<Vec<(f64, f64)>> = dy
            .par_chunks_mut(g.o * g.nb * hw)
            .enumerate()
            .map(|(j, dc)| {
                let (b0, n) = g.chunk(j);
                dc.fill(0.0);
                let mut sums = vec![(0f64, 0f64); g.o];
                for (oc, sum) in sums.iter_mut().enumerate() {
                    let (scale, shift) = coeffs[oc];
                    let (mean, invstd) = (saved.mean[oc], saved.invstd[oc]);
                    for i in 0..n {
                        let bi = b0 + i;
                        let p0 = g.plane(bi, oc);
                        let src = &y[p0..][..hw];
                        let local = p0 - g.chunk_offset(j);
                        let d = &mut dc[local..][..hw];
                        let gp = &gout[(bi * g.o + oc) * hp * wp..][..hp * wp];
                        for py in 0..hp {
                            for px in 0..wp {
                                let gv = gp[py * wp + px];
                                let p = 2 * py * g.wo + 2 * px;
                                let pos = [p, p + 1, p + g.wo, p + g.wo + 1];
                                let (k, m) = window_max(pos.map(|q| src[q] * scale + shift));
                                if m > 0.0 && gv != 0.0 {
                                    d[pos[k]] = gv;
                                    sum.0 += f64::from(gv);
                                    sum.1 +=
                                        f64::from(gv) * f64::from((src[pos[k]] - mean) * invstd);
                                }
                            }
                        }
                    }
                }
                sums
            })
            .collect();
        let mut sdz = vec![0f64; g.o];
        let mut sdzx = vec![0f64; g.o];
        for part in &parts {
            for (oc, &(a, b)) in part.iter().enumerate() {
                sdz[oc] += a;
                sdzx[oc] += b;
            }
        }
        // Pass 2: dy = a·dz (constant normalisation) or, with batch statistics,
        // dy = γ·invstd·(dz − mean(dz) − ŷ·mean(dz·ŷ)), ŷ = (y − mean)·invstd.
        let batch = matches!(self.norm, BlockNorm::Batch { .. });
        let count = (g.b * hw) as f64;
        let lin: Vec<(f32, f32, f32)> = (0..g.o)
            .map(|oc| {
                let (mean, invstd) = (saved.mean[oc], saved.invstd[oc]);
                let a = gamma[oc] * invstd;
                if batch {
                    let (mdz, mdzx) = ((sdz[oc] / count) as f32, (sdzx[oc] / count) as f32);
                    let k_y = -a * invstd * mdzx;
                    (a, k_y, -a * mdz - k_y * mean)
                } else {
                    (a, 0.0, 0.0)
                }
            })
            .collect();
        dy.par_chunks_mut(g.o * g.nb * hw)
            .enumerate()
            .for_each(|(j, dc)| {
                let (_, n) = g.chunk(j);
                let yc = &y[g.chunk_offset(j)..][..dc.len()];
                for (oc, (drow, yrow)) in dc
                    .chunks_exact_mut(n * hw)
                    .zip(yc.chunks_exact(n * hw))
                    .enumerate()
                {
                    let (a, k_y, k0) = lin[oc];
                    if batch {
                        for (dv, &yv) in drow.iter_mut().zip(yrow) {
                            *dv = a * *dv + yv * k_y + k0;
                        }
                    } else if a != 1.0 {
                        for dv in drow.iter_mut() {
                            *dv *= a;
                        }
                    }
                }
            });
        let dgamma = sdzx.iter().map(|&v| v as f32).collect();
        let dbeta = sdz.iter().map(|&v| v as f32).collect();
        (dy, dgamma, dbeta)
    }

    /// `dW = Σ dy·colsᵀ` and, if `want_dx`, `dx = col2im(Wᵀ·dy)` (NCHW), chunk by chunk in [`GRAD_GROUPS`]
    /// groups of consecutive chunks.
    fn conv_grads(
        &self,
        x: &[f32],
        wt: &[f32],
        dy: &[f32],
        want_dx: bool,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
        let g = self.geo;
        let (hw, ckk) = (g.hw(), g.ckk());
        let chunks = g.chunks();
        let groups = GRAD_GROUPS.min(chunks);
        // Group `q` holds chunks `bounds[q] .. bounds[q + 1]`, so its images are contiguous in `dx`.
        let bounds: Vec<usize> = (0..=groups).map(|q| q * chunks / groups).collect();
        let image = g.c * g.h * g.w;
        let mut dx = if want_dx {
            vec![0f32; g.b * image]
        } else {
            Vec::new()
        };
        let mut dx_parts: Vec<&mut [f32]> = Vec::with_capacity(groups);
        let mut rest = dx.as_mut_slice();
        for q in 0..groups {
            let images = if want_dx {
                let (first, _) = g.chunk(bounds[q]);
                let last = g.chunk(bounds[q + 1] - 1);
                last.0 + last.1 - first
            } else {
                0
            };
            let (head, tail) = rest.split_at_mut(images * image);
            dx_parts.push(head);
            rest = tail;
        }
        let partial: Vec<Vec<f32>> = dx_parts
            .into_par_iter()
            .enumerate()
            .map(|(q, dxq)| -> Result<Vec<f32>> {
                let mut dw = vec![0f32; g.o * ckk];
                let first_image = g.chunk(bounds[q]).0;
                for j in bounds[q]..bounds[q + 1] {
                    let (b0, n) = g.chunk(j);
                    let dyc =
                        MatRef::row_major(&dy[g.chunk_offset(j)..][..g.o * n * hw], g.o, n * hw)?;
                    SCRATCH.with_borrow_mut(|(cols, dcols)| -> Result<()> {
                        cols.resize(ckk * n * hw, 0.0);
                        g.im2col(x, b0, n, cols);
                        matmul(
                            MatMut::row_major(&mut dw, g.o, ckk)?,
                            dyc,
                            MatRef::row_major(cols, ckk, n * hw)?.t(),
                            j > bounds[q],
                            1,
                        )?;
                        if want_dx {
                            dcols.resize(ckk * n * hw, 0.0);
                            matmul(
                                MatMut::row_major(dcols, ckk, n * hw)?,
                                MatRef::row_major(wt, g.o, ckk)?.t(),
                                dyc,
                                false,
                                1,
                            )?;
                            let off = (b0 - first_image) * image;
                            g.col2im(dcols, n, &mut dxq[off..off + n * image]);
                        }
                        Ok(())
                    })?;
                }
                Ok(dw)
            })
            .collect::<Result<_>>()?;
        let mut dw = vec![0f32; g.o * ckk];
        for p in &partial {
            for (d, v) in dw.iter_mut().zip(p) {
                *d += v;
            }
        }
        Ok((dw, want_dx.then_some(dx)))
    }
}

/// Per-channel `(scale, shift)` so that `z = y·scale + shift`.
fn coefficients(gamma: &[f32], beta: &[f32], mean: &[f32], invstd: &[f32]) -> Vec<(f32, f32)> {
    (0..gamma.len())
        .map(|c| {
            let scale = gamma[c] * invstd[c];
            (scale, beta[c] - mean[c] * scale)
        })
        .collect()
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
        let (gamma, beta) = affine.split_at(g.o);
        let y = self.convolve(x, wt)?;
        let (mean, invstd, stats) = match &self.norm {
            BlockNorm::Batch { eps } => {
                let (mean, var) = self.batch_stats(&y);
                let invstd = var
                    .iter()
                    .map(|&v| (1.0 / (f64::from(v) + eps).sqrt()) as f32)
                    .collect();
                (mean.clone(), invstd, Some((mean, var)))
            }
            BlockNorm::Fixed { mean, invstd } => (mean.clone(), invstd.clone(), None),
        };
        let out = self.pool(&y, &coefficients(gamma, beta, &mean, &invstd));
        let y = Pooled(y);
        let mut state = lock(&self.state);
        state.stats = stats;
        if self.keep {
            state.saved = Some(Saved { y, mean, invstd });
        }
        let (hp, wp) = g.pooled();
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, hp, wp))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        affine: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.geo;
        let saved = lock(&self.state).saved.take();
        let Some(saved) = saved else {
            bail!("convolution block: backward pass without a kept forward pass (or a second backward pass)")
        };
        let params = affine.flatten_all()?.to_vec1::<f32>()?;
        if params.len() != 2 * g.o {
            bail!("convolution block: the affine parameters changed after the forward pass")
        }
        let (gamma, beta) = params.split_at(g.o);
        let (dy, dgamma, dbeta) = with_f32(grad, "convolution block gradient", |gout| {
            let (hp, wp) = g.pooled();
            if gout.len() != g.b * g.o * hp * wp {
                bail!("convolution block: the output gradient does not match the forward pass")
            }
            Ok(self.dy(&saved, gamma, beta, gout))
        })?;
        drop(saved);
        let dy = Pooled(dy);
        let want_dx = x.track_op();
        let (dw, dx) = with_f32(x, "convolution block input", |xv| {
            with_f32(weight, "convolution block weight", |wv| {
                self.conv_grads(xv, wv, &dy.0, want_dx)
            })
        })?;
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        let dw = crate::param_grads::offer(weight, Tensor::from_vec(dw, weight.shape(), dev)?);
        let mut da = dgamma;
        da.extend(dbeta);
        let da = Tensor::from_vec(da, affine.shape(), dev)?;
        Ok((dx, dw, Some(da)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, probe_grads, rnd};
    use candle_core::{Device, Var};

    /// (b, c, h, w, out, k, pad): odd sizes, one image, one channel, 1×1 and 5×5 kernels, no and large padding,
    /// and batches big enough to span several chunks (the last one partial).
    const CASES: [(usize, usize, usize, usize, usize, usize, usize); 7] = [
        (3, 2, 8, 10, 4, 3, 1),
        (2, 1, 7, 9, 5, 3, 1),
        (2, 2, 9, 7, 3, 5, 2),
        (1, 3, 6, 5, 2, 3, 0),
        (2, 2, 5, 5, 3, 1, 0),
        (2, 1, 4, 3, 2, 3, 2),
        (37, 4, 16, 24, 8, 3, 1),
    ];

    fn norm_for(kind: usize, o: usize) -> BlockNorm {
        match kind {
            0 => BlockNorm::Batch { eps: 1e-5 },
            1 => BlockNorm::Fixed {
                mean: (0..o).map(|i| 0.1 * i as f32 - 0.2).collect(),
                invstd: (0..o).map(|i| 0.5 + 0.25 * i as f32).collect(),
            },
            _ => BlockNorm::Fixed {
                mean: vec![0.0; o],
                invstd: vec![1.0; o],
            },
        }
    }

    #[test]
    fn fused_block_matches_candles_generic_ops_values_and_gradients() {
        for (i, &(b, c, h, w, o, k, pad)) in CASES.iter().enumerate() {
            let geo = Geometry::new(b, c, h, w, o, k, pad).unwrap();
            if i == CASES.len() - 1 {
                assert!(
                    geo.chunks() >= 3 && b % geo.nb != 0,
                    "the last case spans several chunks, one partial"
                );
            }
            for kind in 0..3 {
                for input_grad in [true, false] {
                    let what = format!("case {i}, norm {kind}, input gradient {input_grad}");
                    let x =
                        Var::from_tensor(&(rnd(&[b, c, h, w], i as u64) * 2.0).unwrap()).unwrap();
                    let xt = if input_grad {
                        x.as_tensor().clone()
                    } else {
                        x.as_tensor().detach()
                    };
                    let wt = Var::from_tensor(&rnd(&[o, c, k, k], 40 + i as u64)).unwrap();
                    let affine = Var::from_tensor(
                        &Tensor::stack(
                            &[
                                (rnd(&[o], 60 + i as u64) + 1.0).unwrap(),
                                rnd(&[o], 80 + i as u64),
                            ],
                            0,
                        )
                        .unwrap(),
                    )
                    .unwrap();
                    let run = |fused: bool| {
                        let (out, stats) = conv_block(
                            &xt,
                            wt.as_tensor(),
                            affine.as_tensor(),
                            pad,
                            norm_for(kind, o),
                            fused,
                        )
                        .unwrap();
                        let probe = rnd(out.dims(), 90 + i as u64);
                        let grads = probe_grads(&out, &probe);
                        (out, stats, grads)
                    };
                    let (fo, fs, fg) = run(true);
                    let (ro, rs, rg) = run(false);
                    assert_close(&what, &fo, &ro, 1e-5);
                    assert_eq!(
                        fs.is_some(),
                        kind == 0,
                        "{what}: statistics returned for batch norm only"
                    );
                    if let (Some((fm, fv)), Some((rm, rv))) = (fs, rs) {
                        for (a, b) in fm.iter().zip(&rm).chain(fv.iter().zip(&rv)) {
                            assert!(
                                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                                "{what}: statistics {a} vs {b}"
                            );
                        }
                    }
                    for (name, v) in [("affine", &affine), ("weight", &wt)] {
                        assert_close(
                            &format!("{what}: {name} gradient"),
                            fg.get(v.as_tensor()).unwrap(),
                            rg.get(v.as_tensor()).unwrap(),
                            1e-4,
                        );
                    }
                    match (fg.get(x.as_tensor()), rg.get(x.as_tensor())) {
                        (Some(a), Some(b)) => {
                            assert_close(&format!("{what}: input gradient"), a, b, 1e-4)
                        }
                        (None, None) => assert!(!input_grad),
                        _ => panic!("{what}: input gradient present on one path only"),
                    }
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (b, c, h, w, o) = (21, 16, 16, 48, 8);
        let x = rnd(&[b, c, h, w], 3);
        let wt = Var::from_tensor(&rnd(&[o, c, 3, 3], 4)).unwrap();
        let affine = Var::from_tensor(
            &Tensor::stack(
                &[
                    Tensor::ones(o, candle_core::DType::F32, &Device::Cpu).unwrap(),
                    rnd(&[o], 5),
                ],
                0,
            )
            .unwrap(),
        )
        .unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (out, stats) = conv_block(
                    &x,
                    wt.as_tensor(),
                    affine.as_tensor(),
                    1,
                    BlockNorm::Batch { eps: 1e-5 },
                    true,
                )
                .unwrap();
                let g = out.sum_all().unwrap().backward().unwrap();
                (
                    out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    stats,
                    g.get(wt.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn the_buffer_pool_reuses_exact_sizes_and_stays_bounded() {
        // Other tests share the pool: use sizes no block here produces.
        let n = 12_345;
        give_buffer(vec![7.0; n]);
        let v = take_buffer(n);
        assert_eq!(
            (v.len(), v[0]),
            (n, 7.0),
            "a returned buffer of the same length is reused as it is"
        );
        give_buffer(vec![0.0; POOL_VALUES + 1]);
        for _ in 0..3 {
            give_buffer(vec![0.0; POOL_VALUES / 2 + 1]);
        }
        let held: usize = lock(&POOL).iter().map(Vec::len).sum();
        assert!(held <= POOL_VALUES, "{held} values held");
    }

    #[test]
    fn mismatched_shapes_and_inference_backward_are_errors() {
        let x = rnd(&[2, 3, 6, 6], 1);
        let wt = rnd(&[4, 2, 3, 3], 2);
        let affine = rnd(&[2, 4], 3);
        let norm = || BlockNorm::Batch { eps: 1e-5 };
        assert!(
            conv_block(&x, &wt, &affine, 1, norm(), true).is_err(),
            "channel mismatch"
        );
        let wt = rnd(&[4, 3, 3, 3], 2);
        assert!(
            conv_block(&x, &wt, &rnd(&[2, 5], 3), 1, norm(), true).is_err(),
            "affine mismatch"
        );
        assert!(
            conv_block(&rnd(&[2, 3, 1, 1], 1), &wt, &affine, 0, norm(), true).is_err(),
            "kernel too large"
        );
        let bad = BlockNorm::Fixed {
            mean: vec![0.0; 3],
            invstd: vec![1.0; 4],
        };
        assert!(
            conv_block(&x, &wt, &affine, 1, bad, true).is_err(),
            "statistics mismatch"
        );
        // Nothing tracks gradients: y is not kept, and the output has no graph to go back through.
        let (out, stats) = conv_block(&x, &wt, &affine, 1, norm(), true).unwrap();
        assert_eq!(out.dims(), &[2, 4, 3, 3]);
        let (mean, _) = stats.unwrap();
        // Mean over all but the channel axis.
        let reference = x
            .conv2d(&wt, 1, 1, 1, 1)
            .unwrap()
            .transpose(0, 1)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .mean(candle_core::D::Minus1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in mean.iter().zip(&reference) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
