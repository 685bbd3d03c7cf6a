//! The scene of one sample: a plate (layout, colours) placed by a homography into the crop, with the car and
//! neighbouring text around it, drawn by mapping every output pixel back into plate space. The camera's
//! effects come afterwards ([`super::degrade`]).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::glyphs::GlyphSet;
use super::{
    degrade, u, CropStyle, Kind, RenderConfig, FIRST_REGION, FIRST_SYLLABLE, PLATE_HEIGHT,
    PLATE_WIDTH,
};

/// What to draw.
pub(super) struct Plate<'a> {
    pub(super) crop: CropStyle,
    pub(super) kind: Kind,
    pub(super) two_line: bool,
    /// Token ids in reading order (no blanks).
    pub(super) tokens: &'a [u32],
}

/// One glyph box in plate units.
#[derive(Debug, Clone, Copy)]
struct Cell {
    u0: f32,
    v0: f32,
    w: f32,
    h: f32,
    class: usize,
}

/// Plate size in plate units (5 mm): one-line plates are 520 × 110 mm, two-line plates 335 × 170 mm.
const ONE_LINE: (f32, f32) = (104.0, 22.0);
const TWO_LINE: (f32, f32) = (67.0, 34.0);

/// Lays out a row of tokens with natural widths `width(class)` and gaps `gap`, stretched to span `u0..u1`, at
/// height `v0..v0 + h`.
fn row(
    tokens: &[u32],
    width: impl Fn(usize) -> f32,
    gap: f32,
    u0: f32,
    u1: f32,
    v0: f32,
    h: f32,
) -> Vec<Cell> {
    let natural: f32 =
        tokens.iter().map(|&t| width(t as usize)).sum::<f32>() + gap * (tokens.len() as f32 - 1.0);
    let stretch = (u1 - u0) / natural;
    let mut at = u0;
    tokens
        .iter()
        .map(|&t| {
            let w = width(t as usize) * stretch;
            let c = Cell {
                u0: at,
                v0,
                w,
                h,
                class: t as usize,
            };
            at += w + gap * stretch;
            c
        })
        .collect()
}

fn is_syllable(class: usize) -> bool {
    (FIRST_SYLLABLE..FIRST_REGION).contains(&class)
}

/// The plate's size and its glyph boxes; the returned height is that of the bottom (or only) line.
fn layout(rng: &mut ChaCha8Rng, plate: &Plate) -> ((f32, f32), Vec<Cell>, f32) {
    if plate.two_line {
        let (pw, ph) = TWO_LINE;
        // Top line: region and two digits, centred; bottom line: syllable and four digits, filling the plate.
        let top_h = u(rng, 8.5, 10.0);
        let top_v = u(rng, 2.0, 3.0);
        let top_w = u(rng, 30.0, 36.0);
        let top_u = (pw - top_w) / 2.0 + u(rng, -1.5, 1.5);
        let width = |c: usize| if c >= FIRST_REGION { 17.0 } else { 6.5 };
        let mut cells = row(
            &plate.tokens[..3],
            width,
            1.6,
            top_u,
            top_u + top_w,
            top_v,
            top_h,
        );
        let bot_h = u(rng, 15.5, 17.5);
        let bot_v = (top_v + top_h + u(rng, 1.8, 3.0)).min(ph - 1.2 - bot_h);
        let margin = u(rng, 3.5, 6.0);
        let width = |c: usize| if is_syllable(c) { 12.0 } else { 9.5 };
        cells.extend(row(
            &plate.tokens[3..],
            width,
            1.3,
            margin,
            pw - margin,
            bot_v,
            bot_h,
        ));
        ((pw, ph), cells, bot_h)
    } else {
        let (pw, ph) = ONE_LINE;
        let margin = u(rng, 5.0, 9.0);
        let h = u(rng, 14.5, 16.5);
        let v0 = (ph - h) / 2.0 + u(rng, -0.7, 0.7);
        let width = |c: usize| if is_syllable(c) { 14.0 } else { 9.0 };
        (
            (pw, ph),
            row(plate.tokens, width, 1.6, margin, pw - margin, v0, h),
            h,
        )
    }
}

