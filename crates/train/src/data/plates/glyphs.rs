//! Glyph bitmaps for the plate renderer: the built-in Unifont (8×16 digits, 16×16 Hangul) or a TTF/OTF font
//! rasterised once with `ab_glyph`. One bitmap per charset token (a region name is its two syllables side by
//! side), each group (digits, syllables, regions) cropped to the union of its ink so glyphs keep their relative
//! size and baseline; every glyph also comes emboldened, since plate fonts are bold.

use std::path::Path;
use std::sync::OnceLock;

use super::{charset, DataError, DIGITS, SYLLABLES};

/// A coverage bitmap, row-major, values in [0, 1].
#[derive(Debug, Clone)]
pub(super) struct Bitmap {
    pub(super) w: usize,
    pub(super) h: usize,
    px: Vec<f32>,
}

impl Bitmap {
    fn at(&self, x: isize, y: isize) -> f32 {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            0.0
        } else {
            self.px[y as usize * self.w + x as usize]
        }
    }

    /// Bilinear sample at continuous pixel coordinates (pixel centres at +0.5), zero outside.
    pub(super) fn sample(&self, x: f32, y: f32) -> f32 {
        let (x, y) = (x - 0.5, y - 0.5);
        let (x0, y0) = (x.floor(), y.floor());
        let (fx, fy) = (x - x0, y - y0);
        let (xi, yi) = (x0 as isize, y0 as isize);
        let top = self.at(xi, yi) + (self.at(xi + 1, yi) - self.at(xi, yi)) * fx;
        let bot = self.at(xi, yi + 1) + (self.at(xi + 1, yi + 1) - self.at(xi, yi + 1)) * fx;
        top + (bot - top) * fy
    }

    /// One pixel thicker each way (2x2 max filter): plate fonts are bold, Unifont is not.
    fn bold(&self) -> Bitmap {
        let (w, h) = (self.w + 1, self.h + 1);
        let mut px = vec![0f32; w * h];
        for y in 0..h as isize {
            for x in 0..w as isize {
                px[y as usize * w + x as usize] = self
                    .at(x, y)
                    .max(self.at(x - 1, y))
                    .max(self.at(x, y - 1))
                    .max(self.at(x - 1, y - 1));
            }
        }
        Bitmap { w, h, px }
    }

    fn crop(&self, x0: usize, y0: usize, x1: usize, y1: usize) -> Bitmap {
        let (w, h) = (x1 - x0, y1 - y0);
        let mut px = Vec::with_capacity(w * h);
        for y in y0..y1 {
            px.extend_from_slice(&self.px[y * self.w + x0..y * self.w + x1]);
        }
        Bitmap { w, h, px }
    }

    /// `self` and `other` side by side on a common baseline (a region name from its two syllables).
    fn beside(&self, other: &Bitmap) -> Bitmap {
        let (w, h) = (self.w + other.w, self.h.max(other.h));
        let mut px = vec![0f32; w * h];
        for y in 0..h {
            for x in 0..w {
                px[y * w + x] = if x < self.w {
                    self.at(x as isize, y as isize)
                } else {
                    other.at((x - self.w) as isize, y as isize)
                };
            }
        }
        Bitmap { w, h, px }
    }
}

/// Regular and bold glyphs per charset id (index 0, the blank, is never drawn).
#[derive(Debug)]
pub(super) struct GlyphSet {
    pub(super) regular: Vec<Bitmap>,
    pub(super) bold: Vec<Bitmap>,
}

static UNIFONT: OnceLock<Result<GlyphSet, String>> = OnceLock::new();

/// The built-in Unifont glyphs, rasterised on first use.
pub(super) fn unifont_glyphs() -> Result<&'static GlyphSet, DataError> {
    UNIFONT
        .get_or_init(|| {
            let one = |c: char| -> Result<Bitmap, String> {
                let g = unifont::get_glyph(c)
                    .ok_or_else(|| format!("the built-in Unifont lacks '{c}'"))?;
                let (w, h) = (g.get_width(), 16);
                let mut px = Vec::with_capacity(w * h);
                for y in 0..h {
                    px.extend((0..w).map(|x| if g.get_pixel(x, y) { 1.0 } else { 0.0 }));
                }
                Ok(Bitmap { w, h, px })
            };
            GlyphSet::from_canvases(token_canvases(one)?)
        })
        .as_ref()
        .map_err(|e| DataError::Config(e.clone()))
}

