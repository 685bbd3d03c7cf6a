//! Where each effective setting came from (issue 16): a flag, the state's `ferry.toml`, or the built-in default.
//! The typed files are the libraries' (`ferry_site::settings`, `ferry_merge::settings`); this is how both tools
//! pick between a flag and the file, and how `config` prints the result.

use std::fmt;
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::{outln, print_json};

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// A command-line flag.
    Flag,
    /// The state directory's `ferry.toml`.
    File,
    /// The built-in default.
    Default,
    /// Not set anywhere (and no default).
    Unset,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Flag => "flag",
            Origin::File => "ferry.toml",
            Origin::Default => "default",
            Origin::Unset => "not set",
        })
    }
}

/// A flag, else the file's value, else the default.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: Option<T>) -> (Option<T>, Origin) {
    match (flag, file, default) {
        (Some(v), _, _) => (Some(v), Origin::Flag),
        (None, Some(v), _) => (Some(v), Origin::File),
        (None, None, Some(v)) => (Some(v), Origin::Default),
        (None, None, None) => (None, Origin::Unset),
    }
}

/// One line of `config`: a setting, its value as text (escaped), where it came from.
#[derive(Debug, Clone, Serialize)]
pub struct SettingRow {
    /// The setting's name in `ferry.toml`.
    pub name: String,
    /// Its effective value, or `None`.
    pub value: Option<String>,
    /// Where it came from.
    pub origin: Origin,
}

impl SettingRow {
    /// A row from a [`pick`] result.
    pub fn new<T: fmt::Display>(name: &str, picked: &(Option<T>, Origin)) -> SettingRow {
        SettingRow {
            name: name.into(),
            value: picked
                .0
                .as_ref()
                .map(|v| ferry_bundle::escape(&v.to_string())),
            origin: picked.1,
        }
    }
}

impl SettingRow {
    /// A row for a path setting (key, stick, root ...), shown as the path.
    pub fn path(name: &str, picked: &(Option<PathBuf>, Origin)) -> SettingRow {
        let shown = picked.0.as_ref().map(|p| p.display().to_string());
        SettingRow::new(name, &(shown, picked.1))
    }

    /// A row for a list of paths (trust), shown joined with ", ".
    pub fn paths(name: &str, picked: &(Option<Vec<PathBuf>>, Origin)) -> SettingRow {
        let shown = picked.0.as_ref().map(|v| {
            v.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        });
        SettingRow::new(name, &(shown, picked.1))
    }
}

/// Print `config`'s table (or JSON), then the warnings on stderr.
pub fn print_settings(
    file: &str,
    rows: &[SettingRow],
    warnings: &[String],
    json: bool,
) -> Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "file": file, "settings": rows, "warnings": warnings,
        }));
    }
    outln!("settings file: {file}");
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in rows {
        outln!(
            "  {:<width$}  {:<40}  ({})",
            r.name,
            r.value.as_deref().unwrap_or("-"),
            r.origin
        );
    }
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(())
}
