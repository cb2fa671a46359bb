//! `supir restore` with the SUPIR backend end to end on the tiny fixture model (`--model-dir`):
//! sizes, determinism, folder mode with skipping, weight paths, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, GenericImageView, ImageBuffer, Rgb};

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

/// `supir restore <args> --model-dir <tiny> --steps 2 --min-size 64` without weight variables.
fn restore(args: &[&str]) -> Output {
    restore_raw(&[args, &["--steps", "2", "--min-size", "64"]].concat())
}

/// `supir restore <args> --model-dir <tiny>` without weight variables.
fn restore_raw(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
    for v in ["SUPIR_MODELS", "SUPIR_SDXL", "SUPIR_CKPT", "SUPIR_CONFIG"] {
        c.env_remove(v);
    }
    c.arg("restore")
        .args(args)
        .args(["--model-dir", model_dir().to_str().unwrap()])
        .output()
        .expect("run supir")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-cli-supir-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn photo(path: &Path, w: u32, h: u32) {
    let img = ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 7 % 256) as u8,
            (y * 11 % 256) as u8,
            ((x + y) * 3 % 256) as u8,
        ])
    });
    DynamicImage::ImageRgb8(img).save(path).unwrap();
}

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn end_to_end_size_and_determinism() {
    let d = tmpdir("e2e");
    let input = d.join("in.png");
    photo(&input, 40, 30);
    let (a, b) = (d.join("a.png"), d.join("b.png"));
    let o = restore(&[s(&input), "-o", s(&a), "--seed", "1", "--upscale", "1.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("backend: SUPIR"), "{}", stderr(&o));
    assert_eq!(image::open(&a).unwrap().dimensions(), (60, 45));
    let o = restore(&[s(&input), "-o", s(&b), "--seed", "1", "--upscale", "1.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // Another seed, another image; two samples, two files.
    let c = d.join("c.png");
    let o = restore(&[s(&input), "-o", s(&c), "--seed", "2", "--samples", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        files_in(&d),
        ["a.png", "b.png", "c_0.png", "c_1.png", "in.png"]
    );
    assert_ne!(
        std::fs::read(d.join("c_0.png")).unwrap(),
        std::fs::read(&a).unwrap()
    );
}

#[test]
fn folder_mode_skips_done_images() {
    let d = tmpdir("folder");
    let inputs = d.join("in");
    std::fs::create_dir(&inputs).unwrap();
    photo(&inputs.join("a.png"), 24, 20);
    photo(&inputs.join("b.jpg"), 20, 24);
    let outs = d.join("out");
    let o = restore(&[s(&inputs), "-o", s(&outs), "--preset", "fidelity"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files_in(&outs), ["a.png", "b.jpg"]);
    assert_eq!(
        image::open(outs.join("b.jpg")).unwrap().dimensions(),
        (20, 24)
    );
    // A second run skips both, and says so; --overwrite redoes them.
    let before = std::fs::metadata(outs.join("a.png"))
        .unwrap()
        .modified()
        .unwrap();
    let o = restore(&[s(&inputs), "-o", s(&outs)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipping"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains("backend: SUPIR"),
        "loaded the model for nothing"
    );
    assert_eq!(
        std::fs::metadata(outs.join("a.png"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    std::fs::remove_file(outs.join("b.jpg")).unwrap();
    let o = restore(&[s(&inputs), "-o", s(&outs)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files_in(&outs), ["a.png", "b.jpg"]);
    assert_eq!(files_in(&inputs), ["a.png", "b.jpg"]);
}

#[test]
fn weight_paths_from_flags_config_file_and_environment() {
    let d = tmpdir("weights");
    let input = d.join("in.png");
    photo(&input, 16, 16);
    let cfg = model_dir().join("config.yaml");
    let w = model_dir().join("weights.safetensors");
    // --sdxl and --supir (the tiny model is one merged file: it serves as both).
    let run = |extra: &[&str], envs: &[(&str, &Path)], out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
        for v in ["SUPIR_MODELS", "SUPIR_SDXL", "SUPIR_CKPT", "SUPIR_CONFIG"] {
            c.env_remove(v);
        }
        for (k, v) in envs {
            c.env(k, v);
        }
        c.args(["restore", s(&input), "-o", s(out), "--steps", "1"])
            .args(["--min-size", "64"])
            .args(extra)
            .output()
            .unwrap()
    };
    let a = d.join("a.png");
    let o = run(
        &["--sdxl", s(&w), "--supir", s(&w), "--model-config", s(&cfg)],
        &[],
        &a,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // A config file with relative paths.
    let yaml = d.join("supir.yaml");
    std::fs::copy(&w, d.join("w.safetensors")).unwrap();
    std::fs::write(
        &yaml,
        format!(
            "sdxl: w.safetensors\nsupir: w.safetensors\nmodel_config: {}\n",
            s(&cfg)
        ),
    )
    .unwrap();
    let b = d.join("b.png");
    let o = run(&["--config", s(&yaml)], &[], &b);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // Environment variables.
    let c = d.join("c.png");
    let o = run(
        &["--model-config", s(&cfg)],
        &[("SUPIR_SDXL", &w), ("SUPIR_CKPT", &w)],
        &c,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
}

#[test]
fn bad_input_one_line_error_nothing_written() {
    let d = tmpdir("bad");
    let good = d.join("good.png");
    photo(&good, 16, 16);
    let garbage = d.join("garbage.png");
    std::fs::write(&garbage, b"not a png").unwrap();
    let out = d.join("out.png");
    let check = |o: &Output, needle: &str| {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "no `{needle}` in: {err}");
        let errors: Vec<_> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        assert!(!out.exists());
    };
    check(&restore(&[s(&garbage), "-o", s(&out)]), "garbage.png");
    check(
        &restore_raw(&[s(&good), "-o", s(&out), "--steps", "0"]),
        "steps 0",
    );
    check(
        &restore(&[s(&good), "-o", s(&out), "--cfg", "-1"]),
        "cfg scale -1",
    );
    check(
        &restore(&[s(&good), "-o", s(&out), "--control-scale", "5"]),
        "control scale 5",
    );
    check(
        &restore(&[s(&good), "-o", s(&out), "--upscale", "100000"]),
        "upscale",
    );
    check(
        &restore(&[s(&good), "-o", s(&out), "--vae-dtype", "fp16"]),
        "fp16",
    );
    // Missing weights.
    let missing = d.join("nowhere.safetensors");
    let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
    for v in ["SUPIR_MODELS", "SUPIR_SDXL", "SUPIR_CKPT", "SUPIR_CONFIG"] {
        c.env_remove(v);
    }
    let o = c
        .args(["restore", s(&good), "-o", s(&out)])
        .args(["--sdxl", s(&missing), "--supir", s(&good)])
        .output()
        .unwrap();
    check(&o, "nowhere.safetensors");
    let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
    for v in ["SUPIR_MODELS", "SUPIR_SDXL", "SUPIR_CKPT", "SUPIR_CONFIG"] {
        c.env_remove(v);
    }
    let o = c
        .args(["restore", s(&good), "-o", s(&out), "--model-dir", s(&d)])
        .output()
        .unwrap();
    check(&o, "config.yaml");
    assert_eq!(files_in(&d), ["garbage.png", "good.png"]);
}

/// `--tile-prompts` (lines or JSON) on 2x2 latent tiles of a 64x64 input, `--list-tiles` with and
/// without weights, and the refusals (count, untiled sampler, folder) before any weights load.
#[test]
fn tile_prompts_and_list_tiles() {
    let d = tmpdir("tiles");
    let input = d.join("in.png");
    photo(&input, 64, 64);
    const TILED: &[&str] = &[
        "--sampler",
        "tiled-edm",
        "--sampler-tile",
        "4",
        "--sampler-stride",
        "4",
        "--seed",
        "3",
    ];
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        [TILED, extra].concat()
    }
    let caption = "a photo of a cat";

    // Listing: index and window in model-input pixels, row major.
    let table = "tile\tx0\ty0\tx1\ty1\n0\t0\t0\t32\t32\n1\t32\t0\t64\t32\n2\t0\t32\t32\t64\n3\t32\t32\t64\t64\n";
    let o = restore(&with(&[s(&input), "--list-tiles"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), table);
    assert!(stderr(&o).contains("4 tiles"), "{}", stderr(&o));
    let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
    for v in ["SUPIR_MODELS", "SUPIR_SDXL", "SUPIR_CKPT", "SUPIR_CONFIG"] {
        c.env_remove(v);
    }
    let o = c
        .args(["restore", s(&input), "--list-tiles", "--min-size", "64"])
        .args(TILED)
        .output()
        .unwrap();
    assert!(o.status.success(), "without weights: {}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout), table);

    // Prompts equal to the caption: the caption's image, byte for byte.
    let global = d.join("global.png");
    let o = restore(&with(&[s(&input), "-o", s(&global), "--caption", caption]));
    assert!(o.status.success(), "{}", stderr(&o));
    let same_file = d.join("same.txt");
    std::fs::write(&same_file, format!("{caption}\n").repeat(4) + "\n").unwrap();
    let same = d.join("same.png");
    let o = restore(&with(&[
        s(&input),
        "-o",
        s(&same),
        "--tile-prompts",
        s(&same_file),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&global).unwrap(),
        std::fs::read(&same).unwrap()
    );

    // A JSON array with another prompt for tile 2: another image.
    let json = d.join("prompts.json");
    std::fs::write(
        &json,
        serde_json::to_string(&[caption, caption, "a red brick wall", caption]).unwrap(),
    )
    .unwrap();
    let other = d.join("other.png");
    let o = restore(&with(&[
        s(&input),
        "-o",
        s(&other),
        "--tile-prompts",
        s(&json),
    ]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(
        std::fs::read(&global).unwrap(),
        std::fs::read(&other).unwrap()
    );

    // Refusals: one error line naming the file and the counts, nothing written.
    let out = d.join("refused.png");
    let check = |o: &Output, needles: &[&str]| {
        let err = stderr(o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        for n in needles {
            assert!(err.contains(n), "no `{n}` in: {err}");
        }
        assert!(!err.contains("backend: SUPIR"), "loaded the model: {err}");
        assert!(!out.exists());
    };
    let three = d.join("three.txt");
    std::fs::write(&three, "a\nb\r\nc\n").unwrap();
    let o = restore(&with(&[
        s(&input),
        "-o",
        s(&out),
        "--tile-prompts",
        s(&three),
    ]));
    check(
        &o,
        &[
            "three.txt",
            "3 prompts",
            "4 tiles",
            "latent 8x8",
            "--list-tiles",
        ],
    );
    let o = restore(&[
        s(&input),
        "-o",
        s(&out),
        "--tile-prompts",
        s(&json),
        "--sampler",
        "edm",
    ]);
    check(
        &o,
        &["prompts.json", "RestoreEDMSampler", "--sampler tiled-edm"],
    );
    let bad_json = d.join("bad.json");
    std::fs::write(&bad_json, "[\"a\", 3]").unwrap();
    let o = restore(&with(&[
        s(&input),
        "-o",
        s(&out),
        "--tile-prompts",
        s(&bad_json),
    ]));
    check(&o, &["bad.json", "JSON array of strings"]);
    let folder = d.join("folder");
    std::fs::create_dir(&folder).unwrap();
    photo(&folder.join("x.png"), 64, 64);
    let o = restore(&with(&[
        s(&folder),
        "-o",
        s(&d.join("folder-out")),
        "--tile-prompts",
        s(&json),
    ]));
    check(&o, &["prompts.json", "one input image"]);
}
