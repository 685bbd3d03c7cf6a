//! Synthetic Korean licence plates: the built-in dataset, generated on the spot (no download).
//!
//! **Strings.** One-line plates read `12가3456` or `123가4567` (2 or 3 digits, a Hangul syllable, 4 digits), the
//! syllable one of the 40 used on Korean plates ([`SYLLABLES`]). Two-line plates (yellow commercial plates, the
//! old green ones) carry a region name on the top line: `서울12바3456` is `서울 12` above `바 3456`; the region is
//! one of [`REGIONS`] and reads as one token.
//!
//! **Labels.** [`SLOTS`] = 8 labels per plate, each an index into [`charset`] (0 = blank, 1..=10 the digits
//! `0`..`9`, 11..=50 the syllables, 51..=67 the region names). Plates are **right-aligned**: a 7-character plate
//! has a blank in slot 0, so the syllable is always slot 3 and the last four digits always slots 4..8, whatever
//! the format; only slot 0 varies between blank, digit and region. The first [`BASE_CLASSES`] tokens (no
//! regions) are what `plate-cnn` reads.
//!
//! **Images.** Grayscale, 1 × [`PLATE_HEIGHT`] × [`PLATE_WIDTH`] = 1 × 32 × 96, values in `[0, 1]` on the 8-bit
//! grid (multiples of 1/255, as a camera delivers them). The size is chosen for CPU training (3,072 pixels per
//! sample), and the Hangul syllable still gets about 9 pixels of height in the smallest loose crop.
//!
//! **Rendering** ([`render`], [`degrade`]). Glyphs come from the built-in Unifont bitmaps or from a TTF/OTF font.
//! The plate (white, yellow, blue or green, one- or two-line) is placed by a random homography (scale, rotation,
//! shear, and the keystone of a camera looking down and sideways) and every output pixel is mapped back into
//! plate space. Around it: the car (body tone, plate holder, bumper edges, grille, lamps) and neighbouring text
//! (dealer frames, stickers). Then the camera: lighting gradient and shadow, night/IR exposure, optical and
//! motion blur, low resolution scaled back up, sensor noise and JPEG compression. [`RenderConfig`] holds the
//! probability of each effect; issue 12 measured what each costs (docs/training.md).
//!
//! **Crop styles** ([`CropStyle`]), after a field study on CCTV plates: *tight* crops are fitted to the plate
//! (it fills 86-100 % of the width, text 16-23 px high); *loose* crops, as a detector's box with margins, shrink
//! it to 48-78 % of the width at a random offset (the plate stays whole), with the car and neighbouring text
//! around (text 10-17 px high). A model trained on tight crops only has never seen the clutter, the small text
//! or the distractor characters of loose crops, and reads them badly.
//!
//! **Determinism.** Sample `i` of seed `s` is drawn from `ChaCha8Rng::seed_from_u64(s)` on stream `i`, so it
//! does not depend on `n`, on the thread that renders it, or on the machine: the renderer uses only IEEE-754
//! `+ - * /` and `sqrt` (rotation via the tangent half-angle, the DCT from tabulated cosines, noise as a sum of
//! four uniforms), no `sin`/`exp` whose last bit may differ between libms.

mod degrade;
mod glyphs;
mod render;

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{CropStyle, DataError, Dataset, PlateStyle, Task};
use glyphs::{unifont_glyphs, GlyphSet};

/// Height in pixels of generated plate images.
pub const PLATE_HEIGHT: usize = 32;
/// Width in pixels of generated plate images.
pub const PLATE_WIDTH: usize = 96;
/// Label slots per plate: the longest plate has 8 tokens.
pub const SLOTS: usize = 8;

/// The Hangul syllables used on Korean plates: private cars (가..주), commercial (바 사 아 자),
/// delivery (배) and rental (하 허 호).
pub const SYLLABLES: [char; 40] = [
    '가', '나', '다', '라', '마', '거', '너', '더', '러', '머', '버', '서', '어', '저', '고', '노',
    '도', '로', '모', '보', '소', '오', '조', '구', '누', '두', '루', '무', '부', '수', '우', '주',
    '바', '사', '아', '자', '배', '하', '허', '호',
];

/// The region names on two-line plates (the 17 provinces and metropolitan cities).
pub const REGIONS: [&str; 17] = [
    "서울", "부산", "대구", "인천", "광주", "대전", "울산", "세종", "경기", "강원", "충북", "충남",
    "전북", "전남", "경북", "경남", "제주",
];

