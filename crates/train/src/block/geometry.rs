//! The sizes of one convolution block and how its batch is cut into chunks, and the copies between NCHW images
//! and a chunk's column matrix (im2col and its adjoint).

use candle_core::{bail, Result};

use super::Pool;

/// Sizes of one block and its chunking.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub(super) b: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) k: usize,
    pub(super) pad: usize,
    /// Max-pool window and stride.
    pub(super) pool: Pool,
    pub(super) ho: usize,
    pub(super) wo: usize,
    /// Images per chunk.
    pub(super) nb: usize,
}

/// Column-matrix values per chunk: ~768 KiB, inside a core's L2 cache next to the weight.
const CHUNK_VALUES: usize = 192 * 1024;

impl Geometry {
    /// `input` is the NCHW input's `(b, c, h, w)`; `o` output channels, a `k×k` kernel, `pad` zeros on every
    /// side, `pool`'s max-pool.
    pub(super) fn new(
        input: (usize, usize, usize, usize),
        o: usize,
        k: usize,
        pad: usize,
        pool: Pool,
    ) -> Result<Self> {
        let (b, c, h, w) = input;
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        if k == 0 || hp < k || wp < k {
            bail!("convolution block: {h}x{w} input (padding {pad}) is smaller than the {k}x{k} kernel")
        }
        let (ho, wo) = (hp - k + 1, wp - k + 1);
        let known = [Pool::NONE, Pool::SQUARE, Pool::ROWS].contains(&pool);
        if !known || ho < pool.rows || wo < pool.cols {
            bail!(
                "convolution block: no {}x{} pooling of a {ho}x{wo} output (1x1, 2x2 or 2x1, at most the output)",
                pool.rows,
                pool.cols
            )
        }
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
            pool,
            ho,
            wo,
            nb,
        })
    }

    pub(super) fn hw(&self) -> usize {
        self.ho * self.wo
    }

    pub(super) fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }

    pub(super) fn chunks(&self) -> usize {
        self.b.div_ceil(self.nb)
    }

    /// First image and image count of chunk `j`.
    pub(super) fn chunk(&self, j: usize) -> (usize, usize) {
        let b0 = j * self.nb;
        (b0, self.nb.min(self.b - b0))
    }

    /// Offset of chunk `j` in the chunk-major `y` buffer.
    pub(super) fn chunk_offset(&self, j: usize) -> usize {
        self.o * j * self.nb * self.hw()
    }

    /// Offset of image `bi`'s plane of channel `oc` in `y`.
    pub(super) fn plane(&self, bi: usize, oc: usize) -> usize {
        let (j, i) = (bi / self.nb, bi % self.nb);
        let (_, n) = self.chunk(j);
        self.chunk_offset(j) + (oc * n + i) * self.hw()
    }

    /// The pooled output's height and width (odd trailing rows and columns dropped, as in PyTorch).
    pub(super) fn pooled(&self) -> (usize, usize) {
        (self.ho / self.pool.rows, self.wo / self.pool.cols)
    }

    /// For kernel column `kx`: the output columns `lo..hi` whose input column lies inside the image.
    fn cols(&self, kx: usize) -> (usize, usize) {
        let lo = self.pad.saturating_sub(kx).min(self.wo);
        let hi = (self.w + self.pad).saturating_sub(kx).min(self.wo);
        (lo, hi.max(lo))
    }

    /// im2col of images `b0 .. b0 + n` of the NCHW input into `(c·k·k, n·ho·wo)`, rows `(c, ky, kx)`.
    pub(super) fn im2col(&self, x: &[f32], b0: usize, n: usize, cols: &mut [f32]) {
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
    pub(super) fn col2im(&self, dcols: &[f32], n: usize, dx: &mut [f32]) {
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
