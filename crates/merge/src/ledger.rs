//! The HQ ledger (issue 3): which global is current (round, hash), which bundles were merged in which round
//! from which site. One JSON file, `ledger.json`, in the HQ state dir, replaced atomically on every change; a
//! [`Ledger`] holds the dir's lock for its lifetime so two merges cannot interleave. Every check refuses
//! before anything is written.
//!
//! Issue 16: each round also records when it was made, each contributor's merge weight and distance from the
//! base ([`ContributorStats`]), whether it re-issues an earlier global's weights (`republished_from`), and the
//! evaluations HQ ran on its own data ([`EvalRecord`]). These fields default to empty, so ledgers written
//! before them load unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use ferry_bundle::fsutil::{self, DirLock, FsError};
use ferry_bundle::{Contributor, PublicKey};
use serde::{Deserialize, Serialize};

use crate::LedgerError;

/// The ledger file name inside the HQ state dir.
pub const LEDGER_FILE: &str = "ledger.json";
const FORMAT: &str = "ferry-ledger/2";
/// The first format, read and upgraded on load: its contributors also carried their round.
const FORMAT_V1: &str = "ferry-ledger/1";
const MAX_LEDGER_LEN: u64 = 256 << 20;

/// The current global.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurrentGlobal {
    /// Its round (0 for the initial global).
    pub round: u64,
    /// Its bundle hash, hex.
    pub hash: String,
}

/// One contributor's part in a merge, from the merge report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContributorStats {
    /// The update bundle hash.
    pub bundle: String,
    /// The signing site.
    pub site: String,
    /// The merge weight (the weights sum to 1); `None` under the robust strategies.
    pub weight: Option<f64>,
    /// L2 distance of the update from the base global, before clipping.
    pub distance: f64,
    /// Whether `--clip-norm` scaled it down.
    #[serde(default)]
    pub clipped: bool,
}

/// One evaluation of a global on HQ's own data (`ferry-server eval --state`, `merge --require-eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRecord {
    /// When, Unix seconds (shown as UTC).
    pub time: u64,
    /// The data spec evaluated on, as given.
    pub data: String,
    /// Samples evaluated.
    pub samples: u64,
    /// Exact-match accuracy, 0..1.
    pub accuracy: f64,
    /// Per-character accuracy (plates).
    #[serde(default)]
    pub char_accuracy: Option<f64>,
    /// Mean loss.
    pub loss: f64,
}

/// One round of the federation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundEntry {
    /// The round number of the global produced.
    pub round: u64,
    /// That global's bundle hash.
    pub global: String,
    /// How it was produced (`init`, or [`crate::MergeConfig::describe`]).
    pub strategy: String,
    /// The updates merged into it (empty for round 0), as listed in the global's manifest. They were trained
    /// on the previous round's global.
    pub contributors: Vec<Contributor>,
    /// When HQ recorded the round, Unix seconds (absent in ledgers written before issue 16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
    /// Per contributor: merge weight and distance (empty in older ledgers and for round 0).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stats: Vec<ContributorStats>,
    /// The round whose global's weights this round re-issues (`ferry-server republish`); it has no
    /// contributors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub republished_from: Option<u64>,
    /// Evaluations of this round's global on HQ's data, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evals: Vec<EvalRecord>,
}

/// The contents of `ledger.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerData {
    /// Always `ferry-ledger/2`.
    pub format: String,
    /// The federation id.
    pub federation: String,
    /// The model architecture name, if given at init.
    pub arch: Option<String>,
    /// The model fingerprint every bundle must carry.
    pub model_fingerprint: String,
    /// The current global.
    pub current: CurrentGlobal,
    /// Every round, 0 first.
    pub history: Vec<RoundEntry>,
    /// Every update bundle ever merged.
    pub merged: BTreeSet<String>,
    /// Every HQ key that signed a global recorded here, oldest first (issue 15 §4). HQ's stored globals verify
    /// under these, so after a key rotation (`sign-hq-keys`) HQ signs the next global with the new key from the
    /// same state. Empty in ledgers written before: then only the key a command is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hq_keys: Vec<ferry_bundle::keys::KeyRecord>,
}

impl LedgerData {
    /// Add `signer` to [`LedgerData::hq_keys`] unless it is there.
    fn note_signer(&mut self, signer: &PublicKey) {
        let record = ferry_bundle::keys::KeyRecord::from(signer);
        if !self.hq_keys.contains(&record) {
            self.hq_keys.push(record);
        }
    }

