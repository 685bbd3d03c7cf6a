//! Parameter gradients handed from the fused ops' backward passes straight to the optimizer (issue 7), through
//! an explicit channel in the model's workspace (issue 11).
//!
//! candle's backward stores each gradient it is given as `zeros_like(param) + grad`: a zero-filled allocation and
//! an elementwise pass over every weight, every step (for the MNIST CNN's 1.6 M-value `fc1.weight`, ~2 ms of a
//! ~38 ms step). During a training step the fused ops instead hand a parameter's gradient to the channel, and
//! [`Step::backward`] moves it into the `GradStore`, where the optimizer looks it up as usual.
//!
//! The trainer opens the channel for one step ([`ParamGrads::open`]); ops built by that step's forward pass carry
//! the step's [`StepId`] and hand over only while that same step is open. So a graph built outside a step (the
//! tests' reference path, evaluation) or by an earlier step keeps every gradient in candle's store, whichever
//! thread runs its backward pass; and only variables are taken (nothing else in the graph can need their
//! gradient). The [`Step`] guard closes the channel however the step ends.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use std::sync::Mutex;

use crate::workspace::lock;

/// One training step of one workspace: ops built while it was open carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepId(u64);

/// The gradient channel of a workspace.
#[derive(Debug, Default)]
pub(crate) struct ParamGrads {
    state: Mutex<Channel>,
}

#[derive(Debug, Default)]
struct Channel {
    /// The open step, if any.
    open: Option<StepId>,
    /// Steps opened so far (the next step's id).
    opened: u64,
    /// `(variable, gradient)` handed over during the open step, in the order the ops ran.
    taken: Vec<(Tensor, Tensor)>,
}

impl ParamGrads {
    /// Opens the channel for a new step (closing any earlier one): the forward pass then builds ops that hand
    /// their variables' gradients here, and [`Step::backward`] collects them.
    pub(crate) fn open(&self) -> Step<'_> {
        let mut c = lock(&self.state);
        let id = StepId(c.opened);
        c.opened += 1;
        c.open = Some(id);
        c.taken.clear();
        Step { grads: self, id }
    }

    /// The open step, for an op being built: its backward pass may hand over gradients only for this step.
    pub(crate) fn current(&self) -> Option<StepId> {
        lock(&self.state).open
    }

    /// An op's gradient for `param`: `None` when it was taken (a variable, from an op of the step that is still
    /// open), otherwise the gradient to give back to candle.
    pub(crate) fn offer(
        &self,
        step: Option<StepId>,
        param: &Tensor,
        grad: Tensor,
    ) -> Option<Tensor> {
        if step.is_none() || !param.is_variable() {
            return Some(grad);
        }
        let mut c = lock(&self.state);
        if c.open != step {
            return Some(grad);
        }
        c.taken.push((param.clone(), grad));
        None
    }
}

/// An open training step; closes the channel when dropped (an error, or a panic unwinding through the step), so
/// a later plain backward pass keeps all its gradients.
pub(crate) struct Step<'a> {
    grads: &'a ParamGrads,
    id: StepId,
}

impl Step<'_> {
    /// `loss.backward()`, with the gradients the step's ops handed over added to the store; closes the step.
    pub(crate) fn backward(self, loss: &Tensor) -> Result<GradStore> {
        let result = loss.backward();
        let taken = std::mem::take(&mut lock(&self.grads.state).taken);
        drop(self);
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
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        let mut c = lock(&self.grads.state);
        if c.open == Some(self.id) {
            c.open = None;
            c.taken.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::Workspace;
    use candle_core::{Device, Var};

    #[test]
    fn taken_gradients_reach_the_store_summed_and_only_inside_the_step() {
        let grads = ParamGrads::default();
        let w = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let plain = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        // Outside a step nothing is taken; a non-variable is never taken.
        let g = Tensor::new(&[1f32, 1.0], &Device::Cpu).unwrap();
        assert!(grads.current().is_none());
        assert!(grads.offer(None, w.as_tensor(), g.clone()).is_some());
        let stale = {
            let step = grads.open();
            let id = grads.current();
            assert_eq!(id, Some(step.id));
            id
        };
        assert!(grads.current().is_none(), "closed when dropped");
        assert!(grads.offer(stale, w.as_tensor(), g.clone()).is_some());
        let step = grads.open();
        let id = grads.current();
        assert!(grads.offer(id, &plain, g.clone()).is_some());
        assert!(
            grads.offer(stale, w.as_tensor(), g.clone()).is_some(),
            "an op of an earlier step hands over nothing"
        );
        assert!(grads.offer(None, w.as_tensor(), g.clone()).is_some());
        assert!(grads.offer(id, w.as_tensor(), g.clone()).is_none());
        assert!(grads.offer(id, w.as_tensor(), (g * 2.0).unwrap()).is_none());
        // Through `backward`: w's own candle gradient (from w·plain) plus what was handed over.
        let loss = (w.as_tensor() * &plain).unwrap().sum_all().unwrap();
        let store = step.backward(&loss).unwrap();
        assert_eq!(
            store.get(w.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![6.0, 7.0]
        );
        assert!(grads.current().is_none(), "closed afterwards");
        assert!(lock(&grads.state).taken.is_empty());
    }

    #[test]
    fn a_weight_used_by_a_fused_op_and_by_candle_gets_the_sum() {
        let dev = Device::Cpu;
        let ws = Workspace::new();
        let x = Tensor::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &dev).unwrap();
        let w = Var::new(&[[0.1f32, 0.2, 0.3], [-0.4, 0.5, -0.6]], &dev).unwrap();
        let b = Var::new(&[0.05f32, -0.05], &dev).unwrap();
        let c = Tensor::new(&[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]], &dev).unwrap();
        let loss = || {
            let y =
                crate::linear::linear(&x, w.as_tensor(), b.as_tensor(), false, Some(&ws)).unwrap();
            (y.sqr().unwrap().sum_all().unwrap() + (w.as_tensor() * &c).unwrap().sum_all().unwrap())
                .unwrap()
        };
        let step = ws.grads.open();
        let through_channel = step.backward(&loss()).unwrap();
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

    #[test]
    fn gradients_are_taken_whatever_thread_runs_the_backward_pass() {
        // The channel lives in the workspace, not in a thread: a step's backward pass on another thread still
        // hands the fused op's gradients over, and they still reach the store.
        let dev = Device::Cpu;
        let ws = Workspace::new();
        let x = Tensor::new(&[[0.5f32, -1.0], [1.5, 0.25]], &dev).unwrap();
        let w = Var::new(&[[0.1f32, 0.2], [-0.4, 0.5]], &dev).unwrap();
        let b = Var::new(&[0.05f32, -0.05], &dev).unwrap();
        let step = ws.grads.open();
        let y = crate::linear::linear(&x, w.as_tensor(), b.as_tensor(), true, Some(&ws)).unwrap();
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let store =
            std::thread::scope(|s| s.spawn(|| step.backward(&loss)).join().unwrap()).unwrap();
        let want = loss.backward().unwrap();
        for v in [&w, &b] {
            let (a, p) = (store.get(v.as_tensor()), want.get(v.as_tensor()));
            assert_eq!(
                a.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                p.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
            );
        }
    }
}
