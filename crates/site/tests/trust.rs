//! Whom a site believes (issue 15 §2, §3, §4), attacked on real state directories: each hostile case gets its
//! exact error and leaves the state byte for byte as it was (or absent, for a first import).
//!
//! - first contact: no federation, no HQ key, another federation signed by the same HQ key;
//! - pinned HQ key: a second HQ key offered with `--trust`, a global signed by it;
//! - forks: round N+1 not based on the global held;
//! - revocation that sticks: a global naming a list the site lacks, a list of another federation, a withdrawn
//!   global refused on a later import without the flag;
//! - freshness: an expired global warns, or is refused with `refuse_expired`;
//! - the root key: HQ key rotation under the root, a rolled-back or foreign key list, adding a root to a site
//!   pinned to an HQ key only with continuity.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferry_bundle::keylist::{self, HqKeyList};
use ferry_bundle::revocation::{self, RevocationList, Revoked, RevokedBundle};
use ferry_bundle::{
    open, seal, Bundle, Contributor, Draft, Dtype, Keyring, Limits, OpenError, Payload,
    RevocationRef, Role, SecretKey, TensorRef,
};
use ferry_site::{ImportOutcome, ImportPolicy, ImportTrust, SiteError, SiteState};

const NOW: u64 = 1_800_000_000;

fn hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [1; 32])
}
fn hq2() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq-2027", [10; 32])
}
fn rogue_hq() -> SecretKey {
    SecretKey::from_seed(Role::Hq, "hq", [9; 32])
}
fn root() -> SecretKey {
    SecretKey::from_seed(Role::Root, "root", [5; 32])
}
fn site_a() -> SecretKey {
    SecretKey::from_seed(Role::Site, "site-a", [2; 32])
}

fn payload(v: f32) -> Payload {
    let d: Vec<u8> = (0..4).flat_map(|i| (v + i as f32).to_le_bytes()).collect();
    Payload::from_tensors(&[TensorRef {
        name: "w",
        dtype: Dtype::F32,
        shape: &[4],
        data: &d,
    }])
    .unwrap()
}

struct G {
    round: u64,
    base: Option<String>,
    federation: &'static str,
    key: SecretKey,
    revocations: Option<RevocationRef>,
    expires: u64,
    v: f32,
}

impl G {
    fn new(round: u64, base: Option<&Bundle>) -> G {
        G {
            round,
            base: base.map(|b| b.hash.clone()),
            federation: "city",
            key: hq(),
            revocations: None,
            expires: NOW + 1000,
            v: round as f32,
        }
    }
}

fn policy() -> ImportPolicy {
    ImportPolicy {
        now: NOW,
        ..ImportPolicy::default()
    }
}

fn ring(keys: &[&SecretKey]) -> Keyring {
    let mut r = Keyring::new();
    for k in keys {
        r.add(k.public()).unwrap();
    }
    r
}

/// `ferry-client import --federation city --trust hq.pub`.
fn first(keys: &[&SecretKey]) -> ImportTrust {
    ImportTrust {
        keys: ring(keys),
        federation: Some("city".into()),
        ..ImportTrust::default()
    }
}

fn list(serial: u64, federation: &str, revoked: Vec<Revoked>, bundles: Vec<&Bundle>) -> Vec<u8> {
    let l = RevocationList::new(
        federation,
        serial,
        NOW - 5,
        NOW + 1000,
        revoked,
        bundles
            .into_iter()
            .map(|b| RevokedBundle {
                sha256: b.hash.clone(),
                reason: "poisoned".into(),
            })
            .collect(),
    );
    revocation::sign(&l, &hq()).unwrap()
}

fn key_list(serial: u64, federation: &str, keys: &[&SecretKey], signer: &SecretKey) -> Vec<u8> {
    let pubs: Vec<_> = keys.iter().map(|k| k.public()).collect();
    keylist::sign(
        &HqKeyList::new(federation, serial, NOW - 5, NOW + 1000, &pubs),
        signer,
    )
    .unwrap()
}

