//! Site-level training against a real state directory (issue 4): the local record, optimizer persistence,
//! resuming an interrupted run, foreign weights, recalibration into the deployed model.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ferry_bundle::{open, seal, Draft, Keyring, Limits, Payload, Role, SecretKey};
use ferry_site::{
    eval_site, recalibrate_site, train_site, EvalTarget, ImportPolicy, ImportTrust, SiteError,
    SiteLock, SiteState,
};
use ferry_train::data::{DataSpec, Dataset, LoadConfig};
use ferry_train::{AdamConfig, Arch, Device, EpochStats, Model, TrainConfig, TrainObserver};

const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const CHECKPOINT_FILE: &str = "train-checkpoint.safetensors";
const DEPLOYED_FILE: &str = "deployed.safetensors";

fn plates(n: usize) -> Dataset {
    let spec: DataSpec = format!("plates:mixed:{n}:4").parse().unwrap();
    spec.load(&LoadConfig::default()).unwrap()
}

/// A state directory holding an imported plate-ctc global (round 0, seed 42), as `ferry-client import` leaves
/// it: a real signed global, verified and imported. `arch: None` makes it a global of foreign weights.
fn site(dir: &Path, arch: Option<&str>) -> SiteState {
    let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
    let weights = Model::init(Arch::PlateCtc, 42, &Device::Cpu)
        .unwrap()
        .to_safetensors()
        .unwrap();
    let payload = Payload::from_safetensors(&weights).unwrap();
    let sealed = seal(
        Draft::initial("test", arch.map(String::from)),
        &payload,
        &hq,
        3,
    )
    .unwrap();
    let mut ring = Keyring::new();
    ring.add(hq.public()).unwrap();
    let state = SiteState::at(dir);
    let policy = ImportPolicy::default();
    let trust = ImportTrust {
        keys: ring,
        federation: Some("test".into()),
        ..ImportTrust::default()
    };
    let prepared = state.prepare_import(&trust, &policy).unwrap();
    let bundle = open(&sealed.bytes, prepared.keyring(), &Limits::default()).unwrap();
    state
        .import_new(&bundle, "global-r0.ferry", &policy, &prepared)
        .unwrap();
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
        // Augmented, as plate readers train by default: resuming must replay the same draws.
        augment: ferry_train::Augment::plates(),
    }
}

struct StopAfterFirstEpoch;
impl TrainObserver for StopAfterFirstEpoch {
    fn on_epoch(&mut self, _: &EpochStats) {
        panic!("simulated power cut after the first epoch's checkpoint");
    }
}

/// Train with `cfg`, cut off by a simulated power cut after the first epoch's checkpoint.
fn interrupt_after_first_epoch(
    state: &SiteState,
    lock: &SiteLock<'_>,
    data: &Dataset,
    cfg: &TrainConfig,
) {
    let r = catch_unwind(AssertUnwindSafe(|| {
        train_site(
            state,
            lock,
            data,
            cfg,
            &Device::Cpu,
            &mut StopAfterFirstEpoch,
        )
    }));
    assert!(r.is_err());
    assert!(state.dir().join(CHECKPOINT_FILE).exists());
}

