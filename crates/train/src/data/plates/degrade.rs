//! The camera between the scene and the crop: lighting and shadow, optical and motion blur, low resolution
//! (the scene sampled on a coarser grid, where the sensor noise and JPEG blocks also live, then scaled back up
//! as a detector's crop is), sensor noise, JPEG compression, and the 8-bit grid. Deterministic: IEEE
//! `+ - * /`, `sqrt`, `floor` and `round` only; the DCT's cosines are tabulated.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{noise, u, RenderConfig, PLATE_HEIGHT, PLATE_WIDTH};

/// A grayscale image on a grid of its own size.
struct Gray {
    w: usize,
    h: usize,
    px: Vec<f32>,
}

impl Gray {
    /// Clamp-to-edge bilinear sample at continuous coordinates (pixel centres at +0.5).
    fn sample(&self, x: f32, y: f32) -> f32 {
        let (x, y) = (
            (x - 0.5).clamp(0.0, (self.w - 1) as f32),
            (y - 0.5).clamp(0.0, (self.h - 1) as f32),
        );
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.w - 1), (y0 + 1).min(self.h - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let at = |xx: usize, yy: usize| self.px[yy * self.w + xx];
        let top = at(x0, y0) + (at(x1, y0) - at(x0, y0)) * fx;
        let bot = at(x0, y1) + (at(x1, y1) - at(x0, y1)) * fx;
        top + (bot - top) * fy
    }
}

/// Applies the camera to a rendered scene in place (`PLATE_HEIGHT * PLATE_WIDTH` values). `text_px` is the
/// height of the plate's (bottom line's) characters and `digit_px` the width of a digit, in pixels: motion blur
/// stays under a third of a digit, and low resolution keeps the characters at least 11 pixels high.
pub(super) fn camera(
    rng: &mut ChaCha8Rng,
    cfg: &RenderConfig,
    night: bool,
    text_px: f32,
    digit_px: f32,
    out: &mut [f32],
) {
    let (w, h) = (PLATE_WIDTH as f32, PLATE_HEIGHT as f32);
    // Lighting gradient and an occasional straight-edged shadow.
    let (lx, ly) = (u(rng, -0.3, 0.3) / w, u(rng, -0.3, 0.3) / h);
    let shadow = rng
        .random_bool(if night { 0.0 } else { 0.25 })
        .then(|| (u(rng, -1.0, 1.0), u(rng, 0.0, w), u(rng, 0.55, 0.85)));
    for y in 0..PLATE_HEIGHT {
        let yf = y as f32 + 0.5;
        for x in 0..PLATE_WIDTH {
            let xf = x as f32 + 0.5;
            let mut gain = 1.0 + lx * (xf - w / 2.0) + ly * (yf - h / 2.0);
            if let Some((slope, x0, dark)) = shadow {
                if xf > x0 + slope * yf {
                    gain *= dark;
                }
            }
            out[y * PLATE_WIDTH + x] *= gain;
        }
    }

    // Optical blur: separable [a, 1 - 2a, a], once or twice, milder for small text (a 1-pixel stroke of
    // 12-pixel text is gone after two passes at a = 0.3).
    // The text's size: its height, or for narrow characters (loose and two-line plates) what their width
    // allows.
    let size = text_px.min(2.4 * digit_px);
    let room = ((size - 9.0) / 9.0).clamp(0.2, 1.0);
    let passes = if rng.random_bool(f64::from(0.3 * room)) {
        2
    } else {
        1
    };
    let (bx, by) = (u(rng, 0.0, 0.25 * room), u(rng, 0.0, 0.25 * room));
    for _ in 0..passes {
        blur(out, bx, by);
    }
    let mut img = Gray {
        w: PLATE_WIDTH,
        h: PLATE_HEIGHT,
        px: out.to_vec(),
    };
    if rng.random_bool(cfg.motion_blur) {
        let len = u(rng, 1.0, 4.0).min(digit_px / 3.0).max(1.0);
        let (dx, dy) = (1.0, u(rng, -0.35, 0.35));
        let norm = (dx * dx + dy * dy).sqrt();
        img = motion_blur(&img, len * dx / norm, len * dy / norm);
    }
    let low = rng
        .random_bool(cfg.low_res)
        .then(|| u(rng, 1.3, 2.4).min(size / 11.0))
        .filter(|&f| f > 1.15);
    if let Some(f) = low {
        img = downsample(&img, (w / f).round() as usize, (h / f).round() as usize);
    }

    // The sensor: contrast, brightness, noise (more of it at night, when the gain is up).
    let contrast = u(rng, 0.7, 1.2);
    let bright = u(rng, -0.15, 0.15);
    let sigma = if night {
        u(rng, 0.02, 0.06)
    } else {
        u(rng, 0.005, 0.045)
    };
    for o in img.px.iter_mut() {
        *o = ((*o - 0.5) * contrast + 0.5 + bright + sigma * noise(rng)).clamp(0.0, 1.0);
    }
    if rng.random_bool(cfg.jpeg) {
        // Small text survives only the milder settings.
        let worst = if size < 14.0 { 60.0 } else { 35.0 };
        let quality = u(rng, worst, 90.0);
        jpeg(&mut img, quality);
    }
    if std::env::var_os("FERRY_DEBUG_CAMERA").is_some() {
        eprintln!("camera: text {text_px:.1} digit {digit_px:.1} blur {bx:.2}/{by:.2}x{passes} low {low:?} contrast {contrast:.2} bright {bright:.2} sigma {sigma:.3} night {night}");
    }
    if low.is_some() {
        img = upsample(&img, PLATE_WIDTH, PLATE_HEIGHT);
    }
    for (o, v) in out.iter_mut().zip(&img.px) {
        *o = (v.clamp(0.0, 1.0) * 255.0).round() / 255.0;
    }
}