/// Prepare, verify the global's bytes under the prepared keyring (as `ferry-client import` does), import.
fn import(
    state: &SiteState,
    trust: &ImportTrust,
    policy: &ImportPolicy,
    g: &Bundle,
) -> Result<ImportOutcome, SiteError> {
    let prepared = state.prepare_import(trust, policy)?;
    // Re-verify under the prepared keyring: a pinned site must not accept what its pin does not cover.
    let bytes = resealed_bytes(g);
    let b =
        open(&bytes, prepared.keyring(), &Limits::default()).map_err(|e| SiteError::Corrupt {
            path: PathBuf::from("(bundle)"),
            why: format!("open: {e:?}"),
        })?;
    state.import_new(&b, "stick", policy, &prepared)
}

thread_local! {
    static BYTES: std::cell::RefCell<BTreeMap<String, Vec<u8>>> = const { std::cell::RefCell::new(BTreeMap::new()) };
}

/// The file bytes of a bundle sealed in this test (kept by hash when sealed).
fn resealed_bytes(g: &Bundle) -> Vec<u8> {
    BYTES
        .with(|m| m.borrow().get(&g.hash).cloned())
        .expect("bundle bytes kept")
}

fn keep(g: Bundle, bytes: &[u8]) -> Bundle {
    BYTES.with(|m| m.borrow_mut().insert(g.hash.clone(), bytes.to_vec()));
    g
}

/// Seal and remember the bytes.
fn global(g: G) -> Bundle {
    let key = g.key.public();
    let mut d = Draft::initial(g.federation, None);
    d.round = g.round;
    d.base = g.base.clone();
    d.created = NOW - 10;
    d.expires = Some(g.expires);
    d.revocations = g.revocations.clone();
    if g.round > 0 {
        d.strategy = Some("fedavg".into());
        d.contributors = vec![Contributor {
            bundle: "a".repeat(64),
            site: "site-a".into(),
            samples: 1,
        }];
    }
    let s = seal(d, &payload(g.v), &g.key, 3).unwrap();
    let mut r = Keyring::new();
    r.add(key).unwrap();
    keep(open(&s.bytes, &r, &Limits::default()).unwrap(), &s.bytes)
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.file_name().is_some_and(|n| n != "lock") {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut m = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut m);
    }
    m
}

/// The revocation-list error inside a site error, if that is what it is.
fn revocation_error(e: &SiteError) -> Option<&revocation::RevocationError> {
    match e {
        SiteError::Revocation { source, .. } => Some(source),
        _ => None,
    }
}

/// The key-list error inside a site error, if that is what it is.
fn key_list_error(e: &SiteError) -> Option<&keylist::KeyListError> {
    match e {
        SiteError::KeyList { source, .. } => Some(source),
        _ => None,
    }
}

/// An import given only `--federation`.
fn only_federation(federation: &str) -> ImportTrust {
    ImportTrust {
        federation: Some(federation.into()),
        ..ImportTrust::default()
    }
}

/// A later import given these revocation lists (file name, bytes) and nothing else.
fn with_lists(lists: Vec<(&str, Vec<u8>)>) -> ImportTrust {
    ImportTrust {
        revocations: lists.into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
        ..ImportTrust::default()
    }
}

/// A later import given this HQ key list and nothing else.
fn with_key_list(bytes: Vec<u8>) -> ImportTrust {
    ImportTrust {
        hq_keys: Some(("hq-keys.ferry-keys".into(), bytes)),
        ..ImportTrust::default()
    }
}

/// Assert `r` is the refusal `is` and the state did not change.
fn refused(
    state: &SiteState,
    before: &BTreeMap<String, Vec<u8>>,
    r: Result<ImportOutcome, SiteError>,
    is: impl Fn(&SiteError) -> bool,
) -> String {
    let err = r.expect_err("accepted");
    assert!(is(&err), "unexpected error: {err:?}");
    assert_eq!(&snapshot(state.dir()), before, "state changed after: {err}");
    let msg = err.to_string();
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    msg
}

