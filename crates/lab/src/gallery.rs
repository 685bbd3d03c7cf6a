//! `ferry-lab gallery` (issue 12): a PNG of what the synthetic plates look like, loose crops (site A) above tight
//! crops (site B), so a user can see the data the demo and the seed table train on. `docs/img/plates.png` is
//! this command's output with the defaults.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use ferry_train::data::{plates, Dataset, PlateStyle};
use plotters::prelude::*;

use crate::report::register_fonts;

/// Settings of a gallery.
#[derive(Debug, Clone)]
pub struct GalleryConfig {
    /// The PNG to write.
    pub out: PathBuf,
    /// Samples of each crop style.
    pub per_style: usize,
    /// Samples per row.
    pub cols: usize,
    /// Pixels per plate pixel (nearest neighbour).
    pub scale: usize,
    /// Generator seed.
    pub seed: u64,
}

impl Default for GalleryConfig {
    fn default() -> Self {
        GalleryConfig {
            out: PathBuf::from("docs/img/plates.png"),
            per_style: 24,
            cols: 6,
            scale: 2,
            seed: 1,
        }
    }
}

/// Draws the gallery and writes it to `cfg.out`.
pub fn run(cfg: &GalleryConfig) -> Result<()> {
    if cfg.per_style == 0 || cfg.cols == 0 || !(1..=8).contains(&cfg.scale) {
        return Err(anyhow!(
            "gallery: --per-style and --cols must be at least 1 and --scale 1 to 8"
        ));
    }
    register_fonts();
    let sets = [
        (
            "loose crops (site A): a detector's box with margins, the car and neighbouring text around",
            plates::generate(PlateStyle::Loose, cfg.per_style, cfg.seed, None)?,
        ),
        (
            "tight crops (site B): the box fitted to the plate",
            plates::generate(PlateStyle::Tight, cfg.per_style, cfg.seed + 1, None)?,
        ),
    ];
    let (pw, ph) = (
        plates::PLATE_WIDTH * cfg.scale,
        plates::PLATE_HEIGHT * cfg.scale,
    );
    let (gap, band) = (4usize, 30usize);
    let rows = cfg.per_style.div_ceil(cfg.cols);
    let width = cfg.cols * (pw + gap) + gap;
    let height = sets.len() * (band + rows * (ph + gap));
    let to_u32 = |v: usize| u32::try_from(v).map_err(|_| anyhow!("gallery: image too large"));
    let root = BitMapBackend::new(&cfg.out, (to_u32(width)?, to_u32(height)?)).into_drawing_area();
    let err = |e: DrawingAreaErrorKind<_>| anyhow!("gallery {}: {e}", cfg.out.display());
    root.fill(&WHITE).map_err(err)?;
    let mut y = 0usize;
    for (title, data) in &sets {
        root.draw(&Text::new(
            title.to_string(),
            (gap as i32, (y + 7) as i32),
            ("sans-serif", 17).into_font(),
        ))
        .map_err(err)?;
        y += band;
        for i in 0..data.len() {
            let (x0, y0) = (
                gap + (i % cfg.cols) * (pw + gap),
                y + (i / cfg.cols) * (ph + gap),
            );
            let buf = scaled_rgb(data, i, cfg.scale);
            let elem = BitMapElement::with_owned_buffer(
                (x0 as i32, y0 as i32),
                (to_u32(pw)?, to_u32(ph)?),
                buf,
            )
            .ok_or_else(|| anyhow!("gallery: bad image buffer"))?;
            root.draw(&elem).map_err(err)?;
        }
        y += rows * (ph + gap);
    }
    root.present().map_err(err)?;
    println!("wrote {}", cfg.out.display());
    Ok(())
}

/// Sample `i` as RGB bytes, each pixel repeated `scale` times both ways.
fn scaled_rgb(data: &Dataset, i: usize, scale: usize) -> Vec<u8> {
    let (w, h) = (data.width, data.height);
    let img = data.image(i);
    let mut out = Vec::with_capacity(w * h * scale * scale * 3);
    for y in 0..h * scale {
        for x in 0..w * scale {
            let v = (img[(y / scale) * w + x / scale].clamp(0.0, 1.0) * 255.0).round() as u8;
            out.extend([v, v, v]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_of_both_styles() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = GalleryConfig {
            out: dir.path().join("g.png"),
            per_style: 5,
            cols: 3,
            scale: 1,
            seed: 3,
        };
        run(&cfg).unwrap();
        let bytes = std::fs::read(&cfg.out).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        assert!(run(&GalleryConfig { cols: 0, ..cfg }).is_err());
    }
}
