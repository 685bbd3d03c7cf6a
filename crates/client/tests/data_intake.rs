//! Data intake through the `ferry-client` binary and real files (issue 16, the labelling barrier): labels CSVs in
//! CP949 with quoted fields, labels from file names, `--skip-bad`, `check-data`'s report, and `predict` writing
//! a labels CSV with what the model reads (the same readings as ferry-train's, never over an existing file).

use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_bundle::{Draft, Payload, Role, SecretKey};
use ferry_train::data::plates;
use ferry_train::data::PlateStyle;
use ferry_train::{Arch, Device, Model};

fn client(args: &[&str]) -> Output {
    ferry_testdata::cli::run(Path::new(env!("CARGO_BIN_EXE_ferry-client")), args)
}

#[track_caller]
fn success(o: &Output) -> String {
    ferry_testdata::cli::ok(o)
}

#[track_caller]
fn refusal(o: &Output) -> String {
    ferry_testdata::cli::refused("ferry-client", o)
}

struct Site {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    state: PathBuf,
    weights: Vec<u8>,
}

/// A site state holding a plate-ctc global, imported through the binary.
fn site() -> Site {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let hq = SecretKey::from_seed(Role::Hq, "hq", [1; 32]);
    hq.write_pair(&dir.join("keys")).unwrap();
    let model = Model::init(Arch::PlateCtc, 11, &Device::Cpu).unwrap();
    let weights = model.to_safetensors().unwrap();
    let payload = Payload::from_safetensors(&weights).unwrap();
    let sealed = ferry_bundle::seal(
        Draft::initial("city", Some("plate-ctc".into())),
        &payload,
        &hq,
        3,
    )
    .unwrap();
    let g = sealed.write_to_dir(&dir.join("usb")).unwrap();
    let state = dir.join("site");
    success(&client(&[
        "import",
        "--federation",
        "city",
        "--trust",
        dir.join("keys/hq.pub").to_str().unwrap(),
        "--state",
        state.to_str().unwrap(),
        g.to_str().unwrap(),
    ]));
    Site {
        weights: std::fs::read(state.join("current.safetensors")).unwrap(),
        _tmp: tmp,
        dir,
        state,
    }
}

/// `n` generated plates saved as PNGs under `dir` with `name(i, label)`; returns their labels.
fn plates_in(dir: &Path, n: usize, name: impl Fn(usize, &str) -> String) -> Vec<(PathBuf, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let d = plates::generate(PlateStyle::Loose, n, 3, None).unwrap();
    (0..n)
        .map(|i| {
            let label = plates::decode(d.label(i));
            let p = dir.join(name(i, &label));
            d.save_png(i, &p).unwrap();
            (p, label)
        })
        .collect()
}

#[test]
fn check_data_reports_cp949_labels_bad_images_and_unknown_characters() {
    let s = site();
    let dir = s.dir.join("data");
    let imgs = plates_in(&dir, 3, |i, _| format!("cam, {i}.png"));
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    let text = format!(
        "path,label\n\"cam, 0.png\",\"{}\"\n\"cam, 1.png\",{}\nbroken.png,{}\n\"cam, 2.png\",12가345X\n",
        imgs[0].1, imgs[1].1, imgs[2].1
    );
    // As Korean Excel saves a CSV: CP949.
    let (bytes, _, _) = encoding_rs::EUC_KR.encode(&text);
    let csv = dir.join("labels.csv");
    std::fs::write(&csv, &bytes).unwrap();
    let spec = format!("folder:{}", csv.display());
    let o = client(&["check-data", "--state", s.state.to_str().unwrap(), &spec]);
    let err = refusal(&o);
    assert!(
        err.contains("found 2 bad samples and 1 label character the model cannot read"),
        "{err}"
    );
    let out = String::from_utf8(o.stdout).unwrap();
    assert!(
        out.contains("4 samples listed, 2 usable (plate; labels read from cp949)"),
        "{out}"
    );
    assert!(out.contains("line 4"), "{out}");
    assert!(out.contains("broken.png: cannot use the image"), "{out}");
    assert!(
        out.contains("label characters the model cannot read: X (1)"),
        "{out}"
    );
    // The histogram counts the characters of the usable plates: the last digit of the first plate, say.
    let digit = imgs[0].1.chars().last().unwrap();
    let want: usize = imgs[..2]
        .iter()
        .map(|(_, l)| l.chars().filter(|c| *c == digit).count())
        .sum();
    assert!(out.contains(&format!("  {digit:<6} {want}\n")), "{out}");

    // Forcing UTF-8 refuses the CP949 file with a specific error, nothing else.
    let e = refusal(&client(&[
        "check-data",
        &spec,
        "--labels-encoding",
        "utf-8",
    ]));
    assert!(e.contains("not valid UTF-8") && e.contains("cp949"), "{e}");

    // Labels from file names: a clean folder passes.
    let named = s.dir.join("named");
    plates_in(&named, 3, |i, l| format!("{l}_{i}.png"));
    let out = success(&client(&[
        "check-data",
        &format!("folder:{}?labels=filename", named.display()),
    ]));
    assert!(
        out.contains("3 samples listed, 3 usable") && out.contains("no problems found"),
        "{out}"
    );
}