/// Syllables of commercial (yellow) plates: 바 사 아 자 배.
const COMMERCIAL: [usize; 5] = [32, 33, 34, 35, 36];

const DIGITS: usize = 10;
const FIRST_SYLLABLE: usize = 1 + DIGITS;
const FIRST_REGION: usize = FIRST_SYLLABLE + SYLLABLES.len();

/// Classes without the region names: blank, digits and syllables, what one-line plates need and what
/// `plate-cnn` predicts.
pub const BASE_CLASSES: usize = FIRST_REGION;

static CHARSET: OnceLock<Vec<String>> = OnceLock::new();

/// The tokens of each slot: index 0 is the blank (shown as `" "`), 1..=10 the digits `0`..`9`, then
/// [`SYLLABLES`] and [`REGIONS`] in order: 68 classes.
pub fn charset() -> &'static [String] {
    CHARSET.get_or_init(|| {
        let mut v = vec![" ".to_string()];
        v.extend(('0'..='9').map(String::from));
        v.extend(SYLLABLES.iter().map(|c| c.to_string()));
        v.extend(REGIONS.iter().map(|r| r.to_string()));
        v
    })
}

/// Splits a plate string into token ids: a leading region name, then digits and syllables. Spaces are ignored.
fn tokens(text: &str) -> Result<Vec<u32>, String> {
    let chars: Vec<char> = text.chars().filter(|c| *c != ' ').collect();
    let mut out = Vec::with_capacity(SLOTS);
    let mut k = 0;
    if chars.len() >= 2 {
        let head: String = chars[..2].iter().collect();
        if let Some(r) = REGIONS.iter().position(|&r| r == head) {
            out.push((FIRST_REGION + r) as u32);
            k = 2;
        }
    }
    for &c in &chars[k..] {
        let id = if let Some(d) = c.to_digit(10) {
            1 + d
        } else if let Some(s) = SYLLABLES.iter().position(|&s| s == c) {
            (FIRST_SYLLABLE + s) as u32
        } else {
            return Err(format!("'{c}' is not a plate character"));
        };
        out.push(id);
    }
    Ok(out)
}

/// Encodes a plate string as [`SLOTS`] class ids, right-aligned with blanks (class 0) in front. Accepted:
/// `12가3456`, `123가4567` and the two-line form, top line first: `서울12바3456` (region, 2 digits, syllable,
/// 4 digits). Spaces are ignored (`서울 12 바 3456`).
pub fn encode(text: &str) -> Result<Vec<u32>, DataError> {
    let bad = |reason: String| DataError::Plate {
        text: text.to_string(),
        reason,
    };
    let ids = tokens(text).map_err(bad)?;
    let region = ids.first().is_some_and(|&t| t as usize >= FIRST_REGION);
    let ok_len = if region {
        ids.len() == 8
    } else {
        ids.len() == 7 || ids.len() == 8
    };
    if !ok_len {
        return Err(bad(if region {
            "a plate with a region name must read region, 2 digits, syllable, 4 digits (서울12바3456)".into()
        } else {
            "it must have 7 or 8 characters (12가3456, 123가4567)".into()
        }));
    }
    let syllable_at = ids.len() - 5;
    for (k, &id) in ids.iter().enumerate().skip(usize::from(region)) {
        let want_syllable = k == syllable_at;
        let is_syllable = (FIRST_SYLLABLE..FIRST_REGION).contains(&(id as usize));
        if want_syllable != is_syllable {
            return Err(bad(format!(
                "character {} must be {}",
                k + 1 + usize::from(region),
                if want_syllable {
                    "a Hangul syllable"
                } else {
                    "a digit"
                }
            )));
        }
    }
    let mut out = vec![0u32; SLOTS - ids.len()];
    out.extend(ids);
    Ok(out)
}

/// Decodes class ids back to text: blanks are dropped, ids outside the charset show as `?`.
pub fn decode(labels: &[u32]) -> String {
    let cs = charset();
    labels
        .iter()
        .filter(|&&l| l != 0)
        .map(|&l| cs.get(l as usize).map_or("?", String::as_str))
        .collect()
}