#[test]
fn the_first_import_pins_federation_and_hq_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(&dir.path().join("site"));
    let g0 = global(G::new(0, None));
    let none = BTreeMap::new();
    let msg = refused(
        &state,
        &none,
        import(
            &state,
            &ImportTrust {
                keys: ring(&[&hq()]),
                ..ImportTrust::default()
            },
            &policy(),
            &g0,
        ),
        |e| matches!(e, SiteError::NeedsFederation),
    );
    assert!(msg.contains("--federation"), "{msg}");
    refused(
        &state,
        &none,
        import(&state, &only_federation("city"), &policy(), &g0),
        |e| matches!(e, SiteError::NeedsHqKey),
    );
    // A global of another federation signed by the very same HQ key, offered first.
    let foreign = global(G {
        federation: "other-city",
        ..G::new(0, None)
    });
    refused(
        &state,
        &none,
        import(&state, &first(&[&hq()]), &policy(), &foreign),
        |e| matches!(e, SiteError::WrongFederation { .. }),
    );
    assert!(
        !state.dir().exists(),
        "a refused first import created the state"
    );

    import(&state, &first(&[&hq()]), &policy(), &g0).unwrap();
    let pin = state.pin().unwrap().unwrap();
    assert_eq!(pin.federation, "city");
    assert_eq!(pin.hq_keys.len(), 1);
    assert_eq!(pin.hq_keys[0].key_id, hq().public().key_id_hex());

    // From now on: no --federation or --trust needed; another federation or HQ key is refused.
    let before = snapshot(state.dir());
    let later = ImportTrust::default();
    let g1 = global(G::new(1, Some(&g0)));
    let foreign1 = global(G {
        federation: "other-city",
        ..G::new(1, Some(&g0))
    });
    refused(
        &state,
        &before,
        import(&state, &later, &policy(), &foreign1),
        |e| matches!(e, SiteError::WrongFederation { .. }),
    );
    refused(
        &state,
        &before,
        import(&state, &only_federation("other-city"), &policy(), &g1),
        |e| matches!(e, SiteError::PinnedFederation { .. }),
    );
    // A second key calling itself hq, offered with --trust, is not added to the pin.
    let msg = refused(
        &state,
        &before,
        import(&state, &first(&[&rogue_hq()]), &policy(), &g1),
        |e| matches!(e, SiteError::UnpinnedHqKey { .. }),
    );
    assert!(msg.contains("root"), "{msg}");
    // A global signed by it does not verify under the pinned keyring.
    let rogue1 = global(G {
        key: rogue_hq(),
        ..G::new(1, Some(&g0))
    });
    let prepared = state.prepare_import(&later, &policy()).unwrap();
    assert!(matches!(
        open(
            &resealed_bytes(&rogue1),
            prepared.keyring(),
            &Limits::default()
        ),
        Err(OpenError::UntrustedKey(_))
    ));
    assert!(matches!(
        import(&state, &later, &policy(), &g1).unwrap(),
        ImportOutcome::Installed { .. }
    ));
}

#[test]
fn round_n_plus_1_must_extend_the_global_held() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(dir.path());
    let g0 = global(G::new(0, None));
    import(&state, &first(&[&hq()]), &policy(), &g0).unwrap();
    let g1 = global(G::new(1, Some(&g0)));
    import(&state, &ImportTrust::default(), &policy(), &g1).unwrap();
    // A forked HQ state: round 2 built on another round-1 global.
    let fork1 = global(G {
        v: 7.0,
        ..G::new(1, Some(&g0))
    });
    let fork2 = global(G::new(2, Some(&fork1)));
    let before = snapshot(state.dir());
    let msg = refused(
        &state,
        &before,
        import(&state, &ImportTrust::default(), &policy(), &fork2),
        |e| {
            matches!(
                e,
                SiteError::Fork {
                    current: 1,
                    found: 2,
                    ..
                }
            )
        },
    );
    assert!(msg.contains("fork"), "{msg}");
    let g2 = global(G::new(2, Some(&g1)));
    import(&state, &ImportTrust::default(), &policy(), &g2).unwrap();
}