#[test]
fn skip_bad_leaves_bad_images_out_and_says_so() {
    let s = site();
    let dir = s.dir.join("data");
    let imgs = plates_in(&dir, 2, |i, _| format!("{i}.png"));
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    let csv = dir.join("labels.csv");
    std::fs::write(
        &csv,
        format!(
            "0.png,{}\nbroken.png,{}\n1.png,{}\n",
            imgs[0].1, imgs[0].1, imgs[1].1
        ),
    )
    .unwrap();
    let spec = format!("folder:{}", csv.display());
    let st = s.state.to_str().unwrap();
    let e = refusal(&client(&["eval", "--state", st, "--data", &spec]));
    assert!(
        e.contains("line 2") && e.contains("broken.png") && e.contains("--skip-bad"),
        "{e}"
    );
    for args in [
        vec!["eval", "--state", st, "--data", &spec, "--skip-bad"],
        vec!["eval", "--state", st, "--data", &format!("{spec}?skip-bad")],
    ] {
        let o = client(&args);
        let out = success(&o);
        assert!(out.contains("on 2 samples"), "{out}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("skipped line 2") && err.contains("1 sample left out"),
            "{err}"
        );
    }
}

#[test]
fn predict_writes_a_labels_csv_of_what_the_model_reads() {
    let s = site();
    let dir = s.dir.join("new");
    let imgs = plates_in(&dir, 5, |i, _| format!("cam2-{i:04}.png"));
    std::fs::write(dir.join("notes.txt"), "not an image").unwrap();
    // What ferry-train reads on the same images with the imported global.
    let model = Model::from_safetensors(Arch::PlateCtc, &s.weights, &Device::Cpu).unwrap();
    let mut px = Vec::new();
    for (p, _) in &imgs {
        px.extend(ferry_train::data::folder::decode_image(p, Arch::PlateCtc.input()).unwrap());
    }
    let want = ferry_train::predict::read(&model, &px, 64).unwrap();

    let out = dir.join("labels.csv");
    let st = s.state.to_str().unwrap();
    let spec = format!("folder:{}", dir.display());
    let said = success(&client(&[
        "predict",
        "--state",
        st,
        "--data",
        &spec,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(said.contains("5 images"), "{said}");
    let bytes = std::fs::read(&out).unwrap();
    assert!(
        bytes.starts_with(b"\xEF\xBB\xBF"),
        "Excel needs the byte-order mark"
    );
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(&bytes[3..]);
    let rows: Vec<(String, String)> = r
        .records()
        .map(|x| {
            let x = x.unwrap();
            (x[0].to_string(), x[1].to_string())
        })
        .collect();
    let expected: Vec<(String, String)> = imgs
        .iter()
        .zip(&want)
        .map(|((p, _), t)| {
            (
                p.file_name().unwrap().to_str().unwrap().to_string(),
                t.clone(),
            )
        })
        .collect();
    assert_eq!(rows, expected);
    // Every reading is a plate of a valid format, so an uncorrected row is a label training accepts.
    for (_, text) in &rows {
        assert!(ferry_train::data::plates::encode(text).is_ok(), "{text:?}");
    }

    // Never over an existing file (it may hold the operator's corrections).
    std::fs::write(&out, "corrected").unwrap();
    let e = refusal(&client(&[
        "predict",
        "--state",
        st,
        "--data",
        &spec,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"corrected");

    // One image: printed.
    let one = success(&client(&[
        "predict",
        "--state",
        st,
        imgs[2].0.to_str().unwrap(),
    ]));
    assert_eq!(one, format!("{}  {}\n", imgs[2].0.display(), want[2]));
    let e = refusal(&client(&[
        "predict",
        "--state",
        st,
        dir.join("notes.txt").to_str().unwrap(),
    ]));
    assert!(
        e.contains("cannot use image") && e.contains("notes.txt"),
        "{e}"
    );
}
