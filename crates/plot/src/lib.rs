//! Line plots as PNG files, with a font compiled in (PNG text works on a machine without fonts): the one owner
//! of ferry's plotting, used by `ferry-lab`'s experiments and `ferry-server report` (issue 16).
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::Path;

use plotters::prelude::*;

/// One line on a plot: a name and (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points (x, y); for [`plot_accuracy`], y is an accuracy in 0..1.
    pub points: Vec<(f64, f64)>,
}

/// A plot could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {reason}")]
pub struct PlotError {
    /// The output file.
    pub path: String,
    /// What failed.
    pub reason: String,
}

/// Registers the built-in DejaVu fonts with plotters (once).
pub fn register_fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Plot accuracy (percent) against `x_label` for every series into a PNG.
pub fn plot_accuracy(
    path: &Path,
    title: &str,
    x_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let pct: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: s.points.iter().map(|&(x, y)| (x, y * 100.0)).collect(),
        })
        .collect();
    plot_lines(
        path,
        title,
        x_label,
        "validation accuracy (%)",
        Some((0.0, 100.0)),
        &pct,
    )
}

/// Plot every series (y against `x_label`) into a PNG; the y range is `y_range`, or from 0 to the largest y.
pub fn plot_lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    y_range: Option<(f64, f64)>,
    series: &[Series],
) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    register_fonts();
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let xs = || series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let x_max = xs().fold(1.0f64, f64::max);
    let x_min = xs().fold(x_max, f64::min).min(0.0);
    let (y_min, y_max) = y_range.unwrap_or_else(|| {
        let m = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|y| y.is_finite())
            .fold(0.0f64, f64::max);
        (0.0, if m > 0.0 { m * 1.1 } else { 1.0 })
    });
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts = s.points.clone();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_png() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        let s = [Series {
            name: "x".into(),
            points: vec![(0.0, 0.1), (1.0, 0.5)],
        }];
        plot_accuracy(&p, "t", "round", &s).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[1..4], b"PNG");
        let q = dir.path().join("b.png");
        plot_lines(&q, "t", "round", "distance", None, &s).unwrap();
        assert_eq!(&std::fs::read(&q).unwrap()[1..4], b"PNG");
        let e = plot_lines(&dir.path().join("no/such/c.png"), "t", "r", "d", None, &s).unwrap_err();
        assert!(e.to_string().contains("c.png"), "{e}");
    }
}
