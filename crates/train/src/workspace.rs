//! The state the fused CPU ops share, owned by the model that runs them (issue 11): a pool of reusable buffers
//! and the channel that hands parameter gradients to the optimizer ([`ParamGrads`]).
//!
//! Each fused op keeps a [`Handle`] to the workspace in a struct field, as candle's own ops keep their settings,
//! so its backward pass reaches the same buffers and the same gradient channel whatever thread candle runs it on.
//! This replaced a process-wide pool, a per-thread scratch buffer and a per-thread gradient side channel. Two
//! models share nothing; one model's ops share the pool, which is safe from any number of threads.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Tensor;

use crate::param_grads::{ParamGrads, StepId};

/// A model's fused-op state. Passed to the ops as `Some(&workspace)`; `None` selects candle's generic ops (the
/// reference path, and the only path off the CPU).
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    /// Buffers returned by earlier passes, for reuse (training repeats the same shapes every step; fresh
    /// multi-megabyte allocations cost page faults and zeroing).
    pool: Mutex<Vec<Vec<f32>>>,
    /// Parameter gradients handed from the ops' backward passes to the optimizer during a training step.
    pub(crate) grads: ParamGrads,
}

/// Values the pool may hold in all (256 MiB): a training step of either model needs well under a tenth of that,
/// and a change of shapes (an evaluation with large batches) cannot make the pool grow without limit.
const POOL_VALUES: usize = 64 << 20;

impl Workspace {
    /// An empty workspace.
    pub(crate) fn new() -> Arc<Workspace> {
        Arc::new(Workspace::default())
    }

    /// The handle a fused op being built keeps: the workspace, and the training step open now (if any).
    pub(crate) fn handle(self: &Arc<Self>) -> Handle {
        Handle {
            ws: Arc::clone(self),
            step: self.grads.current(),
        }
    }

    /// A buffer of exactly `len` values for the caller to overwrite entirely, back in the pool when dropped. The
    /// most recently returned buffer of that length is reused first: in a parallel loop that is usually the one
    /// this thread just gave back, still in its cache.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> Pooled {
        let reused = {
            let mut pool = lock(&self.pool);
            let found = pool.iter().rposition(|v| v.len() == len);
            found.map(|i| pool.swap_remove(i))
        };
        // A new buffer is allocated outside the lock.
        let buf = reused.unwrap_or_else(|| vec![0.0; len]);
        Pooled {
            buf,
            owner: Arc::clone(self),
        }
    }

    /// Returns a buffer to the pool, dropping the oldest ones beyond [`POOL_VALUES`].
    fn give(&self, v: Vec<f32>) {
        if v.is_empty() || v.len() > POOL_VALUES {
            return;
        }
        let mut pool = lock(&self.pool);
        pool.push(v);
        let mut held: usize = pool.iter().map(Vec::len).sum();
        while held > POOL_VALUES {
            held -= pool.remove(0).len();
        }
    }
}

/// What a fused op keeps of its model's workspace ([`Workspace::handle`]).
pub(crate) struct Handle {
    ws: Arc<Workspace>,
    /// The training step open when the op was built: only that step takes the op's gradients.
    step: Option<StepId>,
}

impl Handle {
    /// A buffer of exactly `len` values from the pool ([`Workspace::take`]).
    pub(crate) fn take(&self, len: usize) -> Pooled {
        self.ws.take(len)
    }

    /// The op's gradient for `param`: `None` when the op's training step took it for the optimizer, otherwise
    /// the gradient to give back to candle ([`ParamGrads::offer`]).
    pub(crate) fn offer(&self, param: &Tensor, grad: Tensor) -> Option<Tensor> {
        self.ws.grads.offer(self.step, param, grad)
    }
}

/// A buffer from [`Workspace::take`], returned to its pool when dropped.
pub(crate) struct Pooled {
    buf: Vec<f32>,
    owner: Arc<Workspace>,
}

impl Deref for Pooled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.owner.give(std::mem::take(&mut self.buf));
    }
}

/// Locks `m`, also after a panic elsewhere poisoned it (the data are buffers and lists, never half-updated).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_pool_reuses_exact_sizes_and_stays_bounded() {
        let ws = Workspace::new();
        let n = 12_345;
        let mut v = ws.take(n);
        v.fill(7.0);
        drop(v);
        let v = ws.take(n);
        assert_eq!(
            (v.len(), v[0]),
            (n, 7.0),
            "a returned buffer of the same length is reused as it is"
        );
        assert_eq!(
            ws.take(n - 1).len(),
            n - 1,
            "another length is a new buffer"
        );
        drop(v);
        ws.give(vec![0.0; POOL_VALUES + 1]);
        for _ in 0..3 {
            ws.give(vec![0.0; POOL_VALUES / 2 + 1]);
        }
        let held: usize = lock(&ws.pool).iter().map(Vec::len).sum();
        assert!(held <= POOL_VALUES, "{held} values held");
    }

    #[test]
    fn two_workspaces_share_no_buffers() {
        let (a, b) = (Workspace::new(), Workspace::new());
        let mut v = a.take(100);
        v.fill(3.0);
        drop(v);
        assert_eq!(b.take(100)[0], 0.0);
        assert_eq!(a.take(100)[0], 3.0);
    }
}
