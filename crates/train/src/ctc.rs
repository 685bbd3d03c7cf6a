//! Connectionist temporal classification (issue 12): the loss of a sequence reader that emits one class per
//! column, blank (class 0) included, and its decoding (greedy, or the best path under a syntax). candle has no
//! CTC loss, so the forward-backward recursion runs on the host, over the logits' values, and the loss enters
//! the graph as a surrogate whose value is the CTC loss and whose gradient with respect to the logits is the
//! exact CTC gradient, `softmax(z) − γ` (γ the posterior of each class at each step), computed by the recursion.
//! That keeps the backward exact and device-independent (CUDA copies the logits to the host, a few hundred kB a step).
//!
//! Conventions are PyTorch's `F.ctc_loss(log_softmax(z), .., blank=0, reduction="mean", zero_infinity=True)`:
//! each sample's loss `−log p(target | z)` is divided by the target's length and the batch is averaged; a
//! target that cannot fit in `T` steps (its length plus its repeated neighbours exceeds `T`) counts 0 and gets
//! no gradient. A reader may emit several rows (a two-line plate's lines): each row is its own sequence with its
//! own target (possibly empty: an all-blank row), and a sample's loss is the rows' sum over their total length.
//! The recursion is Graves' scaled one (probabilities renormalised at every step, `f64`), so it needs only `T`
//! logarithms per sample.

use std::ops::Range;

use candle_core::{DType, Tensor};

use crate::error::TrainError;

/// CTC loss and gradient of one sample: `logits` is `T × K` row-major, `target` the class ids (none of them
/// the blank 0, each below `K`). Returns `−log p` and writes `∂(−log p)/∂logits` into `grad` (`T × K`), or
/// returns `None` and leaves `grad` zero when the target cannot be emitted in `T` steps.
fn sample_loss(
    logits: &[f32],
    t_len: usize,
    k: usize,
    target: &[u32],
    grad: &mut [f32],
) -> Option<f64> {
    grad.fill(0.0);
    let repeats = target.windows(2).filter(|w| w[0] == w[1]).count();
    if t_len == 0 || target.len() + repeats > t_len {
        return None;
    }
    // Softmax per step.
    let mut y = vec![0f64; t_len * k];
    for (row, out) in logits.chunks_exact(k).zip(y.chunks_exact_mut(k)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0.0;
        for (o, &v) in out.iter_mut().zip(row) {
            *o = (f64::from(v) - f64::from(max)).exp();
            sum += *o;
        }
        for o in out.iter_mut() {
            *o /= sum;
        }
    }
    // The extended target: blank, l1, blank, l2, ..., blank.
    let s_len = 2 * target.len() + 1;
    let label = |s: usize| {
        if s.is_multiple_of(2) {
            0
        } else {
            target[s / 2] as usize
        }
    };
    // A state may be entered from two back when it is a label differing from the label two back.
    let skip = |s: usize| s >= 2 && s % 2 == 1 && label(s) != label(s - 2);
    let mut alpha = vec![0f64; t_len * s_len];
    let mut beta = vec![0f64; t_len * s_len];
    let mut log_p = 0.0;
    for t in 0..t_len {
        let yt = &y[t * k..(t + 1) * k];
        let mut sum = 0.0;
        for s in 0..s_len {
            let a = if t == 0 {
                if s < 2 {
                    1.0
                } else {
                    0.0
                }
            } else {
                let prev = &alpha[(t - 1) * s_len..t * s_len];
                let mut a = prev[s];
                if s >= 1 {
                    a += prev[s - 1];
                }
                if skip(s) {
                    a += prev[s - 2];
                }
                a
            };
            let v = a * yt[label(s)];
            alpha[t * s_len + s] = v;
            sum += v;
        }
        if sum <= 0.0 {
            return None;
        }
        for v in &mut alpha[t * s_len..(t + 1) * s_len] {
            *v /= sum;
        }
        log_p += sum.ln();
    }
    let last = &alpha[(t_len - 1) * s_len..];
    let end = last[s_len - 1] + if s_len >= 2 { last[s_len - 2] } else { 0.0 };
    if end <= 0.0 {
        return None;
    }
    log_p += end.ln();
    for t in (0..t_len).rev() {
        let yt = &y[t * k..(t + 1) * k];
        let mut sum = 0.0;
        for s in 0..s_len {
            let b = if t == t_len - 1 {
                if s + 2 >= s_len {
                    1.0
                } else {
                    0.0
                }
            } else {
                let next = &beta[(t + 1) * s_len..(t + 2) * s_len];
                let mut b = next[s];
                if s + 1 < s_len {
                    b += next[s + 1];
                }
                if s + 2 < s_len && skip(s + 2) {
                    b += next[s + 2];
                }
                b
            };
            let v = b * yt[label(s)];
            beta[t * s_len + s] = v;
            sum += v;
        }
        if sum <= 0.0 {
            return None;
        }
        for v in &mut beta[t * s_len..(t + 1) * s_len] {
            *v /= sum;
        }
    }
    // γ_t(s) ∝ α̂_t(s)·β̂_t(s)/y_t(l'_s), normalised over s; the gradient is y − Σ_{s: l'_s = k} γ_t(s).
    let mut gamma = vec![0f64; s_len];
    for t in 0..t_len {
        let yt = &y[t * k..(t + 1) * k];
        let mut total = 0.0;
        for (s, g) in gamma.iter_mut().enumerate() {
            *g = alpha[t * s_len + s] * beta[t * s_len + s] / yt[label(s)].max(1e-300);
            total += *g;
        }
        if total <= 0.0 {
            return None;
        }
        let mut gk: Vec<f64> = yt.to_vec();
        for (s, g) in gamma.iter().enumerate() {
            gk[label(s)] -= g / total;
        }
        for (o, v) in grad[t * k..(t + 1) * k].iter_mut().zip(gk) {
            *o = v as f32;
        }
    }
    Some(-log_p)
}