    /// HQ's recorded signing keys. A record that does not decode (a hand-edited ledger) is an error.
    pub fn signers(&self) -> Result<Vec<PublicKey>, LedgerError> {
        self.hq_keys
            .iter()
            .map(|r| {
                r.to_key()
                    .map_err(|why| LedgerError::BadInput(format!("ledger.json hq_keys: {why}")))
            })
            .collect()
    }
}

/// What the ledger needs to know about one verified update (taken from its manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateInfo {
    /// The signer's site id.
    pub site: String,
    /// The update bundle hash, hex.
    pub bundle: String,
    /// The hash of the global it was trained on.
    pub base: String,
    /// The round it declares (the round of its base).
    pub round: u64,
    /// Its federation id.
    pub federation: String,
    /// Its model fingerprint.
    pub fingerprint: String,
    /// Its signed sample count.
    pub samples: u64,
}

impl UpdateInfo {
    /// How the update is listed in the next global's manifest and in the ledger.
    pub fn contributor(&self) -> Contributor {
        Contributor {
            bundle: self.bundle.clone(),
            site: self.site.clone(),
            samples: self.samples,
        }
    }
}

/// What [`Ledger::record_round_with`] records besides the global and its contributors.
#[derive(Debug, Clone, Default)]
pub struct RoundExtras {
    /// When, Unix seconds.
    pub time: u64,
    /// Each contributor's weight and distance.
    pub stats: Vec<ContributorStats>,
    /// Evaluations of the new global.
    pub evals: Vec<EvalRecord>,
    /// Evaluations of the global it replaces (added to that round's entry).
    pub base_evals: Vec<EvalRecord>,
    /// The HQ key that signed the new global, added to [`LedgerData::hq_keys`].
    pub signer: Option<PublicKey>,
}

/// The locked, loaded HQ ledger.
#[derive(Debug)]
pub struct Ledger {
    dir: PathBuf,
    data: LedgerData,
    _lock: DirLock,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_hex(what: &str, s: &str) -> Result<(), LedgerError> {
    if is_hex(s) {
        Ok(())
    } else {
        Err(LedgerError::BadInput(format!(
            "{what} {s:?} is not a lowercase hex hash"
        )))
    }
}

impl Ledger {
    /// Start a federation in `dir` (created if missing): round 0 with `global_hash`, signed by `signer`, as the
    /// current global. Refuses when `dir` already holds a ledger.
    pub fn init(
        dir: &Path,
        federation: &str,
        arch: Option<&str>,
        fingerprint: &str,
        global_hash: &str,
        signer: &PublicKey,
    ) -> Result<Ledger, LedgerError> {
        if federation.is_empty() || fingerprint.is_empty() {
            return Err(LedgerError::BadInput(
                "the federation id and model fingerprint must not be empty".into(),
            ));
        }
        check_hex("the global hash", global_hash)?;
        fsutil::ensure_dir(dir)?;
        let lock = DirLock::acquire(dir)?;
        let path = dir.join(LEDGER_FILE);
        let data = LedgerData {
            format: FORMAT.into(),
            federation: federation.into(),
            arch: arch.map(str::to_string),
            model_fingerprint: fingerprint.into(),
            current: CurrentGlobal {
                round: 0,
                hash: global_hash.into(),
            },
            history: vec![RoundEntry {
                round: 0,
                global: global_hash.into(),
                strategy: "init".into(),
                contributors: Vec::new(),
                time: Some(ferry_bundle::unix_now()),
                stats: Vec::new(),
                republished_from: None,
                evals: Vec::new(),
            }],
            merged: BTreeSet::new(),
            hq_keys: vec![signer.into()],
        };
        match fsutil::write_new(&path, &to_json(&data)) {
            Err(FsError::Exists(_)) => return Err(LedgerError::Exists(dir.to_path_buf())),
            r => r?,
        }
        Ok(Ledger {
            dir: dir.to_path_buf(),
            data,
            _lock: lock,
        })
    }

    /// Lock `dir` and load its ledger, checking it is consistent.
    pub fn load(dir: &Path) -> Result<Ledger, LedgerError> {
        // Checked before the lock, which would create `lock` in a folder that holds no ledger (issue 17: a
        // refused merge leaves nothing behind) or fail with "lock: No such file" on a missing one.
        if !dir.is_dir() {
            return Err(LedgerError::NoState(dir.to_path_buf()));
        }
        if !dir.join(LEDGER_FILE).exists() {
            return Err(LedgerError::Missing(dir.to_path_buf()));
        }
        let lock = DirLock::acquire(dir)?;
        let data = Self::peek(dir)?;
        Ok(Ledger {
            dir: dir.to_path_buf(),
            data,
            _lock: lock,
        })
    }