/// In-place separable 3-tap blur with edge clamping.
fn blur(img: &mut [f32], ax: f32, ay: f32) {
    let (w, h) = (PLATE_WIDTH, PLATE_HEIGHT);
    let mut row = [0f32; PLATE_WIDTH];
    for y in 0..h {
        let r = &mut img[y * w..(y + 1) * w];
        row.copy_from_slice(r);
        for x in 0..w {
            let (l, c, rr) = (row[x.saturating_sub(1)], row[x], row[(x + 1).min(w - 1)]);
            r[x] = c + ax * (l + rr - 2.0 * c);
        }
    }
    let mut prev = [0f32; PLATE_WIDTH];
    prev.copy_from_slice(&img[..w]);
    for y in 0..h {
        let below = (y + 1).min(h - 1) * w;
        for x in 0..w {
            let c = img[y * w + x];
            let v = c + ay * (prev[x] + img[below + x] - 2.0 * c);
            prev[x] = c;
            img[y * w + x] = v;
        }
    }
}

/// The average along a segment of `(dx, dy)` pixels centred on each pixel.
fn motion_blur(img: &Gray, dx: f32, dy: f32) -> Gray {
    let taps = ((dx * dx + dy * dy).sqrt().ceil() as usize + 1).max(2);
    let mut px = Vec::with_capacity(img.px.len());
    for y in 0..img.h {
        for x in 0..img.w {
            let (xf, yf) = (x as f32 + 0.5, y as f32 + 0.5);
            let mut acc = 0.0;
            for k in 0..taps {
                let t = k as f32 / (taps - 1) as f32 - 0.5;
                acc += img.sample(xf + t * dx, yf + t * dy);
            }
            px.push(acc / taps as f32);
        }
    }
    Gray {
        w: img.w,
        h: img.h,
        px,
    }
}

/// Area-average resampling to a coarser `w × h` grid.
fn downsample(img: &Gray, w: usize, h: usize) -> Gray {
    let (w, h) = (w.max(1), h.max(1));
    // Separable: weights of source index `s` in target `t` by overlap of [t·r, (t+1)·r) with [s, s+1).
    let weights = |src: usize, dst: usize| -> Vec<Vec<(usize, f32)>> {
        let r = src as f32 / dst as f32;
        (0..dst)
            .map(|t| {
                let (a, b) = (t as f32 * r, (t + 1) as f32 * r);
                let (s0, s1) = (a.floor() as usize, (b.ceil() as usize).min(src));
                (s0..s1)
                    .map(|s| (s, ((s + 1) as f32).min(b) - (s as f32).max(a)))
                    .filter(|&(_, wt)| wt > 0.0)
                    .map(|(s, wt)| (s, wt / r))
                    .collect()
            })
            .collect()
    };
    let (wx, wy) = (weights(img.w, w), weights(img.h, h));
    let mut tmp = vec![0f32; img.h * w];
    for y in 0..img.h {
        for (t, ws) in wx.iter().enumerate() {
            tmp[y * w + t] = ws.iter().map(|&(s, wt)| img.px[y * img.w + s] * wt).sum();
        }
    }
    let mut px = vec![0f32; h * w];
    for (t, ws) in wy.iter().enumerate() {
        for x in 0..w {
            px[t * w + x] = ws.iter().map(|&(s, wt)| tmp[s * w + x] * wt).sum();
        }
    }
    Gray { w, h, px }
}

