//! Bounds-checked strided f32 matrix products on the CPU, through the `gemm` crate that candle's own CPU matmul
//! uses (issue 7).
//!
//! The fused ops call this instead of `Tensor::matmul` so that a product can write into part of a larger buffer
//! (one chunk of images), accumulate into an existing result (`dW += dy·colsᵀ` over chunks), and read transposed
//! operands through strides, without the allocation, zero-fill and gradient bookkeeping of a graph node.

use candle_core::{bail, Result};

/// A read-only `rows × cols` matrix over a slice: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

/// The largest index a `rows × cols` view with strides `rs`, `cs` touches, plus one (0 for an empty view).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> Option<usize> {
    if rows == 0 || cols == 0 {
        return Some(0);
    }
    (rows - 1)
        .checked_mul(rs)?
        .checked_add((cols - 1).checked_mul(cs)?)?
        .checked_add(1)
}

fn check_view(
    what: &str,
    len: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<()> {
    match extent(rows, cols, rs, cs) {
        Some(end) if end <= len && isize::try_from(rs.max(cs)).is_ok() => Ok(()),
        _ => bail!(
            "matmul: {what} view {rows}x{cols} (strides {rs}, {cs}) does not fit {len} values"
        ),
    }
}

impl<'a> MatRef<'a> {
    /// A strided view; fails if it reaches outside `data`.
    pub(crate) fn new(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Result<Self> {
        check_view("input", data.len(), rows, cols, rs, cs)?;
        Ok(MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    /// A contiguous row-major view.
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transpose (a view, no copy).
    pub(crate) fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// A writable row-major `rows × cols` matrix over a slice, row stride `rs ≥ cols`: distinct elements never share
/// memory.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
}

impl<'a> MatMut<'a> {
    /// A row-major view with row stride `rs ≥ cols` (rows may be longer than the view, as for a column range of a
    /// larger matrix).
    pub(crate) fn rows_strided(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        rs: usize,
    ) -> Result<Self> {
        if rows > 1 && rs < cols {
            bail!("matmul: output row stride {rs} is shorter than its {cols} columns")
        }
        check_view("output", data.len(), rows, cols, rs, 1)?;
        Ok(MatMut {
            data,
            rows,
            cols,
            rs,
        })
    }

    /// A contiguous row-major view.
    pub(crate) fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::rows_strided(data, rows, cols, cols)
    }
}

/// Checks that `lhs·rhs` is `m × n`; returns `k`.
fn inner_dim(lhs: &MatRef, rhs: &MatRef, m: usize, n: usize) -> Result<usize> {
    if lhs.rows != m || rhs.cols != n || rhs.rows != lhs.cols {
        bail!(
            "matmul: shapes {}x{} · {}x{} do not give {m}x{n}",
            lhs.rows,
            lhs.cols,
            rhs.rows,
            rhs.cols
        )
    }
    Ok(lhs.cols)
}

/// gemm's `dst := (accumulate ? dst : 0) + lhs·rhs` for a row-major `m × n` destination with row stride `dst_rs`,
/// on `threads` of rayon's threads.
///
/// # Safety
/// `lhs·rhs` must be `m × n` with an inner dimension `k > 0`, and `dst` valid for writes (and, when
/// `accumulate`, reads) at `i·dst_rs + j` for every `i < m`, `j < n`, with `dst_rs ≥ n`, not aliasing the operands
/// and not accessed by anything else during the call. The operands' views are inside their slices by
/// construction. gemm does not read `dst` when `accumulate` is false.
unsafe fn gemm_into(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: MatRef,
    rhs: MatRef,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // Strides fit in isize: checked by the views' constructors (and `dst_rs` by the caller's allocation).
    let s = |v: usize| v as isize;
    // SAFETY: as the caller guarantees.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
            dst,
            1,
            s(dst_rs),
            accumulate,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst = lhs·rhs`, or `dst += lhs·rhs` when `accumulate`, on `threads` of rayon's threads (1: the calling thread
/// only, for callers that parallelise over chunks themselves).
pub(crate) fn matmul(
    dst: MatMut,
    lhs: MatRef,
    rhs: MatRef,
    accumulate: bool,
    threads: usize,
) -> Result<()> {
    let (m, n) = (dst.rows, dst.cols);
    let k = inner_dim(&lhs, &rhs, m, n)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for row in dst.data.chunks_mut(dst.rs.max(n)).take(m) {
                row[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    // SAFETY: the shapes agree and k > 0 (checked above); `dst` was checked to cover `i·rs + j` for its rows and
    // columns with `rs ≥ cols`, and it is borrowed mutably, so nothing else touches it during the call.
    unsafe { gemm_into(dst.data.as_mut_ptr(), dst.rs, accumulate, lhs, rhs, threads) };
    Ok(())
}

/// `lhs·rhs` as a new row-major vector, written by gemm into fresh memory without zero-filling it first: for a
/// multi-megabyte result (a weight gradient) the zero-fill costs as much as a pass over the product.
pub(crate) fn matmul_new(lhs: MatRef, rhs: MatRef, threads: usize) -> Result<Vec<f32>> {
    let (m, n) = (lhs.rows, rhs.cols);
    let k = inner_dim(&lhs, &rhs, m, n)?;
    let Some(len) = m.checked_mul(n) else {
        bail!("matmul: a {m}x{n} result is too large")
    };
    if k == 0 || len == 0 {
        return Ok(vec![0.0; len]);
    }
    let mut out: Vec<f32> = Vec::with_capacity(len);
    // SAFETY: the shapes agree and k > 0; `out` has capacity for the m·n values at `i·n + j` and is a fresh
    // allocation. With `accumulate` false gemm writes each of them once and reads none, so after the call all
    // `len` values are initialised and the length may be set.
    unsafe {
        gemm_into(out.as_mut_ptr(), n, false, lhs, rhs, threads);
        out.set_len(len);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef, b: MatRef) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                let mut s = 0f64;
                for p in 0..a.cols {
                    s += f64::from(a.data[i * a.rs + p * a.cs])
                        * f64::from(b.data[p * b.rs + j * b.cs]);
                }
                out[i * b.cols + j] = s as f32;
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn strided_and_transposed_products_match_a_naive_loop() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (64, 31, 5)] {
            let a = values(m * k, 1);
            let bt = values(n * k, 2); // stored as (n, k): rhs is its transpose
            let lhs = MatRef::row_major(&a, m, k).unwrap();
            let rhs = MatRef::row_major(&bt, n, k).unwrap().t();
            let want = naive(lhs, rhs);
            // Write into columns 2..2+n of a wider buffer, then accumulate a second time.
            let width = n + 3;
            let mut dst = vec![7f32; m * width];
            matmul(
                MatMut::rows_strided(&mut dst[2..], m, n, width).unwrap(),
                lhs,
                rhs,
                false,
                2,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    let got = dst[i * width + 2 + j];
                    assert!(
                        (got - want[i * n + j]).abs() < 1e-4,
                        "{m}x{n}x{k} at ({i},{j})"
                    );
                }
                assert_eq!(
                    dst[i * width],
                    7.0,
                    "columns outside the view are untouched"
                );
            }
            matmul(
                MatMut::rows_strided(&mut dst[2..], m, n, width).unwrap(),
                lhs,
                rhs,
                true,
                1,
            )
            .unwrap();
            assert!((dst[2] - 2.0 * want[0]).abs() < 1e-4);
        }
    }

    #[test]
    fn products_into_fresh_memory_match_a_naive_loop() {
        for &(m, n, k) in &[(1, 1, 1), (64, 33, 17), (7, 130, 3)] {
            let a = values(m * k, 5);
            let bt = values(n * k, 6);
            let lhs = MatRef::row_major(&a, m, k).unwrap();
            let rhs = MatRef::row_major(&bt, n, k).unwrap().t();
            let want = naive(lhs, rhs);
            let got = matmul_new(lhs, rhs, 2).unwrap();
            assert_eq!(got.len(), m * n);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{m}x{n}x{k}");
            }
        }
        let a = vec![1f32; 6];
        let lhs = MatRef::row_major(&a, 2, 3).unwrap();
        assert!(matmul_new(lhs, lhs, 1).is_err());
        let empty = MatRef::row_major(&a[..0], 2, 0).unwrap();
        assert_eq!(
            matmul_new(empty, MatRef::row_major(&a[..0], 0, 3).unwrap(), 1).unwrap(),
            vec![0.0; 6]
        );
    }

    #[test]
    fn views_outside_their_buffers_and_mismatched_shapes_are_refused() {
        let a = vec![0f32; 6];
        assert!(MatRef::row_major(&a, 2, 4).is_err());
        assert!(MatRef::new(&a, 2, 3, 1, 3).is_err());
        assert!(MatRef::new(&a, 3, 2, 1, 3).is_ok());
        let mut d = vec![0f32; 4];
        assert!(MatMut::rows_strided(&mut d, 2, 2, 1).is_err());
        let lhs = MatRef::row_major(&a, 2, 3).unwrap();
        assert!(matmul(MatMut::row_major(&mut d, 2, 2).unwrap(), lhs, lhs, false, 1).is_err());
    }
}
