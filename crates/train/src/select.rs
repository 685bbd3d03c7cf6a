//! HQ's choice between models (issue 14, `ferry-server merge --select`): after a merge, the merged model and
//! every site's model are evaluated on HQ's own labelled data, and the best one becomes the next global. With
//! sites as unequal as the plate benchmark's, one site's model alone reads more than any one-trip merge of the
//! two; this makes that choice a measured step of the merge instead of a guess by an operator.

use crate::data::Dataset;
use crate::{evaluate, Arch, Device, Model, TrainError};

/// One model HQ may seal.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// What to call it in the note (`the merge`, `site-a's model`).
    pub name: &'a str,
    /// Its weights (safetensors of the architecture).
    pub weights: &'a [u8],
}

/// What [`select_best`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The index of the chosen candidate.
    pub chosen: usize,
    /// Every candidate's (name, exact accuracy, character accuracy) on HQ's data, in the given order.
    pub scores: Vec<(String, f64, Option<f64>)>,
}

impl Selection {
    /// One line for the ledger and the operator: which model was kept and every candidate's score.
    pub fn note(&self) -> String {
        let pct = |(_, a, c): &(String, f64, Option<f64>)| match c {
            Some(c) => format!("{:.2}% exact, {:.2}% of characters", 100.0 * a, 100.0 * c),
            None => format!("{:.2}%", 100.0 * a),
        };
        let others: Vec<String> = self
            .scores
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != self.chosen)
            .map(|(_, s)| format!("{} {}", s.0, pct(s)))
            .collect();
        let kept = &self.scores[self.chosen.min(self.scores.len().saturating_sub(1))];
        format!(
            "kept {}: {} on HQ's data; {}",
            kept.0,
            pct(kept),
            others.join(", ")
        )
    }
}

/// Evaluate every candidate (safetensors of `arch`) on HQ's labelled `data`, `batch` images at a time, and choose
/// the best by exact accuracy, then character accuracy; a tie keeps the earlier candidate (put the merge first,
/// so that a site's model replaces it only when it reads more). CPU only.
pub fn select_best(
    arch: Arch,
    candidates: &[Candidate<'_>],
    data: &Dataset,
    batch: usize,
) -> Result<Selection, TrainError> {
    if candidates.is_empty() || data.is_empty() {
        return Err(TrainError::Config(
            "selection needs at least one model and one labelled sample".into(),
        ));
    }
    let mut scores: Vec<(String, f64, Option<f64>)> = Vec::with_capacity(candidates.len());
    let (mut chosen, mut best) = (0, (f64::NEG_INFINITY, f64::NEG_INFINITY));
    for (i, c) in candidates.iter().enumerate() {
        let model = Model::from_safetensors(arch, c.weights, &Device::Cpu)?;
        let e = evaluate(&model, data, batch)?;
        let key = (e.accuracy, e.char_accuracy.unwrap_or(e.accuracy));
        if key > best {
            (chosen, best) = (i, key);
        }
        scores.push((c.name.to_string(), e.accuracy, e.char_accuracy));
    }
    Ok(Selection { chosen, scores })
}

/// HQ's choice after a merge: [`select_best`] between `merged` (named `the merge`, first, so a tie keeps it) and
/// each `(site, weights)` (named `SITE's model`; the caller escapes untrusted site ids). Returns the chosen
/// weights and the selection.
pub fn merge_or_site(
    arch: Arch,
    merged: &[u8],
    sites: &[(String, &[u8])],
    data: &Dataset,
    batch: usize,
) -> Result<(Vec<u8>, Selection), TrainError> {
    let names: Vec<String> = sites
        .iter()
        .map(|(site, _)| format!("{site}'s model"))
        .collect();
    let mut candidates = vec![Candidate {
        name: "the merge",
        weights: merged,
    }];
    candidates.extend(
        sites
            .iter()
            .zip(&names)
            .map(|((_, weights), name)| Candidate { name, weights }),
    );
    let s = select_best(arch, &candidates, data, batch)?;
    Ok((candidates[s.chosen].weights.to_vec(), s))
}
