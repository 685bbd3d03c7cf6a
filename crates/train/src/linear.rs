//! A fully-connected layer, `relu?(x·wᵀ + b)`, as one graph node (issue 7).
//!
//! candle's own chain (matmul of `x` with the transposed weight, a broadcast bias add, an optional ReLU) is four
//! graph nodes, and its backward pass allocates and zero-fills a gradient for each of them (the matmul, the
//! transpose, the broadcast and the ReLU) before adding into it. Here the CPU path is one `CustomOp3` with a
//! hand-written backward: one GEMM (and one pass for bias and ReLU) forward; backward, the masked output gradient
//! once, then `dW = g'ᵀ·x` and `dx = g'·W` as GEMMs over transposed views (no copies), `db` as column sums, and no
//! `dx` at all for inputs that need none (the first layer). Weights stay in PyTorch's `(out, in)` layout. Other
//! devices and dtypes use candle's ops unchanged.
//!
//! The weight and bias gradients go to the optimizer through the model's workspace ([`crate::param_grads`]).

use std::sync::Arc;

use candle_core::{
    bail, utils::get_num_threads, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::cpu::{f32_slice, with_f32};
use crate::matmul::{matmul_new, MatRef};
use crate::workspace::{Handle, Workspace};

/// Threads for an `n × inp × out` product: below ~2¹⁸ multiply-adds, splitting costs more than it saves.
fn threads(n: usize, inp: usize, out: usize) -> usize {
    if n.saturating_mul(inp).saturating_mul(out) >= 1 << 18 {
        get_num_threads()
    } else {
        1
    }
}

/// Checks `x (n, in)`, `w (out, in)`, `b (out)`; returns `(n, in, out)`.
fn check_shapes(x: &Shape, w: &Shape, b: &Shape) -> Result<(usize, usize, usize)> {
    let (n, inp) = x.dims2()?;
    let (out, w_in) = w.dims2()?;
    let b_out = b.dims1()?;
    if w_in != inp || b_out != out {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (n, in), (out, in), (out)",
            x.dims(),
            w.dims(),
            b.dims()
        )
    }
    Ok((n, inp, out))
}

/// The fused CPU op over `(x, w, b)`.
struct FusedLinear {
    relu: bool,
    /// Where the backward pass hands the weight and bias gradients.
    ws: Handle,
}

