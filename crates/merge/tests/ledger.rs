//! The HQ ledger: rounds recorded atomically, every refusal leaves ledger.json byte-for-byte unchanged.

use ferry_bundle::Contributor;
use ferry_merge::{Ledger, LedgerError, UpdateInfo, LEDGER_FILE};

const G0: &str = "00aa";
const G1: &str = "11bb";

fn update(site: &str, bundle: &str, base: &str, round: u64) -> UpdateInfo {
    UpdateInfo {
        site: site.into(),
        bundle: bundle.into(),
        base: base.into(),
        round,
        federation: "plates".into(),
        fingerprint: "f1f1".into(),
        samples: 100,
    }
}

fn hq_key() -> ferry_bundle::PublicKey {
    ferry_bundle::SecretKey::generate(ferry_bundle::Role::Hq, "hq")
        .unwrap()
        .public()
}

fn init(dir: &std::path::Path) -> Ledger {
    Ledger::init(dir, "plates", Some("resnet8"), "f1f1", G0, &hq_key()).unwrap()
}

fn bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join(LEDGER_FILE)).unwrap()
}

#[test]
fn rounds_are_recorded_and_survive_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = init(dir.path());
    assert_eq!((l.current().round, l.current().hash.as_str()), (0, G0));
    let batch = [update("a", "a1", G0, 0), update("b", "b1", G0, 0)];
    l.check_batch(&batch).unwrap();
    let cs: Vec<Contributor> = batch.iter().map(UpdateInfo::contributor).collect();
    assert_eq!(
        l.record_round(G1, "fedavg weights=samples", &cs).unwrap(),
        1
    );
    drop(l);
    let l = Ledger::load(dir.path()).unwrap();
    assert_eq!((l.current().round, l.current().hash.as_str()), (1, G1));
    assert_eq!(l.data().history.len(), 2);
    assert!(l.data().merged.contains("a1") && l.data().merged.contains("b1"));
    let status = l.status().to_string();
    assert!(
        status.contains("round       1") && status.contains("a (100), b (100)"),
        "{status}"
    );
    assert_eq!(Ledger::peek(dir.path()).unwrap(), *l.data());
    // Round 1 updates are checked against the new global.
    l.check_update(&update("a", "a2", G1, 1)).unwrap();
}

#[test]
fn every_refusal_leaves_the_ledger_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = init(dir.path());
    l.record_round(G1, "fedavg", &[update("a", "a1", G0, 0).contributor()])
        .unwrap();
    let before = bytes(dir.path());
    type Case = (Vec<UpdateInfo>, fn(&LedgerError) -> bool, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![update("b", "b1", G0, 0)],
            |e| matches!(e, LedgerError::Stale { .. }),
            "round-0 global",
        ),
        (
            vec![update("b", "b1", "dead", 1)],
            |e| matches!(e, LedgerError::Stale { .. }),
            "never produced",
        ),
        (
            vec![update("a", "a1", G1, 1)],
            |e| matches!(e, LedgerError::Replay { round: 1, .. }),
            "already merged in round 1",
        ),
        (
            vec![update("a", "a2", G1, 1), update("a", "a3", G1, 1)],
            |e| matches!(e, LedgerError::DuplicateSite { .. }),
            "site a sent more than one",
        ),
        (
            vec![update("a", "a2", G1, 1), update("b", "a2", G1, 1)],
            |e| matches!(e, LedgerError::DuplicateBundle { .. }),
            "given twice",
        ),
        (
            vec![UpdateInfo {
                federation: "other".into(),
                ..update("b", "b1", G1, 1)
            }],
            |e| matches!(e, LedgerError::WrongFederation { .. }),
            "wrong HQ",
        ),
        (
            vec![UpdateInfo {
                fingerprint: "f2f2".into(),
                ..update("b", "b1", G1, 1)
            }],
            |e| matches!(e, LedgerError::FingerprintMismatch { .. }),
            "another architecture",
        ),
        (
            vec![update("b", "b1", G1, 0)],
            |e| {
                matches!(
                    e,
                    LedgerError::WrongRound {
                        found: 0,
                        expected: 1,
                        ..
                    }
                )
            },
            "inconsistent",
        ),
        (
            vec![],
            |e| matches!(e, LedgerError::EmptyBatch),
            "no updates",
        ),
        (
            vec![update("b", "XYZ", G1, 1)],
            |e| matches!(e, LedgerError::BadInput(_)),
            "hex",
        ),
    ];
    for (batch, is, words) in cases {
        let err = l.check_batch(&batch).unwrap_err();
        assert!(is(&err) && err.to_string().contains(words), "{err}");
        assert_eq!(bytes(dir.path()), before);
    }
    // record_round re-checks what it records.
    let replay = [update("a", "a1", G1, 1).contributor()];
    assert!(matches!(
        l.record_round("22cc", "fedavg", &replay),
        Err(LedgerError::Replay { .. })
    ));
    let twice = [
        update("b", "b2", G1, 1).contributor(),
        update("b", "b3", G1, 1).contributor(),
    ];
    assert!(matches!(
        l.record_round("22cc", "fedavg", &twice),
        Err(LedgerError::DuplicateSite { .. })
    ));
    assert!(matches!(
        l.record_round(G0, "fedavg", &[update("c", "c1", G1, 1).contributor()]),
        Err(LedgerError::BadInput(_))
    ));
    assert!(matches!(
        l.record_round("22cc", "fedavg", &[]),
        Err(LedgerError::EmptyBatch)
    ));
    assert_eq!(bytes(dir.path()), before);
    assert_eq!(l.current().round, 1);
}