/// Mean CTC loss of a batch and its gradient with respect to the logits `(B, T, K)` (row-major). The `T` steps
/// are `rows` consecutive output rows of `T / rows` steps each (a two-line plate's lines), and `targets` holds
/// `rows` targets per sample, sample-major (an empty target: the row must stay blank). A sample's loss is the sum
/// over its rows divided by its total target length (PyTorch's "mean" per sequence), then the batch is averaged.
/// Returns the loss, the gradient and how many samples could not be aligned (counted as 0, no gradient).
pub(crate) fn batch_loss(
    logits: &[f32],
    dims: (usize, usize, usize),
    rows: usize,
    targets: &[Vec<u32>],
) -> Result<(f64, Vec<f32>, usize), TrainError> {
    let (b, t, k) = dims;
    if rows == 0
        || t % rows != 0
        || logits.len() != b * t * k
        || targets.len() != b * rows
        || b == 0
    {
        return Err(TrainError::Config(format!(
            "CTC: {} logits and {} targets do not fit a batch of {b} × {t} steps ({rows} rows) × {k} classes",
            logits.len(),
            targets.len()
        )));
    }
    if let Some(&bad) = targets
        .iter()
        .flatten()
        .find(|&&l| l == 0 || l as usize >= k)
    {
        return Err(TrainError::Config(format!(
            "CTC: target class {bad} is the blank or not below {k} classes"
        )));
    }
    let steps = t / rows;
    let mut grad = vec![0f32; b * t * k];
    let (mut total, mut infeasible) = (0.0, 0);
    for ((z, g), tgt) in logits
        .chunks_exact(t * k)
        .zip(grad.chunks_exact_mut(t * k))
        .zip(targets.chunks_exact(rows))
    {
        let len: usize = tgt.iter().map(Vec::len).sum();
        let mut loss = Some(0.0);
        for ((zr, gr), target) in z
            .chunks_exact(steps * k)
            .zip(g.chunks_exact_mut(steps * k))
            .zip(tgt)
        {
            loss = loss.and_then(|l| sample_loss(zr, steps, k, target, gr).map(|r| l + r));
        }
        match loss {
            Some(loss) if len > 0 => {
                let scale = 1.0 / (len as f64 * b as f64);
                total += loss * scale;
                for v in g.iter_mut() {
                    *v = (f64::from(*v) * scale) as f32;
                }
            }
            _ => {
                g.fill(0.0);
                infeasible += usize::from(len > 0);
            }
        }
    }
    Ok((total, grad, infeasible))
}