#[test]
fn training_records_the_local_model_and_resumes_after_an_interruption() {
    let data = plates(40);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // Uninterrupted run.
    let sa = site(a.path(), Some("plate-ctc"));
    let lock_a = sa.lock().unwrap();
    let whole = train_site(&sa, &lock_a, &data, &cfg(2), &Device::Cpu, &mut ()).unwrap();
    let local = sa.local().unwrap().unwrap();
    assert_eq!(local.samples, 40);
    assert_eq!(local.steps, 2 * 3);
    let global = sa.current().unwrap().unwrap();
    assert_eq!(
        (local.round, local.epochs, local.base_hash.as_str()),
        (0, 2, global.hash.as_str())
    );
    assert!(a.path().join(OPTIMIZER_FILE).exists());
    assert!(!a.path().join(CHECKPOINT_FILE).exists());

    // Interrupted after epoch 1, then run again: resumes, same step count, same weights.
    let sb = site(b.path(), Some("plate-ctc"));
    let lock_b = sb.lock().unwrap();
    interrupt_after_first_epoch(&sb, &lock_b, &data, &cfg(2));
    assert!(sb.local().unwrap().is_none());
    let resumed = train_site(&sb, &lock_b, &data, &cfg(2), &Device::Cpu, &mut ()).unwrap();
    assert_eq!(resumed.resumed_after, Some(1));
    assert_eq!(resumed.round_steps, whole.round_steps);
    assert_eq!(resumed.train.total_steps, whole.train.total_steps);
    assert_eq!(sb.local_weights().unwrap().1, sa.local_weights().unwrap().1);
    assert_eq!(
        std::fs::read(b.path().join(OPTIMIZER_FILE)).unwrap(),
        std::fs::read(a.path().join(OPTIMIZER_FILE)).unwrap()
    );

    // The next round continues Adam's step count from the saved optimizer state.
    let again = train_site(&sa, &lock_a, &data, &cfg(1), &Device::Cpu, &mut ()).unwrap();
    assert_eq!(again.train.total_steps, whole.train.total_steps + 3);
    assert_eq!(again.round_steps, 3);
}

#[test]
fn a_checkpoint_trained_with_another_augmentation_is_not_resumed() {
    let data = plates(40);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plain = TrainConfig {
        augment: ferry_train::Augment::none(),
        ..cfg(2)
    };
    let sa = site(a.path(), Some("plate-ctc"));
    let lock_a = sa.lock().unwrap();
    train_site(&sa, &lock_a, &data, &plain, &Device::Cpu, &mut ()).unwrap();

    // Interrupted with augmentation, then rerun without: the checkpoint belongs to another run, so the rerun
    // starts from the global and ends exactly where an uninterrupted unaugmented run does.
    let sb = site(b.path(), Some("plate-ctc"));
    let lock_b = sb.lock().unwrap();
    interrupt_after_first_epoch(&sb, &lock_b, &data, &cfg(2));
    let rerun = train_site(&sb, &lock_b, &data, &plain, &Device::Cpu, &mut ()).unwrap();
    assert_eq!(rerun.resumed_after, None);
    assert_eq!(sb.local_weights().unwrap().1, sa.local_weights().unwrap().1);

    // And the augmentation does change what is learnt.
    let c = tempfile::tempdir().unwrap();
    let sc = site(c.path(), Some("plate-ctc"));
    let lock_c = sc.lock().unwrap();
    train_site(&sc, &lock_c, &data, &cfg(2), &Device::Cpu, &mut ()).unwrap();
    assert_ne!(sc.local_weights().unwrap().1, sa.local_weights().unwrap().1);
}

#[test]
fn foreign_weights_cannot_be_trained() {
    let dir = tempfile::tempdir().unwrap();
    let state = site(dir.path(), None);
    let lock = state.lock().unwrap();
    let err = train_site(&state, &lock, &plates(4), &cfg(1), &Device::Cpu, &mut ()).unwrap_err();
    assert!(matches!(err, SiteError::ForeignWeights), "{err}");
    assert!(err.to_string().contains("import and re-pack only"));
}

#[test]
fn recalibration_writes_the_deployed_model_and_leaves_the_global_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = site(dir.path(), Some("plate-ctc"));
    let global = state.global_weights().unwrap();
    let data = plates(24);
    let lock = state.lock().unwrap();
    let (r, path) = recalibrate_site(&state, &lock, &data, 16, &Device::Cpu).unwrap();
    assert_eq!((r.samples, r.batches), (24, 2));
    assert_eq!(path, dir.path().join(DEPLOYED_FILE));
    assert_eq!(state.global_weights().unwrap(), global);
    assert_ne!(std::fs::read(&path).unwrap(), global);
    let (which, e) = eval_site(&state, &data, EvalTarget::Deployed, 64, &Device::Cpu).unwrap();
    assert_eq!((which, e.samples), (EvalTarget::Deployed, 24));
    let (which, _) = eval_site(&state, &data, EvalTarget::Auto, 64, &Device::Cpu).unwrap();
    assert_eq!(which, EvalTarget::Global);
}