/// The lines of a plate from its [`SLOTS`] label ids, as token sequences: a plate with a region name reads the
/// region and two digits on the top line and the rest below; a one-line plate has an empty top line. A reader
/// with one output row per line learns each line as its own sequence.
pub fn lines(labels: &[u32]) -> [Vec<u32>; 2] {
    let tokens: Vec<u32> = labels.iter().copied().filter(|&l| l != 0).collect();
    if tokens.first().is_some_and(|&t| t as usize >= FIRST_REGION) && tokens.len() > 3 {
        [tokens[..3].to_vec(), tokens[3..].to_vec()]
    } else {
        [Vec::new(), tokens]
    }
}

static SYNTAX: OnceLock<Vec<Vec<Vec<Range<u32>>>>> = OnceLock::new();

/// The plate formats [`encode`] accepts, as a two-row reader reads them ([`lines`]): per format, the token
/// classes of the top line, then of the bottom line. One-line plates (`12가3456`, `123가4567`) have an empty top
/// line; a two-line plate reads region and 2 digits above syllable and 4 digits. A CTC reader's output is
/// decoded to the most likely string of these formats (`ctc::decode_syntax`), so it never reads a plate that
/// cannot exist.
pub fn syntax() -> &'static [Vec<Vec<Range<u32>>>] {
    SYNTAX.get_or_init(|| {
        let d = 1..FIRST_SYLLABLE as u32;
        let s = FIRST_SYLLABLE as u32..FIRST_REGION as u32;
        let r = FIRST_REGION as u32..(FIRST_REGION + REGIONS.len()) as u32;
        let line = |lead: usize, head: &[Range<u32>]| {
            let mut v = head.to_vec();
            v.extend(std::iter::repeat_n(d.clone(), lead));
            v.push(s.clone());
            v.extend(std::iter::repeat_n(d.clone(), 4));
            v
        };
        vec![
            vec![Vec::new(), line(2, &[])],
            vec![Vec::new(), line(3, &[])],
            vec![vec![r, d.clone(), d.clone()], line(0, &[])],
        ]
    })
}

/// A random one-line plate string, 7 or 8 characters with equal probability.
pub fn random_plate<R: Rng + ?Sized>(rng: &mut R) -> String {
    let lead = if rng.random_bool(0.5) { 3 } else { 2 };
    let mut s = String::with_capacity(16);
    for _ in 0..lead {
        s.push(char::from(b'0' + rng.random_range(0..10u8)));
    }
    s.push(SYLLABLES[rng.random_range(0..SYLLABLES.len())]);
    for _ in 0..4 {
        s.push(char::from(b'0' + rng.random_range(0..10u8)));
    }
    s
}

/// How often each kind of plate and each camera effect occurs in generated plates: probabilities in `[0, 1]`
/// (`perspective` is a strength). `Default` is what `plates:` specs use (issue 12 measured each effect).
#[derive(Debug, Clone, PartialEq)]
pub struct RenderConfig {
    /// Two-line plates with a region name (needs a reader with the region classes; 0 for `plate-cnn`).
    pub two_line: f64,
    /// Yellow commercial one-line plates (the rest: white, blue and a few green).
    pub yellow: f64,
    /// Strength of the keystone a camera looking down and sideways gives, 0..1.
    pub perspective: f32,
    /// Car context around the plate: holder, bumper edges, grille, lamps (mostly in loose crops).
    pub context: f64,
    /// A line of neighbouring text (dealer frame, sticker) near the plate.
    pub distractors: f64,
    /// Night / infra-red exposure: dark surroundings, a glowing plate, more noise.
    pub night: f64,
    /// Motion blur of 1-4 px (at most a third of a digit's width).
    pub motion_blur: f64,
    /// Low resolution (1/1.3 to 1/2.4, the characters kept at least 11 px high) scaled back up.
    pub low_res: f64,
    /// JPEG compression at quality 35-90 (60-90 for small text).
    pub jpeg: f64,
}

impl Default for RenderConfig {
    fn default() -> Self {
        RenderConfig {
            two_line: 0.05,
            yellow: 0.15,
            perspective: 1.0,
            context: 0.8,
            distractors: 0.3,
            night: 0.08,
            motion_blur: 0.15,
            low_res: 0.2,
            jpeg: 0.3,
        }
    }
}

impl RenderConfig {
    /// The settings without any effect added by issue 12 (one-line plates, no perspective, context, night,
    /// motion blur, low resolution or JPEG): the baseline the measurements compare against.
    pub fn plain() -> Self {
        RenderConfig {
            two_line: 0.0,
            yellow: 0.0,
            ..RenderConfig::default().clean()
        }
    }

