//! The merge engine against independent references computed here (issue 3).

mod common;

use common::*;
use ferry_merge::{
    merge, Contribution, Dtype, MergeConfig, MergeError, PayloadFile, ServerState, Strategy,
    TensorRule, TensorSource, Weighting,
};

fn cfg(strategy: Strategy) -> MergeConfig {
    MergeConfig {
        strategy,
        ..MergeConfig::default()
    }
}

#[test]
fn fedavg_weights_by_samples() {
    let base = source("base", &[("w", f32t(&[3], &[0.0, 0.0, 0.0]))]);
    let mut sites = vec![
        site("a", "aa", 100, &[("w", f32t(&[3], &[1.0, 2.0, 3.0]))]),
        site("b", "bb", 300, &[("w", f32t(&[3], &[5.0, 6.0, 7.5]))]),
    ];
    let (out, report) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    // 0.25·a + 0.75·b by hand.
    assert_eq!(f32s(&out["w"].data), vec![4.0, 5.0, 6.375]);
    assert_eq!(report.contributions[0].weight, Some(0.25));
    assert_eq!(report.contributions[1].weight, Some(0.75));
    assert_eq!(report.tensors[0].rule, TensorRule::Average);

    // Weights that do not divide evenly: (1·1 + 2·2)/3 rounded once to f32.
    let mut sites = vec![
        site("a", "aa", 1, &[("w", f32t(&[3], &[1.0, 0.1, -3.0]))]),
        site("b", "bb", 2, &[("w", f32t(&[3], &[2.0, 0.2, 7.0]))]),
    ];
    let (out, _) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    let want: Vec<f32> = [(1.0, 2.0), (0.1f32 as f64, 0.2f32 as f64), (-3.0, 7.0)]
        .iter()
        .map(|&(a, b)| (a * (1.0 / 3.0) + b * (2.0 / 3.0)) as f32)
        .collect();
    assert_eq!(f32s(&out["w"].data), want);
}

#[test]
fn equal_weights_ignore_samples() {
    let base = source("base", &[("w", f32t(&[2], &[0.0, 0.0]))]);
    let mut sites = vec![
        site("a", "aa", 1, &[("w", f32t(&[2], &[1.0, 10.0]))]),
        site("b", "bb", 1000, &[("w", f32t(&[2], &[3.0, 20.0]))]),
        site("c", "cc", 0, &[("w", f32t(&[2], &[8.0, 0.0]))]),
    ];
    let config = MergeConfig {
        weighting: Weighting::Equal,
        ..MergeConfig::default()
    };
    let (out, report) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
    assert_eq!(f32s(&out["w"].data), vec![4.0, 10.0]);
    assert!(report
        .contributions
        .iter()
        .all(|c| c.weight == Some(1.0 / 3.0)));
}

fn mixed_sites() -> (ferry_merge::MemorySource, Vec<Site>) {
    let base = source(
        "base",
        &[
            ("bn.num_batches_tracked", i64t(&[], &[0])),
            ("bn.running_mean", f32t(&[2], &[0.0, 0.0])),
            ("bn.running_var", f32t(&[2], &[1.0, 1.0])),
            ("bn.weight", f16t(&[2], &[1.0, 1.0])),
            ("conv.weight", f32t(&[2, 2], &[0.1, 0.2, 0.3, 0.4])),
            ("head.bias", bf16t(&[3], &[0.0, 0.0, 0.0])),
        ],
    );
    let mk = |id: &str, bundle: &str, n: u64, k: f32| {
        let kf = k as f64;
        site(
            id,
            bundle,
            n,
            &[
                ("bn.num_batches_tracked", i64t(&[], &[(k * 10.0) as i64])),
                ("bn.running_mean", f32t(&[2], &[0.3 * k, -0.7 + k])),
                ("bn.running_var", f32t(&[2], &[1.0 + 0.1 * k, 0.5 * k])),
                ("bn.weight", f16t(&[2], &[1.0 + 0.01 * kf, 0.3 * kf])),
                (
                    "conv.weight",
                    f32t(&[2, 2], &[0.1 * k, 0.2 + k, 0.3 / k, 0.4 - 0.01 * k]),
                ),
                ("head.bias", bf16t(&[3], &[0.11 * kf, -kf, 1.0 / kf])),
            ],
        )
    };
    let sites = vec![
        mk("a", "0a1b", 17, 1.3),
        mk("b", "9f00", 5, 2.9),
        mk("c", "5c5c", 123, 0.7),
        mk("d", "77e1", 64, 3.7),
    ];
    (base, sites)
}