    /// Read and check the ledger without taking the lock (for `ferry-server status` while a merge runs: the
    /// file is replaced atomically, so this sees the state before or after the merge, never half of it).
    pub fn peek(dir: &Path) -> Result<LedgerData, LedgerError> {
        if !dir.is_dir() {
            return Err(LedgerError::NoState(dir.to_path_buf()));
        }
        let path = dir.join(LEDGER_FILE);
        let bytes = match fsutil::read_capped(&path, MAX_LEDGER_LEN) {
            Ok(b) => b,
            Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(LedgerError::Missing(dir.to_path_buf()))
            }
            Err(e) => return Err(e.into()),
        };
        let data = parse(&bytes).map_err(|reason| LedgerError::Corrupt {
            path: path.clone(),
            reason,
        })?;
        validate(&data).map_err(|reason| LedgerError::Corrupt { path, reason })?;
        Ok(data)
    }

    /// The HQ state dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ledger contents.
    pub fn data(&self) -> &LedgerData {
        &self.data
    }

    /// The current global.
    pub fn current(&self) -> &CurrentGlobal {
        &self.data.current
    }

    /// Check one update against the ledger: federation, fingerprint, not merged before, based on the current
    /// global, declaring the current round.
    pub fn check_update(&self, u: &UpdateInfo) -> Result<(), LedgerError> {
        let d = &self.data;
        let (site, bundle) = (u.site.clone(), u.bundle.clone());
        if u.site.is_empty() {
            return Err(LedgerError::BadInput(format!(
                "update {} has an empty site id",
                u.bundle
            )));
        }
        check_hex("the update hash", &u.bundle)?;
        if u.federation != d.federation {
            return Err(LedgerError::WrongFederation {
                site,
                bundle,
                found: u.federation.clone(),
                expected: d.federation.clone(),
            });
        }
        if u.fingerprint != d.model_fingerprint {
            return Err(LedgerError::FingerprintMismatch {
                site,
                bundle,
                found: u.fingerprint.clone(),
                expected: d.model_fingerprint.clone(),
            });
        }
        if d.merged.contains(&u.bundle) {
            let round = d
                .history
                .iter()
                .find(|r| r.contributors.iter().any(|c| c.bundle == u.bundle))
                .map_or(0, |r| r.round);
            return Err(LedgerError::Replay {
                site,
                bundle,
                round,
            });
        }
        if u.base != d.current.hash {
            let based_on = match d.history.iter().find(|r| r.global == u.base) {
                Some(r) => format!("the round-{} global {}", r.round, r.global),
                None => format!("global {}, which this HQ never produced", u.base),
            };
            return Err(LedgerError::Stale {
                site,
                bundle,
                based_on,
                current_round: d.current.round,
            });
        }
        if u.round != d.current.round {
            return Err(LedgerError::WrongRound {
                site,
                bundle,
                found: u.round,
                expected: d.current.round,
            });
        }
        Ok(())
    }

    /// Check a whole batch: every update as [`Ledger::check_update`], no bundle twice, no site twice.
    pub fn check_batch(&self, updates: &[UpdateInfo]) -> Result<(), LedgerError> {
        if updates.is_empty() {
            return Err(LedgerError::EmptyBatch);
        }
        let mut sites: BTreeMap<&str, &str> = BTreeMap::new();
        let mut bundles = BTreeSet::new();
        for u in updates {
            self.check_update(u)?;
            if !bundles.insert(u.bundle.as_str()) {
                return Err(LedgerError::DuplicateBundle {
                    bundle: u.bundle.clone(),
                });
            }
            if let Some(first) = sites.insert(&u.site, &u.bundle) {
                return Err(LedgerError::DuplicateSite {
                    site: u.site.clone(),
                    first: first.to_string(),
                    second: u.bundle.clone(),
                });
            }
        }
        Ok(())
    }