#[test]
fn revocation_lists_stick_and_globals_require_the_list_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(dir.path());
    let g0 = global(G::new(0, None));
    import(&state, &first(&[&hq()]), &policy(), &g0).unwrap();

    // HQ withdraws a poisoned round-1 global and names the list in the replacement.
    let poisoned = global(G {
        v: 99.0,
        ..G::new(1, Some(&g0))
    });
    let rev = list(
        1,
        "city",
        vec![Revoked {
            key_id: site_a().public().key_id_hex(),
            role: Role::Site,
            id: "site-a".into(),
            reason: "stolen".into(),
        }],
        vec![&poisoned],
    );
    let rev_hash = ferry_bundle::sha256_hex(&rev);
    let g1 = global(G {
        revocations: Some(RevocationRef {
            serial: 1,
            sha256: rev_hash.clone(),
        }),
        ..G::new(1, Some(&g0))
    });
    let before = snapshot(state.dir());
    let msg = refused(
        &state,
        &before,
        import(&state, &ImportTrust::default(), &policy(), &g1),
        |e| matches!(e, SiteError::MissingRevocationList { serial: 1, .. }),
    );
    assert!(msg.contains("--revocations"), "{msg}");
    // A list of another federation, signed by the same HQ key; a list signed by a rogue HQ key.
    let foreign = list(1, "other-city", vec![], vec![]);
    let rogue = revocation::sign(
        &RevocationList::new("city", 9, 0, NOW + 1, vec![], vec![]),
        &rogue_hq(),
    )
    .unwrap();
    refused(
        &state,
        &before,
        import(
            &state,
            &with_lists(vec![("foreign.ferry-rev", foreign)]),
            &policy(),
            &g1,
        ),
        |e| {
            matches!(
                revocation_error(e),
                Some(revocation::RevocationError::WrongFederation { .. })
            )
        },
    );
    refused(
        &state,
        &before,
        import(
            &state,
            &with_lists(vec![("rogue.ferry-rev", rogue)]),
            &policy(),
            &g1,
        ),
        |e| {
            matches!(
                revocation_error(e),
                Some(revocation::RevocationError::UntrustedKey(_))
            )
        },
    );
    // Given the list, the global installs and the list is stored.
    import(
        &state,
        &with_lists(vec![("revocations-1.ferry-rev", rev.clone())]),
        &policy(),
        &g1,
    )
    .unwrap();
    let stored = state.revocation_lists().unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sha256, rev_hash);
    // The withdrawn global is refused on a later import that does not repeat the list: it sticks.
    let prepared = state
        .prepare_import(&ImportTrust::default(), &policy())
        .unwrap();
    assert!(prepared.keyring().is_bundle_revoked(&poisoned.hash));
    assert!(matches!(
        open(
            &resealed_bytes(&poisoned),
            prepared.keyring(),
            &Limits::default()
        ),
        Err(OpenError::RevokedBundle(_))
    ));
    assert!(prepared.keyring().is_revoked(&site_a().public().key_id()));
}

