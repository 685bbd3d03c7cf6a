//! The block's forward pass on the CPU: the convolution into a chunk-major buffer `y` from the workspace's pool,
//! the batch statistics (when normalising with them), then normalisation, ReLU and max-pool in one pass to
//! the NCHW output. `y` and the normalisation are kept in the op for the backward pass when some input tracks
//! gradients.

use candle_core::{CpuStorage, Result, Shape};
use rayon::prelude::*;

use super::{BatchStats, BlockNorm, ConvBlockOp, Saved};
use crate::matmul::{matmul, MatMut, MatRef};
use crate::workspace::{lock, Pooled};

impl ConvBlockOp {
    /// The forward pass over contiguous `x`, `wt` and `affine` (γ then β), their sizes checked by the caller.
    pub(super) fn forward(
        &self,
        x: &[f32],
        wt: &[f32],
        affine: &[f32],
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geo;
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
        let mut state = lock(&self.state);
        state.stats = stats;
        if self.keep {
            state.saved = Some(Saved { y, mean, invstd });
        }
        let (hp, wp) = g.pooled();
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.o, hp, wp))))
    }

    /// `y = W·im2col(x)`, chunk by chunk, into a chunk-major buffer.
    fn convolve(&self, x: &[f32], wt: &[f32]) -> Result<Pooled> {
        let g = self.geo;
        let (hw, ckk) = (g.hw(), g.ckk());
        let mut y = self.ws.take(g.o * g.b * hw);
        let chunk_len = g.o * g.nb * hw;
        y.par_chunks_mut(chunk_len).enumerate().try_for_each_init(
            // One column matrix per rayon task, reused for the chunks it runs.
            || self.ws.take(ckk * g.nb * hw),
            |cols, (j, yc)| -> Result<()> {
                let (b0, n) = g.chunk(j);
                let cols = &mut cols[..ckk * n * hw];
                g.im2col(x, b0, n, cols);
                matmul(
                    MatMut::row_major(yc, g.o, n * hw)?,
                    MatRef::row_major(wt, g.o, ckk)?,
                    MatRef::row_major(cols, ckk, n * hw)?,
                    false,
                    1,
                )
            },
        )?;
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

    /// `max_pool(relu(y·scale + shift))` into NCHW.
    fn pool(&self, y: &[f32], coeffs: &[(f32, f32)]) -> Vec<f32> {
        let g = self.geo;
        let (hp, wp) = g.pooled();
        // The window size as a constant, so that its loops unroll.
        let pool = match (g.pool.rows, g.pool.cols) {
            (1, 1) => pool_plane::<1, 1>,
            (2, 1) => pool_plane::<2, 1>,
            _ => pool_plane::<2, 2>,
        };
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
                pool(src, g.wo, dst, wp, scale, shift);
            });
        out
    }
}

/// One plane's `max_pool(relu(y·scale + shift))` with `R`×`C` windows: `src` rows of `wo`, `dst` rows of `wp`.
fn pool_plane<const R: usize, const C: usize>(
    src: &[f32],
    wo: usize,
    dst: &mut [f32],
    wp: usize,
    scale: f32,
    shift: f32,
) {
    for (py, drow) in dst.chunks_exact_mut(wp).enumerate() {
        for (px, d) in drow.iter_mut().enumerate() {
            let mut m = f32::NEG_INFINITY;
            for r in 0..R {
                let row = &src[(R * py + r) * wo + C * px..][..C];
                for &v in row {
                    m = m.max(v * scale + shift);
                }
            }
            *d = m.max(0.0);
        }
    }
}

/// Per-channel `(scale, shift)` so that `z = y·scale + shift`.
pub(super) fn coefficients(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    invstd: &[f32],
) -> Vec<(f32, f32)> {
    (0..gamma.len())
        .map(|c| {
            let scale = gamma[c] * invstd[c];
            (scale, beta[c] - mean[c] * scale)
        })
        .collect()
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
