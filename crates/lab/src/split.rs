//! How `ferry-lab fedavg` deals a training set out to K sites (issue 5): IID, by crop style (synthetic plates),
//! the FedAvg paper's pathological non-IID shards (McMahan et al. 2017: sort by label, cut 2K shards, two per
//! site), and a Dirichlet(α) label skew (Hsu et al. 2019). Deterministic in the seed.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use ferry_train::data::{CropStyle, Dataset};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

/// A way to split the data between sites.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SplitKind {
    /// Shuffle, then equal parts.
    Iid,
    /// Site k gets samples of crop style k mod 2 (loose, tight), shared equally among the sites of that style.
    ByStyle,
    /// Sort by label, cut `per_site × K` equal shards, deal `per_site` random shards to each site.
    Shards {
        /// Shards per site (the FedAvg paper: 2).
        per_site: usize,
    },
    /// For every label, split its samples between sites in proportions drawn from Dirichlet(α, …, α).
    Dirichlet {
        /// Concentration: small α = each site sees few labels; large α tends to IID.
        alpha: f64,
    },
}

impl FromStr for SplitKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            anyhow::anyhow!("unknown split `{s}`: use iid, by-style, shards[:N] or dirichlet:ALPHA")
        };
        match s.split_once(':') {
            None => match s {
                "iid" => Ok(SplitKind::Iid),
                "by-style" => Ok(SplitKind::ByStyle),
                "shards" => Ok(SplitKind::Shards { per_site: 2 }),
                _ => Err(bad()),
            },
            Some(("shards", n)) => match n.parse::<usize>() {
                Ok(per_site) if per_site > 0 => Ok(SplitKind::Shards { per_site }),
                _ => bail!("shards:N needs a whole number N of at least 1, not `{n}`"),
            },
            Some(("dirichlet", a)) => match a.parse::<f64>() {
                Ok(alpha) if alpha.is_finite() && alpha > 0.0 => Ok(SplitKind::Dirichlet { alpha }),
                _ => bail!("dirichlet:ALPHA needs a positive number ALPHA, not `{a}`"),
            },
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for SplitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitKind::Iid => f.write_str("iid"),
            SplitKind::ByStyle => f.write_str("by-style"),
            SplitKind::Shards { per_site } => write!(f, "shards:{per_site}"),
            SplitKind::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
        }
    }
}

/// The label a sample is sorted and skewed by: the class, or for plates the first character slot.
fn key(data: &Dataset, i: usize) -> u32 {
    data.label(i)[0]
}

/// Indices of `data` for each of `k` sites. Every sample goes to at most one site; a site may get none (a
/// Dirichlet split with small α), and the caller decides what that means.
pub fn split(data: &Dataset, k: usize, kind: SplitKind, seed: u64) -> Result<Vec<Vec<usize>>> {
    if k == 0 {
        bail!("--sites must be at least 1");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ SPLIT_STREAM);
    let n = data.len();
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut rng);
    let mut out = vec![Vec::new(); k];
    match kind {
        SplitKind::Iid => {
            for (j, i) in all.into_iter().enumerate() {
                out[j % k].push(i);
            }
        }
        SplitKind::ByStyle => {
            let Some(styles) = &data.styles else {
                bail!("--split by-style needs data with crop styles (plates:mixed:N)");
            };
            for style in [CropStyle::Loose, CropStyle::Tight] {
                let sites: Vec<usize> = (0..k)
                    .filter(|s| (s % 2 == 0) == (style == CropStyle::Loose))
                    .collect();
                if sites.is_empty() {
                    continue;
                }
                let of_style = all.iter().copied().filter(|&i| styles[i] == style);
                for (j, i) in of_style.enumerate() {
                    out[sites[j % sites.len()]].push(i);
                }
            }
        }
        SplitKind::Shards { per_site } => {
            // Stable sort of a shuffled list: equal labels in random order.
            all.sort_by_key(|&i| key(data, i));
            let shards = k * per_site;
            if n < shards {
                bail!("{n} samples cannot be cut into {shards} shards");
            }
            let size = n / shards;
            let mut ids: Vec<usize> = (0..shards).collect();
            ids.shuffle(&mut rng);
            for (j, s) in ids.into_iter().enumerate() {
                out[j / per_site].extend_from_slice(&all[s * size..(s + 1) * size]);
            }
        }
        SplitKind::Dirichlet { alpha } => {
            let gamma = Gamma::new(alpha, 1.0)?;
            let classes = (0..n).map(|i| key(data, i)).max().map_or(0, |m| m + 1);
            for c in 0..classes {
                let of_class: Vec<usize> =
                    all.iter().copied().filter(|&i| key(data, i) == c).collect();
                let mut p: Vec<f64> = (0..k).map(|_| gamma.sample(&mut rng)).collect();
                let total: f64 = p.iter().sum();
                if total <= 0.0 || !total.is_finite() {
                    p = vec![1.0; k];
                }
                let total: f64 = p.iter().sum();
                // Cumulative cut points, rounded, so the parts add up to the class size exactly.
                let mut acc = 0.0;
                let mut start = 0;
                for (s, share) in p.iter().enumerate() {
                    acc += share / total;
                    let end = if s + 1 == k {
                        of_class.len()
                    } else {
                        ((acc * of_class.len() as f64).round() as usize).min(of_class.len())
                    };
                    out[s].extend_from_slice(&of_class[start..end.max(start)]);
                    start = end.max(start);
                }
            }
        }
    }
    Ok(out)
}

