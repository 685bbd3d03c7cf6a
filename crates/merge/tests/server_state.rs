//! Server optimizers against a reference loop, and their state surviving serialization between rounds (issue 3).
//! The state on HQ's disk (`server/<global>.safetensors`) is tested through `merge_round` in `hq_rounds.rs`.

mod common;

use common::*;
use ferry_merge::{FedAdamConfig, FedAvgMConfig, MergeConfig, MergeError, ServerState, Strategy};

const DA: [[f32; 3]; 2] = [[0.5, -0.25, 1.0], [0.125, 0.75, -0.5]];
const DB: [[f32; 3]; 2] = [[-0.1, 0.3, 2.0], [0.2, -0.6, 0.05]];
const NA: u64 = 30;
const NB: u64 = 10;

/// Round `r`'s two updates, trained from the global `x` (the BN counter rises each round).
fn round_sites(r: usize, x: &[f32]) -> Vec<Site> {
    let up = |d: &[f32; 3]| -> Vec<f32> { x.iter().zip(d).map(|(a, b)| a + b).collect() };
    vec![
        site(
            "a",
            "a0a0",
            NA,
            &[
                ("w", f32t(&[3], &up(&DA[r]))),
                ("bn.num_batches_tracked", i64t(&[], &[r as i64 + 1])),
            ],
        ),
        site(
            "b",
            &format!("b{r}b{r}"),
            NB,
            &[
                ("w", f32t(&[3], &up(&DB[r]))),
                ("bn.num_batches_tracked", i64t(&[], &[7])),
            ],
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, mut s)| {
        s.bundle = format!("{}{r}{i}", s.bundle);
        s
    })
    .collect()
}

fn x0() -> Vec<f32> {
    vec![1.0, -2.0, 0.5]
}

fn base_of(x: &[f32]) -> ferry_merge::MemorySource {
    source(
        "base",
        &[
            ("w", f32t(&[3], x)),
            ("bn.num_batches_tracked", i64t(&[], &[0])),
        ],
    )
}

/// The reference: the same two rounds written as a plain loop in f64, with state and weights rounded to f32
/// between rounds as they are stored.
fn reference(strategy: Strategy, config: &MergeConfig) -> Vec<f32> {
    // NumPy equivalent (w = [0.75, 0.25]):
    //   x = np.array([1, -2, 0.5], np.float32); m = np.zeros(3); v = np.full(3, tau**2)
    //   for r in range(2):
    //       avg = 0.75*(x + DA[r]) + 0.25*(x + DB[r]); delta = x - avg
    //       fedavgm: m = beta*m + delta;                       x = x - lr*m
    //       fedadam: m = b1*m + (1-b1)*delta; v = b2*v + (1-b2)*delta**2; x = x - lr*m/(np.sqrt(v)+tau)
    //       x, m, v = x.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
    let mut x = x0();
    let a = config.fedadam;
    let mut m = [0f32; 3];
    let mut v = [(a.tau * a.tau) as f32; 3];
    let (wa, wb) = (NA as f64 / (NA + NB) as f64, NB as f64 / (NA + NB) as f64);
    for r in 0..2 {
        for j in 0..3 {
            let b = x[j] as f64;
            let ua = (x[j] + DA[r][j]) as f64;
            let ub = (x[j] + DB[r][j]) as f64;
            let delta = b - (wa * ua + wb * ub);
            let new_x = match strategy {
                Strategy::FedAvgM => {
                    let c = config.fedavgm;
                    let mm = c.beta * m[j] as f64 + delta;
                    m[j] = mm as f32;
                    b - c.lr * mm
                }
                _ => {
                    let mm = a.beta1 * m[j] as f64 + (1.0 - a.beta1) * delta;
                    let vv = if r == 0 {
                        a.beta2 * a.tau * a.tau
                    } else {
                        a.beta2 * v[j] as f64
                    } + (1.0 - a.beta2) * delta * delta;
                    m[j] = mm as f32;
                    v[j] = vv as f32;
                    b - a.lr * mm / (vv.sqrt() + a.tau)
                }
            };
            x[j] = new_x as f32;
        }
    }
    x
}

fn configs() -> Vec<MergeConfig> {
    vec![
        MergeConfig {
            strategy: Strategy::FedAvgM,
            fedavgm: FedAvgMConfig { lr: 0.7, beta: 0.9 },
            ..MergeConfig::default()
        },
        MergeConfig {
            strategy: Strategy::FedAvgM,
            ..MergeConfig::default()
        },
        MergeConfig {
            strategy: Strategy::FedAdam,
            fedadam: FedAdamConfig {
                lr: 0.1,
                ..FedAdamConfig::default()
            },
            ..MergeConfig::default()
        },
        MergeConfig {
            strategy: Strategy::FedAdam,
            ..MergeConfig::default()
        },
    ]
}

