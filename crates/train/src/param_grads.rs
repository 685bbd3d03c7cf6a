//! Parameter gradients handed from the fused ops' backward passes straight to the optimizer (issue 7).
//!
//! candle's backward stores each gradient it is given as `zeros_like(param) + grad`: a zero-filled allocation and
//! an elementwise pass over every weight, every step (for the MNIST CNN's 1.6 M-value `fc1.weight`, ~2 ms of a
//! ~38 ms step). During [`backward`] the fused ops instead hand a parameter's gradient here, and it is moved into
//! the `GradStore` afterwards, where the optimizer looks it up as usual. Only tensors that are variables themselves
//! are taken (nothing else in the graph can need their gradient); outside [`backward`] nothing is taken, so a plain
//! `Tensor::backward` (the tests' reference path) sees every gradient as usual.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

thread_local! {
    /// Open (Some) while [`backward`] runs on this thread: candle calls the ops' backward passes on the thread that
    /// called `backward`.
    static TAKEN: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the gradients of variables that fused ops hand to [`offer`] added to the store.
pub(crate) fn backward(loss: &Tensor) -> Result<GradStore> {
    /// Closes the side channel however `backward` ends (an error, or a panic unwinding through it), so a later
    /// plain backward pass on this thread keeps all its gradients.
    struct Open;
    impl Drop for Open {
        fn drop(&mut self) {
            TAKEN.with_borrow_mut(|t| *t = None);
        }
    }
    TAKEN.with_borrow_mut(|t| *t = Some(Vec::new()));
    let open = Open;
    let result = loss.backward();
    let taken = TAKEN.with_borrow_mut(|t| t.take()).unwrap_or_default();
    drop(open);
    let mut grads = result?;
    for (param, grad) in taken {
        // A variable used by several ops gets the sum of their gradients.
        let sum = match grads.remove(&param) {
            Some(earlier) => (earlier + grad)?,
            None => grad,
        };
        grads.insert(&param, sum);
    }
    Ok(grads)
}

/// A fused op's gradient for `param`: `None` when it was taken (a variable, inside [`backward`]), otherwise the
/// gradient to give back to candle.
pub(crate) fn offer(param: &Tensor, grad: Tensor) -> Option<Tensor> {
    if !param.is_variable() {
        return Some(grad);
    }
    TAKEN.with_borrow_mut(|t| match t {
        Some(taken) => {
            taken.push((param.clone(), grad));
            None
        }
        None => Some(grad),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn taken_gradients_reach_the_store_summed_and_only_inside_backward() {
        let w = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let plain = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        // Outside `backward` nothing is taken; a non-variable is never taken.
        let g = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        assert!(offer(w.as_tensor(), g.clone()).is_some());
        TAKEN.with_borrow_mut(|t| *t = Some(Vec::new()));
        assert!(offer(&plain, g.clone()).is_some());
        assert!(offer(w.as_tensor(), g.clone()).is_none());
        assert!(offer(w.as_tensor(), (g * 2.0).unwrap()).is_none());
        TAKEN.with_borrow_mut(|t| *t = None);
        // Through `backward`: w's own candle gradient (from w·plain) plus whatever ops handed over.
        let loss = (w.as_tensor() * &plain).unwrap().sum_all().unwrap();
        let grads = backward(&loss).unwrap();
        assert_eq!(
            grads.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, 4.0]
        );
        assert!(TAKEN.with_borrow(|t| t.is_none()), "closed afterwards");
    }

    #[test]
    fn a_weight_used_by_a_fused_op_and_by_candle_gets_the_sum() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &dev).unwrap();
        let w = Var::new(&[[0.1f32, 0.2, 0.3], [-0.4, 0.5, -0.6]], &dev).unwrap();
        let b = Var::new(&[0.05f32, -0.05], &dev).unwrap();
        let c = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
        let loss = || {
            let y = crate::linear::linear(&x, w.as_tensor(), b.as_tensor(), false, true).unwrap();
            (y.sqr().unwrap().sum_all().unwrap() + (w.as_tensor() * &c).unwrap().sum_all().unwrap())
                .unwrap()
        };
        let through_channel = backward(&loss()).unwrap();
        let plain = loss().backward().unwrap();
        for v in [&w, &b] {
            let values = |g: &GradStore| {
                let t = g.get(v.as_tensor()).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            let (a, p) = (values(&through_channel), values(&plain));
            for (a, p) in a.iter().zip(&p) {
                assert!((a - p).abs() < 1e-5, "{a} vs {p}");
            }
        }
    }
}
