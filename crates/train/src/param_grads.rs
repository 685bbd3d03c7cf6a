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
    TAKEN.with_borrow_mut(|t| *t = Some(Vec::new()));
    let result = loss.backward();
    let taken = TAKEN.with_borrow_mut(|t| t.take()).unwrap_or_default();
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