    /// Record a merged round: `new_global` becomes current at round + 1, the contributors are added to the
    /// history and their bundles to the merged set. The file is replaced atomically; on any error neither the
    /// file nor this value changes. Returns the new round.
    pub fn record_round(
        &mut self,
        new_global: &str,
        strategy: &str,
        contributors: &[Contributor],
    ) -> Result<u64, LedgerError> {
        let extras = RoundExtras {
            time: ferry_bundle::unix_now(),
            ..RoundExtras::default()
        };
        self.record_round_with(new_global, strategy, contributors, extras)
    }

    /// [`Ledger::record_round`] with what issue 16 adds: the time, each contributor's weight and distance,
    /// and the evaluations of the new global and of the one it replaces (the quality gate's scores), all in
    /// the same atomic write.
    pub fn record_round_with(
        &mut self,
        new_global: &str,
        strategy: &str,
        contributors: &[Contributor],
        extras: RoundExtras,
    ) -> Result<u64, LedgerError> {
        check_hex("the new global hash", new_global)?;
        if contributors.is_empty() {
            return Err(LedgerError::EmptyBatch);
        }
        self.check_new_global(new_global)?;
        let mut sites: BTreeMap<&str, &str> = BTreeMap::new();
        let mut bundles = BTreeSet::new();
        for c in contributors {
            check_hex("the update hash", &c.bundle)?;
            if self.data.merged.contains(&c.bundle) {
                let round = self
                    .data
                    .history
                    .iter()
                    .find(|r| r.contributors.iter().any(|x| x.bundle == c.bundle))
                    .map_or(0, |r| r.round);
                return Err(LedgerError::Replay {
                    site: c.site.clone(),
                    bundle: c.bundle.clone(),
                    round,
                });
            }
            if !bundles.insert(c.bundle.as_str()) {
                return Err(LedgerError::DuplicateBundle {
                    bundle: c.bundle.clone(),
                });
            }
            if let Some(first) = sites.insert(&c.site, &c.bundle) {
                return Err(LedgerError::DuplicateSite {
                    site: c.site.clone(),
                    first: first.to_string(),
                    second: c.bundle.clone(),
                });
            }
        }
        if let Some(s) = extras
            .stats
            .iter()
            .find(|s| !bundles.contains(s.bundle.as_str()))
        {
            return Err(LedgerError::BadInput(format!(
                "merge statistics name bundle {}, which is not a contributor",
                s.bundle
            )));
        }
        let mut next = self.data.clone();
        let round = next.current.round + 1;
        let mut contributors = contributors.to_vec();
        contributors.sort_by(|a, b| a.bundle.cmp(&b.bundle));
        let mut stats = extras.stats;
        stats.sort_by(|a, b| a.bundle.cmp(&b.bundle));
        next.merged
            .extend(contributors.iter().map(|c| c.bundle.clone()));
        if let Some(signer) = &extras.signer {
            next.note_signer(signer);
        }
        if let Some(cur) = next.history.last_mut() {
            cur.evals.extend(extras.base_evals);
        }
        next.history.push(RoundEntry {
            round,
            global: new_global.into(),
            strategy: strategy.into(),
            contributors,
            time: Some(extras.time),
            stats,
            republished_from: None,
            evals: extras.evals,
        });
        next.current = CurrentGlobal {
            round,
            hash: new_global.into(),
        };
        self.commit(next)?;
        Ok(round)
    }

    /// Record a global that re-issues the weights of round `from` as the next round (`ferry-server
    /// republish`: HQ's rollback, since sites refuse older rounds). It has no contributors. Returns the new
    /// round.
    pub fn record_republish(
        &mut self,
        new_global: &str,
        from: u64,
        time: u64,
        signer: &PublicKey,
    ) -> Result<u64, LedgerError> {
        check_hex("the new global hash", new_global)?;
        self.check_new_global(new_global)?;
        if from > self.data.current.round {
            return Err(LedgerError::BadInput(format!(
                "round {from} is not in the ledger (the current round is {})",
                self.data.current.round
            )));
        }
        let mut next = self.data.clone();
        let round = next.current.round + 1;
        next.note_signer(signer);
        next.history.push(RoundEntry {
            round,
            global: new_global.into(),
            strategy: format!("republish r{from}"),
            contributors: Vec::new(),
            time: Some(time),
            stats: Vec::new(),
            republished_from: Some(from),
            evals: Vec::new(),
        });
        next.current = CurrentGlobal {
            round,
            hash: new_global.into(),
        };
        self.commit(next)?;
        Ok(round)
    }