/// The CTC loss of `logits` `(B, T, K)` (`rows` output rows of `T / rows` steps) against `rows` targets per
/// sample, as a scalar tensor in the graph: its value is the mean loss and its gradient with respect to
/// `logits` the exact CTC gradient.
pub(crate) fn loss(
    logits: &Tensor,
    rows: usize,
    targets: &[Vec<u32>],
) -> Result<Tensor, TrainError> {
    let dims = logits.dims3()?;
    let host = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (value, grad, _) = batch_loss(&host, dims, rows, targets)?;
    let g = Tensor::from_vec(grad, dims, logits.device())?.to_dtype(logits.dtype())?;
    // s − detach(s) is 0 with gradient g; adding the value gives the loss.
    let s = (logits * &g)?.sum_all()?;
    Ok(((&s - s.detach())? + value)?)
}

/// Greedy (best-path) decoding of `(B, T, K)` logits in `rows` rows: per row the arg-max class per step,
/// repeats collapsed, blanks dropped; a sample's rows concatenated.
pub(crate) fn decode(logits: &[f32], dims: (usize, usize, usize), rows: usize) -> Vec<Vec<u32>> {
    let (_, t, k) = dims;
    let steps = t / rows.max(1);
    logits
        .chunks_exact((t * k).max(1))
        .map(|z| {
            let mut seq = Vec::with_capacity(t);
            for row in z.chunks_exact((steps * k).max(1)) {
                let mut prev = 0usize;
                for step in row.chunks_exact(k) {
                    let best = step
                        .iter()
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                            if v > bv {
                                (i, v)
                            } else {
                                (bi, bv)
                            }
                        })
                        .0;
                    if best != 0 && best != prev {
                        seq.push(best as u32);
                    }
                    prev = best;
                }
            }
            seq
        })
        .collect()
}

/// One row's syntax: the class range of each character, in order (an empty pattern is an all-blank row).
pub(crate) type Pattern = Vec<Range<u32>>;

/// Best-path decoding under a syntax (issue 12): of the sequences `formats` allow (each format one [`Pattern`]
/// per row), the one whose best CTC alignment scores highest, read from `(B, T, K)` logits in `rows` rows. A
/// plate's format is known (2 or 3 digits, a syllable, 4 digits; or a region and 2 digits above a syllable and
/// 4 digits), and greedy decoding's commonest errors break it: a repeated digit read once, a character too many.
/// The search is exact (Viterbi over the CTC alignments of each format), `O(T · Σ classes)` per row and format.
/// A format whose classes reach past `K`, or that cannot fit in the row's steps, is skipped; a sample no format
/// fits is read greedily.
pub(crate) fn decode_syntax(
    logits: &[f32],
    dims: (usize, usize, usize),
    rows: usize,
    formats: &[Vec<Pattern>],
) -> Vec<Vec<u32>> {
    let (_, t, k) = dims;
    let rows = rows.max(1);
    let steps = t / rows;
    let usable: Vec<&Vec<Pattern>> = formats
        .iter()
        .filter(|f| f.len() == rows && f.iter().flatten().all(|r| r.end as usize <= k))
        .collect();
    let row_len = (steps * k).max(1);
    let mut lp = vec![0f32; rows * steps * k];
    logits
        .chunks_exact((t * k).max(1))
        .map(|z| {
            for (row, out) in z.chunks_exact(row_len).zip(lp.chunks_exact_mut(row_len)) {
                log_softmax(row, k, out);
            }
            let mut best: Option<(f32, Vec<u32>)> = None;
            for format in &usable {
                let paths: Option<Vec<(f32, Vec<u32>)>> = format
                    .iter()
                    .zip(lp.chunks_exact(row_len))
                    .map(|(pattern, row)| best_path(row, k, pattern))
                    .collect();
                let Some(paths) = paths else { continue };
                let score: f32 = paths.iter().map(|p| p.0).sum();
                if score.is_finite() && best.as_ref().is_none_or(|(b, _)| score > *b) {
                    best = Some((score, paths.into_iter().flat_map(|p| p.1).collect()));
                }
            }
            best.map(|(_, seq)| seq)
                .unwrap_or_else(|| decode(z, (1, t, k), rows).pop().unwrap_or_default())
        })
        .collect()
}

