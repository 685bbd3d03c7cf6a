//! Results people would rather see than read: markdown tables, CSV files and accuracy plots (PNG).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One line on a plot: a name and (x, accuracy in 0..1) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points (x, accuracy).
    pub points: Vec<(f64, f64)>,
}

/// A markdown table from a header and rows.
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| -> String {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push_str(&format!(
        "|{}|\n",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    ));
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// Write a CSV file (cells must not contain commas; ours are names and numbers).
pub fn write_csv(path: &Path, header: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut s = header.join(",");
    s.push('\n');
    for r in rows {
        s.push_str(&r.join(","));
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// Print a result table as Markdown (after `title`) and write it to `<dir>/<stem>.md` and `<stem>.csv`.
pub fn write_table(
    dir: &Path,
    stem: &str,
    title: &str,
    header: &[&str],
    rows: &[Vec<String>],
) -> Result<()> {
    let md = markdown_table(header, rows);
    println!("{title}");
    print!("{md}");
    let path = dir.join(format!("{stem}.md"));
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    write_csv(&dir.join(format!("{stem}.csv")), header, rows)
}

/// Registers the built-in DejaVu fonts with plotters (once).
pub(crate) fn register_fonts() {
    // A font compiled into the binary: PNG text works on a machine without any fonts installed.
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
pub fn plot_accuracy(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    register_fonts();
    let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let x_min = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(x_max, f64::min)
        .min(0.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(x_min..x_max, 0f64..100f64)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("validation accuracy (%)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, y * 100.0)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    root.present()
        .map_err(|e| anyhow::anyhow!("plot {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_and_tables_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.png");
        plot_accuracy(
            &p,
            "t",
            "round",
            &[Series {
                name: "x".into(),
                points: vec![(0.0, 0.1), (1.0, 0.5)],
            }],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let t = markdown_table(&["a", "bb"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | bb |\n|---|----|\n| 1 | 2  |\n");
    }
}