#[test]
fn init_refuses_an_existing_ledger_and_load_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Ledger::load(dir.path()),
        Err(LedgerError::Missing(_))
    ));
    drop(init(dir.path()));
    let before = bytes(dir.path());
    let err = Ledger::init(dir.path(), "plates", None, "f1f1", "99", &hq_key()).unwrap_err();
    assert!(matches!(err, LedgerError::Exists(_)), "{err}");
    assert_eq!(bytes(dir.path()), before);
}

#[test]
fn two_processes_cannot_hold_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let held = init(dir.path());
    let err = Ledger::load(dir.path()).unwrap_err();
    assert!(matches!(err, LedgerError::Lock(_)), "{err}");
    // Status reads without the lock.
    assert_eq!(Ledger::peek(dir.path()).unwrap().current.round, 0);
    drop(held);
    Ledger::load(dir.path()).unwrap();
}

#[test]
fn a_damaged_ledger_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = init(dir.path());
    l.record_round(G1, "fedavg", &[update("a", "a1", G0, 0).contributor()])
        .unwrap();
    drop(l);
    let good = String::from_utf8(bytes(dir.path())).unwrap();
    let path = dir.path().join(LEDGER_FILE);
    let damaged = [
        good[..good.len() / 2].to_string(),
        "not json".to_string(),
        good.replace("\"round\": 1,\n    \"hash\"", "\"round\": 5,\n    \"hash\""),
        good.replace("ferry-ledger/2", "ferry-ledger/9"),
        good.replace("\"a1\"\n  ]", "\"a1\", \"ffff\"\n  ]"),
        good.replace("\"federation\"", "\"extra\": 1, \"federation\""),
    ];
    for (i, text) in damaged.iter().enumerate() {
        assert_ne!(text, &good, "case {i} did not change the file");
        std::fs::write(&path, text).unwrap();
        let err = Ledger::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, LedgerError::Corrupt { .. }),
            "case {i}: {err}"
        );
    }
}

/// `ledger.json` as ferry wrote it before contributors were the manifest's records (`ferry-ledger/1`).
const LEDGER_V1: &str = r#"{
  "format": "ferry-ledger/1",
  "federation": "plates",
  "arch": "resnet8",
  "model_fingerprint": "f1f1",
  "current": {
    "round": 1,
    "hash": "11bb"
  },
  "history": [
    {
      "round": 0,
      "global": "00aa",
      "strategy": "init",
      "contributors": []
    },
    {
      "round": 1,
      "global": "11bb",
      "strategy": "fedavg",
      "contributors": [
        {
          "site": "a",
          "bundle": "a1",
          "samples": 100,
          "round": 0
        }
      ]
    }
  ],
  "merged": [
    "a1"
  ]
}
"#;

#[test]
fn a_first_format_ledger_is_read_and_upgraded_on_the_next_round() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(LEDGER_FILE), LEDGER_V1).unwrap();
    let mut l = Ledger::load(dir.path()).unwrap();
    assert_eq!((l.current().round, l.current().hash.as_str()), (1, G1));
    assert_eq!(
        l.data().history[1].contributors,
        [Contributor {
            bundle: "a1".into(),
            site: "a".into(),
            samples: 100
        }]
    );
    // Still the old file until a round is recorded; then the current format.
    assert_eq!(bytes(dir.path()), LEDGER_V1.as_bytes());
    let replay = l.check_update(&update("a", "a1", G1, 1)).unwrap_err();
    assert!(
        matches!(replay, LedgerError::Replay { round: 1, .. }),
        "{replay}"
    );
    l.record_round("22cc", "fedavg", &[update("b", "b2", G1, 1).contributor()])
        .unwrap();
    drop(l);
    let text = String::from_utf8(bytes(dir.path())).unwrap();
    assert!(text.contains("ferry-ledger/2"), "{text}");
    let l = Ledger::load(dir.path()).unwrap();
    assert_eq!(l.current().round, 2);
    assert_eq!(l.data().history.len(), 3);
}
