//! The fused block against candle's generic ops, thread-count independence, and refused inputs.

use super::*;
use crate::testutil::{assert_close, probe_grads, rnd};
use candle_core::{Device, Var};

/// One block's sizes: (b, c, h, w, out, k, pad, pool).
type Case = (usize, usize, usize, usize, usize, usize, usize, Pool);

/// (b, c, h, w, out, k, pad, pool): odd sizes, one image, one channel, 1×1 and 5×5 kernels, no and large padding,
/// no pooling (on a one-row image too), 2×1 pooling (an odd height: the last row dropped), and batches big enough to span several chunks (the last one partial).
const CASES: [Case; 13] = [
    (3, 2, 8, 10, 4, 3, 1, Pool::SQUARE),
    (2, 1, 7, 9, 5, 3, 1, Pool::SQUARE),
    (2, 2, 9, 7, 3, 5, 2, Pool::SQUARE),
    (1, 3, 6, 5, 2, 3, 0, Pool::SQUARE),
    (2, 2, 5, 5, 3, 1, 0, Pool::SQUARE),
    (2, 1, 4, 3, 2, 3, 2, Pool::SQUARE),
    (3, 2, 7, 9, 4, 3, 1, Pool::NONE),
    (2, 3, 1, 11, 3, 3, 1, Pool::NONE),
    (37, 4, 16, 24, 8, 3, 1, Pool::NONE),
    (37, 4, 16, 24, 8, 3, 1, Pool::SQUARE),
    (3, 2, 8, 10, 4, 3, 1, Pool::ROWS),
    (2, 1, 7, 9, 5, 3, 1, Pool::ROWS),
    (37, 4, 16, 24, 8, 3, 1, Pool::ROWS),
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
    let ws = Workspace::new();
    for (i, &(b, c, h, w, o, k, pad, pool)) in CASES.iter().enumerate() {
        let geo = Geometry::new((b, c, h, w), o, k, pad, pool).unwrap();
        if b == 37 {
            assert!(
                geo.chunks() >= 3 && b % geo.nb != 0,
                "the large cases span several chunks, one partial"
            );
        }
        for kind in 0..3 {
            for input_grad in [true, false] {
                let what = format!("case {i}, norm {kind}, input gradient {input_grad}");
                let x = Var::from_tensor(&(rnd(&[b, c, h, w], i as u64) * 2.0).unwrap()).unwrap();
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
                let run = |ws: Option<&Arc<Workspace>>| {
                    let (out, stats) = conv_block(
                        &xt,
                        wt.as_tensor(),
                        affine.as_tensor(),
                        pad,
                        pool,
                        norm_for(kind, o),
                        ws,
                    )
                    .unwrap();
                    let probe = rnd(out.dims(), 90 + i as u64);
                    let grads = probe_grads(&out, &probe);
                    (out, stats, grads)
                };
                let (fo, fs, fg) = run(Some(&ws));
                let (ro, rs, rg) = run(None);
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
    // One workspace for both runs: the second reuses the first one's buffers.
    let ws = Workspace::new();
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
                Pool::SQUARE,
                BlockNorm::Batch { eps: 1e-5 },
                Some(&ws),
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

/// Inside a training step the weight's gradient goes to the store through the workspace (candle's own backward
/// pass no longer sees it), and comes out exactly as candle's bookkeeping gives it outside a step.
#[test]
fn inside_a_step_the_weight_gradient_goes_through_the_workspace() {
    let ws = Workspace::new();
    let x = rnd(&[3, 2, 8, 10], 1);
    let wt = Var::from_tensor(&rnd(&[4, 2, 3, 3], 2)).unwrap();
    let affine = Var::from_tensor(&(rnd(&[2, 4], 3) + 1.0).unwrap()).unwrap();
    let probe = rnd(&[3, 4, 4, 5], 4);
    let loss = || {
        let norm = BlockNorm::Batch { eps: 1e-5 };
        let (out, _) = conv_block(
            &x,
            wt.as_tensor(),
            affine.as_tensor(),
            1,
            Pool::SQUARE,
            norm,
            Some(&ws),
        )
        .unwrap();
        (out * &probe).unwrap().sum_all().unwrap()
    };
    let values = |g: &candle_core::backprop::GradStore, v: &Var| {
        let t = g.get(v.as_tensor()).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let step = ws.grads.open();
    let bypassed = loss().backward().unwrap();
    assert!(bypassed.get(wt.as_tensor()).is_none(), "handed to the step");
    assert!(bypassed.get(affine.as_tensor()).is_some());
    drop(step);
    let step = ws.grads.open();
    let through = step.backward(&loss()).unwrap();
    let plain = loss().backward().unwrap();
    for v in [&wt, &affine] {
        assert_eq!(values(&through, v), values(&plain, v));
    }
}

#[test]
fn mismatched_shapes_and_inference_backward_are_errors() {
    let ws = Workspace::new();
    let fused = Some(&ws);
    let x = rnd(&[2, 3, 6, 6], 1);
    let wt = rnd(&[4, 2, 3, 3], 2);
    let affine = rnd(&[2, 4], 3);
    let norm = || BlockNorm::Batch { eps: 1e-5 };
    assert!(
        conv_block(&x, &wt, &affine, 1, Pool::SQUARE, norm(), fused).is_err(),
        "channel mismatch"
    );
    let wt = rnd(&[4, 3, 3, 3], 2);
    assert!(
        conv_block(&x, &wt, &rnd(&[2, 5], 3), 1, Pool::SQUARE, norm(), fused).is_err(),
        "affine mismatch"
    );
    assert!(
        conv_block(
            &rnd(&[2, 3, 1, 1], 1),
            &wt,
            &affine,
            0,
            Pool::SQUARE,
            norm(),
            fused
        )
        .is_err(),
        "kernel too large"
    );
    for (rows, cols) in [(0, 0), (3, 3), (1, 2)] {
        assert!(
            conv_block(&x, &wt, &affine, 1, Pool { rows, cols }, norm(), fused).is_err(),
            "pooling windows other than 1x1, 2x2 and 2x1"
        );
    }
    let bad = BlockNorm::Fixed {
        mean: vec![0.0; 3],
        invstd: vec![1.0; 4],
    };
    assert!(
        conv_block(&x, &wt, &affine, 1, Pool::SQUARE, bad, fused).is_err(),
        "statistics mismatch"
    );
    // Nothing tracks gradients: y is not kept, and the output has no graph to go back through.
    let (out, stats) = conv_block(&x, &wt, &affine, 1, Pool::SQUARE, norm(), fused).unwrap();
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

/// The backward routing on its own, where candle's generic path cannot check it: a tie sends the gradient to the
/// window's first maximum only (PyTorch's choice; candle's `max` splits it over all of them), a window whose
/// maximum fails the ReLU passes nothing, and the row and column no 2×2 window covers get zero. Every value of
/// the plane is written (the buffer comes from the pool with old values in it).
#[test]
fn routing_sends_each_gradient_to_its_windows_first_maximum() {
    // A 5×5 plane: 2×2 windows cover rows and columns 0..4; row 4 and column 4 are dropped.
    #[rustfmt::skip]
    let src = [
        1.0, 1.0,   0.2, 3.0,   7.0,
        1.0, 0.5,   3.0, 3.0,   7.0,
        -1.0, -2.0, 2.0, 2.0,   7.0,
        -0.5, -3.0, 5.0, 5.0,   7.0,
        7.0, 7.0,   7.0, 7.0,   7.0,
    ];
    let gp = [10.0, 20.0, 30.0, 40.0];
    let mut d = [9.0f32; 25];
    let (mean, invstd) = (0.5, 2.0);
    let (dz, dzx) =
        backward::route_plane::<2, 2>(&src, 5, &gp, 2, &mut d, (1.0, 0.0), (mean, invstd));
    let mut want = [0.0f32; 25];
    want[0] = 10.0; // tie of four 1.0s: the first
    want[3] = 20.0; // tie of three 3.0s: the first in row-major order
    want[3 * 5 + 2] = 40.0; // 5.0 twice in the bottom row: the first
    assert_eq!(d, want, "routed gradient");
    assert_eq!(dz, 70.0, "sum of the routed gradient");
    let yhat = |v: f64| (v - 0.5) * 2.0;
    let expected = 10.0 * yhat(1.0) + 20.0 * yhat(3.0) + 40.0 * yhat(5.0);
    assert!(
        (dzx - expected).abs() < 1e-9,
        "Σ dz·ŷ {dzx} against {expected}"
    );
}
