//! The f32 values behind a CPU tensor, for the fused ops (`block`, `linear`).

use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

/// A custom op's CPU input as a contiguous f32 slice (`what` names it in errors).
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{what}: only f32 is supported")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// Runs `f` on a CPU f32 tensor's values (made contiguous first). The storage's read lock is held only during
/// `f`: never nest two calls on the same tensor (candle's read locks are not reentrant when a writer is queued).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("{what}: expected a CPU tensor")
    };
    f(f32_slice(cpu, layout, what)?)
}