#[test]
fn output_is_byte_identical_for_any_input_order() {
    for strategy in [
        Strategy::FedAvg,
        Strategy::FedAvgM,
        Strategy::FedAdam,
        Strategy::Median,
        Strategy::TrimmedMean,
    ] {
        let config = MergeConfig {
            clip_norm: Some(1.5),
            ..cfg(strategy)
        };
        let (base, mut sites) = mixed_sites();
        let (first, _) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
        for perm in [[3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]] {
            let (_, sites0) = mixed_sites();
            let mut sites0: Vec<Option<Site>> = sites0.into_iter().map(Some).collect();
            let mut permuted: Vec<Site> = perm.iter().map(|&i| sites0[i].take().unwrap()).collect();
            let (out, _) = run(&base, &mut permuted, &config, &mut ServerState::new()).unwrap();
            assert_eq!(out, first, "{strategy} with order {perm:?}");
        }
    }
}

#[test]
fn half_precision_is_written_back_rounded_to_nearest() {
    let base = source(
        "base",
        &[("h", f16t(&[3], &[0.0; 3])), ("b", bf16t(&[3], &[0.0; 3]))],
    );
    let a = [0.1, 1000.5, -3.3];
    let b = [0.2, 1001.25, 7.7];
    let mut sites = vec![
        site(
            "a",
            "aa",
            1,
            &[("h", f16t(&[3], &a)), ("b", bf16t(&[3], &a))],
        ),
        site(
            "b",
            "bb",
            2,
            &[("h", f16t(&[3], &b)), ("b", bf16t(&[3], &b))],
        ),
    ];
    let (out, _) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    assert_eq!(out["h"].dtype, Dtype::F16);
    assert_eq!(out["b"].dtype, Dtype::BF16);
    for (name, enc) in [("h", 0), ("b", 1)] {
        let got = &out[name].data;
        for j in 0..3 {
            // Reference: decode the stored inputs, average in f64, round once to the storage type.
            let (x, y) = if enc == 0 {
                (
                    half::f16::from_f64(a[j]).to_f64(),
                    half::f16::from_f64(b[j]).to_f64(),
                )
            } else {
                (
                    half::bf16::from_f64(a[j]).to_f64(),
                    half::bf16::from_f64(b[j]).to_f64(),
                )
            };
            let avg = x * (1.0 / 3.0) + y * (2.0 / 3.0);
            let want = if enc == 0 {
                half::f16::from_f64(avg).to_le_bytes()
            } else {
                half::bf16::from_f64(avg).to_le_bytes()
            };
            assert_eq!(&got[2 * j..2 * j + 2], &want, "{name}[{j}]");
        }
    }
}

