//! Channel-major convolution blocks (issues 4 and 7).
//!
//! candle 0.11's CPU convolution backward (a naive `conv_transpose2d`) and its chains of elementwise ops (each a
//! fresh allocation and a spinning thread barrier) trained plate-cnn at 16 img/s, later ~100–180 img/s on 2 cores.
//! Here activations stay *channel-major*, `(c, b, h, w)`, from the first convolution to the last pool:
//!
//! - a convolution is an explicit im2col into `(c·k·k, b·ho·wo)` followed by one GEMM with the weight viewed as
//!   `(out, c·k·k)`: the column order `(c, ky, kx)` is PyTorch's weight layout, so the weight needs no permute, and
//!   im2col/col2im copy whole contiguous image rows;
//! - BatchNorm (or a bias) + ReLU + 2×2 max-pool is one fused op with a hand-written backward, so a block costs
//!   one statistics pass, one pass forward and two passes backward instead of ~15 candle ops;
//! - every pass is split over rayon's threads (both cores).
//!
//! On the CPU these are candle `CustomOp`s; on other devices (CUDA) the same functions fall back to generic candle
//! ops (pad/narrow/stack, reshape/max), so the GPU keeps using candle's kernels. The tests check the fast ops
//! against candle's own convolution, BatchNorm chain and pooling, values and gradients. Weights stay in PyTorch's
//! `(out, in, kh, kw)` layout: the wire format does not change.

use std::sync::Mutex;

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{what}: only f32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// im2col for stride 1 on a channel-major `(c, b, h, w)` input: `(c·k·k, b·ho·wo)`, zero padding `pad`, rows
/// ordered `(c, ky, kx)`.
#[derive(Debug, Clone, Copy)]
struct Im2Col {
    k: usize,
    pad: usize,
}

impl Im2Col {
    fn out_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (hp, wp) = (h + 2 * self.pad, w + 2 * self.pad);
        if hp < self.k || wp < self.k {
            bail!(
                "im2col: {h}x{w} input is smaller than the {0}x{0} kernel",
                self.k
            )
        }
        Ok((hp - self.k + 1, wp - self.k + 1))
    }

    /// For kernel offset `kx`: the output columns `lo..hi` whose input column `ox + kx - pad` lies inside `0..w`.
    fn cols(&self, kx: usize, w: usize, wo: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).min(wo);
        let hi = (w + self.pad).saturating_sub(kx).min(wo);
        (lo, hi.max(lo))
    }

    /// The input row for output row `oy` and kernel offset `ky`, if inside the image.
    fn row(&self, oy: usize, ky: usize, h: usize) -> Option<usize> {
        (oy + ky).checked_sub(self.pad).filter(|&iy| iy < h)
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "ferry-im2col-cm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "im2col")?;
        let (c, b, h, w) = l.shape().dims4()?;
        let (ho, wo) = self.out_hw(h, w)?;
        let k = self.k;
        let mut out = vec![0f32; c * k * k * b * ho * wo];
        // One task per (row, image): `ho·wo` contiguous outputs read from one input plane.
        out.par_chunks_mut(ho * wo)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (row, bi) = (idx / b, idx % b);
                let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
                let src = &x[(ci * b + bi) * h * w..][..h * w];
                let (lo, hi) = self.cols(kx, w, wo);
                for oy in 0..ho {
                    let Some(iy) = self.row(oy, ky, h) else {
                        continue;
                    };
                    let s0 = iy * w + lo + kx - self.pad;
                    dst[oy * wo + lo..oy * wo + hi].copy_from_slice(&src[s0..s0 + hi - lo]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((c * k * k, b * ho * wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &Col2Im(*self))?))
    }
}

/// The adjoint of [`Im2Col`]: sums column gradients back into an image of `arg`'s shape.
struct Col2Im(Im2Col);