    /// These settings without the capture effects (perspective, car context, neighbouring text, night, motion
    /// blur, low resolution, JPEG); the plate kinds stay. What `PlateStyle::Clean` renders.
    pub fn clean(&self) -> Self {
        RenderConfig {
            perspective: 0.0,
            context: 0.0,
            distractors: 0.0,
            night: 0.0,
            motion_blur: 0.0,
            low_res: 0.0,
            jpeg: 0.0,
            ..self.clone()
        }
    }

    /// The default settings for a reader of `classes` classes per slot: no two-line plates if it lacks the
    /// region names (`plate-cnn`'s 51 classes). `None`: a reader of every token.
    pub fn for_classes(classes: Option<usize>) -> Self {
        let mut cfg = RenderConfig::default();
        if classes.is_some_and(|c| c < charset().len()) {
            cfg.two_line = 0.0;
        }
        cfg
    }

    fn check(&self) -> Result<(), DataError> {
        let probs = [
            ("two_line", self.two_line),
            ("yellow", self.yellow),
            ("context", self.context),
            ("distractors", self.distractors),
            ("night", self.night),
            ("motion_blur", self.motion_blur),
            ("low_res", self.low_res),
            ("jpeg", self.jpeg),
            ("perspective", f64::from(self.perspective)),
        ];
        for (name, p) in probs {
            if !(0.0..=1.0).contains(&p) {
                return Err(DataError::Config(format!(
                    "plate rendering: {name} must be in 0..1, not {p}"
                )));
            }
        }
        Ok(())
    }
}

/// Generates `n` plate images (see the module docs) with the default [`RenderConfig`], deterministic in `seed`.
/// `font` is a TTF/OTF file to render with instead of the built-in Unifont bitmaps. Uses all cores; the result
/// does not depend on how many.
pub fn generate(
    style: PlateStyle,
    n: usize,
    seed: u64,
    font: Option<&Path>,
) -> Result<Dataset, DataError> {
    generate_with(style, n, seed, font, &RenderConfig::default())
}

/// [`generate`] with explicit rendering settings.
pub fn generate_with(
    style: PlateStyle,
    n: usize,
    seed: u64,
    font: Option<&Path>,
    cfg: &RenderConfig,
) -> Result<Dataset, DataError> {
    cfg.check()?;
    let cleaned;
    let cfg = if style == PlateStyle::Clean {
        cleaned = cfg.clean();
        &cleaned
    } else {
        cfg
    };
    let owned;
    let glyphs = match font {
        Some(path) => {
            owned = GlyphSet::from_ttf(path)?;
            &owned
        }
        None => unifont_glyphs()?,
    };
    let px = PLATE_HEIGHT * PLATE_WIDTH;
    if n.checked_mul(px * 4)
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(DataError::Config(format!(
            "{n} plates do not fit in memory"
        )));
    }
    let mut images = vec![0f32; n * px];
    let mut labels = vec![0u32; n * SLOTS];
    let mut styles = vec![CropStyle::Tight; n];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, n.div_ceil(256).max(1));
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let chunks = images
            .chunks_mut(per * px)
            .zip(labels.chunks_mut(per * SLOTS))
            .zip(styles.chunks_mut(per))
            .enumerate();
        for (t, ((img, lab), sty)) in chunks {
            scope.spawn(move || {
                for (k, ((img, lab), sty)) in img
                    .chunks_mut(px)
                    .zip(lab.chunks_mut(SLOTS))
                    .zip(sty.iter_mut())
                    .enumerate()
                {
                    let s = sample(glyphs, cfg, style, seed, (t * per + k) as u64, img);
                    *sty = s.crop;
                    lab.copy_from_slice(&s.label);
                }
            });
        }
    });
    Ok(Dataset {
        images,
        channels: 1,
        height: PLATE_HEIGHT,
        width: PLATE_WIDTH,
        labels,
        task: Task::Plate {
            slots: SLOTS,
            classes: charset().len(),
        },
        styles: Some(styles),
    })
}

/// The colours of a plate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Private cars: black on white.
    White,
    /// Commercial: black on yellow.
    Yellow,
    /// Electric cars: dark on light blue.
    Blue,
    /// The old plates: white on green.
    Green,
}

/// What one rendered sample is.
#[derive(Debug, Clone)]
struct Sample {
    crop: CropStyle,
    label: [u32; SLOTS],
    /// Text height of the bottom (or only) line, in output pixels (the tests check the crop styles with it).
    #[cfg_attr(not(test), allow(dead_code))]
    text_px: f32,
}