#[test]
fn integers_follow_the_strategy_and_keep_their_dtype() {
    let u8t = |dtype: Dtype, v: &[u8]| ferry_merge::OwnedTensor {
        dtype,
        shape: vec![v.len()],
        data: v.to_vec(),
    };
    let i32t = |v: &[i32]| ferry_merge::OwnedTensor {
        dtype: Dtype::I32,
        shape: vec![v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let base = source(
        "base",
        &[
            ("bn.num_batches_tracked", i64t(&[], &[5])),
            ("flags", u8t(Dtype::BOOL, &[0, 0])),
            ("mask", u8t(Dtype::U8, &[0, 0, 0])),
            ("q", i32t(&[0, 0])),
        ],
    );
    // Samples 1, 1, 3: weights 0.2, 0.2, 0.6.
    let mut sites = vec![
        site(
            "a",
            "aa",
            1,
            &[
                ("bn.num_batches_tracked", i64t(&[], &[100])),
                ("flags", u8t(Dtype::BOOL, &[1, 0])),
                ("mask", u8t(Dtype::U8, &[1, 0, 1])),
                ("q", i32t(&[-5, 3])),
            ],
        ),
        site(
            "b",
            "bb",
            1,
            &[
                ("bn.num_batches_tracked", i64t(&[], &[300])),
                ("flags", u8t(Dtype::BOOL, &[1, 0])),
                ("mask", u8t(Dtype::U8, &[0, 0, 1])),
                ("q", i32t(&[-7, -1])),
            ],
        ),
        site(
            "c",
            "cc",
            3,
            &[
                ("bn.num_batches_tracked", i64t(&[], &[200])),
                ("flags", u8t(Dtype::BOOL, &[0, 1])),
                ("mask", u8t(Dtype::U8, &[0, 1, 0])),
                ("q", i32t(&[-9, 2])),
            ],
        ),
    ];
    // By hand: fedavg 0.2·a + 0.2·b + 0.6·c, rounded half away from zero (a boolean by weighted majority);
    // median and trimmed mean (trim 1) per coordinate over the sorted values.
    type Want = (i64, [u8; 2], [u8; 3], [i32; 2], TensorRule);
    let cases: [(Strategy, Want); 3] = [
        (
            Strategy::FedAvg,
            (200, [0, 1], [0, 1, 0], [-8, 2], TensorRule::IntAverage),
        ),
        (
            Strategy::Median,
            (200, [1, 0], [0, 0, 1], [-7, 2], TensorRule::IntMedian),
        ),
        (
            Strategy::TrimmedMean,
            (200, [1, 0], [0, 0, 1], [-7, 2], TensorRule::IntTrimmedMean),
        ),
    ];
    for (strategy, (nbt, flags, mask, q, rule)) in cases {
        let (out, report) =
            run(&base, &mut sites, &cfg(strategy), &mut ServerState::new()).unwrap();
        assert_eq!(
            out["bn.num_batches_tracked"],
            i64t(&[], &[nbt]),
            "{strategy}"
        );
        assert_eq!(out["flags"], u8t(Dtype::BOOL, &flags), "{strategy}");
        assert_eq!(out["mask"], u8t(Dtype::U8, &mask), "{strategy}");
        assert_eq!(out["q"], i32t(&q), "{strategy}");
        assert!(report.tensors.iter().all(|t| t.rule == rule), "{strategy}");
    }
}

#[test]
fn a_counter_stored_as_a_float_takes_the_maximum() {
    let base = source("base", &[("bn.num_batches_tracked", f32t(&[], &[0.0]))]);
    let mut sites = vec![
        site(
            "a",
            "aa",
            1,
            &[("bn.num_batches_tracked", f32t(&[], &[5.0]))],
        ),
        site(
            "b",
            "bb",
            1,
            &[("bn.num_batches_tracked", f32t(&[], &[7.0]))],
        ),
        site(
            "c",
            "cc",
            9,
            &[("bn.num_batches_tracked", f32t(&[], &[6.0]))],
        ),
    ];
    let (out, report) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    assert_eq!(out["bn.num_batches_tracked"], f32t(&[], &[7.0]));
    assert_eq!(report.tensors[0].rule, TensorRule::Max);
}

/// One BatchNorm layer with a single channel: running mean `m`, running variance `v`.
fn bn1(m: f32, v: f32) -> Vec<(&'static str, ferry_merge::OwnedTensor)> {
    vec![
        ("layer.running_mean", f32t(&[1], &[m])),
        ("layer.running_var", f32t(&[1], &[v])),
    ]
}

#[test]
fn a_negative_running_variance_is_refused_naming_site_and_tensor() {
    let base = source("base", &bn1(0.0, 1.0));
    let mut sites = vec![
        site("a", "aa", 10, &bn1(0.2, 0.9)),
        site("b", "bb", 10, &bn1(0.1, -0.5)),
    ];
    for strategy in [Strategy::FedAvg, Strategy::Median] {
        let e = run(&base, &mut sites, &cfg(strategy), &mut ServerState::new()).unwrap_err();
        assert!(
            matches!(&e, MergeError::NegativeVariance { origin, tensor }
                if origin.contains("site b") && tensor == "layer.running_var"),
            "{e}"
        );
        assert!(e.to_string().contains("negative"), "{e}");
    }
}

#[test]
fn batchnorm_statistics_are_bounded_relative_to_the_base_global() {
    // Base σ = 2: with R = 100 a site's mean stays within 0 ± 200 and its variance within [4e-4, 4e4].
    let base = source("base", &bn1(0.0, 4.0));
    let mut sites = vec![
        site("a", "aa", 1, &bn1(0.5, 1.2)),
        site("b", "bb", 1, &bn1(1.0e6, 1.0e12)),
    ];
    let (out, report) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    let mean = f32s(&out["layer.running_mean"].data)[0] as f64;
    let var = f32s(&out["layer.running_var"].data)[0] as f64;
    let mu = 0.5 * 0.5 + 0.5 * 200.0;
    let pooled =
        0.5 * (1.2 + (0.5 - mu) * (0.5 - mu)) + 0.5 * (4.0e4 + (200.0 - mu) * (200.0 - mu));
    assert!((mean - mu).abs() < 1e-4, "{mean} vs {mu}");
    assert!((var - pooled).abs() < 1e-6 * pooled, "{var} vs {pooled}");
    let bounded: Vec<(String, u64)> = report
        .contributions
        .iter()
        .map(|c| (c.site.clone(), c.bn_bounded))
        .collect();
    assert_eq!(bounded, vec![("a".to_string(), 0), ("b".to_string(), 2)]);

    // --bn-bound 0 turns the bound off: the hostile statistics go through as sent.
    let off = MergeConfig {
        bn_bound: 0.0,
        ..MergeConfig::default()
    };
    let (out, report) = run(&base, &mut sites, &off, &mut ServerState::new()).unwrap();
    let mean = f32s(&out["layer.running_mean"].data)[0] as f64;
    assert!((mean - (0.25 + 5.0e5)).abs() < 1.0, "{mean}");
    assert!(report.contributions.iter().all(|c| c.bn_bounded == 0));

    let bad = MergeConfig {
        bn_bound: 0.5,
        ..MergeConfig::default()
    };
    let e = run(&base, &mut sites, &bad, &mut ServerState::new()).unwrap_err();
    assert!(e.to_string().contains("--bn-bound"), "{e}");
}

#[test]
fn robust_strategies_report_no_weights_and_averaging_ones_do() {
    let base = source("base", &[("w", f32t(&[1], &[0.0]))]);
    let mut sites = vec![
        site("a", "aa", 1, &[("w", f32t(&[1], &[1.0]))]),
        site("b", "bb", 3, &[("w", f32t(&[1], &[2.0]))]),
        site("c", "cc", 4, &[("w", f32t(&[1], &[9.0]))]),
    ];
    for strategy in [Strategy::Median, Strategy::TrimmedMean] {
        let (_, report) = run(&base, &mut sites, &cfg(strategy), &mut ServerState::new()).unwrap();
        assert!(
            report.contributions.iter().all(|c| c.weight.is_none()),
            "{strategy}"
        );
    }
    let (_, report) = run(
        &base,
        &mut sites,
        &cfg(Strategy::FedAvg),
        &mut ServerState::new(),
    )
    .unwrap();
    let w: Vec<f64> = report
        .contributions
        .iter()
        .map(|c| c.weight.unwrap())
        .collect();
    assert_eq!(w, vec![0.125, 0.375, 0.5]);
}

/// Biased mean and variance of a sample.
fn moments(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mu = x.iter().sum::<f64>() / n;
    (mu, x.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n)
}

#[test]
fn batchnorm_variance_is_pooled_like_the_concatenated_data() {
    // Two sites' activations for two channels; each site reports biased per-channel stats and its sample count.
    let a = [[0.5, 1.5, 2.0, -1.0], [10.0, 11.0, 12.5, 9.0]];
    let b = [
        [3.0, 4.5, 2.5, 5.0, 6.0, 3.5],
        [-2.0, -1.0, 0.0, -3.5, -2.5, -1.5],
    ];
    let stats = |x: &[[f64; 4]; 2]| [moments(&x[0]), moments(&x[1])];
    let sa = stats(&a);
    let sb = [moments(&b[0]), moments(&b[1])];
    let bn = |s: [(f64, f64); 2]| {
        vec![
            (
                "layer.running_mean",
                f32t(&[2], &[s[0].0 as f32, s[1].0 as f32]),
            ),
            (
                "layer.running_var",
                f32t(&[2], &[s[0].1 as f32, s[1].1 as f32]),
            ),
        ]
    };
    let base = source("base", &bn([(0.0, 1.0), (0.0, 1.0)]));
    let mut sites = vec![site("a", "aa", 4, &bn(sa)), site("b", "bb", 6, &bn(sb))];
    let (out, report) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    let mean = f32s(&out["layer.running_mean"].data);
    let var = f32s(&out["layer.running_var"].data);
    for c in 0..2 {
        let all: Vec<f64> = a[c].iter().chain(b[c].iter()).copied().collect();
        let (mu, s2) = moments(&all);
        assert!(
            (mean[c] as f64 - mu).abs() < 1e-5,
            "mean {c}: {} vs {mu}",
            mean[c]
        );
        assert!(
            (var[c] as f64 - s2).abs() < 1e-5 * s2.max(1.0),
            "var {c}: {} vs {s2}",
            var[c]
        );
        // And not the plain weighted mean of the variances, which misses the spread of the means.
        let naive = 0.4 * sa[c].1 + 0.6 * sb[c].1;
        assert!((var[c] as f64 - naive).abs() > 0.1);
    }
    let rules: Vec<_> = report.tensors.iter().map(|t| t.rule).collect();
    assert_eq!(rules, vec![TensorRule::BnMean, TensorRule::BnVarPooled]);
}

#[test]
fn keras_names_and_custom_bn_names() {
    let base = source(
        "base",
        &[
            ("bn/moving_mean", f32t(&[1], &[0.0])),
            ("bn/moving_variance", f32t(&[1], &[1.0])),
        ],
    );
    let mk = |id: &str, m: f32, v: f32| {
        site(
            id,
            id,
            1,
            &[
                ("bn/moving_mean", f32t(&[1], &[m])),
                ("bn/moving_variance", f32t(&[1], &[v])),
            ],
        )
    };
    let mut sites = vec![mk("a", 0.0, 1.0), mk("b", 2.0, 1.0)];
    let (out, _) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    // Pooled: 1 + ((0−1)² + (2−1)²)/2 = 2.
    assert_eq!(f32s(&out["bn/moving_variance"].data), vec![2.0]);
    // Without the Keras pair the variance is an ordinary trainable tensor: plain average.
    let config = MergeConfig {
        bn: "running_mean:running_var".parse().unwrap(),
        ..MergeConfig::default()
    };
    let (out, report) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
    assert_eq!(f32s(&out["bn/moving_variance"].data), vec![1.0]);
    assert!(report.tensors.iter().all(|t| t.rule == TensorRule::Average));
    assert!("running_mean".parse::<ferry_merge::BnRules>().is_err());
}

#[test]
fn median_and_trimmed_mean_per_coordinate() {
    let vals: [[f32; 3]; 5] = [
        [1.0, 50.0, -2.0],
        [2.0, -40.0, -1.0],
        [3.0, 0.5, 1000.0],
        [4.0, 1.0, 0.0],
        [1000.0, 2.0, 1.0],
    ];
    let base = source("base", &[("w", f32t(&[3], &[0.0; 3]))]);
    let mk = || -> Vec<Site> {
        vals.iter()
            .enumerate()
            .map(|(i, v)| {
                site(
                    &format!("s{i}"),
                    &format!("{i:02x}"),
                    1,
                    &[("w", f32t(&[3], v))],
                )
            })
            .collect()
    };
    // Reference by hand: sorted columns [1,2,3,4,1000], [-40,0.5,1,2,50], [-2,-1,0,1,1000].
    let (out, _) = run(
        &base,
        &mut mk(),
        &cfg(Strategy::Median),
        &mut ServerState::new(),
    )
    .unwrap();
    assert_eq!(f32s(&out["w"].data), vec![3.0, 1.0, 0.0]);
    let t1 = MergeConfig {
        trim: 1,
        ..cfg(Strategy::TrimmedMean)
    };
    let (out, _) = run(&base, &mut mk(), &t1, &mut ServerState::new()).unwrap();
    assert_eq!(f32s(&out["w"].data), vec![3.0, 3.5 / 3.0, 0.0]);
    let t2 = MergeConfig {
        trim: 2,
        ..t1.clone()
    };
    let (out, _) = run(&base, &mut mk(), &t2, &mut ServerState::new()).unwrap();
    assert_eq!(f32s(&out["w"].data), vec![3.0, 1.0, 0.0]);
    // Even count: the median is the mean of the two middle values.
    let mut four = mk();
    four.pop();
    let (out, _) = run(
        &base,
        &mut four,
        &cfg(Strategy::Median),
        &mut ServerState::new(),
    )
    .unwrap();
    assert_eq!(f32s(&out["w"].data), vec![2.5, 0.75, -0.5]);
    // 2K ≥ n is refused.
    let t3 = MergeConfig { trim: 3, ..t1 };
    assert!(matches!(
        run(&base, &mut mk(), &t3, &mut ServerState::new()),
        Err(MergeError::TrimTooLarge { trim: 3, n: 5 })
    ));
}

#[test]
fn clip_norm_scales_a_x100_update_back() {
    let base = source(
        "base",
        &[
            ("w", f32t(&[2], &[1.0, 1.0])),
            ("bn.running_mean", f32t(&[1], &[0.0])),
        ],
    );
    // Honest update: Δ = (0.6, 0.8), ‖Δ‖ = 1. Poisoned: Δ × 100.
    let mut sites = vec![
        site(
            "good",
            "aa",
            1,
            &[
                ("w", f32t(&[2], &[1.6, 1.8])),
                ("bn.running_mean", f32t(&[1], &[500.0])),
            ],
        ),
        site(
            "evil",
            "bb",
            1,
            &[
                ("w", f32t(&[2], &[61.0, 81.0])),
                ("bn.running_mean", f32t(&[1], &[0.0])),
            ],
        ),
    ];
    let (_, plain) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    let flagged: Vec<_> = plain
        .outliers(10.0)
        .iter()
        .map(|c| c.site.clone())
        .collect();
    assert_eq!(flagged, vec!["evil"]);
    let config = MergeConfig {
        clip_norm: Some(2.0),
        ..MergeConfig::default()
    };
    let (out, report) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
    let good = &report.contributions[0];
    let evil = &report.contributions[1];
    assert_eq!((good.site.as_str(), good.clipped), ("good", false));
    assert!((good.distance - 1.0).abs() < 1e-6);
    assert!(
        (evil.distance - 100.0).abs() < 1e-4 && evil.clipped && (evil.scale - 0.02).abs() < 1e-9
    );
    // Evil becomes base + 2·(0.6, 0.8) = (2.2, 2.6); the average with good's (1.6, 1.8) is (1.9, 2.2).
    let w = f32s(&out["w"].data);
    assert!(
        (w[0] - 1.9).abs() < 1e-6 && (w[1] - 2.2).abs() < 1e-6,
        "{w:?}"
    );
    // BatchNorm statistics are neither measured nor clipped.
    assert_eq!(f32s(&out["bn.running_mean"].data), vec![250.0]);
}

#[test]
fn nan_and_inf_are_refused_naming_site_and_tensor() {
    let base = source(
        "base",
        &[("a", f32t(&[2], &[0.0, 0.0])), ("z", f16t(&[1], &[0.0]))],
    );
    let mut sites = [
        site(
            "ok",
            "aa",
            1,
            &[("a", f32t(&[2], &[1.0, 2.0])), ("z", f16t(&[1], &[1.0]))],
        ),
        site(
            "broken",
            "bb",
            1,
            &[
                ("a", f32t(&[2], &[1.0, 2.0])),
                ("z", f16t(&[1], &[f64::NAN])),
            ],
        ),
    ];
    let mut written = 0;
    let layout = layout_of(&base);
    let mut b = base.clone();
    let (s0, s1) = sites.split_at_mut(1);
    let mut cs = vec![
        Contribution {
            site: s0[0].id.clone(),
            bundle: s0[0].bundle.clone(),
            samples: 1,
            source: &mut s0[0].src,
        },
        Contribution {
            site: s1[0].id.clone(),
            bundle: s1[0].bundle.clone(),
            samples: 1,
            source: &mut s1[0].src,
        },
    ];
    let err = merge(
        &layout,
        &mut b,
        &mut cs,
        &MergeConfig::default(),
        &mut ServerState::new(),
        |_, _| {
            written += 1;
            Ok(())
        },
    )
    .unwrap_err();
    assert_eq!(
        written, 0,
        "nothing may reach the sink before every input is checked"
    );
    let msg = err.to_string();
    assert!(
        matches!(err, MergeError::NonFinite { .. })
            && msg.contains("broken")
            && msg.contains("tensor z;"),
        "{msg}"
    );

    let mut sites = vec![site(
        "inf",
        "aa",
        1,
        &[
            ("a", f32t(&[2], &[f32::INFINITY, 2.0])),
            ("z", f16t(&[1], &[1.0])),
        ],
    )];
    let err = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("site inf"), "{err}");
}

#[test]
fn malformed_inputs_are_refused() {
    let base = source("base", &[("w", f32t(&[2], &[0.0, 0.0]))]);
    let go = |sites: &mut Vec<Site>, c: &MergeConfig| {
        run(&base, sites, c, &mut ServerState::new()).unwrap_err()
    };
    let d = MergeConfig::default();
    assert!(matches!(go(&mut vec![], &d), MergeError::NoContributions));
    let err = go(
        &mut vec![site("a", "aa", 1, &[("w", f32t(&[1, 2], &[0.0, 0.0]))])],
        &d,
    );
    assert!(matches!(err, MergeError::LayoutMismatch { .. }), "{err}");
    let err = go(
        &mut vec![site("a", "aa", 1, &[("w", f16t(&[2], &[0.0, 0.0]))])],
        &d,
    );
    assert!(matches!(err, MergeError::LayoutMismatch { .. }), "{err}");
    let mut short = f32t(&[2], &[0.0, 0.0]);
    short.data.pop();
    assert!(matches!(
        go(&mut vec![site("a", "aa", 1, &[("w", short)])], &d),
        MergeError::LayoutMismatch { .. }
    ));
    assert!(matches!(
        go(
            &mut vec![site("a", "aa", 1, &[("v", f32t(&[2], &[0.0, 0.0]))])],
            &d
        ),
        MergeError::MissingTensor { .. }
    ));
    let w = || f32t(&[2], &[1.0, 1.0]);
    let err = go(
        &mut vec![
            site("a", "aa", 3, &[("w", w())]),
            site("zero", "bb", 0, &[("w", w())]),
        ],
        &d,
    );
    assert!(
        matches!(&err, MergeError::ZeroSamples { site } if site == "zero"),
        "{err}"
    );
    let err = go(
        &mut vec![
            site("a", "aa", 3, &[("w", w())]),
            site("b", "aa", 1, &[("w", w())]),
        ],
        &d,
    );
    assert!(matches!(err, MergeError::DuplicateBundle { .. }));
    let bad = MergeConfig {
        clip_norm: Some(-1.0),
        ..MergeConfig::default()
    };
    assert!(matches!(
        go(&mut vec![site("a", "aa", 1, &[("w", w())])], &bad),
        MergeError::BadConfig(_)
    ));
    assert!("fedprox".parse::<Strategy>().is_err());
    assert_eq!(
        "trimmed-mean".parse::<Strategy>().unwrap(),
        Strategy::TrimmedMean
    );
    assert_eq!("equal".parse::<Weighting>().unwrap(), Weighting::Equal);
}

#[test]
fn an_f16_result_that_overflows_is_refused() {
    let base = source("base", &[("h", f16t(&[1], &[0.0]))]);
    let mut sites = vec![site("a", "aa", 1, &[("h", f16t(&[1], &[60000.0]))])];
    let config = MergeConfig {
        fedavgm: ferry_merge::FedAvgMConfig { lr: 2.0, beta: 0.0 },
        ..cfg(Strategy::FedAvgM)
    };
    let err = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap_err();
    assert!(matches!(err, MergeError::ResultOverflow { .. }), "{err}");
}

#[test]
fn payload_files_stream_and_match_memory_sources() {
    let (base, mut sites) = mixed_sites();
    let dir = tempfile::tempdir().unwrap();
    let hq = ferry_bundle::SecretKey::from_seed(ferry_bundle::Role::Hq, "hq", [7; 32]);
    let mut ring = ferry_bundle::Keyring::new();
    ring.add(hq.public()).unwrap();
    // Each source sealed and verified as a real bundle, then spooled: the path HQ's merge takes.
    let spool = |label: &str, s: &ferry_merge::MemorySource| {
        let refs: Vec<ferry_bundle::TensorRef<'_>> = s
            .tensors()
            .iter()
            .map(|(n, t)| ferry_bundle::TensorRef {
                name: n,
                dtype: t.dtype,
                shape: &t.shape,
                data: &t.data,
            })
            .collect();
        let payload = ferry_bundle::Payload::from_tensors(&refs).unwrap();
        let sealed =
            ferry_bundle::seal(ferry_bundle::Draft::initial("t", None), &payload, &hq, 1).unwrap();
        let bundle =
            ferry_bundle::open(&sealed.bytes, &ring, &ferry_bundle::Limits::default()).unwrap();
        (
            bundle.metas().to_vec(),
            PayloadFile::spool(dir.path(), label, &bundle).unwrap(),
        )
    };
    for strategy in [Strategy::FedAvg, Strategy::TrimmedMean] {
        // A tiny slice size exercises the sliced reads of the robust path.
        let config = MergeConfig {
            chunk_elements: 3,
            clip_norm: Some(1.0),
            ..cfg(strategy)
        };
        let (want, _) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
        let (layout, mut bsrc) = spool(&format!("base-{strategy}"), &base);
        let mut files: Vec<PayloadFile> = sites
            .iter()
            .map(|s| spool(&format!("{}-{strategy}", s.id), &s.src).1)
            .collect();
        let mut cs: Vec<Contribution<'_>> = files
            .iter_mut()
            .zip(&sites)
            .map(|(f, s)| Contribution {
                site: s.id.clone(),
                bundle: s.bundle.clone(),
                samples: s.samples,
                source: f,
            })
            .collect();
        let mut got = Out::new();
        merge(
            &layout,
            &mut bsrc,
            &mut cs,
            &config,
            &mut ServerState::new(),
            |m, data| {
                got.insert(
                    m.name.clone(),
                    ferry_merge::OwnedTensor {
                        dtype: m.dtype,
                        shape: m.shape.clone(),
                        data,
                    },
                );
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(got, want, "{strategy}");
    }
    // Reads outside what the bundle holds are errors, not panics or short reads.
    let (layout, mut file) = spool("bounds", &base);
    let t = &layout[0];
    let n = t.numel().unwrap();
    assert_eq!(
        file.read_elements(&t.name, 0, n).unwrap(),
        file.read(&t.name).unwrap().data
    );
    assert!(matches!(
        file.read_elements(&t.name, n, 1),
        Err(MergeError::BadLayout(_))
    ));
    assert!(matches!(
        file.read_elements(&t.name, usize::MAX, 2),
        Err(MergeError::BadLayout(_))
    ));
    assert!(matches!(
        file.read("no.such.tensor"),
        Err(MergeError::MissingTensor { .. })
    ));
}

/// `--strategy fisher` on a case small enough to do by hand: two sites, equal samples, bound B = 4.
#[test]
fn fisher_merge_matches_a_hand_computed_example() {
    let base = source(
        "base",
        &[("w", f32t(&[4], &[0.0; 4])), ("n", i64t(&[], &[0]))],
    );
    // Site a: w = [1, 1, 1, 1], Fisher [3, 1, 0, 0] (mean 1) → factors [3, 1, 1/4 (clamped from 0), 1/4].
    // Site b: w = [5, 5, 5, 5], Fisher [2, 2, 2, 2] (mean 2) → factors [1, 1, 1, 1].
    let mut sites = vec![
        site(
            "a",
            "aa",
            10,
            &[
                ("w", f32t(&[4], &[1.0; 4])),
                ("ferry.fisher/w", f32t(&[4], &[3.0, 1.0, 0.0, 0.0])),
                ("n", i64t(&[], &[3])),
            ],
        ),
        site(
            "b",
            "bb",
            10,
            &[
                ("w", f32t(&[4], &[5.0; 4])),
                ("ferry.fisher/w", f32t(&[4], &[2.0; 4])),
                ("n", i64t(&[], &[5])),
            ],
        ),
    ];
    let config = MergeConfig {
        fisher_bound: 4.0,
        ..cfg(Strategy::Fisher)
    };
    let (out, report) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
    // (fa·1 + fb·5) / (fa + fb): [(3 + 5)/4, (1 + 5)/2, (0.25 + 5)/1.25, same].
    assert_eq!(f32s(&out["w"].data), vec![2.0, 3.0, 4.2, 4.2]);
    // No Fisher tensor reaches the global; the integer counter follows the average rule.
    assert!(!out.contains_key("ferry.fisher/w"));
    assert_eq!(report.tensors.len(), 2);
    let rule = |name: &str| report.tensors.iter().find(|t| t.name == name).unwrap().rule;
    assert_eq!(rule("w"), TensorRule::Fisher);
    assert_eq!(rule("n"), TensorRule::IntAverage);
    assert_eq!(report.config, "fisher weights=samples bound=4");

    // Bound 1 is FedAvg, whatever the Fisher values say.
    let config = MergeConfig {
        fisher_bound: 1.0,
        ..cfg(Strategy::Fisher)
    };
    let (out, _) = run(&base, &mut sites, &config, &mut ServerState::new()).unwrap();
    assert_eq!(f32s(&out["w"].data), vec![3.0; 4]);
}

/// A hostile site controls its Fisher values: the bound keeps its say on any parameter at B times its FedAvg
/// weight, and the normalisation keeps it from being heavy on more than a fraction of a tensor.
#[test]
fn a_site_cannot_take_a_fisher_merge_over() {
    let n = 100;
    let base = source("base", &[("w", f32t(&[n], &vec![0.0; n]))]);
    let honest = |id: &str, bundle: &str| {
        site(
            id,
            bundle,
            100,
            &[
                ("w", f32t(&[n], &vec![0.0; n])),
                ("ferry.fisher/w", f32t(&[n], &vec![1e-3; n])),
            ],
        )
    };
    // The attacker's weights are 1000 everywhere, its Fisher enormous on element 0 and tiny elsewhere.
    let mut attack_fisher = vec![1e-30f32; n];
    attack_fisher[0] = 3e38;
    let mut sites = vec![
        honest("h1", "aa"),
        honest("h2", "bb"),
        honest("h3", "cc"),
        site(
            "evil",
            "dd",
            100,
            &[
                ("w", f32t(&[n], &vec![1000.0; n])),
                ("ferry.fisher/w", f32t(&[n], &attack_fisher)),
            ],
        ),
    ];
    let b = 10.0f64;
    let (out, _) = run(
        &base,
        &mut sites,
        &cfg(Strategy::Fisher),
        &mut ServerState::new(),
    )
    .unwrap();
    let w = f32s(&out["w"].data);
    // Element 0: the attacker's factor is clamped to B and the honest sites count 1 each (uniform Fisher), so
    // its share is B / (B + 3) where FedAvg gives it 1/4.
    let most = 1000.0 * b / (b + 3.0);
    assert!((f64::from(w[0]) - most).abs() < 1e-2, "{}", w[0]);
    // Everywhere else its factor is clamped up to 1/B: 1000·(1/B) / (1/B + 3).
    let elsewhere = 1000.0 * (1.0 / b) / (1.0 / b + 3.0);
    for &x in &w[1..] {
        assert!((f64::from(x) - elsewhere).abs() < 1e-2, "{x}");
    }
    // Unbounded (B = 1e30), element 0 gets the attacker's whole mass over the tensor: a factor of n = 100.
    let loose = MergeConfig {
        fisher_bound: 1e30,
        ..cfg(Strategy::Fisher)
    };
    let (out, _) = run(&base, &mut sites, &loose, &mut ServerState::new()).unwrap();
    assert!((f64::from(f32s(&out["w"].data)[0]) - 1000.0 * 100.0 / 103.0).abs() < 1e-2);
}

#[test]
fn fisher_merge_refuses_updates_without_or_with_negative_fisher_values() {
    let base = source("base", &[("w", f32t(&[2], &[0.0, 0.0]))]);
    let mut sites = vec![
        site(
            "a",
            "aa",
            1,
            &[
                ("w", f32t(&[2], &[1.0, 2.0])),
                ("ferry.fisher/w", f32t(&[2], &[1.0, 1.0])),
            ],
        ),
        site("b", "bb", 1, &[("w", f32t(&[2], &[3.0, 4.0]))]),
    ];
    let err = run(
        &base,
        &mut sites,
        &cfg(Strategy::Fisher),
        &mut ServerState::new(),
    )
    .unwrap_err();
    assert!(
        matches!(err, MergeError::NoFisher { ref tensor, .. } if tensor == "w"),
        "{err}"
    );
    assert!(err.to_string().contains("site b"), "{err}");
    // Other strategies ignore Fisher tensors an update carries.
    let (out, _) = run(
        &base,
        &mut sites,
        &MergeConfig::default(),
        &mut ServerState::new(),
    )
    .unwrap();
    assert_eq!(f32s(&out["w"].data), vec![2.0, 3.0]);

    let mut sites = vec![
        site(
            "a",
            "aa",
            1,
            &[
                ("w", f32t(&[2], &[1.0, 2.0])),
                ("ferry.fisher/w", f32t(&[2], &[1.0, -1.0])),
            ],
        ),
        site(
            "b",
            "bb",
            1,
            &[
                ("w", f32t(&[2], &[1.0, 2.0])),
                ("ferry.fisher/w", f32t(&[2], &[1.0, 1.0])),
            ],
        ),
    ];
    let err = run(
        &base,
        &mut sites,
        &cfg(Strategy::Fisher),
        &mut ServerState::new(),
    )
    .unwrap_err();
    assert!(matches!(err, MergeError::NegativeFisher { .. }), "{err}");
    assert!(MergeConfig {
        fisher_bound: 0.5,
        ..cfg(Strategy::Fisher)
    }
    .validate()
    .is_err());
}