#[test]
fn an_expired_global_warns_or_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(dir.path());
    let stale = global(G {
        expires: NOW - 1,
        ..G::new(0, None)
    });
    let strict = ImportPolicy {
        refuse_expired: true,
        ..policy()
    };
    let none = BTreeMap::new();
    let msg = refused(
        &state,
        &none,
        import(&state, &first(&[&hq()]), &strict, &stale),
        |e| matches!(e, SiteError::Expired(_)),
    );
    assert!(msg.contains("expired"), "{msg}");
    match import(&state, &first(&[&hq()]), &policy(), &stale).unwrap() {
        ImportOutcome::Installed { warnings, .. } => {
            assert_eq!(warnings.len(), 1);
            assert!(warnings[0].contains("expired"), "{warnings:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(state.current().unwrap().unwrap().expires, Some(NOW - 1));
}

fn root_trust(list: &[u8]) -> ImportTrust {
    ImportTrust {
        root: Some(root().public()),
        hq_keys: Some(("hq-keys.ferry-keys".into(), list.to_vec())),
        federation: Some("city".into()),
        ..ImportTrust::default()
    }
}

#[test]
fn a_root_pinned_site_follows_hq_key_rotation_under_the_root_only() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(&dir.path().join("site"));
    let g0 = global(G::new(0, None));
    let none = BTreeMap::new();
    // A list signed by another "root", or by the HQ key itself, is not the root's.
    let rogue_root = SecretKey::from_seed(Role::Root, "root", [6; 32]);
    refused(
        &state,
        &none,
        import(
            &state,
            &root_trust(&key_list(1, "city", &[&rogue_hq()], &rogue_root)),
            &policy(),
            &g0,
        ),
        |e| {
            matches!(
                key_list_error(e),
                Some(keylist::KeyListError::UntrustedRoot { .. })
            )
        },
    );
    refused(
        &state,
        &none,
        import(
            &state,
            &ImportTrust {
                hq_keys: None,
                ..root_trust(&[])
            },
            &policy(),
            &g0,
        ),
        |e| matches!(e, SiteError::NeedsHqKeyList),
    );
    // Nothing pinned yet: `export --encrypt` has no HQ key to encrypt to (issue 15 §5).
    assert!(matches!(
        state.pinned_hq_keys().unwrap_err(),
        SiteError::NoPinnedHqKey
    ));
    let l1 = key_list(1, "city", &[&hq()], &root());
    import(&state, &root_trust(&l1), &policy(), &g0).unwrap();
    assert!(state.pin().unwrap().unwrap().root.is_some());
    assert_eq!(state.pinned_hq_keys().unwrap(), vec![hq().public()]);

    // HQ's key leaks; the root names a new key. The global signed by it comes with the new list.
    let g1 = global(G {
        key: hq2(),
        ..G::new(1, Some(&g0))
    });
    let before = snapshot(state.dir());
    let later = ImportTrust::default();
    let prepared = state.prepare_import(&later, &policy()).unwrap();
    assert!(open(&resealed_bytes(&g1), prepared.keyring(), &Limits::default()).is_err());
    // The new key offered with --trust alone is refused: only the root vouches for HQ keys.
    refused(
        &state,
        &before,
        import(&state, &first(&[&hq2()]), &policy(), &g1),
        |e| matches!(e, SiteError::UnpinnedHqKey { .. }),
    );
    let l2 = key_list(2, "city", &[&hq2()], &root());
    import(&state, &with_key_list(l2.clone()), &policy(), &g1).unwrap();
    assert_eq!(state.hq_key_list().unwrap().unwrap(), l2);
    // Updates are now encrypted to the new HQ key, the one the root's newest list names.
    assert_eq!(state.pinned_hq_keys().unwrap(), vec![hq2().public()]);
    // The old key no longer signs anything this site accepts, and the old list cannot come back.
    let old = global(G::new(2, Some(&g1)));
    let before = snapshot(state.dir());
    let prepared = state.prepare_import(&later, &policy()).unwrap();
    assert!(matches!(
        open(
            &resealed_bytes(&old),
            prepared.keyring(),
            &Limits::default()
        ),
        Err(OpenError::UntrustedKey(_))
    ));
    refused(
        &state,
        &before,
        import(&state, &with_key_list(l1), &policy(), &old),
        |e| {
            matches!(
                key_list_error(e),
                Some(keylist::KeyListError::Rollback { held: 2, found: 1 })
            )
        },
    );
    // A list for another federation under the right root.
    let foreign = with_key_list(key_list(3, "other-city", &[&hq()], &root()));
    refused(
        &state,
        &before,
        import(&state, &foreign, &policy(), &old),
        |e| {
            matches!(
                key_list_error(e),
                Some(keylist::KeyListError::WrongFederation { .. })
            )
        },
    );
}

#[test]
fn a_root_is_added_to_an_hq_pinned_site_only_if_it_vouches_for_the_pinned_key() {
    let dir = tempfile::tempdir().unwrap();
    let state = SiteState::at(dir.path());
    let g0 = global(G::new(0, None));
    import(&state, &first(&[&hq()]), &policy(), &g0).unwrap();
    let g1 = global(G::new(1, Some(&g0)));
    let before = snapshot(state.dir());
    // A root whose list does not name the pinned key: no continuity, refused.
    refused(
        &state,
        &before,
        import(
            &state,
            &root_trust(&key_list(1, "city", &[&hq2()], &root())),
            &policy(),
            &g1,
        ),
        |e| matches!(e, SiteError::RootWithoutContinuity { .. }),
    );
    import(
        &state,
        &root_trust(&key_list(1, "city", &[&hq()], &root())),
        &policy(),
        &g1,
    )
    .unwrap();
    let pin = state.pin().unwrap().unwrap();
    assert!(pin.root.is_some() && pin.hq_keys.is_empty(), "{pin:?}");
    // Now a different root is refused.
    let other = SecretKey::from_seed(Role::Root, "root", [6; 32]);
    let before = snapshot(state.dir());
    let g2 = global(G::new(2, Some(&g1)));
    refused(
        &state,
        &before,
        import(
            &state,
            &ImportTrust {
                root: Some(other.public()),
                ..ImportTrust::default()
            },
            &policy(),
            &g2,
        ),
        |e| matches!(e, SiteError::RootMismatch { .. }),
    );
}
