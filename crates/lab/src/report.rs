//! Results people would rather see than read: markdown tables, CSV files and accuracy plots (PNG).

use std::path::Path;

use anyhow::{Context, Result};
// Plotting has one owner, ferry-plot, shared with `ferry-server report` (issue 16).
pub use ferry_plot::{register_fonts, Series};

/// A setting in a results file as its display form (an architecture's name, an augmentation's spec), for
/// `#[serde(serialize_with = "crate::report::display")]`.
pub(crate) fn display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// An optional setting as its display form, or `null` when unset.
pub(crate) fn display_opt<T: std::fmt::Display, S: serde::Serializer>(
    v: &Option<T>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// Plot accuracy (percent) against `x_label` for every series into a PNG.
pub fn plot_accuracy(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    Ok(ferry_plot::plot_accuracy(path, title, x_label, series)?)
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