/// The 3×3 homography (h22 = 1) taking the four `from` points to the four `to` points, by Gaussian elimination
/// with partial pivoting (only IEEE `+ - * /`, so bit-exact everywhere).
pub(super) fn homography(from: &[(f64, f64); 4], to: &[(f64, f64); 4]) -> [f64; 8] {
    let mut m = [[0f64; 9]; 8];
    for k in 0..4 {
        let ((x, y), (p, q)) = (from[k], to[k]);
        m[2 * k] = [x, y, 1.0, 0.0, 0.0, 0.0, -x * p, -y * p, p];
        m[2 * k + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -x * q, -y * q, q];
    }
    for col in 0..8 {
        let pivot = (col..8)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let d = if m[col][col].abs() < 1e-12 {
            1e-12
        } else {
            m[col][col]
        };
        for v in &mut m[col][col..9] {
            *v /= d;
        }
        let pivot_row = m[col];
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col];
                if f != 0.0 {
                    for (v, p) in row[col..9].iter_mut().zip(&pivot_row[col..9]) {
                        *v -= f * p;
                    }
                }
            }
        }
    }
    std::array::from_fn(|i| m[i][8])
}

/// A filled ellipse in plate units with a tone (a lamp or reflector).
struct Lamp {
    cu: f32,
    cv: f32,
    ru: f32,
    rv: f32,
    tone: f32,
}