    /// Add an evaluation to the round whose global is `global` (`ferry-server eval --state`). Returns that
    /// round, or `None` (nothing written) when the ledger holds no such global.
    pub fn record_eval(
        &mut self,
        global: &str,
        eval: EvalRecord,
    ) -> Result<Option<u64>, LedgerError> {
        let mut next = self.data.clone();
        let Some(entry) = next.history.iter_mut().find(|r| r.global == global) else {
            return Ok(None);
        };
        entry.evals.push(eval);
        let round = entry.round;
        self.commit(next)?;
        Ok(Some(round))
    }

    /// Record `key` as one of HQ's signing keys (`ferry-server retire-key`): the stored globals it signed then
    /// verify after a rotation even in a ledger written before signers were recorded. Returns whether it was new.
    pub fn record_signer(&mut self, key: &PublicKey) -> Result<bool, LedgerError> {
        let mut next = self.data.clone();
        next.note_signer(key);
        if next.hq_keys.len() == self.data.hq_keys.len() {
            return Ok(false);
        }
        self.commit(next)?;
        Ok(true)
    }

    /// The round entry of round `n`.
    pub fn round(&self, n: u64) -> Option<&RoundEntry> {
        self.data.history.iter().find(|r| r.round == n)
    }

    fn check_new_global(&self, new_global: &str) -> Result<(), LedgerError> {
        if self.data.history.iter().any(|r| r.global == new_global) {
            return Err(LedgerError::BadInput(format!(
                "global {new_global} is already in the ledger"
            )));
        }
        Ok(())
    }

    /// Replace the file with `next`, then this value (the file first: on error nothing changed).
    fn commit(&mut self, next: LedgerData) -> Result<(), LedgerError> {
        validate(&next).map_err(LedgerError::BadInput)?;
        fsutil::write_replace(&self.dir.join(LEDGER_FILE), &to_json(&next))?;
        self.data = next;
        Ok(())
    }

    /// The federation at a glance, for `ferry-server status` (its `Display` is the printed form).
    pub fn status(&self) -> LedgerStatus {
        LedgerStatus::from(&self.data)
    }
}

/// What `ferry-server status` shows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerStatus {
    /// The federation id.
    pub federation: String,
    /// The architecture, if recorded.
    pub arch: Option<String>,
    /// The model fingerprint.
    pub model_fingerprint: String,
    /// The current round.
    pub round: u64,
    /// The current global hash.
    pub global: String,
    /// Per round: round, global hash, strategy, and the contributing sites with their sample counts.
    pub rounds: Vec<RoundEntry>,
}

impl From<&LedgerData> for LedgerStatus {
    fn from(d: &LedgerData) -> Self {
        LedgerStatus {
            federation: d.federation.clone(),
            arch: d.arch.clone(),
            model_fingerprint: d.model_fingerprint.clone(),
            round: d.current.round,
            global: d.current.hash.clone(),
            rounds: d.history.clone(),
        }
    }
}