/// `out` = log-softmax of each `k`-wide step of `row`.
fn log_softmax(row: &[f32], k: usize, out: &mut [f32]) {
    for (step, o) in row.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        let max = step.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f32 = step.iter().map(|&v| (v - max).exp()).sum();
        let norm = max + sum.ln();
        for (o, &v) in o.iter_mut().zip(step) {
            *o = v - norm;
        }
    }
}

/// The best CTC alignment of one row (`lp`: `T × K` log-probabilities) to a sequence that matches `pattern`:
/// its log-probability and the sequence, or `None` when no sequence of the pattern fits in `T` steps.
///
/// States: "blank after j characters" (`j = 0..=L`) and "emitting character j as class c". Character j is
/// entered from the blank after j − 1, or straight from character j − 1 when the classes differ (CTC needs a
/// blank between equal neighbours).
// A state's index reads three arrays (score, next, back) at once, so the loops run over state ids.
#[allow(clippy::needless_range_loop)]
fn best_path(lp: &[f32], k: usize, pattern: &[Range<u32>]) -> Option<(f32, Vec<u32>)> {
    let t_len = lp.len() / k.max(1);
    let l = pattern.len();
    if t_len == 0 {
        return (l == 0).then(|| (0.0, Vec::new()));
    }
    // State ids: blanks 0..=l, then character j's classes at offset[j].
    let mut offset = Vec::with_capacity(l + 1);
    let mut n = l + 1;
    for r in pattern {
        offset.push(n);
        n += r.len();
    }
    offset.push(n);
    let class_of = |j: usize, s: usize| pattern[j].start as usize + (s - offset[j]);
    const NONE: u32 = u32::MAX;
    let mut score = vec![f32::NEG_INFINITY; n];
    let mut next = vec![f32::NEG_INFINITY; n];
    let mut back = vec![NONE; t_len * n];
    score[0] = lp[0];
    if let Some(r) = pattern.first() {
        for c in r.clone() {
            score[offset[0] + (c - r.start) as usize] = lp[c as usize];
        }
    }
    // Per character, its best and second-best state at the previous step (for "classes differ").
    let mut top2 = vec![[(f32::NEG_INFINITY, NONE); 2]; l];
    for t in 1..t_len {
        let step = &lp[t * k..(t + 1) * k];
        for (j, top) in top2.iter_mut().enumerate() {
            *top = [(f32::NEG_INFINITY, NONE); 2];
            for s in offset[j]..offset[j + 1] {
                let v = score[s];
                if v > top[0].0 {
                    top[1] = top[0];
                    top[0] = (v, s as u32);
                } else if v > top[1].0 {
                    top[1] = (v, s as u32);
                }
            }
        }
        let back = &mut back[t * n..(t + 1) * n];
        for j in 0..=l {
            let (mut v, mut from) = (score[j], j as u32);
            if j > 0 && top2[j - 1][0].0 > v {
                (v, from) = top2[j - 1][0];
            }
            next[j] = v + step[0];
            back[j] = from;
        }
        for j in 0..l {
            for s in offset[j]..offset[j + 1] {
                let c = class_of(j, s);
                let (mut v, mut from) = (score[s], s as u32);
                if score[j] > v {
                    (v, from) = (score[j], j as u32);
                }
                if j > 0 {
                    let prev = &top2[j - 1];
                    let other = if prev[0].1 != NONE && class_of(j - 1, prev[0].1 as usize) == c {
                        prev[1]
                    } else {
                        prev[0]
                    };
                    if other.0 > v {
                        (v, from) = other;
                    }
                }
                next[s] = v + step[c];
                back[s] = from;
            }
        }
        std::mem::swap(&mut score, &mut next);
    }
    let mut end = (score[l], l);
    if l > 0 {
        for s in offset[l - 1]..offset[l] {
            if score[s] > end.0 {
                end = (score[s], s);
            }
        }
    }
    if !end.0.is_finite() {
        return None;
    }
    // Walk back; a character state entered from another state emits its class.
    let mut seq = Vec::with_capacity(l);
    let mut s = end.1;
    for t in (0..t_len).rev() {
        let from = if t > 0 {
            back[t * n + s] as usize
        } else {
            usize::MAX
        };
        if s > l && from != s {
            let j = offset[..l].partition_point(|&o| o <= s) - 1;
            seq.push(class_of(j, s) as u32);
        }
        s = from;
    }
    seq.reverse();
    Some((end.0, seq))
}