impl CustomOp2 for Col2Im {
    fn name(&self) -> &'static str {
        "ferry-col2im-cm"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s2, l2, "col2im")?;
        let (c, b, h, w) = l1.shape().dims4()?;
        let op = self.0;
        let (ho, wo) = op.out_hw(h, w)?;
        let k = op.k;
        if g.len() != c * k * k * b * ho * wo {
            bail!(
                "col2im: gradient has {} values, expected {}",
                g.len(),
                c * k * k * b * ho * wo
            )
        }
        let mut out = vec![0f32; c * b * h * w];
        // One task per input plane (channel, image): only that channel's k·k rows write to it.
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(idx, dst)| {
                let (ci, bi) = (idx / b, idx % b);
                for ky in 0..k {
                    for kx in 0..k {
                        let row = (ci * k + ky) * k + kx;
                        let src = &g[(row * b + bi) * ho * wo..][..ho * wo];
                        let (lo, hi) = op.cols(kx, w, wo);
                        for oy in 0..ho {
                            let Some(iy) = op.row(oy, ky, h) else {
                                continue;
                            };
                            let d0 = iy * w + lo + kx - op.pad;
                            for (d, s) in dst[d0..d0 + hi - lo]
                                .iter_mut()
                                .zip(&src[oy * wo + lo..oy * wo + hi])
                            {
                                *d += s;
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// im2col on any device with its backward: the CPU custom op, or pad/narrow/stack elsewhere (the tests' entry
/// point; the model goes through [`conv2d_cm`]).
#[cfg(test)]
fn im2col(x: &Tensor, k: usize, pad: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    if x.device().is_cpu() {
        return x.apply_op1(Im2Col { k, pad });
    }
    im2col_generic(&x, k, pad)
}

fn im2col_generic(x: &Tensor, k: usize, pad: usize) -> Result<Tensor> {
    let (c, b, h, w) = x.dims4()?;
    let (ho, wo) = Im2Col { k, pad }.out_hw(h, w)?;
    let xp = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let mut parts = Vec::with_capacity(k * k);
    for ky in 0..k {
        for kx in 0..k {
            parts.push(xp.narrow(2, ky, ho)?.narrow(3, kx, wo)?);
        }
    }
    // (c, k·k, b, ho, wo): rows (c, ky, kx).
    Tensor::stack(&parts, 1)?.reshape((c * k * k, b * ho * wo))
}

/// NCHW `(b, c, h, w)` → channel-major `(c, b, h, w)` (free for one channel).
pub(crate) fn to_channel_major(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if c == 1 {
        return x.reshape((1, b, h, w));
    }
    x.transpose(0, 1)?.contiguous()
}

/// Channel-major `(c, b, h, w)` → `(b, c·h·w)`, PyTorch's flatten order for the following linear layer.
pub(crate) fn flatten_channel_major(x: &Tensor) -> Result<Tensor> {
    x.transpose(0, 1)?.contiguous()?.flatten_from(1)
}

/// Stride-1 convolution of a channel-major `(c, b, h, w)` tensor with a PyTorch-layout weight `(out, c, k, k)`:
/// the output as channel-major `(out, b·ho·wo)` and `(b, ho, wo)`. No bias (it is fused into
/// [`affine_relu_pool`]).
pub(crate) fn conv2d_cm(
    x: &Tensor,
    weight: &Tensor,
    pad: usize,
) -> Result<(Tensor, (usize, usize, usize))> {
    let (_, b, h, w) = x.dims4()?;
    let (o, c, k, _) = weight.dims4()?;
    let op = Im2Col { k, pad };
    let (ho, wo) = op.out_hw(h, w)?;
    let w2 = weight.reshape((o, c * k * k))?;
    let x = x.contiguous()?;
    if !x.device().is_cpu() {
        return Ok((w2.matmul(&im2col_generic(&x, k, pad)?)?, (b, ho, wo)));
    }
    // The product is computed outside the graph and attached to it by `ConvGrad`, whose backward computes the two
    // gradients directly: candle's own matmul backward would materialise (and zero-fill, then add) a gradient for
    // the whole column matrix, 9× the input, even for the input images that need none.
    let cols = x.apply_op1_no_bwd(&op)?;
    let y = w2.detach().matmul(&cols)?;
    let y = x.apply_op3(&w2, &y, ConvGrad { op, cols })?;
    Ok((y, (b, ho, wo)))
}

/// Attaches a convolution's output `(x, w2, y) → y` to the graph with the backward `dW = dy·colsᵀ`,
/// `dx = col2im(Wᵀ·dy)` (the latter only when `x` needs a gradient).
struct ConvGrad {
    op: Im2Col,
    /// im2col of `x`, from the forward pass.
    cols: Tensor,
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "ferry-conv-grad"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s3, l3, "convolution")?;
        Ok((CpuStorage::F32(y.to_vec()), l3.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w2: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        let dw = g.matmul(&self.cols.t()?)?;
        let dx = if x.track_op() {
            let dcols = w2.detach().t()?.matmul(&g)?;
            Some(x.apply_op2_no_bwd(&dcols, &Col2Im(self.op))?)
        } else {
            None
        };
        Ok((dx, Some(dw), None))
    }
}

/// Sum and sum of squares of a slice, in f64 (f32 lanes flushed every few thousand values).
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

/// Per-channel mean and biased variance of a channel-major `(c, …)` tensor, as `(2, c)`.
struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "ferry-channel-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "channel statistics")?;
        let c = l.shape().dims()[0];
        let n = x.len() / c.max(1);
        // Each channel's plane is split into pieces so that both cores work even with few channels; the pieces are
        // summed in a fixed order, so the result does not depend on the thread count.
        const PIECES: usize = 8;
        let piece = n.div_ceil(PIECES).max(1);
        let parts: Vec<(f64, f64)> = (0..c * PIECES)
            .into_par_iter()
            .map(|i| {
                let plane = &x[(i / PIECES) * n..][..n];
                let start = ((i % PIECES) * piece).min(n);
                sum_sq(&plane[start..(start + piece).min(n)])
            })
            .collect();
        let mut out = vec![0f32; 2 * c];
        for ci in 0..c {
            let (s, q) = parts[ci * PIECES..(ci + 1) * PIECES]
                .iter()
                .fold((0f64, 0f64), |(s, q), &(a, b)| (s + a, q + b));
            let mean = s / n as f64;
            out[ci] = mean as f32;
            out[c + ci] = (q / n as f64 - mean * mean).max(0.0) as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// Per-channel batch mean and biased variance of a channel-major `(c, …)` CPU tensor.
pub(crate) fn channel_stats(y: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let y = y.contiguous()?;
    let c = y.dims().first().copied().unwrap_or(0);
    if c == 0 || y.elem_count() == 0 {
        bail!("channel statistics of an empty tensor")
    }
    let s = y.apply_op1_no_bwd(&ChannelStats)?.to_vec2::<f32>()?;
    Ok((s[0].clone(), s[1].clone()))
}

/// The per-channel normalisation in front of [`affine_relu_pool`]: `z = (y - mean)·invstd·γ + β`.
#[derive(Debug, Clone)]
pub(crate) struct Normalise {
    /// Per-channel mean subtracted first.
    pub mean: Vec<f32>,
    /// Per-channel `1/√(var + eps)`.
    pub invstd: Vec<f32>,
    /// Whether `mean` and `invstd` are this batch's statistics of `y` (BatchNorm training: the backward pass then
    /// differentiates through them) or constants (running statistics, or a plain bias with mean 0, invstd 1).
    pub batch_stats: bool,
}

/// Fused `max_pool_2x2(relu((y - mean)·invstd·γ + β))` on channel-major `(c, b·h·w)` → `(c, b, h/2, w/2)` (odd
/// trailing rows and columns dropped, as in PyTorch), with its backward.
#[derive(Debug, Clone)]
struct AffineReluPool {
    norm: Normalise,
    /// `(b, h, w)` of the input.
    bhw: (usize, usize, usize),
}

impl AffineReluPool {
    /// Per-channel (scale, shift) so that `z = y·scale + shift`.
    fn coeffs(&self, gamma: &[f32], beta: &[f32]) -> Vec<(f32, f32)> {
        let n = &self.norm;
        (0..gamma.len())
            .map(|c| {
                let scale = gamma[c] * n.invstd[c];
                (scale, beta[c] - n.mean[c] * scale)
            })
            .collect()
    }

    /// Checks the input's size and the per-channel parameters; returns `(c, b, h, w)`.
    fn check(
        &self,
        l: &Layout,
        gamma: &[f32],
        beta: &[f32],
    ) -> Result<(usize, usize, usize, usize)> {
        let c = l.dims().first().copied().unwrap_or(0);
        let (b, h, w) = self.bhw;
        if l.shape().elem_count() != c * b * h * w {
            bail!(
                "affine-relu-pool: input {:?} is not {c} channels of {b}x{h}x{w}",
                l.dims()
            )
        }
        let n = &self.norm;
        if [gamma.len(), beta.len(), n.mean.len(), n.invstd.len()] != [c; 4] {
            bail!("affine-relu-pool: per-channel parameters do not match {c} channels")
        }
        Ok((c, b, h, w))
    }
}

/// Index (0..4, order: top-left, top-right, bottom-left, bottom-right) and value of the first maximum of a 2×2
/// window, PyTorch's choice on ties.
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

impl CustomOp3 for AffineReluPool {
    fn name(&self) -> &'static str {
        "ferry-affine-relu-pool"
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
        let y = f32_slice(s1, l1, "affine-relu-pool")?;
        let gamma = f32_slice(s2, l2, "affine-relu-pool")?;
        let beta = f32_slice(s3, l3, "affine-relu-pool")?;
        let (c, b, h, w) = self.check(l1, gamma, beta)?;
        let co = self.coeffs(gamma, beta);
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![0f32; c * b * ho * wo];
        if !out.is_empty() {
            out.par_chunks_mut(ho * wo)
                .enumerate()
                .for_each(|(idx, dst)| {
                    let (scale, shift) = co[idx / b];
                    let src = &y[idx * h * w..][..h * w];
                    for oy in 0..ho {
                        let (r0, r1) = (&src[2 * oy * w..][..w], &src[(2 * oy + 1) * w..][..w]);
                        for (ox, d) in dst[oy * wo..(oy + 1) * wo].iter_mut().enumerate() {
                            let z = |v: f32| v * scale + shift;
                            let m = z(r0[2 * ox])
                                .max(z(r0[2 * ox + 1]))
                                .max(z(r1[2 * ox]))
                                .max(z(r1[2 * ox + 1]));
                            *d = m.max(0.0);
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((c, b, ho, wo))))
    }

    fn bwd(
        &self,
        y: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let params = Tensor::stack(&[gamma, beta], 0)?;
        let bwd = AffineReluPoolBwd {
            op: self.clone(),
            params: params.flatten_all()?.to_vec1::<f32>()?,
            sums: Mutex::new(Vec::new()),
        };
        let dy = y.apply_op2_no_bwd(&g, &bwd)?;
        let sums = bwd.sums.into_inner().unwrap_or_else(|e| e.into_inner());
        let c = gamma.elem_count();
        let dgamma = Tensor::from_vec(sums[c..].to_vec(), gamma.shape(), gamma.device())?;
        let dbeta = Tensor::from_vec(sums[..c].to_vec(), beta.shape(), beta.device())?;
        Ok((Some(dy), Some(dgamma), Some(dbeta)))
    }
}

/// Backward of [`AffineReluPool`]: the image gradient as its output; per-channel `Σ dz` (β's gradient) and
/// `Σ dz·ŷ` (γ's gradient) left in `sums`.
struct AffineReluPoolBwd {
    op: AffineReluPool,
    /// γ then β.
    params: Vec<f32>,
    sums: Mutex<Vec<f32>>,
}

impl CustomOp2 for AffineReluPoolBwd {
    fn name(&self) -> &'static str {
        "ferry-affine-relu-pool-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "affine-relu-pool backward")?;
        let g = f32_slice(s2, l2, "affine-relu-pool backward")?;
        let (gamma, beta) = self.params.split_at(self.params.len() / 2);
        let (c, b, h, w) = self.op.check(l1, gamma, beta)?;
        let (ho, wo) = (h / 2, w / 2);
        if g.len() != c * b * ho * wo {
            bail!(
                "affine-relu-pool backward: gradient has {} values, expected {}",
                g.len(),
                c * b * ho * wo
            )
        }
        let co = self.op.coeffs(gamma, beta);
        let norm = &self.op.norm;
        let plane = b * h * w;
        let mut dy = vec![0f32; c * plane];
        if plane == 0 {
            *self.sums.lock().unwrap_or_else(|e| e.into_inner()) = vec![0.0; 2 * c];
            return Ok((CpuStorage::F32(dy), l1.shape().clone()));
        }
        // One task per channel: route each pooled gradient to its window's first maximum (if that passed the
        // ReLU), accumulate the per-channel sums, then apply BatchNorm's backward to the whole plane.
        let sums: Vec<(f32, f32)> = dy
            .par_chunks_mut(plane)
            .enumerate()
            .map(|(ci, d)| {
                let (scale, shift) = co[ci];
                let (mean, invstd) = (norm.mean[ci], norm.invstd[ci]);
                let src = &y[ci * plane..][..plane];
                let gc = &g[ci * b * ho * wo..][..b * ho * wo];
                let (mut sdz, mut sdzx) = (0f64, 0f64);
                for bi in 0..b {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let gv = gc[(bi * ho + oy) * wo + ox];
                            let p = (bi * h + 2 * oy) * w + 2 * ox;
                            let pos = [p, p + 1, p + w, p + w + 1];
                            let (i, m) = window_max(pos.map(|q| src[q] * scale + shift));
                            if m > 0.0 && gv != 0.0 {
                                d[pos[i]] = gv;
                                sdz += f64::from(gv);
                                sdzx += f64::from(gv) * f64::from((src[pos[i]] - mean) * invstd);
                            }
                        }
                    }
                }
                let a = gamma[ci] * invstd;
                if norm.batch_stats {
                    // dy = γ·invstd·(dz − mean(dz) − ŷ·mean(dz·ŷ)), ŷ = (y − mean)·invstd.
                    let n = plane as f64;
                    let (mdz, mdzx) = ((sdz / n) as f32, (sdzx / n) as f32);
                    let k_y = -a * invstd * mdzx;
                    let k0 = -a * mdz - k_y * mean;
                    for (dv, &yv) in d.iter_mut().zip(src) {
                        *dv = a * *dv + yv * k_y + k0;
                    }
                } else {
                    for dv in d.iter_mut() {
                        *dv *= a;
                    }
                }
                (sdz as f32, sdzx as f32)
            })
            .collect();
        let mut out = vec![0f32; 2 * c];
        for (ci, (s, sx)) in sums.into_iter().enumerate() {
            out[ci] = s;
            out[c + ci] = sx;
        }
        *self.sums.lock().unwrap_or_else(|e| e.into_inner()) = out;
        Ok((CpuStorage::F32(dy), l1.shape().clone()))
    }
}

/// `max_pool_2x2(relu((y - mean)·invstd·γ + β))` of a channel-major CPU tensor `(c, b·h·w)` (`bhw` = `(b, h, w)`)
/// → `(c, b, h/2, w/2)`, fused, differentiable in `y`, `γ` and `β`.
pub(crate) fn affine_relu_pool(
    y: &Tensor,
    bhw: (usize, usize, usize),
    gamma: &Tensor,
    beta: &Tensor,
    norm: Normalise,
) -> Result<Tensor> {
    if !y.device().is_cpu() {
        bail!("affine-relu-pool: the fused op runs on the CPU only")
    }
    y.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        AffineReluPool { norm, bhw },
    )
}

/// 2×2 max-pool with stride 2 of a channel-major `(c, b, h, w)` tensor with generic candle ops (any device).
pub(crate) fn max_pool2_cm(x: &Tensor) -> Result<Tensor> {
    let (c, b, h, w) = x.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    x.narrow(2, 0, 2 * ho)?
        .narrow(3, 0, 2 * wo)?
        .reshape((c, b, ho, 2, wo, 2))?
        .max(5)?
        .max(3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// Deterministic pseudo-random values in [-0.5, 0.5).
    fn rnd(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 10_007) as f32 / 10_007.0 - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
        let scale = b
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .max(1.0);
        let d = max_diff(a, b);
        assert!(
            d <= tol * scale,
            "{what}: max difference {d} (scale {scale})"
        );
    }

    /// Shapes (c, b, h, w, out, k, pad) including odd sizes, 1×1 and 5×5 kernels, no and large padding.
    const CONV_CASES: [(usize, usize, usize, usize, usize, usize, usize); 6] = [
        (3, 2, 8, 10, 4, 3, 1),
        (1, 3, 7, 9, 5, 3, 1),
        (2, 2, 9, 7, 3, 5, 2),
        (3, 1, 6, 5, 2, 3, 0),
        (2, 2, 5, 5, 3, 1, 0),
        (1, 2, 4, 3, 2, 3, 2),
    ];

    #[test]
    fn im2col_matches_the_generic_path_forward_and_backward() {
        for (i, &(c, b, h, w, _, k, pad)) in CONV_CASES.iter().enumerate() {
            let x = Var::from_tensor(&rnd(&[c, b, h, w], i as u64)).unwrap();
            let fast = im2col(x.as_tensor(), k, pad).unwrap();
            let slow = im2col_generic(x.as_tensor(), k, pad).unwrap();
            assert_eq!(max_diff(&fast, &slow), 0.0, "case {i}");
            let wgt = rnd(fast.dims(), 100 + i as u64);
            let gf = (fast * &wgt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gs = (slow * &wgt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_close(
                &format!("im2col gradient, case {i}"),
                gf.get(x.as_tensor()).unwrap(),
                gs.get(x.as_tensor()).unwrap(),
                1e-6,
            );
        }
    }

    #[test]
    fn conv_matches_candles_convolution_values_and_gradients() {
        for (i, &(c, b, h, w, o, k, pad)) in CONV_CASES.iter().enumerate() {
            let x = Var::from_tensor(&rnd(&[b, c, h, w], i as u64)).unwrap();
            let wt = Var::from_tensor(&rnd(&[o, c, k, k], 50 + i as u64)).unwrap();
            let reference = x.as_tensor().conv2d(wt.as_tensor(), pad, 1, 1, 1).unwrap();
            let (ours, (b2, ho, wo)) = conv2d_cm(
                &to_channel_major(x.as_tensor()).unwrap(),
                wt.as_tensor(),
                pad,
            )
            .unwrap();
            let ours = ours
                .reshape((o, b2, ho, wo))
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            assert_close(&format!("conv, case {i}"), &ours, &reference, 1e-5);
            let probe = rnd(reference.dims(), 200 + i as u64);
            let gr = (reference * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let go = (ours * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("input", &x), ("weight", &wt)] {
                assert_close(
                    &format!("conv {name} gradient, case {i}"),
                    go.get(v.as_tensor()).unwrap(),
                    gr.get(v.as_tensor()).unwrap(),
                    1e-5,
                );
            }
        }
    }

    /// candle's reference chain: BatchNorm (batch statistics or constants) as elementwise ops over `(c, n)`, then
    /// ReLU and a 2×2 max-pool.
    fn reference_block(y: &Tensor, gamma: &Tensor, beta: &Tensor, batch: bool) -> Tensor {
        let (c, b, h, w) = y.dims4().unwrap();
        let flat = y.reshape((c, b * h * w)).unwrap();
        let z = if batch {
            let mean = flat.mean_keepdim(1).unwrap();
            let centered = flat.broadcast_sub(&mean).unwrap();
            let var = centered.sqr().unwrap().mean_keepdim(1).unwrap();
            let scale = gamma
                .reshape((c, 1))
                .unwrap()
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap();
            centered.broadcast_mul(&scale).unwrap()
        } else {
            flat.broadcast_mul(&gamma.reshape((c, 1)).unwrap()).unwrap()
        };
        let z = z.broadcast_add(&beta.reshape((c, 1)).unwrap()).unwrap();
        max_pool2_cm(&z.relu().unwrap().reshape((c, b, h, w)).unwrap()).unwrap()
    }

    #[test]
    fn fused_batch_norm_relu_pool_matches_candles_chain_values_and_gradients() {
        // Odd heights and widths (dropped rows/columns still count in the statistics), one image, one channel.
        for (i, &(c, b, h, w)) in [(3, 2, 6, 8), (4, 3, 7, 9), (1, 1, 5, 4), (5, 2, 2, 3)]
            .iter()
            .enumerate()
        {
            for batch in [true, false] {
                let y = Var::from_tensor(&(rnd(&[c, b, h, w], i as u64) * 3.0).unwrap()).unwrap();
                let gamma = Var::from_tensor(&(rnd(&[c], 10 + i as u64) + 1.0).unwrap()).unwrap();
                let beta = Var::from_tensor(&rnd(&[c], 20 + i as u64)).unwrap();
                let norm = if batch {
                    let (mean, var) = channel_stats(y.as_tensor()).unwrap();
                    let invstd = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
                    Normalise {
                        mean,
                        invstd,
                        batch_stats: true,
                    }
                } else {
                    Normalise {
                        mean: vec![0.0; c],
                        invstd: vec![1.0; c],
                        batch_stats: false,
                    }
                };
                let what = format!("case {i}, batch statistics {batch}");
                let y2 = y.as_tensor().reshape((c, b * h * w)).unwrap();
                let ours =
                    affine_relu_pool(&y2, (b, h, w), gamma.as_tensor(), beta.as_tensor(), norm)
                        .unwrap();
                let reference =
                    reference_block(y.as_tensor(), gamma.as_tensor(), beta.as_tensor(), batch);
                assert_close(&what, &ours, &reference, 1e-5);
                let probe = rnd(ours.dims(), 30 + i as u64);
                let go = (ours * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gr = (reference * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (name, v) in [("y", &y), ("gamma", &gamma), ("beta", &beta)] {
                    assert_close(
                        &format!("{what}: {name} gradient"),
                        go.get(v.as_tensor()).unwrap(),
                        gr.get(v.as_tensor()).unwrap(),
                        1e-4,
                    );
                }
            }
        }
    }

    #[test]
    fn channel_statistics_match_candles_mean_and_variance() {
        let y = (rnd(&[3, 5, 7, 9], 4) + 2.0).unwrap();
        let (mean, var) = channel_stats(&y).unwrap();
        let flat = y.reshape((3, 5 * 7 * 9)).unwrap();
        let m = flat.mean(D::Minus1).unwrap();
        let v = flat
            .broadcast_sub(&flat.mean_keepdim(1).unwrap())
            .unwrap()
            .sqr()
            .unwrap()
            .mean(D::Minus1)
            .unwrap();
        let dev = &Device::Cpu;
        assert_close("mean", &Tensor::new(mean, dev).unwrap(), &m, 1e-6);
        assert_close("variance", &Tensor::new(var, dev).unwrap(), &v, 1e-5);
    }

    #[test]
    fn layout_helpers_round_trip_to_pytorch_order() {
        let x = rnd(&[2, 3, 4, 5], 9);
        let cm = to_channel_major(&x).unwrap();
        assert_eq!(cm.dims(), &[3, 2, 4, 5]);
        let flat = flatten_channel_major(&cm).unwrap();
        assert_eq!(max_diff(&flat, &x.flatten_from(1).unwrap()), 0.0);
    }
}