impl fmt::Display for LedgerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "federation  {}", self.federation)?;
        if let Some(a) = &self.arch {
            writeln!(f, "arch        {a}")?;
        }
        writeln!(f, "model       {}", self.model_fingerprint)?;
        writeln!(f, "round       {}", self.round)?;
        writeln!(f, "global      {}", self.global)?;
        for r in &self.rounds {
            let sites: Vec<String> = r
                .contributors
                .iter()
                .map(|c| {
                    let stats = r
                        .stats
                        .iter()
                        .find(|s| s.bundle == c.bundle)
                        .map(|s| {
                            let w = s.weight.map_or_else(|| "-".into(), |w| format!("{w:.4}"));
                            format!(", weight {w}, distance {:.4}", s.distance)
                        })
                        .unwrap_or_default();
                    format!("{} ({}{stats})", ferry_bundle::escape(&c.site), c.samples)
                })
                .collect();
            let sites = match r.republished_from {
                Some(from) => format!("weights of round {from}"),
                None if sites.is_empty() => "-".to_string(),
                None => sites.join(", "),
            };
            let time = r.time.map_or_else(|| "-".to_string(), ferry_bundle::utc);
            writeln!(
                f,
                "  r{:<4} {}  {:<24} {:<20}  {}",
                r.round,
                short(&r.global),
                r.strategy,
                time,
                sites
            )?;
            for e in &r.evals {
                let chars = e
                    .char_accuracy
                    .map(|c| format!(", {:.1}% of characters", 100.0 * c))
                    .unwrap_or_default();
                writeln!(
                    f,
                    "         eval {}: {:.1}% on {} samples{chars} (loss {:.3}), {}",
                    ferry_bundle::escape(&e.data),
                    100.0 * e.accuracy,
                    e.samples,
                    e.loss,
                    ferry_bundle::utc(e.time)
                )?;
            }
        }
        Ok(())
    }
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Parse `ledger.json`, upgrading a `ferry-ledger/1` file (written before contributors were the manifest's
/// records) in memory; the next recorded round writes it back as the current format.
fn parse(bytes: &[u8]) -> Result<LedgerData, String> {
    #[derive(Deserialize)]
    struct Format {
        format: String,
    }
    let format = serde_json::from_slice::<Format>(bytes)
        .map_err(|e| e.to_string())?
        .format;
    if format != FORMAT_V1 {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ContributorV1 {
        site: String,
        bundle: String,
        samples: u64,
        #[allow(dead_code)]
        round: u64,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RoundV1 {
        round: u64,
        global: String,
        strategy: String,
        contributors: Vec<ContributorV1>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LedgerV1 {
        #[allow(dead_code)]
        format: String,
        federation: String,
        arch: Option<String>,
        model_fingerprint: String,
        current: CurrentGlobal,
        history: Vec<RoundV1>,
        merged: BTreeSet<String>,
    }
    let v1: LedgerV1 = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    Ok(LedgerData {
        format: FORMAT.into(),
        federation: v1.federation,
        arch: v1.arch,
        model_fingerprint: v1.model_fingerprint,
        current: v1.current,
        history: v1
            .history
            .into_iter()
            .map(|r| RoundEntry {
                round: r.round,
                global: r.global,
                strategy: r.strategy,
                time: None,
                stats: Vec::new(),
                republished_from: None,
                evals: Vec::new(),
                contributors: r
                    .contributors
                    .into_iter()
                    .map(|c| Contributor {
                        bundle: c.bundle,
                        site: c.site,
                        samples: c.samples,
                    })
                    .collect(),
            })
            .collect(),
        merged: v1.merged,
        hq_keys: Vec::new(),
    })
}

fn to_json(d: &LedgerData) -> Vec<u8> {
    // Serializing plain strings, integers and sets cannot fail; an empty file would be caught by `validate`
    // on the next load rather than panicking here.
    let mut v = serde_json::to_vec_pretty(d).unwrap_or_default();
    v.push(b'\n');
    v
}

/// The invariants a loaded ledger must satisfy.
fn validate(d: &LedgerData) -> Result<(), String> {
    if d.format != FORMAT {
        return Err(format!(
            "format is {:?}, expected {FORMAT:?} (written by a newer ferry?)",
            d.format
        ));
    }
    if d.federation.is_empty() || d.model_fingerprint.is_empty() {
        return Err("empty federation or model fingerprint".into());
    }
    if d.history.is_empty() {
        return Err("no rounds in the history".into());
    }
    let mut seen = BTreeSet::new();
    for (i, r) in d.history.iter().enumerate() {
        if r.round != i as u64 {
            return Err(format!("history entry {i} says round {}", r.round));
        }
        if !is_hex(&r.global) {
            return Err(format!(
                "round {} has a global hash that is not hex",
                r.round
            ));
        }
        if let Some(from) = r.republished_from {
            if from >= r.round {
                return Err(format!(
                    "round {} republishes round {from}, which is not earlier",
                    r.round
                ));
            }
        }
        if (i == 0 || r.republished_from.is_some()) != r.contributors.is_empty() {
            return Err(format!(
                "round {} has the wrong number of contributors",
                r.round
            ));
        }
        if r.stats
            .iter()
            .any(|s| !r.contributors.iter().any(|c| c.bundle == s.bundle))
        {
            return Err(format!(
                "round {} has statistics for a bundle it does not list",
                r.round
            ));
        }
        for c in &r.contributors {
            if !is_hex(&c.bundle)
                || !d.merged.contains(&c.bundle)
                || !seen.insert(c.bundle.as_str())
            {
                return Err(format!(
                    "round {} lists bundle {:?} inconsistently",
                    r.round, c.bundle
                ));
            }
        }
    }
    if seen.len() != d.merged.len() {
        return Err("the merged set differs from the history".into());
    }
    let last = &d.history[d.history.len() - 1];
    if d.current.round != last.round || d.current.hash != last.global {
        return Err("the current global is not the last round of the history".into());
    }
    Ok(())
}