#[cfg(test)]
#[allow(clippy::excessive_precision)] // reference values as PyTorch printed them
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    // PyTorch 2.15, float64:
    //   torch.manual_seed(0); T, B, K = 6, 3, 5
    //   z = (torch.randn(B, T, K) * 1.5).double().requires_grad_(True)
    //   targets = [[1, 2, 2], [3], [4, 1, 4, 2]]
    //   lp = F.log_softmax(z, -1).transpose(0, 1)
    //   F.ctc_loss(lp, tg, il, tl, blank=0, reduction="none"/"mean", zero_infinity=True); loss.backward()
    const Z: [f32; 90] = [
        -1.68876, -1.72854, -0.375868, -0.650818, 1.273066, 1.038014, -0.474019, -3.172829,
        0.483412, -1.895002, 0.524975, 0.462201, 0.179762, 1.856487, 1.675166, -0.370917,
        -2.028981, -2.543897, 0.849976, 1.190263, 0.898259, -2.332643, -0.512041, 2.779509,
        1.125284, -0.878246, -0.260095, 0.275217, 2.084049, 2.379501, 1.419448, -1.265515,
        -0.920375, 0.047389, -0.739015, 0.372622, 0.659544, 0.168617, 0.961189, 0.661734,
        -0.153464, 1.188666, -0.434502, 0.078761, 0.784291, 3.453308, -2.203341, -2.380033,
        -1.009635, 1.309247, 1.583036, 0.266766, -0.345503, -0.587632, 0.814942, -0.592736,
        -0.669326, 1.116031, 2.281469, 5.115754, -2.296777, -1.851202, 2.729588, -0.827293,
        -0.853872, 1.379957, 1.666224, 1.934811, -2.217261, 3.850849, -0.70968, 0.503326,
        -2.443989, -0.824615, 1.753032, 0.591754, 2.912193, 1.187247, -0.030378, -0.655754,
        2.468801, -2.040253, 1.449455, 2.437175, -0.548428, -1.953661, 0.149105, 0.662733, 0.37039,
        0.115331,
    ];
    const PER: [f64; 3] = [12.883693937507735, 7.827606678863297, 8.606578710288401];
    const MEAN: f64 = 4.75793866742377;
    const GRAD: [f32; 90] = [
        -0.01994729,
        -0.08333581,
        0.01483731,
        0.01127057,
        0.07717523,
        -0.01557634,
        -0.02057237,
        -0.00128159,
        0.03425495,
        0.00317535,
        0.00032635,
        0.0012202,
        -0.08199544,
        0.04386125,
        0.03658763,
        -0.07248232,
        0.00223782,
        -0.02554497,
        0.03982351,
        0.05596598,
        -0.07839693,
        0.00048255,
        -0.01752433,
        0.08011709,
        0.01532161,
        -0.00278695,
        0.0040143,
        -0.09930435,
        0.04184647,
        0.05623052,
        -0.09963618,
        0.01482813,
        0.02094012,
        0.03876396,
        0.02510397,
        -0.21513711,
        0.07066783,
        0.04325287,
        0.0303936,
        0.07082281,
        -0.24460559,
        0.13574718,
        0.02677923,
        -0.00851762,
        0.0905968,
        -0.03737121,
        0.00102608,
        0.0008599,
        0.00107564,
        0.0344096,
        -0.13768031,
        0.04487983,
        0.02433023,
        -0.00917614,
        0.07764639,
        -0.08404188,
        0.00094544,
        0.00563642,
        -0.23019291,
        0.30765293,
        -0.01175415,
        0.00079572,
        0.07765544,
        0.00221533,
        -0.06891234,
        0.00300441,
        -0.01311814,
        0.00910913,
        0.0001433,
        0.0008613,
        0.00119326,
        -0.00752904,
        0.00085683,
        0.00432693,
        0.00115202,
        -0.00466091,
        0.00774031,
        0.00525385,
        0.0032373,
        -0.01157055,
        0.01789733,
        0.00038391,
        0.00157693,
        0.03378706,
        -0.05364522,
        0.0003801,
        0.01664028,
        -0.05386973,
        0.02076171,
        0.01608764,
    ];
    /// The three targets, one row each.
    fn targets() -> Vec<Vec<u32>> {
        vec![vec![1, 2, 2], vec![3], vec![4, 1, 4, 2]]
    }

    #[test]
    fn matches_pytorch_loss_and_gradient() {
        let mut g = vec![0f32; 30];
        for (i, target) in targets().iter().enumerate() {
            let loss = sample_loss(&Z[i * 30..(i + 1) * 30], 6, 5, target, &mut g).unwrap();
            assert!(
                (loss - PER[i]).abs() < 1e-4 * PER[i],
                "sample {i}: {loss} vs {}",
                PER[i]
            );
        }
        let (mean, grad, infeasible) = batch_loss(&Z, (3, 6, 5), 1, &targets()).unwrap();
        assert_eq!(infeasible, 0);
        assert!((mean - MEAN).abs() < 1e-4 * MEAN, "{mean} vs {MEAN}");
        for (i, (a, b)) in grad.iter().zip(GRAD).enumerate() {
            assert!((a - b).abs() < 2e-5, "grad[{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let target = [2u32, 2, 3];
        let mut g = vec![0f32; 30];
        let z: Vec<f32> = Z[30..60].to_vec();
        sample_loss(&z, 6, 5, &target, &mut g).unwrap();
        let mut scratch = vec![0f32; 30];
        for i in [0, 7, 13, 22, 29] {
            let h = 1e-2f32;
            let (mut up, mut down) = (z.clone(), z.clone());
            up[i] += h;
            down[i] -= h;
            let lu = sample_loss(&up, 6, 5, &target, &mut scratch).unwrap();
            let ld = sample_loss(&down, 6, 5, &target, &mut scratch).unwrap();
            let fd = (lu - ld) / (2.0 * f64::from(h));
            assert!(
                (fd - f64::from(g[i])).abs() < 1e-3,
                "logit {i}: {fd} vs {}",
                g[i]
            );
        }
    }

    #[test]
    fn rows_are_separate_sequences() {
        // Two rows of 3 steps = the two halves of each 6-step sample: the loss is the two rows' losses over the
        // total length, and an empty target asks for an all-blank row.
        let t = vec![vec![], vec![1, 2], vec![3], vec![4]];
        let (mean, grad, infeasible) = batch_loss(&Z[..60], (2, 6, 5), 2, &t).unwrap();
        assert_eq!(infeasible, 0);
        let mut g = vec![0f32; 15];
        let mut want = 0.0;
        for (s, rows) in t.chunks(2).enumerate() {
            let len: usize = rows.iter().map(Vec::len).sum();
            let mut l = 0.0;
            for (r, target) in rows.iter().enumerate() {
                let z = &Z[s * 30 + r * 15..][..15];
                l += sample_loss(z, 3, 5, target, &mut g).unwrap();
                for (a, b) in grad[s * 30 + r * 15..][..15].iter().zip(&g) {
                    assert!((f64::from(*a) - f64::from(*b) / (2.0 * len as f64)).abs() < 1e-6);
                }
            }
            want += l / len as f64 / 2.0;
        }
        assert!((mean - want).abs() < 1e-9, "{mean} vs {want}");
        // An all-blank row costs −Σ log p(blank).
        let blank: f64 = (0..3)
            .map(|s| {
                let row = &Z[s * 5..s * 5 + 5];
                let lse = row.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
                lse - f64::from(row[0])
            })
            .sum();
        let mut g = vec![0f32; 15];
        assert!((sample_loss(&Z[..15], 3, 5, &[], &mut g).unwrap() - blank).abs() < 1e-9);
    }

    #[test]
    fn a_target_that_cannot_fit_counts_zero() {
        // 1,1,1,1 needs 7 steps (three blanks between the repeats): T = 6 cannot emit it.
        let t = vec![vec![1u32, 1, 1, 1], vec![3]];
        let (mean, grad, infeasible) = batch_loss(&Z[..60], (2, 6, 5), 1, &t).unwrap();
        assert_eq!(infeasible, 1);
        assert!(grad[..30].iter().all(|&v| v == 0.0));
        let mut g = vec![0f32; 30];
        let second = sample_loss(&Z[30..60], 6, 5, &[3], &mut g).unwrap();
        assert!((mean - second / 2.0).abs() < 1e-9, "{mean} vs {second}");
        // Wrong sizes, blanks and classes beyond K in targets are errors, not panics.
        assert!(batch_loss(&Z[..60], (2, 6, 5), 1, &t[..1]).is_err());
        assert!(batch_loss(&Z[..60], (2, 6, 5), 4, &t).is_err());
        assert!(batch_loss(&Z[..30], (1, 6, 5), 1, &[vec![9]]).is_err());
        assert!(batch_loss(&Z[..30], (1, 6, 5), 1, &[vec![0, 1]]).is_err());
    }

    #[test]
    fn the_graph_loss_has_the_ctc_value_and_gradient() {
        let z = Var::from_vec(Z.to_vec(), (3, 6, 5), &Device::Cpu).unwrap();
        let l = loss(z.as_tensor(), 1, &targets()).unwrap();
        let v = f64::from(l.to_scalar::<f32>().unwrap());
        assert!((v - MEAN).abs() < 1e-4 * MEAN, "{v} vs {MEAN}");
        let grads = l.backward().unwrap();
        let g = grads
            .get(z.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (a, b)) in g.iter().zip(GRAD).enumerate() {
            assert!((a - b).abs() < 2e-5, "grad[{i}]: {a} vs {b}");
        }
    }

    #[test]
    fn greedy_decoding_collapses_repeats_and_drops_blanks() {
        // Steps (arg-max): 1 1 0 1 2 2 0 -> [1, 1, 2]; K = 3.
        let steps = [1usize, 1, 0, 1, 2, 2, 0];
        let one_hot = |steps: &[usize]| {
            let mut logits = vec![0f32; steps.len() * 3];
            for (t, &c) in steps.iter().enumerate() {
                logits[t * 3 + c] = 1.0;
            }
            logits
        };
        assert_eq!(decode(&one_hot(&steps), (1, 7, 3), 1), vec![vec![1, 1, 2]]);
        // Two rows decode separately: a repeat across the row boundary is kept.
        assert_eq!(
            decode(&one_hot(&[0, 2, 2, 2, 0, 1]), (1, 6, 3), 2),
            vec![vec![2, 2, 1]]
        );
        // All blank: nothing.
        assert_eq!(
            decode(&one_hot(&[0, 0]), (1, 2, 3), 1),
            vec![Vec::<u32>::new()]
        );
    }

    /// Every sequence a CTC path of `t` steps over `k` classes can read, with its best path's log-probability
    /// (brute force over all `k^t` paths).
    fn all_readings(lp: &[f32], t: usize, k: usize) -> Vec<(Vec<u32>, f32)> {
        let mut best: std::collections::HashMap<Vec<u32>, f32> = Default::default();
        for code in 0..k.pow(t as u32) {
            let (mut c, mut prev, mut seq, mut score) = (code, 0, Vec::new(), 0.0);
            for step in 0..t {
                let class = c % k;
                c /= k;
                score += lp[step * k + class];
                if class != 0 && class != prev {
                    seq.push(class as u32);
                }
                prev = class;
            }
            let e = best.entry(seq).or_insert(f32::NEG_INFINITY);
            *e = e.max(score);
        }
        best.into_iter().collect()
    }

    #[test]
    fn syntax_decoding_finds_the_best_valid_reading() {
        use rand::{Rng, SeedableRng};
        // Rows of 6 steps over blank + classes 1..=4; formats: an empty top row with "a b" below (a in 1..3,
        // b in 1..5), or "c" above "a a b" (c in 3..5). Checked against brute force on random logits.
        let (t, k) = (6, 5);
        let formats = vec![
            vec![vec![], vec![1..3, 1..5]],
            vec![vec![3..5], vec![1..3, 1..3, 1..5]],
        ];
        let fits = |seq: &[u32], pat: &[Range<u32>]| {
            seq.len() == pat.len() && seq.iter().zip(pat).all(|(c, r)| r.contains(c))
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..40 {
            let logits: Vec<f32> = (0..2 * t * k)
                .map(|_| rng.random_range(-3.0..3.0))
                .collect();
            let mut lp = vec![0f32; 2 * t * k];
            for r in 0..2 {
                let span = r * t * k..(r + 1) * t * k;
                log_softmax(&logits[span.clone()], k, &mut lp[span]);
            }
            let rows: Vec<_> = (0..2)
                .map(|r| all_readings(&lp[r * t * k..(r + 1) * t * k], t, k))
                .collect();
            let mut want = (f32::NEG_INFINITY, Vec::new());
            for f in &formats {
                let mut score = 0.0;
                let mut seq = Vec::new();
                for (r, pat) in f.iter().enumerate() {
                    let (s, best) = rows[r]
                        .iter()
                        .filter(|(s, _)| fits(s, pat))
                        .map(|(s, v)| (s.clone(), *v))
                        .fold((Vec::new(), f32::NEG_INFINITY), |a, b| {
                            if b.1 > a.1 {
                                b
                            } else {
                                a
                            }
                        });
                    score += best;
                    seq.extend(s);
                }
                if score > want.0 {
                    want = (score, seq);
                }
            }
            assert_eq!(
                decode_syntax(&logits, (1, 2 * t, k), 2, &formats),
                vec![want.1]
            );
        }
    }

    #[test]
    fn syntax_decoding_restores_a_repeat_that_greedy_drops() {
        // One row, 8 steps, K = 4; arg-max 1 2 2 2 0 3 0 0 reads "1 2 3" greedily, but the format wants four
        // characters and the blank is a close second at step 2: the best valid reading is "1 2 2 3".
        let (t, k) = (8, 4);
        let mut logits = vec![0f32; t * k];
        for (step, &c) in [1usize, 2, 2, 2, 0, 3, 0, 0].iter().enumerate() {
            logits[step * k + c] = 4.0;
        }
        logits[2 * k] = 3.5;
        let one_row = vec![vec![1..4, 1..4, 1..4, 1..4]];
        assert_eq!(decode(&logits, (1, t, k), 1), vec![vec![1, 2, 3]]);
        assert_eq!(
            decode_syntax(&logits, (1, t, k), 1, std::slice::from_ref(&one_row)),
            vec![vec![1, 2, 2, 3]]
        );
        // A format that cannot fit (9 characters in 8 steps) or names a class past K is skipped; with none
        // left the reading is greedy.
        let too_long = vec![vec![1..4; 9]];
        let past_k = vec![vec![1..5; 4]];
        assert_eq!(
            decode_syntax(&logits, (1, t, k), 1, &[too_long, past_k]),
            vec![vec![1, 2, 3]]
        );
    }
}