/// Renders sample `index` of `seed` into `out`.
fn sample(
    glyphs: &GlyphSet,
    cfg: &RenderConfig,
    style: PlateStyle,
    seed: u64,
    index: u64,
    out: &mut [f32],
) -> Sample {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let crop = match style {
        PlateStyle::Loose => CropStyle::Loose,
        PlateStyle::Tight => CropStyle::Tight,
        PlateStyle::Mixed | PlateStyle::Clean if rng.random_bool(0.5) => CropStyle::Loose,
        PlateStyle::Mixed | PlateStyle::Clean => CropStyle::Tight,
    };
    let two_line = rng.random_bool(cfg.two_line);
    let kind = if two_line {
        if rng.random_bool(0.7) {
            Kind::Yellow
        } else {
            Kind::Green
        }
    } else {
        let r: f64 = rng.random();
        if r < cfg.yellow {
            Kind::Yellow
        } else if r < cfg.yellow + 0.1 {
            Kind::Blue
        } else if r < cfg.yellow + 0.15 {
            Kind::Green
        } else {
            Kind::White
        }
    };
    let mut ids = Vec::with_capacity(SLOTS);
    if two_line {
        ids.push((FIRST_REGION + rng.random_range(0..REGIONS.len())) as u32);
    }
    let lead = if two_line || rng.random_bool(0.5) {
        2
    } else {
        3
    };
    for _ in 0..lead {
        ids.push(1 + rng.random_range(0..10u32));
    }
    let syllable = if kind == Kind::Yellow {
        COMMERCIAL[rng.random_range(0..COMMERCIAL.len())]
    } else {
        rng.random_range(0..SYLLABLES.len())
    };
    ids.push((FIRST_SYLLABLE + syllable) as u32);
    for _ in 0..4 {
        ids.push(1 + rng.random_range(0..10u32));
    }
    let mut label = [0u32; SLOTS];
    label[SLOTS - ids.len()..].copy_from_slice(&ids);
    let text_px = render::render(
        &mut rng,
        &render::Plate {
            crop,
            kind,
            two_line,
            tokens: &ids,
        },
        glyphs,
        cfg,
        out,
    );
    Sample {
        crop,
        label,
        text_px,
    }
}

/// Four 16-bit uniforms from one draw, summed: mean 0, variance 1 (Irwin-Hall, close enough to Gaussian for
/// sensor noise, and bit-exact everywhere).
fn noise(rng: &mut ChaCha8Rng) -> f32 {
    use rand::RngCore;
    let r = rng.next_u64();
    let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
    (s as f32 / 65536.0 - 2.0) * 1.732_050_8
}