/// Splits draw from their own random stream, not the model's or the shuffles'.
const SPLIT_STREAM: u64 = 0x5e_ed5f_1175;

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_train::data::Task;

    fn labelled(n: usize, classes: u32) -> Dataset {
        Dataset {
            images: vec![0.0; n],
            channels: 1,
            height: 1,
            width: 1,
            labels: (0..n as u32).map(|i| i % classes).collect(),
            task: Task::Classes {
                classes: classes as usize,
            },
            styles: Some(
                (0..n)
                    .map(|i| {
                        if i % 3 == 0 {
                            CropStyle::Tight
                        } else {
                            CropStyle::Loose
                        }
                    })
                    .collect(),
            ),
        }
    }

    /// Every sample at most once, and all of them for the splits that keep everything.
    fn check_partition(parts: &[Vec<usize>], n: usize, all: bool) {
        let mut seen: Vec<usize> = parts.iter().flatten().copied().collect();
        seen.sort_unstable();
        let len = seen.len();
        seen.dedup();
        assert_eq!(seen.len(), len, "a sample went to two sites");
        if all {
            assert_eq!(len, n);
        }
    }

    #[test]
    fn splits_partition_the_data_as_described() {
        let d = labelled(200, 10);
        let iid = split(&d, 3, SplitKind::Iid, 1).unwrap();
        check_partition(&iid, 200, true);
        assert!(iid.iter().all(|p| (66..=67).contains(&p.len())));

        let shards = split(&d, 5, SplitKind::Shards { per_site: 2 }, 1).unwrap();
        check_partition(&shards, 200, true);
        for p in &shards {
            // Two shards of 20 sorted samples: at most 2 labels each (shards of one label here).
            let mut labels: Vec<u32> = p.iter().map(|&i| d.label(i)[0]).collect();
            labels.sort_unstable();
            labels.dedup();
            assert!(labels.len() <= 2, "{labels:?}");
        }

        let styles = d.styles.as_ref().unwrap();
        let by = split(&d, 2, SplitKind::ByStyle, 1).unwrap();
        check_partition(&by, 200, true);
        assert!(by[0].iter().all(|&i| styles[i] == CropStyle::Loose));
        assert!(by[1].iter().all(|&i| styles[i] == CropStyle::Tight));

        let dir = split(&d, 4, SplitKind::Dirichlet { alpha: 0.1 }, 1).unwrap();
        check_partition(&dir, 200, true);
        assert_eq!(
            split(&d, 4, SplitKind::Dirichlet { alpha: 0.1 }, 1).unwrap(),
            dir
        );
        assert_ne!(
            split(&d, 4, SplitKind::Iid, 2).unwrap(),
            split(&d, 4, SplitKind::Iid, 1).unwrap()
        );
    }

    #[test]
    fn names_parse_and_print() {
        for s in ["iid", "by-style", "shards:2", "shards:3", "dirichlet:0.5"] {
            assert_eq!(s.parse::<SplitKind>().unwrap().to_string(), s);
        }
        assert_eq!(
            "shards".parse::<SplitKind>().unwrap(),
            SplitKind::Shards { per_site: 2 }
        );
        for s in ["", "noniid", "shards:0", "dirichlet:-1", "dirichlet:x"] {
            assert!(s.parse::<SplitKind>().is_err(), "{s}");
        }
    }
}