/// Draws the scene into `out` and applies the camera; returns the text height of the bottom (or only) line in
/// output pixels.
pub(super) fn render(
    rng: &mut ChaCha8Rng,
    plate: &Plate,
    glyphs: &GlyphSet,
    cfg: &RenderConfig,
    out: &mut [f32],
) -> f32 {
    let (w, h) = (PLATE_WIDTH as f32, PLATE_HEIGHT as f32);
    let loose = plate.crop == CropStyle::Loose;
    let ((pw, ph), cells, text_h) = layout(rng, plate);

    // Geometry: the plate's corners in the crop, then the homography from crop pixels back to plate units.
    let (fx, fy) = match (loose, plate.two_line) {
        (false, _) => (u(rng, 0.88, 1.02), u(rng, 0.80, 1.0)),
        (true, false) => (u(rng, 0.55, 0.82), u(rng, 0.50, 0.75)),
        (true, true) => (u(rng, 0.45, 0.65), u(rng, 0.70, 0.90)),
    };
    let (tmax, kmax, pitch, yaw) = if loose {
        (0.06, 0.18, (-0.04, 0.15), 0.15)
    } else {
        (0.035, 0.10, (-0.03, 0.10), 0.08)
    };
    let persp = cfg.perspective;
    let k1 = u(rng, pitch.0, pitch.1) * persp; // top edge wider than the bottom: a camera looking down
    let k2 = u(rng, -yaw, yaw) * persp; // one side taller: a camera to the side
    let t = u(rng, -tmax, tmax); // tan(angle / 2)
    let (cos, sin) = ((1.0 - t * t) / (1.0 + t * t), 2.0 * t / (1.0 + t * t));
    let shear = u(rng, -kmax, kmax);
    let (hw, hh) = (fx * w / 2.0, fy * h / 2.0);
    let corners = [
        (-hw * (1.0 + k1), -hh * (1.0 + k2)),
        (hw * (1.0 + k1), -hh * (1.0 - k2)),
        (hw * (1.0 - k1), hh * (1.0 - k2)),
        (-hw * (1.0 - k1), hh * (1.0 + k2)),
    ]
    .map(|(x, y)| {
        let xs = x + shear * y;
        (cos * xs - sin * y, sin * xs + cos * y)
    });
    let (mut x0, mut x1, mut y0, mut y1) = (f32::MAX, f32::MIN, f32::MAX, f32::MIN);
    for &(x, y) in &corners {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let (cx, cy) = if loose {
        // Anywhere a detector's loose box may put it, the plate whole inside the crop.
        let mut place = |lo: f32, hi: f32, size: f32, reach: f32| {
            let (a, b) = (
                (0.5 - lo).max(size / 2.0 - reach),
                (size - 0.5 - hi).min(size / 2.0 + reach),
            );
            if a < b {
                u(rng, a, b)
            } else {
                size / 2.0
            }
        };
        let cx = place(x0, x1, w, 8.0);
        let cy = place(y0, y1, h, 3.0);
        (cx, cy)
    } else {
        (w / 2.0 + u(rng, -2.0, 2.0), h / 2.0 + u(rng, -1.2, 1.2))
    };
    let img = corners.map(|(x, y)| (f64::from(x + cx), f64::from(y + cy)));
    let (pwd, phd) = (f64::from(pw), f64::from(ph));
    let hm = homography(&img, &[(0.0, 0.0), (pwd, 0.0), (pwd, phd), (0.0, phd)]).map(|v| v as f32);
    // Pixels per plate unit, for antialiasing the plate's edge.
    let (sx, sy) = (fx * w / pw, fy * h / ph);
    let s_min = sx.min(sy);
    // Plate fonts are bold; thin strokes would vanish in small text.
    let bold = rng.random_bool(0.7) || text_h * sy < 14.0;
    let set = if bold { &glyphs.bold } else { &glyphs.regular };
    let map = |xf: f32, yf: f32| -> (f32, f32) {
        let den = hm[6] * xf + hm[7] * yf + 1.0;
        (
            (hm[0] * xf + hm[1] * yf + hm[2]) / den,
            (hm[3] * xf + hm[4] * yf + hm[5]) / den,
        )
    };

    // Tones: the plate by kind; at night (infra-red) the plate glows and the car is dark.
    let night = rng.random_bool(cfg.night);
    let (mut bg, mut ink) = match plate.kind {
        Kind::White => (u(rng, 0.75, 0.97), u(rng, 0.02, 0.25)),
        Kind::Yellow => (u(rng, 0.55, 0.80), u(rng, 0.02, 0.22)),
        Kind::Blue => (u(rng, 0.50, 0.75), u(rng, 0.02, 0.20)),
        Kind::Green => (u(rng, 0.18, 0.42), u(rng, 0.72, 0.95)),
    };
    let dark = if night { u(rng, 0.08, 0.35) } else { 1.0 };
    if night {
        (bg, ink) = (u(rng, 0.80, 1.0), u(rng, 0.05, 0.35));
    }
    let plate_tilt = u(rng, -0.1, 0.1);
    let border = rng.random_bool(0.7);
    let (b_in, b_w) = (u(rng, 0.3, 1.2), u(rng, 0.8, 1.6));

    // The car: body tone and gradient, holder, bumper edges, grille, lamps, patches.
    let base = u(rng, 0.1, 0.9);
    let (gx, gy) = (u(rng, -0.3, 0.3) / w, u(rng, -0.4, 0.4) / h);
    let context = rng.random_bool(cfg.context);
    let holder = (context && rng.random_bool(0.5)).then(|| (u(rng, 1.0, 4.0), u(rng, 0.03, 0.35)));
    let bumper_below =
        (context && rng.random_bool(0.6)).then(|| (ph + u(rng, 3.0, 14.0), u(rng, -0.35, 0.35)));
    let bumper_above =
        (context && rng.random_bool(0.4)).then(|| (-u(rng, 3.0, 12.0), u(rng, -0.35, 0.35)));
    let grille = rng
        .random_bool(if loose { 0.5 } else { 0.25 })
        .then(|| (u(rng, 2.5, 6.0), u(rng, 0.05, 0.2), u(rng, 0.0, 6.0)));
    let lamps: Vec<Lamp> = if context && rng.random_bool(if loose { 0.5 } else { 0.2 }) {
        let (gap, ru, rv, cv) = (
            u(rng, 4.0, 25.0),
            u(rng, 5.0, 14.0),
            u(rng, 3.0, 8.0),
            ph / 2.0 + u(rng, -8.0, 8.0),
        );
        let tone = if rng.random_bool(0.5) {
            u(rng, 0.75, 1.0)
        } else {
            u(rng, 0.0, 0.2)
        };
        vec![
            Lamp {
                cu: -gap - ru,
                cv,
                ru,
                rv,
                tone,
            },
            Lamp {
                cu: pw + gap + ru,
                cv,
                ru,
                rv,
                tone,
            },
        ]
    } else {
        Vec::new()
    };
    let n_patches = rng.random_range(0..=if loose { 4 } else { 2 });
    let patches: Vec<[f32; 5]> = (0..n_patches)
        .map(|_| {
            let (px0, py0) = (u(rng, -10.0, w), u(rng, -5.0, h));
            [
                px0,
                py0,
                px0 + u(rng, 2.0, 30.0),
                py0 + u(rng, 1.0, 10.0),
                u(rng, -0.35, 0.35),
            ]
        })
        .collect();
    // Neighbouring text: a dealer's frame above or below the plate, or a sticker beside it, smaller than the
    // plate's characters.
    let (distractors, d_ink) = if rng.random_bool(cfg.distractors) {
        let n = rng.random_range(3..=8usize);
        let dh = u(rng, 5.0, 9.0);
        let toks: Vec<u32> = (0..n)
            .map(|_| {
                if rng.random_bool(0.6) {
                    1 + rng.random_range(0..10u32)
                } else {
                    (FIRST_SYLLABLE + rng.random_range(0..40usize)) as u32
                }
            })
            .collect();
        let dw: f32 = toks
            .iter()
            .map(|&t| {
                if is_syllable(t as usize) {
                    dh * 0.95
                } else {
                    dh * 0.6
                }
            })
            .sum::<f32>()
            * 1.15;
        let (u0, v0) = match rng.random_range(0..4u32) {
            0 => (u(rng, -20.0, pw - 10.0), ph + u(rng, 1.5, 4.0)),
            1 => (u(rng, -20.0, pw - 10.0), -dh - u(rng, 1.5, 4.0)),
            2 => (-dw - u(rng, 2.0, 10.0), u(rng, -4.0, ph - dh + 4.0)),
            _ => (pw + u(rng, 2.0, 10.0), u(rng, -4.0, ph - dh + 4.0)),
        };
        let cells = row(
            &toks,
            |c| if is_syllable(c) { 0.95 * dh } else { 0.6 * dh },
            0.15 * dh,
            u0,
            u0 + dw,
            v0,
            dh,
        );
        let tone = if base > 0.5 {
            u(rng, 0.0, 0.3)
        } else {
            u(rng, 0.7, 1.0)
        };
        (cells, tone)
    } else {
        (Vec::new(), 0.0)
    };
    // Glyph coverage of the pixel centred at (xf, yf), averaged over 3×3 sub-pixel samples mapped through the
    // homography: an area average, so that strokes thinner than a pixel fade instead of aliasing away.
    let reach = 1.5 / s_min; // plate units within which a pixel may still touch a glyph
    let coverage = |cells: &[Cell], xf: f32, yf: f32, pu: f32, pv: f32| -> f32 {
        let near: Vec<&Cell> = cells
            .iter()
            .filter(|c| {
                pu >= c.u0 - reach
                    && pu < c.u0 + c.w + reach
                    && pv >= c.v0 - reach
                    && pv < c.v0 + c.h + reach
            })
            .collect();
        if near.is_empty() {
            return 0.0;
        }
        let mut total = 0f32;
        for dy in [-1.0f32 / 3.0, 0.0, 1.0 / 3.0] {
            for dx in [-1.0f32 / 3.0, 0.0, 1.0 / 3.0] {
                let (su, sv) = map(xf + dx, yf + dy);
                let mut cov = 0f32;
                for c in &near {
                    if su >= c.u0 && su < c.u0 + c.w && sv >= c.v0 && sv < c.v0 + c.h {
                        let g = &set[c.class];
                        cov = cov.max(g.sample(
                            (su - c.u0) / c.w * g.w as f32,
                            (sv - c.v0) / c.h * g.h as f32,
                        ));
                    }
                }
                total += cov;
            }
        }
        total / 9.0
    };

    for y in 0..PLATE_HEIGHT {
        let yf = y as f32 + 0.5;
        for x in 0..PLATE_WIDTH {
            let xf = x as f32 + 0.5;
            let (pu, pv) = map(xf, yf);
            // The car around the plate.
            let mut v = base + gx * (xf - w / 2.0) + gy * (yf - h / 2.0);
            if let Some((period, amp, phase)) = grille {
                if pv < -1.0 {
                    let p = (pv + phase) / period;
                    v += amp * ((p - p.floor() - 0.5).abs() * 4.0 - 1.0); // triangle wave in [-1, 1]
                }
            }
            if let Some((edge, delta)) = bumper_below {
                if pv > edge {
                    v += delta;
                }
            }
            if let Some((edge, delta)) = bumper_above {
                if pv < edge {
                    v += delta;
                }
            }
            for l in &lamps {
                let (du, dv) = ((pu - l.cu) / l.ru, (pv - l.cv) / l.rv);
                if du * du + dv * dv < 1.0 {
                    v = l.tone;
                }
            }
            if let Some((rim, tone)) = holder {
                if pu > -rim && pu < pw + rim && pv > -rim && pv < ph + rim {
                    v = tone;
                }
            }
            for p in &patches {
                if xf >= p[0] && xf < p[2] && yf >= p[1] && yf < p[3] {
                    v += p[4];
                }
            }
            if !distractors.is_empty() {
                v += (d_ink - v) * coverage(&distractors, xf, yf, pu, pv);
            }
            v *= dark;
            // The plate, composited with an antialiased edge.
            let d = (pu.min(pw - pu) * sx).min(pv.min(ph - pv) * sy); // ~pixels inside the edge
            if d > -0.5 {
                let alpha = (d + 0.5).min(1.0);
                let mut cov = 0f32;
                if border {
                    let e = d / s_min; // plate units from the edge
                    cov = ((e - b_in) * s_min + 0.5).clamp(0.0, 1.0)
                        * ((b_in + b_w - e) * s_min + 0.5).clamp(0.0, 1.0);
                }
                cov = cov.max(coverage(&cells, xf, yf, pu, pv));
                let plate_bg = bg + plate_tilt * (pu / pw - 0.5);
                let pv_val = plate_bg + (ink - plate_bg) * cov;
                v += (pv_val - v) * alpha;
            }
            out[y * PLATE_WIDTH + x] = v;
        }
    }
    // The camera's blur and resolution are bounded by the text's size in pixels: a site's labeller could read
    // every crop it labelled.
    let digit_w = cells
        .iter()
        .filter(|c| c.class < FIRST_SYLLABLE)
        .map(|c| c.w)
        .fold(f32::MAX, f32::min);
    let text_px = text_h * sy;
    if std::env::var_os("FERRY_DEBUG_SCENE").is_some() {
        eprintln!("scene: two_line {} kind {:?} fx {fx} fy {fy} k1 {k1} k2 {k2} t {t} shear {shear} cx {cx} cy {cy} text_px {text_px} digit_px {} night {night} bold {bold}", plate.two_line, plate.kind, digit_w * sx);
        return text_px;
    }
    degrade::camera(rng, cfg, night, text_px, digit_w * sx, out);
    text_px
}