#[test]
fn server_optimizers_match_a_reference_loop() {
    for config in configs() {
        let mut state = ServerState::new();
        let mut x = x0();
        for r in 0..2 {
            let (out, _) = run(&base_of(&x), &mut round_sites(r, &x), &config, &mut state).unwrap();
            x = f32s(&out["w"].data);
            assert_eq!(out["bn.num_batches_tracked"], i64t(&[], &[7]));
        }
        let want = reference(config.strategy, &config);
        for j in 0..3 {
            assert!(
                (x[j] - want[j]).abs() <= 1e-6 * want[j].abs().max(1.0),
                "{}: {x:?} vs {want:?}",
                config.describe()
            );
        }
        assert_eq!(state.step(), 2);
        assert_eq!(state.strategy(), Some(config.strategy));
        // FedAvgM with β = 0.9 and lr = 1 must differ from plain FedAvg after two rounds.
        assert!(state.m("w").is_some());
    }
}

#[test]
fn state_survives_a_restart_between_rounds() {
    for config in configs() {
        // One process, two rounds.
        let mut mem = ServerState::new();
        let mut x = x0();
        let mut mem_outputs = Vec::new();
        for r in 0..2 {
            let (out, _) = run(&base_of(&x), &mut round_sites(r, &x), &config, &mut mem).unwrap();
            x = f32s(&out["w"].data);
            mem_outputs.push(out);
        }
        // Two processes: each round starts from the bytes the last one wrote, bound to its global.
        let path = std::path::Path::new("server/state.safetensors");
        let mut bytes = ServerState::new().to_bytes("00").unwrap();
        let mut global = "00".to_string();
        let mut x = x0();
        for (r, mem_out) in mem_outputs.iter().enumerate() {
            let (mut state, bound) = ServerState::from_bytes(&bytes, path).unwrap();
            assert_eq!(bound, global);
            let (out, _) = run(&base_of(&x), &mut round_sites(r, &x), &config, &mut state).unwrap();
            assert_eq!(&out, mem_out, "round {r} after a restart");
            x = f32s(&out["w"].data);
            global = format!("{r}1{r}1");
            bytes = state.to_bytes(&global).unwrap();
        }
        let (loaded, bound) = ServerState::from_bytes(&bytes, path).unwrap();
        assert_eq!((loaded, bound), (mem, global));
    }
}

#[test]
fn a_state_for_another_strategy_is_refused_and_damaged_bytes_are_errors() {
    let config = configs().remove(0);
    let mut state = ServerState::new();
    let x = x0();
    run(&base_of(&x), &mut round_sites(0, &x), &config, &mut state).unwrap();
    let before = state.clone();
    for other in [Strategy::FedAdam, Strategy::FedAvg, Strategy::Median] {
        let cfg = MergeConfig {
            strategy: other,
            ..MergeConfig::default()
        };
        let err = run(&base_of(&x), &mut round_sites(1, &x), &cfg, &mut state).unwrap_err();
        assert!(matches!(err, MergeError::StrategySwitch { .. }), "{err}");
    }
    // A refused merge leaves the state as it was.
    assert_eq!(state, before);

    // A reset (the empty state) may start any strategy.
    let mut reset = ServerState::new();
    let cfg = MergeConfig {
        strategy: Strategy::FedAdam,
        ..MergeConfig::default()
    };
    run(&base_of(&x), &mut round_sites(1, &x), &cfg, &mut reset).unwrap();
    assert_eq!(reset.strategy(), Some(Strategy::FedAdam));

    // Damaged bytes are an error, not a panic.
    let bytes = state.to_bytes("abcd").unwrap();
    let path = std::path::Path::new("server/abcd.safetensors");
    for bad in [&bytes[..bytes.len() / 2], b"{}".as_slice()] {
        assert!(matches!(
            ServerState::from_bytes(bad, path),
            Err(MergeError::StateCorrupt { .. })
        ));
    }
}

#[test]
fn a_state_for_another_model_is_refused() {
    let config = configs().remove(0);
    let mut state = ServerState::new();
    let x = x0();
    run(&base_of(&x), &mut round_sites(0, &x), &config, &mut state).unwrap();
    let other = source("base", &[("w", f32t(&[2], &[0.0, 0.0]))]);
    let mut sites = vec![site("a", "aa", 1, &[("w", f32t(&[2], &[1.0, 1.0]))])];
    let err = run(&other, &mut sites, &config, &mut state).unwrap_err();
    assert!(matches!(err, MergeError::StateMismatch { .. }), "{err}");
}