/// A uniform draw in `[lo, hi)`.
fn u(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    rng.random_range(lo..hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charset_layout() {
        let cs = charset();
        assert_eq!(cs.len(), 68);
        assert_eq!(cs[0], " ");
        assert_eq!(cs[1], "0");
        assert_eq!(cs[10], "9");
        assert_eq!(cs[11], "가");
        assert_eq!(cs[BASE_CLASSES - 1], "호");
        assert_eq!(cs[BASE_CLASSES], "서울");
        assert_eq!(BASE_CLASSES, 51);
        let mut sorted = cs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), cs.len(), "charset has duplicates");
        for &c in &COMMERCIAL {
            assert!("바사아자배".contains(SYLLABLES[c]));
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let ids = encode("12가3456").unwrap();
        assert_eq!(ids, vec![0, 2, 3, 11, 4, 5, 6, 7]);
        assert_eq!(decode(&ids), "12가3456");
        let ids = encode("123호4567").unwrap();
        assert_eq!(ids.len(), SLOTS);
        assert_eq!(ids[3] as usize, BASE_CLASSES - 1);
        assert_eq!(decode(&ids), "123호4567");
        // Two-line plates: the region is one token in slot 0, the syllable stays in slot 3.
        let ids = encode("서울12바3456").unwrap();
        assert_eq!(ids, vec![51, 2, 3, 43, 4, 5, 6, 7]);
        assert_eq!(decode(&ids), "서울12바3456");
        assert_eq!(
            encode("제주 34 아 5678").unwrap(),
            encode("제주34아5678").unwrap()
        );
        assert_eq!(decode(&[0, 99, 1]), "?0");
        assert_eq!(
            lines(&encode("서울12바3456").unwrap()),
            [vec![51, 2, 3], vec![43, 4, 5, 6, 7]]
        );
        assert_eq!(
            lines(&encode("123가4567").unwrap()),
            [vec![], vec![2, 3, 4, 11, 5, 6, 7, 8]]
        );
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let p = random_plate(&mut rng);
            let ids = encode(&p).unwrap();
            assert!(ids[3] as usize >= FIRST_SYLLABLE, "{p}");
            assert_eq!(decode(&ids), p);
        }
    }

    #[test]
    fn encode_rejects_non_plates() {
        for s in [
            "",
            "1234567",
            "12가345",
            "1가23456",
            "12가34567",
            "1234가567",
            "12A3456",
            "12각3456",
            "가123456",
            "123가456가",
            "서울123바3456",
            "서울1바3456",
            "서울12바345",
            "12서울3456",
            "서울",
            "서12바3456",
        ] {
            assert!(
                matches!(encode(s), Err(DataError::Plate { .. })),
                "{s} was accepted"
            );
        }
    }

    /// Whether a plate's lines match one of [`syntax`]'s formats.
    fn fits_syntax(labels: &[u32]) -> bool {
        let lines = lines(labels);
        syntax().iter().any(|f| {
            f.iter().zip(&lines).all(|(pat, line)| {
                pat.len() == line.len() && pat.iter().zip(line).all(|(r, c)| r.contains(c))
            })
        })
    }

    #[test]
    fn the_syntax_is_what_encode_accepts() {
        let cfg = RenderConfig {
            two_line: 0.5,
            ..RenderConfig::default()
        };
        let d = generate_with(PlateStyle::Mixed, 200, 5, None, &cfg).unwrap();
        let two_line = (0..d.len())
            .filter(|&i| !lines(d.label(i))[0].is_empty())
            .count();
        assert!(two_line > 50, "{two_line} two-line plates");
        for i in 0..d.len() {
            assert!(fits_syntax(d.label(i)), "{}", decode(d.label(i)));
        }
        for s in ["12가3456", "123가4567", "서울12바3456"] {
            assert!(fits_syntax(&encode(s).unwrap()), "{s}");
        }
        // Strings of plate characters that encode refuses fit no format either.
        for s in [
            "1234567",
            "12가345",
            "1가23456",
            "1234가567",
            "가123456",
            "서울123바3456",
            "서울1바3456",
        ] {
            assert!(encode(s).is_err(), "{s}");
            assert!(!fits_syntax(&tokens(s).unwrap()), "{s}");
        }
    }

    #[test]
    fn deterministic_and_prefix_stable() {
        let a = generate(PlateStyle::Mixed, 40, 3, None).unwrap();
        let b = generate(PlateStyle::Mixed, 40, 3, None).unwrap();
        assert_eq!(a, b);
        assert!(a
            .images
            .iter()
            .zip(&b.images)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        let c = generate(PlateStyle::Mixed, 40, 4, None).unwrap();
        assert_ne!(a.images, c.images);
        assert_ne!(a.labels, c.labels);
        // Sample i does not depend on n (nor on how the work was split across threads).
        let short = generate(PlateStyle::Mixed, 7, 3, None).unwrap();
        assert_eq!(short, a.clone().limit(7));
    }

    /// Pins the exact output so a change to the renderer, or to rand/rand_chacha, cannot slip in
    /// unnoticed: sites generating "the same" data must get the same bits. Update the constant
    /// only on purpose, and say so in the release notes.
    #[test]
    fn output_is_pinned() {
        let d = generate(PlateStyle::Mixed, 4, 123, None).unwrap();
        let mut h: u64 = 0xcbf2_9ce4_8422_2325; // FNV-1a
        let words = d
            .images
            .iter()
            .map(|v| v.to_bits())
            .chain(d.labels.iter().copied());
        for w in words {
            for b in w.to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        assert_eq!(h, 0x2d24_e8ea_9e08_f51f, "render output changed: {h:#018x}");
    }

    #[test]
    fn dataset_shape_and_values() {
        let d = generate(PlateStyle::Mixed, 300, 11, None).unwrap();
        assert_eq!(d.len(), 300);
        assert_eq!(
            (d.channels, d.height, d.width),
            (1, PLATE_HEIGHT, PLATE_WIDTH)
        );
        assert_eq!(
            d.task,
            Task::Plate {
                slots: 8,
                classes: 68
            }
        );
        // In [0, 1], on the 8-bit grid.
        assert!(d
            .images
            .iter()
            .all(|v| (0.0..=1.0).contains(v) && (v * 255.0 - (v * 255.0).round()).abs() < 1e-3));
        for i in 0..d.len() {
            encode(&decode(d.label(i))).unwrap();
        }
        let styles = d.styles.as_ref().unwrap();
        let loose = styles.iter().filter(|&&s| s == CropStyle::Loose).count();
        assert!((100..200).contains(&loose), "{loose} loose of 300");
        let sevens = (0..d.len()).filter(|&i| d.label(i)[0] == 0).count();
        assert!((100..200).contains(&sevens), "{sevens} 7-char of 300");
        let regions = (0..d.len())
            .filter(|&i| d.label(i)[0] as usize >= BASE_CLASSES)
            .count();
        assert!((10..60).contains(&regions), "{regions} two-line of 300");
        // Images are not flat.
        for i in 0..d.len() {
            let img = d.image(i);
            let mean = img.iter().sum::<f32>() / img.len() as f32;
            let var = img.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / img.len() as f32;
            assert!(var > 1e-4, "sample {i} is flat");
        }
        let t = generate(PlateStyle::Tight, 5, 0, None).unwrap();
        assert!(t.styles.unwrap().iter().all(|&s| s == CropStyle::Tight));
    }

    #[test]
    fn clean_plates_are_mixed_crops_without_capture_effects_and_parse_as_a_spec() {
        let cfg = RenderConfig::default();
        let clean = generate_with(PlateStyle::Clean, 60, 8, None, &cfg).unwrap();
        let by_hand = generate_with(PlateStyle::Mixed, 60, 8, None, &cfg.clean()).unwrap();
        assert_eq!(clean.images, by_hand.images);
        assert_eq!(clean.labels, by_hand.labels);
        let effects = generate_with(PlateStyle::Mixed, 60, 8, None, &cfg).unwrap();
        assert_ne!(clean.images, effects.images);
        let loose = clean.styles.as_ref().unwrap();
        assert!(loose.contains(&CropStyle::Loose) && loose.contains(&CropStyle::Tight));
        let spec: crate::data::DataSpec = "plates:clean:60:8".parse().unwrap();
        assert_eq!(spec.to_string(), "plates:clean:60:8");
    }

    #[test]
    fn render_config_switches_effects_and_is_checked() {
        let plain = RenderConfig::plain();
        let d = generate_with(PlateStyle::Mixed, 200, 5, None, &plain).unwrap();
        assert!((0..d.len()).all(|i| (d.label(i)[0] as usize) < BASE_CLASSES));
        let bad = RenderConfig {
            jpeg: 1.5,
            ..RenderConfig::default()
        };
        let e = generate_with(PlateStyle::Mixed, 1, 5, None, &bad).unwrap_err();
        assert!(e.to_string().contains("jpeg"), "{e}");
        let nan = RenderConfig {
            night: f64::NAN,
            ..RenderConfig::default()
        };
        assert!(generate_with(PlateStyle::Mixed, 1, 5, None, &nan).is_err());
        // The labels do not depend on the effects, only on the seed and the plate kinds.
        let a = generate_with(PlateStyle::Mixed, 50, 5, None, &plain).unwrap();
        let b = generate_with(
            PlateStyle::Mixed,
            50,
            5,
            None,
            &RenderConfig {
                jpeg: 1.0,
                ..plain.clone()
            },
        )
        .unwrap();
        assert_eq!(a.labels, b.labels);
        assert_ne!(a.images, b.images);
    }

    #[test]
    fn tight_text_is_larger_than_loose() {
        let glyphs = unifont_glyphs().unwrap();
        let cfg = RenderConfig::default();
        let mean_height = |style| {
            let mut buf = vec![0f32; PLATE_HEIGHT * PLATE_WIDTH];
            (0..200)
                .map(|i| sample(glyphs, &cfg, style, 5, i, &mut buf).text_px)
                .sum::<f32>()
                / 200.0
        };
        let (tight, loose) = (
            mean_height(PlateStyle::Tight),
            mean_height(PlateStyle::Loose),
        );
        assert!(tight > 18.0 && loose < 15.0, "tight {tight}, loose {loose}");
        // In the images: the larger tight text has more vertical stroke edges (|dI/dx|) than the
        // loose text plus its clutter.
        let edges = |style| {
            let d = generate(style, 300, 9, None).unwrap();
            let mut acc = 0f32;
            for i in 0..d.len() {
                acc += d
                    .image(i)
                    .windows(2)
                    .map(|p| (p[1] - p[0]).abs())
                    .sum::<f32>();
            }
            acc / d.len() as f32
        };
        let (tight, loose) = (edges(PlateStyle::Tight), edges(PlateStyle::Loose));
        eprintln!("mean |dI/dx| per image: tight {tight}, loose {loose}");
        assert!(tight > 1.1 * loose, "tight {tight}, loose {loose}");
    }

    #[test]
    fn homography_maps_the_corners() {
        let from = [(1.0, 2.0), (90.0, 0.5), (95.0, 30.0), (3.0, 28.0)];
        let to = [(0.0, 0.0), (104.0, 0.0), (104.0, 22.0), (0.0, 22.0)];
        let h = render::homography(&from, &to);
        for (&(x, y), &(p, q)) in from.iter().zip(&to) {
            let den = h[6] * x + h[7] * y + 1.0;
            let (u, v) = (
                (h[0] * x + h[1] * y + h[2]) / den,
                (h[3] * x + h[4] * y + h[5]) / den,
            );
            assert!(
                (u - p).abs() < 1e-6 && (v - q).abs() < 1e-6,
                "({x}, {y}) -> ({u}, {v})"
            );
        }
    }

    #[test]
    fn ttf_font_renders() {
        let path = ferry_testdata::font(
            "fonts-nanum",
            "usr/share/fonts/truetype/nanum/NanumGothicBold.ttf",
        );
        let d = generate(PlateStyle::Tight, 20, 1, Some(&path)).unwrap();
        let u = generate(PlateStyle::Tight, 20, 1, None).unwrap();
        assert_eq!(d.labels, u.labels);
        assert_ne!(d.images, u.images);
        assert!(d.images.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn absurd_count_is_an_error() {
        let e = generate(PlateStyle::Tight, usize::MAX / 2, 0, None).unwrap_err();
        assert!(matches!(e, DataError::Config(_)), "{e}");
    }

    #[test]
    fn bad_font_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.ttf");
        std::fs::write(&p, b"not a font").unwrap();
        let e = generate(PlateStyle::Tight, 1, 0, Some(&p)).unwrap_err();
        assert!(matches!(e, DataError::Font { .. }), "{e}");
        let e = generate(PlateStyle::Tight, 1, 0, Some(&dir.path().join("none.ttf"))).unwrap_err();
        assert!(matches!(e, DataError::Io { .. }), "{e}");
        // A font without Hangul.
        let latin = ferry_testdata::font(
            "fonts-dejavu-core",
            "usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        );
        let e = generate(PlateStyle::Tight, 1, 0, Some(&latin)).unwrap_err();
        assert!(e.to_string().contains("no glyph"), "{e}");
    }

    /// Writes contact sheets to $TMPDIR and reports the generation speed:
    /// `cargo test -p ferry-train --release -- --ignored --nocapture plates_sheet_and_speed`.
    #[test]
    #[ignore]
    fn plates_sheet_and_speed() {
        let dir = std::env::temp_dir();
        for (style, name) in [(PlateStyle::Tight, "tight"), (PlateStyle::Loose, "loose")] {
            let d = generate(style, 48, 1, None).unwrap();
            let p = dir.join(format!("plates-{name}.png"));
            d.save_sheet(&(0..48).collect::<Vec<_>>(), 6, &p).unwrap();
            let labels: Vec<String> = (0..12).map(|i| decode(d.label(i))).collect();
            eprintln!("{}: first labels {labels:?}", p.display());
        }
        let font = ferry_testdata::font(
            "fonts-nanum",
            "usr/share/fonts/truetype/nanum/NanumGothicBold.ttf",
        );
        let d = generate(PlateStyle::Mixed, 48, 1, Some(&font)).unwrap();
        let p = dir.join("plates-ttf.png");
        d.save_sheet(&(0..48).collect::<Vec<_>>(), 6, &p).unwrap();
        let glyphs = unifont_glyphs().unwrap();
        let cfg = RenderConfig::default();
        let mut buf = vec![0f32; PLATE_HEIGHT * PLATE_WIDTH];
        let n = 20_000;
        let t = std::time::Instant::now();
        for i in 0..n {
            sample(glyphs, &cfg, PlateStyle::Mixed, 0, i, &mut buf);
        }
        let one = n as f64 / t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        generate(PlateStyle::Mixed, n as usize, 0, None).unwrap();
        let all = n as f64 / t.elapsed().as_secs_f64();
        eprintln!("generation: {one:.0} plates/s on one core, {all:.0} plates/s via generate()");
    }
}