impl CustomOp3 for FusedLinear {
    fn name(&self) -> &'static str {
        "ferry-linear"
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
        let (n, inp, out) = check_shapes(l1.shape(), l2.shape(), l3.shape())?;
        let x = f32_slice(s1, l1, "linear")?;
        let w = f32_slice(s2, l2, "linear")?;
        let b = f32_slice(s3, l3, "linear")?;
        // The product is computed as yᵀ = W·xᵀ so that gemm reads the weight, the large operand, in place instead
        // of packing a copy of it every step; the transpose back is folded into the bias and ReLU pass.
        let yt = matmul_new(
            MatRef::row_major(w, out, inp)?,
            MatRef::row_major(x, n, inp)?.t(),
            threads(n, inp, out),
        )?;
        let relu = self.relu;
        let y: Vec<f32> = (0..n * out)
            .map(|idx| {
                let (i, j) = (idx / out, idx % out);
                let z = yt[j * n + i] + b[j];
                if relu {
                    z.max(0.0)
                } else {
                    z
                }
            })
            .collect();
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, inp, out) = check_shapes(x.shape(), w.shape(), b.shape())?;
        if grad.dims() != [n, out] || res.dims() != [n, out] {
            bail!(
                "linear backward: gradient {:?} and output {:?} are not ({n}, {out})",
                grad.dims(),
                res.dims()
            )
        }
        // g' = g where the output passed the ReLU (PyTorch's convention: no gradient at exactly 0).
        let mut gm = with_f32(grad, "linear backward", |g| Ok(g.to_vec()))?;
        if self.relu {
            with_f32(res, "linear backward", |y| {
                for (g, &y) in gm.iter_mut().zip(y) {
                    if y <= 0.0 || y.is_nan() {
                        *g = 0.0;
                    }
                }
                Ok(())
            })?;
        }
        let threads = threads(n, inp, out);
        let g_rows = MatRef::row_major(&gm, n, out)?;
        let dev = x.device();

        let db = if b.track_op() {
            // Row by row in f64: deterministic, whatever the thread count.
            let mut sums = vec![0f64; out];
            if out > 0 {
                for row in gm.chunks_exact(out) {
                    for (s, &g) in sums.iter_mut().zip(row) {
                        *s += f64::from(g);
                    }
                }
            }
            let sums = sums.into_iter().map(|s| s as f32).collect();
            let db = Tensor::from_vec(sums, out, dev)?;
            self.ws.offer(b, db)
        } else {
            None
        };

        let dw = if w.track_op() {
            let dw = with_f32(x, "linear backward", |xs| {
                matmul_new(g_rows.t(), MatRef::row_major(xs, n, inp)?, threads)
            })?;
            let dw = Tensor::from_vec(dw, (out, inp), dev)?;
            self.ws.offer(w, dw)
        } else {
            None
        };

        let dx = if x.track_op() {
            let dx = with_f32(w, "linear backward", |ws| {
                matmul_new(g_rows, MatRef::row_major(ws, out, inp)?, threads)
            })?;
            Some(Tensor::from_vec(dx, (n, inp), dev)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// `relu?(x·wᵀ + b)` for x `(n, in)`, a PyTorch-layout weight w `(out, in)` and bias b `(out)`: `(n, out)`.
///
/// On the CPU in f32, given the model's workspace, this is one fused node (see the module docs); elsewhere, or in
/// other dtypes, candle's own matmul, broadcast add and ReLU, so the GPU keeps candle's kernels; and so without a
/// workspace (the reference path).
pub(crate) fn linear(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    relu: bool,
    ws: Option<&Arc<Workspace>>,
) -> Result<Tensor> {
    check_shapes(x.shape(), w.shape(), b.shape())?;
    let cpu_f32 = x.device().is_cpu() && [x, w, b].iter().all(|t| t.dtype() == DType::F32);
    if let Some(ws) = ws.filter(|_| cpu_f32) {
        let op = FusedLinear {
            relu,
            ws: ws.handle(),
        };
        return x
            .contiguous()?
            .apply_op3(&w.contiguous()?, &b.contiguous()?, op);
    }
    let y = x.matmul(&w.t()?)?.broadcast_add(b)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{assert_close, probe_grads, rnd};
    use candle_core::Var;

    /// Every value of n, in and out at least once, odd sizes, out = 1, and the multi-threaded path.
    const CASES: [(usize, usize, usize); 8] = [
        (1, 5, 1),
        (3, 257, 51),
        (64, 3072, 256),
        (64, 5, 51),
        (1, 3072, 256),
        (3, 5, 256),
        (64, 257, 1),
        (3, 3072, 1),
    ];

    #[test]
    fn fused_linear_matches_candles_chain_values_and_gradients() {
        let ws = Workspace::new();
        for (i, &(n, inp, out)) in CASES.iter().enumerate() {
            for relu in [false, true] {
                for x_grad in [true, false] {
                    let what = format!("({n}, {inp}) → {out}, relu {relu}, x gradient {x_grad}");
                    let seed = 10 * i as u64;
                    let xv = Var::from_tensor(&rnd(&[n, inp], seed)).unwrap();
                    let x = if x_grad {
                        xv.as_tensor().clone()
                    } else {
                        xv.as_tensor().detach()
                    };
                    let w = Var::from_tensor(&(rnd(&[out, inp], seed + 1) * 0.2).unwrap()).unwrap();
                    let b = Var::from_tensor(&rnd(&[out], seed + 2)).unwrap();
                    let ours = linear(&x, w.as_tensor(), b.as_tensor(), relu, Some(&ws)).unwrap();
                    let want = linear(&x, w.as_tensor(), b.as_tensor(), relu, None).unwrap();
                    assert_close(&what, &ours, &want, 1e-5);
                    let probe = rnd(&[n, out], seed + 3);
                    let go = probe_grads(&ours, &probe);
                    let gr = probe_grads(&want, &probe);
                    for (name, v) in [("w", &w), ("b", &b)] {
                        assert_close(
                            &format!("{what}: {name} gradient"),
                            go.get(v.as_tensor()).unwrap(),
                            gr.get(v.as_tensor()).unwrap(),
                            1e-5,
                        );
                    }
                    if x_grad {
                        assert_close(
                            &format!("{what}: x gradient"),
                            go.get(&x).unwrap(),
                            gr.get(&x).unwrap(),
                            1e-5,
                        );
                    } else {
                        assert!(go.get(xv.as_tensor()).is_none(), "{what}: x gradient");
                    }
                }
            }
        }
    }

    #[test]
    fn strided_inputs_are_made_contiguous_and_still_get_gradients() {
        // x and w given transposed; the gradients reach the original variables through the copies.
        let xt = Var::from_tensor(&rnd(&[7, 4], 1)).unwrap();
        let wt = Var::from_tensor(&rnd(&[7, 5], 2)).unwrap();
        let b = Var::from_tensor(&rnd(&[5], 3)).unwrap();
        let (x, w) = (xt.as_tensor().t().unwrap(), wt.as_tensor().t().unwrap());
        let ws = Workspace::new();
        let ours = linear(&x, &w, b.as_tensor(), true, Some(&ws)).unwrap();
        let want = linear(&x, &w, b.as_tensor(), true, None).unwrap();
        assert_close("values", &ours, &want, 1e-5);
        let probe = rnd(&[4, 5], 4);
        let go = probe_grads(&ours, &probe);
        let gr = probe_grads(&want, &probe);
        for (name, v) in [("x", &xt), ("w", &wt), ("b", &b)] {
            assert_close(
                &format!("{name} gradient"),
                go.get(v.as_tensor()).unwrap(),
                gr.get(v.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }

    #[test]
    fn other_dtypes_use_candles_ops() {
        let x = rnd(&[3, 5], 1).to_dtype(DType::F64).unwrap();
        let w = rnd(&[2, 5], 2).to_dtype(DType::F64).unwrap();
        let b = rnd(&[2], 3).to_dtype(DType::F64).unwrap();
        let y = linear(&x, &w, &b, true, Some(&Workspace::new())).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        let want = x
            .matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap()
            .relu()
            .unwrap();
        assert_eq!(y.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let ws = Workspace::new();
        let fused = Some(&ws);
        let x = rnd(&[3, 5], 1);
        let (w, b) = (rnd(&[4, 5], 2), rnd(&[4], 3));
        assert!(linear(&x, &w, &b, false, fused).is_ok());
        assert!(
            linear(&x, &rnd(&[4, 6], 2), &b, false, fused).is_err(),
            "weight's in"
        );
        assert!(
            linear(&x, &w, &rnd(&[3], 3), true, fused).is_err(),
            "bias length"
        );
        assert!(
            linear(&x, &w, &rnd(&[1, 4], 3), false, fused).is_err(),
            "bias rank"
        );
        assert!(
            linear(&rnd(&[3, 5, 1], 1), &w, &b, false, fused).is_err(),
            "input rank"
        );
        assert!(
            linear(&x, &rnd(&[20], 2), &b, false, fused).is_err(),
            "weight rank"
        );
        // The op itself checks too, when called directly.
        let bad = x.apply_op3(
            &rnd(&[4, 6], 2),
            &b,
            FusedLinear {
                relu: false,
                ws: ws.handle(),
            },
        );
        assert!(bad.is_err());
        // Mixed dtypes fall back to candle, which refuses them.
        let b64 = b.to_dtype(DType::F64).unwrap();
        assert!(linear(&x, &w, &b64, false, fused).is_err(), "mixed dtypes");
    }
}
