//! plate-ctc, the CTC plate reader (issue 12): it learns to read plates (a broken loss or gradient fails this in
//! seconds), and it trains on a site's real crops given as `folder:labels.csv`, two-line plates included.

use ferry_train::data::{plates, DataSpec, LoadConfig, PlateStyle, Task};
use ferry_train::{evaluate, train, Adam, AdamConfig, Arch, Device, Model, TrainConfig};

fn cfg(epochs: u32, batch: usize, lr: f64, warmup: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch,
        seed: 1,
        adam: AdamConfig {
            lr,
            warmup,
            ..AdamConfig::default()
        },
        augment: ferry_train::Augment::none(),
    }
}

/// A few dozen clean tight crops: the reader must go from reading nothing to reading many of them exactly (30
/// epochs read half of them in a measured run; about 15 s in debug on 2 cores). Only a
/// loss whose gradient points the right way gets there: with the CTC gradient zeroed, negated or misaligned the
/// model reads no plate.
#[test]
fn plate_ctc_learns_to_read_plates() {
    learns_to_read_plates(Arch::PlateCtc);
}

/// plate-ctc-deep, the same way: its resolution-keeping convolutions (the fused block without pooling) train.
#[test]
fn plate_ctc_deep_learns_to_read_plates() {
    learns_to_read_plates(Arch::PlateCtcDeep);
}

/// plate-ctc-v2 (the default reader), the same way: its last block pools two rows by one column (the fused block's
/// 2×1 window) and its 24 columns are read one CTC step each.
#[test]
fn plate_ctc_v2_learns_to_read_plates() {
    learns_to_read_plates(Arch::PlateCtcV2);
}

/// plate-ctc-deep-v2, the same way.
#[test]
fn plate_ctc_deep_v2_learns_to_read_plates() {
    learns_to_read_plates(Arch::PlateCtcDeepV2);
}

/// plate-ctc-deep-v3, the same way: its first block keeps the full 32×96 resolution (the fused block without
/// pooling on a one-channel image).
#[test]
fn plate_ctc_deep_v3_learns_to_read_plates() {
    learns_to_read_plates(Arch::PlateCtcDeepV3);
}

/// plate-ctc-deep-v4, the same way: a block without pooling on 32 channels at 16×48.
#[test]
fn plate_ctc_deep_v4_learns_to_read_plates() {
    learns_to_read_plates(Arch::PlateCtcDeepV4);
}

fn learns_to_read_plates(arch: Arch) {
    let data = plates::generate_with(
        PlateStyle::Tight,
        32,
        3,
        None,
        &plates::RenderConfig::plain(),
    )
    .unwrap();
    let mut model = Model::init(arch, 1, &Device::Cpu).unwrap();
    let mut adam = Adam::new(arch, &Device::Cpu).unwrap();
    let before = evaluate(&model, &data, 64).unwrap();
    assert_eq!(before.accuracy, 0.0, "{arch}");
    train(&mut model, &mut adam, &data, &cfg(40, 8, 3e-3, 20), &mut ()).unwrap();
    let after = evaluate(&model, &data, 64).unwrap();
    assert!(
        after.loss < before.loss / 10.0,
        "{arch}: CTC loss {} -> {}",
        before.loss,
        after.loss
    );
    assert!(
        after.accuracy >= 0.4,
        "{arch}: read {:.0} % of the plates exactly ({:.0} % of characters)",
        100.0 * after.accuracy,
        100.0 * after.char_accuracy.unwrap()
    );
}

/// A site's own crops: PNGs and a labels CSV written here, one of them a two-line plate (region name on the top
/// line, written top line first: `서울12바3456`). The folder loads as plates with every token plate-ctc reads,
/// the images come back as written, plate-ctc trains and evaluates on it, and plate-cnn (no region names)
/// refuses the two-line plate by name.
#[test]
fn folder_of_real_crops_trains_plate_ctc() {
    let dir = tempfile::tempdir().unwrap();
    let one_line = plates::generate(PlateStyle::Mixed, 5, 11, None).unwrap();
    let two_line = plates::generate_with(
        PlateStyle::Tight,
        1,
        12,
        None,
        &plates::RenderConfig {
            two_line: 1.0,
            ..plates::RenderConfig::default()
        },
    )
    .unwrap();
    let mut csv = String::from("path,label\n# crops from the car park camera\n");
    let mut written = Vec::new();
    for (set, prefix) in [(&one_line, "a"), (&two_line, "b")] {
        for i in 0..set.len() {
            let name = format!("{prefix}{i}.png");
            // An 8-bit grayscale PNG at the model's size, as a site's crop tool would write it.
            let px: Vec<u8> = set
                .image(i)
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect();
            image::GrayImage::from_raw(96, 32, px)
                .unwrap()
                .save(dir.path().join(&name))
                .unwrap();
            let label = plates::decode(set.label(i));
            csv.push_str(&format!("{name},{label}\n"));
            written.push((set.image(i).to_vec(), set.label(i).to_vec()));
        }
    }
    let top = plates::decode(two_line.label(0));
    assert!(
        plates::REGIONS.iter().any(|r| top.starts_with(r)),
        "the two-line plate's label starts with its region: {top}"
    );
    std::fs::write(dir.path().join("labels.csv"), &csv).unwrap();

    let spec: DataSpec = format!("folder:{}", dir.path().join("labels.csv").display())
        .parse()
        .unwrap();
    let data = spec.load(&LoadConfig::default()).unwrap();
    assert_eq!(data.len(), 6);
    assert_eq!(data.task, Arch::PlateCtc.task());
    assert_eq!(
        data.task,
        Task::Plate {
            slots: 8,
            classes: 68
        }
    );
    for (i, (image, label)) in written.iter().enumerate() {
        assert_eq!(data.label(i), label.as_slice(), "sample {i}'s label");
        let worst = data
            .image(i)
            .iter()
            .zip(image)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1.0 / 255.0 + 1e-6,
            "sample {i}'s pixels differ by {worst}"
        );
    }

    let arch = Arch::PlateCtc;
    let mut model = Model::init(arch, 2, &Device::Cpu).unwrap();
    let mut adam = Adam::new(arch, &Device::Cpu).unwrap();
    let s = train(&mut model, &mut adam, &data, &cfg(2, 4, 1e-3, 1), &mut ()).unwrap();
    assert_eq!((s.steps, s.samples), (4, 6));
    assert!(s.loss.is_finite());
    let e = evaluate(&model, &data, 4).unwrap();
    assert_eq!(e.samples, 6);

    let old = Arch::PlateCnn;
    let mut cnn = Model::init(old, 2, &Device::Cpu).unwrap();
    let mut cnn_adam = Adam::new(old, &Device::Cpu).unwrap();
    let err = train(&mut cnn, &mut cnn_adam, &data, &cfg(1, 4, 1e-3, 1), &mut ()).unwrap_err();
    assert!(err.to_string().contains(&top[..6]), "{err}");
}