/// One canvas per non-blank token, from a per-character rasteriser (a token of several characters is drawn
/// left to right).
fn token_canvases<E>(mut one: impl FnMut(char) -> Result<Bitmap, E>) -> Result<Vec<Bitmap>, E> {
    charset()[1..]
        .iter()
        .map(|tok| {
            let mut chars = tok.chars();
            let first = one(chars.next().unwrap_or(' '))?;
            chars.try_fold(first, |acc, c| Ok(acc.beside(&one(c)?)))
        })
        .collect()
}

impl GlyphSet {
    /// From one canvas per non-blank token, all drawn on a common baseline: each group (digits, syllables,
    /// regions) is cropped to the union of its ink so glyphs keep their relative size and position.
    fn from_canvases(canvases: Vec<Bitmap>) -> Result<GlyphSet, String> {
        let mut regular = vec![Bitmap {
            w: 1,
            h: 1,
            px: vec![0.0],
        }];
        let s_end = DIGITS + SYLLABLES.len();
        for (group, name) in [
            (0..DIGITS, "digits"),
            (DIGITS..s_end, "syllables"),
            (s_end..canvases.len(), "regions"),
        ] {
            let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
            for b in &canvases[group.clone()] {
                for y in 0..b.h {
                    for x in 0..b.w {
                        if b.px[y * b.w + x] > 0.05 {
                            (x0, y0) = (x0.min(x), y0.min(y));
                            (x1, y1) = (x1.max(x + 1), y1.max(y + 1));
                        }
                    }
                }
            }
            if x0 >= x1 || y0 >= y1 {
                return Err(format!("no visible {name}"));
            }
            for b in &canvases[group] {
                let (cx1, cy1) = (x1.min(b.w), y1.min(b.h));
                if x0 >= cx1 || y0 >= cy1 {
                    return Err(format!("a glyph among the {name} is empty"));
                }
                regular.push(b.crop(x0, y0, cx1, cy1));
            }
        }
        let bold = regular.iter().map(Bitmap::bold).collect();
        Ok(GlyphSet { regular, bold })
    }

    /// Rasterises every token with a TTF/OTF font.
    pub(super) fn from_ttf(path: &Path) -> Result<GlyphSet, DataError> {
        use ab_glyph::{Font, FontArc, PxScale, ScaleFont};
        let font_err = |reason: String| DataError::Font {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let font = FontArc::try_from_vec(bytes).map_err(|e| font_err(e.to_string()))?;
        let scale = PxScale::from(24.0);
        let scaled = font.as_scaled(scale);
        let (ascent, descent) = (scaled.ascent(), scaled.descent());
        let h = (ascent - descent).ceil().clamp(1.0, 256.0) as usize;
        let one = |c: char| -> Result<Bitmap, DataError> {
            let id = font.glyph_id(c);
            if id.0 == 0 {
                return Err(font_err(format!("it has no glyph for '{c}'")));
            }
            let w = scaled.h_advance(id).ceil().clamp(1.0, 256.0) as usize;
            let mut px = vec![0f32; w * h];
            let glyph = id.with_scale_and_position(scale, ab_glyph::point(0.0, ascent));
            let outline = font
                .outline_glyph(glyph)
                .ok_or_else(|| font_err(format!("its glyph for '{c}' has no outline")))?;
            let b = outline.px_bounds();
            outline.draw(|x, y, cov| {
                let (gx, gy) = (b.min.x as i64 + i64::from(x), b.min.y as i64 + i64::from(y));
                if gx >= 0 && gy >= 0 && (gx as usize) < w && (gy as usize) < h {
                    let p = &mut px[gy as usize * w + gx as usize];
                    *p = p.max(cov.clamp(0.0, 1.0));
                }
            });
            Ok(Bitmap { w, h, px })
        };
        GlyphSet::from_canvases(token_canvases(one)?).map_err(font_err)
    }
}
