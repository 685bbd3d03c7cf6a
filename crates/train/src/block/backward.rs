//! The block's backward pass on the CPU: from the pooled output's gradient, `dy` (the convolution output's
//! gradient, through pool, ReLU and the normalisation) and γ's and β's gradients; then `dW = Σ dy·colsᵀ` and, only
//! when the input needs it, `dx = col2im(Wᵀ·dy)`, chunk by chunk with the column matrices recomputed. Partial
//! sums are combined in a fixed order, so the results do not depend on the thread count.

use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use super::forward::coefficients;
use super::{BlockNorm, ConvBlockOp, Saved};
use crate::cpu::with_f32;
use crate::matmul::{matmul, MatMut, MatRef};
use crate::workspace::{lock, Pooled};

/// Fixed number of partial weight gradients summed at the end: more than the cores used here, and independent of
/// the thread count so that the sum's rounding is too.
const GRAD_GROUPS: usize = 4;

impl ConvBlockOp {
    /// The gradients of `x` (when it tracks them), the weight (`None` when handed to the optimizer) and the
    /// affine parameters, from the output's gradient `grad`.
    pub(super) fn backward(
        &self,
        x: &Tensor,
        weight: &Tensor,
        affine: &Tensor,
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
        let want_dx = x.track_op();
        let (dw, dx) = with_f32(x, "convolution block input", |xv| {
            with_f32(weight, "convolution block weight", |wv| {
                self.conv_grads(xv, wv, &dy, want_dx)
            })
        })?;
        let dev = x.device();
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), dev))
            .transpose()?;
        // The weight's gradient goes to the optimizer directly when this op belongs to the open training step.
        let dw = Tensor::from_vec(dw, weight.shape(), dev)?;
        let dw = self.ws.offer(weight, dw);
        let mut da = dgamma;
        da.extend(dbeta);
        let da = Tensor::from_vec(da, affine.shape(), dev)?;
        Ok((dx, dw, Some(da)))
    }

    /// The gradient of the convolution output from the pooled output's gradient `gout` (NCHW), through pool, ReLU
    /// and the normalisation; also `(Σ dz·ŷ, Σ dz)` per channel (γ's and β's gradients).
    fn dy(
        &self,
        saved: &Saved,
        gamma: &[f32],
        beta: &[f32],
        gout: &[f32],
    ) -> (Pooled, Vec<f32>, Vec<f32>) {
        let g = self.geo;
        let (hp, wp) = g.pooled();
        let hw = g.hw();
        let y = &*saved.y;
        let coeffs = coefficients(gamma, beta, &saved.mean, &saved.invstd);
        let mut dy = self.ws.take(y.len());
        // The window size as a constant, so that its loops unroll.
        let route = match (g.pool.rows, g.pool.cols) {
            (1, 1) => route_plane::<1, 1>,
            (2, 1) => route_plane::<2, 1>,
            _ => route_plane::<2, 2>,
        };
        // Pass 1, one task per chunk: route each pooled gradient to its window's first maximum (if that passed the
        // ReLU), zero elsewhere, and sum dz and dz·ŷ per channel.
        let parts: Vec<Vec<(f64, f64)>> = dy
            .par_chunks_mut(g.o * g.nb * hw)
            .enumerate()
            .map(|(j, dc)| {
                let (b0, n) = g.chunk(j);
                let mut sums = vec![(0f64, 0f64); g.o];
                for (oc, sum) in sums.iter_mut().enumerate() {
                    let (mean, invstd) = (saved.mean[oc], saved.invstd[oc]);
                    for i in 0..n {
                        let bi = b0 + i;
                        let p0 = g.plane(bi, oc);
                        let src = &y[p0..][..hw];
                        let local = p0 - g.chunk_offset(j);
                        let d = &mut dc[local..][..hw];
                        let gp = &gout[(bi * g.o + oc) * hp * wp..][..hp * wp];
                        let (dz, dzx) = route(src, g.wo, gp, wp, d, coeffs[oc], (mean, invstd));
                        sum.0 += dz;
                        sum.1 += dzx;
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
                // The weight's gradient transposed, `(c·k·k, out)`: `dWᵀ = cols·dyᵀ` runs gemm's kernel on
                // `c·k·k` rows, where `dW = dy·colsᵀ` had only `out` (2.4× slower for 16→32 channels at 32×96).
                let mut dwt = vec![0f32; ckk * g.o];
                let first_image = g.chunk(bounds[q]).0;
                // The group's column matrix and its gradient, reused for each of its chunks.
                let mut cols = self.ws.take(ckk * g.nb * hw);
                let mut dcols = want_dx.then(|| self.ws.take(ckk * g.nb * hw));
                for j in bounds[q]..bounds[q + 1] {
                    let (b0, n) = g.chunk(j);
                    let dyc =
                        MatRef::row_major(&dy[g.chunk_offset(j)..][..g.o * n * hw], g.o, n * hw)?;
                    let cols = &mut cols[..ckk * n * hw];
                    g.im2col(x, b0, n, cols);
                    matmul(
                        MatMut::row_major(&mut dwt, ckk, g.o)?,
                        MatRef::row_major(cols, ckk, n * hw)?,
                        dyc.t(),
                        j > bounds[q],
                        1,
                    )?;
                    if let Some(dcols) = &mut dcols {
                        let dcols = &mut dcols[..ckk * n * hw];
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
                }
                Ok(dwt)
            })
            .collect::<Result<_>>()?;
        let mut dwt = vec![0f32; ckk * g.o];
        for p in &partial {
            for (d, v) in dwt.iter_mut().zip(p) {
                *d += v;
            }
        }
        let mut dw = vec![0f32; g.o * ckk];
        for (r, row) in dwt.chunks_exact(g.o).enumerate() {
            for (oc, &v) in row.iter().enumerate() {
                dw[oc * ckk + r] = v;
            }
        }
        Ok((dw, want_dx.then_some(dx)))
    }
}

/// Lanes of the f32 partial sums: a row's windows go round them, so the loop over a row vectorises.
const LANES: usize = 16;

/// One plane's pooled gradient `gp` (rows of `wp`) routed into `d` (the convolution output's plane, rows of `wo`;
/// every value written): each value goes to its `R`×`C` window's first maximum of `y·scale + shift` (PyTorch's
/// choice on ties) if that passed the ReLU, zero elsewhere, and to the rows and columns no window covers. Returns
/// `(Σ dz, Σ dz·ŷ)`, ŷ = (y − mean)·invstd.
///
/// Branch-free: whether a value passed the ReLU, and which element of a window is its maximum, are data (half of
/// them either way). The sums are kept in f32 lanes per row of windows and added in f64 per row.
pub(super) fn route_plane<const R: usize, const C: usize>(
    src: &[f32],
    wo: usize,
    gp: &[f32],
    wp: usize,
    d: &mut [f32],
    (scale, shift): (f32, f32),
    (mean, invstd): (f32, f32),
) -> (f64, f64) {
    let hp = gp.len() / wp;
    d[R * hp * wo..].fill(0.0);
    let (mut dz, mut dzx) = (0f64, 0f64);
    for (py, grow) in gp.chunks_exact(wp).enumerate() {
        let mut src_rows = src[R * py * wo..][..R * wo].chunks_exact(wo);
        let win: [&[[f32; C]]; R] = std::array::from_fn(|_| {
            let row = src_rows.next().unwrap_or_default();
            &row.as_chunks::<C>().0[..wp]
        });
        let mut dst_rows = d[R * py * wo..][..R * wo].chunks_exact_mut(wo);
        let mut dwin: [&mut [[f32; C]]; R] = std::array::from_fn(|_| {
            let row = dst_rows.next().unwrap_or_default();
            let (windows, tail) = row.as_chunks_mut::<C>();
            // Columns no window covers (PyTorch drops them).
            tail.fill(0.0);
            windows[wp..].iter_mut().for_each(|w| *w = [0.0; C]);
            &mut windows[..wp]
        });
        let (mut s, mut sx) = ([0f32; LANES], [0f32; LANES]);
        for (px, &gv) in grow.iter().enumerate() {
            // The first maximum: element 0, then any later one strictly above.
            let mut best_v = win[0][px][0];
            let mut best_z = best_v * scale + shift;
            let mut best_i = 0;
            for (r, wr) in win.iter().enumerate() {
                for (c, &v) in wr[px].iter().enumerate() {
                    let z = v * scale + shift;
                    let take = z > best_z;
                    best_z = if take { z } else { best_z };
                    best_v = if take { v } else { best_v };
                    best_i = if take { r * C + c } else { best_i };
                }
            }
            let g = if best_z > 0.0 { gv } else { 0.0 };
            for (r, dr) in dwin.iter_mut().enumerate() {
                dr[px] = std::array::from_fn(|c| if best_i == r * C + c { g } else { 0.0 });
            }
            let lane = px % LANES;
            s[lane] += g;
            sx[lane] += g * ((best_v - mean) * invstd);
        }
        dz += s.iter().map(|&v| f64::from(v)).sum::<f64>();
        dzx += sx.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    (dz, dzx)
}
