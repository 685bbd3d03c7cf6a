//! Picking the global to import from a folder (issue 16): a stick may hold several globals (last round's,
//! this round's, one of another federation). [`SiteState::pick_global`] takes the newest one that verifies and
//! passes every import check, and says why it passed over each other file.

use std::path::{Path, PathBuf};

use ferry_bundle::{escape, escape_path, Bundle, BundleKind};

use crate::{ImportPolicy, PreparedTrust, SiteError, SiteState};

/// The global chosen from a folder.
#[derive(Debug)]
pub struct Picked {
    /// Its file.
    pub path: PathBuf,
    /// The verified bundle.
    pub bundle: Bundle,
    /// Warnings of the import checks (an expired global).
    pub warnings: Vec<String>,
    /// Every other `.ferry` file in the folder and why it was not taken (escaped).
    pub skipped: Vec<(PathBuf, String)>,
}

impl SiteState {
    /// The newest global in `dir` that verifies under `trust` and passes [`SiteState::check_import`]. Files are
    /// tried newest first by the round their (unverified) header names; the first that passes wins. Nothing is
    /// written.
    pub fn pick_global(
        &self,
        dir: &Path,
        trust: &PreparedTrust,
        policy: &ImportPolicy,
    ) -> Result<Picked, SiteError> {
        let mut candidates = Vec::new();
        let mut skipped = Vec::new();
        let entries =
            std::fs::read_dir(dir).map_err(|source| ferry_bundle::fsutil::FsError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || !name.ends_with(".ferry") {
                continue;
            }
            match ferry_bundle::inspect_file(&path) {
                Err(err) => skipped.push((path, format!("not a readable bundle ({err})"))),
                Ok(i) => match i.manifest {
                    Err(why) => {
                        skipped.push((path, format!("unreadable manifest ({})", escape(&why))))
                    }
                    Ok(m) if m.kind != BundleKind::Global => {
                        skipped.push((path, "a site update (it goes to HQ)".into()))
                    }
                    Ok(m) => candidates.push((m.round, path)),
                },
            }
        }
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let mut chosen: Option<(PathBuf, Bundle, Vec<String>)> = None;
        for (round, path) in candidates {
            if let Some((_, b, _)) = &chosen {
                skipped.push((
                    path,
                    format!(
                        "round {round}, older than round {} chosen",
                        b.manifest.round
                    ),
                ));
                continue;
            }
            let bundle = match ferry_bundle::open_file(&path, trust.keyring()) {
                Ok(b) => b,
                Err(e) => {
                    skipped.push((path, e.to_string()));
                    continue;
                }
            };
            match self.check_import(&bundle, policy, trust) {
                Ok(w) => chosen = Some((path, bundle, w)),
                Err(e) => skipped.push((path, e.to_string())),
            }
        }
        skipped.sort_by(|a, b| a.0.cmp(&b.0));
        match chosen {
            Some((path, bundle, warnings)) => Ok(Picked {
                path,
                bundle,
                warnings,
                skipped,
            }),
            None => Err(SiteError::NoUsableGlobal {
                dir: escape_path(dir),
                why: if skipped.is_empty() {
                    "it holds no .ferry file".into()
                } else {
                    skipped
                        .iter()
                        .map(|(p, why)| {
                            format!(
                                "{}: {why}",
                                escape(&p.file_name().unwrap_or_default().to_string_lossy())
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            }),
        }
    }
}