/// Bilinear resampling to a finer `w × h` grid (pixel centres aligned).
fn upsample(img: &Gray, w: usize, h: usize) -> Gray {
    let (rx, ry) = (img.w as f32 / w as f32, img.h as f32 / h as f32);
    let mut px = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            px.push(img.sample((x as f32 + 0.5) * rx, (y as f32 + 0.5) * ry));
        }
    }
    Gray { w, h, px }
}

/// cos(jπ/16) for j = 0..=8. The tabulated values are part of the pinned render output (cos(π/4) rounds to
/// the f32 above `FRAC_1_SQRT_2`), so they stay as written.
#[allow(clippy::approx_constant)]
const COS16: [f32; 9] = [
    1.0,
    0.980_785_3,
    0.923_879_5,
    0.831_469_6,
    0.707_106_8,
    0.555_570_2,
    0.382_683_43,
    0.195_090_32,
    0.0,
];

/// The orthonormal 8-point DCT-II matrix, `C[k][n] = c(k)·cos((2n+1)kπ/16)`.
fn dct_matrix() -> [[f32; 8]; 8] {
    let cos = |m: usize| -> f32 {
        let m = m % 32;
        match m {
            0..=8 => COS16[m],
            9..=16 => -COS16[16 - m],
            17..=24 => -COS16[m - 16],
            _ => COS16[32 - m],
        }
    };
    std::array::from_fn(|k| {
        let c = if k == 0 { 0.353_553_38 } else { 0.5 };
        std::array::from_fn(|n| c * cos((2 * n + 1) * k))
    })
}

/// The JPEG standard's luminance quantisation table (Annex K).
const LUMA_Q: [f32; 64] = [
    16.0, 11.0, 10.0, 16.0, 24.0, 40.0, 51.0, 61.0, 12.0, 12.0, 14.0, 19.0, 26.0, 58.0, 60.0, 55.0,
    14.0, 13.0, 16.0, 24.0, 40.0, 57.0, 69.0, 56.0, 14.0, 17.0, 22.0, 29.0, 51.0, 87.0, 80.0, 62.0,
    18.0, 22.0, 37.0, 56.0, 68.0, 109.0, 103.0, 77.0, 24.0, 35.0, 55.0, 64.0, 81.0, 104.0, 113.0,
    92.0, 49.0, 64.0, 78.0, 87.0, 103.0, 121.0, 120.0, 101.0, 72.0, 92.0, 95.0, 98.0, 112.0, 100.0,
    103.0, 99.0,
];

