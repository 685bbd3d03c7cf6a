//! Site-level training against a real state directory (issue 4): the local record, optimizer persistence,
//! resuming an interrupted run, foreign weights, recalibration into the deployed model.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ferry_bundle::site::{GlobalRecord, SiteState};
use ferry_train::data::{DataSpec, Dataset, LoadConfig};
use ferry_train::site::{CHECKPOINT_FILE, DEPLOYED_FILE, OPTIMIZER_FILE};
use ferry_train::{
    eval_site, recalibrate_site, train_site, AdamConfig, Arch, Device, EpochStats, EvalTarget,
    Model, TrainConfig, TrainError, TrainObserver,
};

fn plates(n: usize) -> Dataset {
    let spec: DataSpec = format!("plates:mixed:{n}:4").parse().unwrap();
    spec.load(&LoadConfig::default()).unwrap()
}

/// A state directory holding an imported plate-cnn global (round 3), as `import` leaves it.
fn site(dir: &Path, arch: Option<&str>) -> SiteState {
    let state = SiteState::open(dir).unwrap();
    let weights = Model::init(Arch::PlateCnn, 42, &Device::Cpu)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let sha = state.store_weights(&weights).unwrap();
    let rec = GlobalRecord {
        round: 3,
        hash: "ab".repeat(32),
        federation: "test".into(),
        arch: arch.map(String::from),
        model_fingerprint: "cd".repeat(32),
        payload_sha256: sha,
        samples: 0,
        imported_at: 0,
        source: "test".into(),
        previous: None,
    };
    std::fs::write(dir.join("global.json"), serde_json::to_vec(&rec).unwrap()).unwrap();
    state
}

fn cfg(epochs: u32) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: 16,
        seed: 1,
        adam: AdamConfig {
            lr: 1e-3,
            warmup: 5,
            ..AdamConfig::default()
        },
    }
}

struct StopAfterFirstEpoch;
impl TrainObserver for StopAfterFirstEpoch {
    fn on_epoch(&mut self, _: &EpochStats) {
        panic!("simulated power cut after the first epoch's checkpoint");
    }
}

#[test]
fn training_records_the_local_model_and_resumes_after_an_interruption() {
    let data = plates(40);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // Uninterrupted run.
    let sa = site(a.path(), Some("plate-cnn"));
    let whole = train_site(&sa, &data, &cfg(2), &Device::Cpu, &mut ()).unwrap();
    let local = sa.local().unwrap().unwrap();
    assert_eq!(local.samples, 40);
    assert_eq!(local.steps, 2 * 3);
    assert_eq!(
        (local.round, local.epochs, local.base_hash.as_str()),
        (3, 2, "ab".repeat(32).as_str())
    );
    assert!(a.path().join(OPTIMIZER_FILE).exists());
    assert!(!a.path().join(CHECKPOINT_FILE).exists());

    // Interrupted after epoch 1, then run again: resumes, same step count, same weights.
    let sb = site(b.path(), Some("plate-cnn"));
    let r = catch_unwind(AssertUnwindSafe(|| {
        train_site(&sb, &data, &cfg(2), &Device::Cpu, &mut StopAfterFirstEpoch)
    }));
    assert!(r.is_err());
    assert!(b.path().join(CHECKPOINT_FILE).exists());
    assert!(sb.local().unwrap().is_none());
    let resumed = train_site(&sb, &data, &cfg(2), &Device::Cpu, &mut ()).unwrap();
    assert_eq!(resumed.resumed_after, Some(1));
    assert_eq!(resumed.round_steps, whole.round_steps);
    assert_eq!(resumed.train.total_steps, whole.train.total_steps);
    assert_eq!(sb.local_weights().unwrap().1, sa.local_weights().unwrap().1);
    assert_eq!(
        std::fs::read(b.path().join(OPTIMIZER_FILE)).unwrap(),
        std::fs::read(a.path().join(OPTIMIZER_FILE)).unwrap()
    );

    // The next round continues Adam's step count from the saved optimizer state.
    let again = train_site(&sa, &data, &cfg(1), &Device::Cpu, &mut ()).unwrap();
    assert_eq!(again.train.total_steps, whole.train.total_steps + 3);
    assert_eq!(again.round_steps, 3);
}

#[test]
fn foreign_weights_cannot_be_trained() {
    let dir = tempfile::tempdir().unwrap();
    let state = site(dir.path(), None);
    let err = train_site(&state, &plates(4), &cfg(1), &Device::Cpu, &mut ()).unwrap_err();
    assert!(matches!(err, TrainError::ForeignWeights), "{err}");
    assert!(err.to_string().contains("import and re-pack only"));
}

#[test]
fn recalibration_writes_the_deployed_model_and_leaves_the_global_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = site(dir.path(), Some("plate-cnn"));
    let global = state.global_weights().unwrap();
    let data = plates(24);
    let (r, path) = recalibrate_site(&state, &data, 16, &Device::Cpu).unwrap();
    assert_eq!((r.samples, r.batches), (24, 2));
    assert_eq!(path, dir.path().join(DEPLOYED_FILE));
    assert_eq!(state.global_weights().unwrap(), global);
    assert_ne!(std::fs::read(&path).unwrap(), global);
    let (which, e) = eval_site(&state, &data, EvalTarget::Deployed, 64, &Device::Cpu).unwrap();
    assert_eq!((which, e.samples), (EvalTarget::Deployed, 24));
    let (which, _) = eval_site(&state, &data, EvalTarget::Auto, 64, &Device::Cpu).unwrap();
    assert_eq!(which, EvalTarget::Global);
}