/// JPEG's lossy step on a grayscale image: 8×8 blocks (the edge replicated to fill the last ones), DCT,
/// quantisation with the standard table at `quality` (libjpeg's scaling), inverse DCT.
#[allow(clippy::needless_range_loop)] // 8×8 DCT blocks read clearest as matrix indexing.
fn jpeg(img: &mut Gray, quality: f32) {
    let c = dct_matrix();
    let scale = if quality < 50.0 {
        5000.0 / quality
    } else {
        200.0 - 2.0 * quality
    };
    let q: Vec<f32> = LUMA_Q
        .iter()
        .map(|&b| ((b * scale + 50.0) / 100.0).floor().clamp(1.0, 255.0))
        .collect();
    for by in (0..img.h).step_by(8) {
        for bx in (0..img.w).step_by(8) {
            let mut block = [[0f32; 8]; 8];
            for (i, r) in block.iter_mut().enumerate() {
                for (j, v) in r.iter_mut().enumerate() {
                    let (y, x) = ((by + i).min(img.h - 1), (bx + j).min(img.w - 1));
                    *v = img.px[y * img.w + x] * 255.0 - 128.0;
                }
            }
            // coefficients = C · block · Cᵀ, quantised; then block = Cᵀ · coefficients · C.
            let mut tmp = [[0f32; 8]; 8];
            for k in 0..8 {
                for j in 0..8 {
                    tmp[k][j] = (0..8).map(|n| c[k][n] * block[n][j]).sum();
                }
            }
            let mut coef = [[0f32; 8]; 8];
            for k in 0..8 {
                for l in 0..8 {
                    let v: f32 = (0..8).map(|j| tmp[k][j] * c[l][j]).sum();
                    let step = q[k * 8 + l];
                    coef[k][l] = (v / step).round() * step;
                }
            }
            for n in 0..8 {
                for l in 0..8 {
                    tmp[n][l] = (0..8).map(|k| c[k][n] * coef[k][l]).sum();
                }
            }
            for (i, row) in tmp.iter().enumerate() {
                for j in 0..8 {
                    let (y, x) = (by + i, bx + j);
                    if y < img.h && x < img.w {
                        let v: f32 = (0..8).map(|l| row[l] * c[l][j]).sum();
                        img.px[y * img.w + x] = ((v + 128.0) / 255.0).clamp(0.0, 1.0);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dct_matrix_is_orthonormal() {
        let c = dct_matrix();
        for a in 0..8 {
            for b in 0..8 {
                let dot: f32 = (0..8).map(|n| c[a][n] * c[b][n]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-5, "rows {a}, {b}: {dot}");
            }
        }
    }

    #[test]
    fn jpeg_at_top_quality_keeps_the_image_and_at_low_quality_flattens_detail() {
        let px: Vec<f32> = (0..16 * 16)
            .map(|i| ((i * 37 % 101) as f32) / 100.0)
            .collect();
        let mut hi = Gray {
            w: 16,
            h: 16,
            px: px.clone(),
        };
        jpeg(&mut hi, 100.0);
        let err = |a: &[f32]| {
            a.iter()
                .zip(&px)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(
            err(&hi.px) < 0.01,
            "quality 100 changed the image by {}",
            err(&hi.px)
        );
        let mut lo = Gray {
            w: 16,
            h: 16,
            px: px.clone(),
        };
        jpeg(&mut lo, 10.0);
        assert!(
            err(&lo.px) > 0.1,
            "quality 10 left the noise pattern intact"
        );
        // A flat block stays flat (its level quantised) at any quality.
        let mut flat = Gray {
            w: 8,
            h: 8,
            px: vec![0.4; 64],
        };
        jpeg(&mut flat, 10.0);
        assert!(flat.px.iter().all(|v| (v - 0.4).abs() < 0.03));
    }

    #[test]
    fn resampling_keeps_the_mean_and_the_size() {
        let px: Vec<f32> = (0..96 * 32).map(|i| (i % 7) as f32 / 7.0).collect();
        let mean = px.iter().sum::<f32>() / px.len() as f32;
        let img = Gray { w: 96, h: 32, px };
        let small = downsample(&img, 48, 16);
        assert_eq!((small.w, small.h, small.px.len()), (48, 16, 768));
        let m2 = small.px.iter().sum::<f32>() / small.px.len() as f32;
        assert!((m2 - mean).abs() < 1e-4, "{m2} vs {mean}");
        let odd = downsample(&img, 53, 19);
        let m3 = odd.px.iter().sum::<f32>() / odd.px.len() as f32;
        assert!((m3 - mean).abs() < 0.01, "{m3} vs {mean}");
        let big = upsample(&odd, 96, 32);
        assert_eq!(big.px.len(), 96 * 32);
    }

    #[test]
    fn motion_blur_smears_along_its_direction_only() {
        // A vertical line blurred horizontally spreads sideways; a horizontal blur leaves a horizontal line.
        let mut px = vec![0f32; 20 * 10];
        for y in 0..10 {
            px[y * 20 + 10] = 1.0;
        }
        let img = Gray { w: 20, h: 10, px };
        let b = motion_blur(&img, 4.0, 0.0);
        assert!(b.px[5 * 20 + 10] < 0.5 && b.px[5 * 20 + 9] > 0.1);
        let mut px = vec![0f32; 20 * 10];
        for x in 0..20 {
            px[5 * 20 + x] = 1.0;
        }
        let b = motion_blur(&Gray { w: 20, h: 10, px }, 4.0, 0.0);
        assert!((b.px[5 * 20 + 10] - 1.0).abs() < 1e-6 && b.px[4 * 20 + 10] == 0.0);
    }
}
