//! `supir caption` and `supir restore --caption auto` on the tiny releases: DAPE's tags equal the
//! official `inference_ram` output, caption files are written and reused, bad input is an error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, ImageBuffer, Rgb};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn supir(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
    for v in [
        "SUPIR_MODELS",
        "SUPIR_SDXL",
        "SUPIR_CKPT",
        "SUPIR_CONFIG",
        "SEESR_MODELS",
        "SUPIR_LLAVA",
        "SUPIR_LLAVA_CLIP",
    ] {
        c.env_remove(v);
    }
    c.args(args).output().expect("run supir")
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-cli-caption-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `supir restore IN -o OUT` on the tiny SUPIR fixture with `steps` steps at its 64-pixel
/// minimum size, then `extra`.
fn tiny_restore(input: &Path, out: &Path, steps: &str, extra: &[&str]) -> Output {
    let model = root().join("fixtures/supir-tiny");
    let mut args = vec![
        "restore",
        s(input),
        "-o",
        s(out),
        "--model-dir",
        s(&model),
        "--steps",
        steps,
        "--min-size",
        "64",
    ];
    args.extend(extra);
    supir(&args)
}

/// A 40 x 30 colour pattern saved as `path`.
fn save_pattern(path: &Path) {
    let img = ImageBuffer::from_fn(40, 30, |x, y| {
        Rgb([(x * 6) as u8, (y * 8) as u8, ((x ^ y) * 4) as u8])
    });
    DynamicImage::ImageRgb8(img).save(path).unwrap();
}

/// The `ram` case's image of the SeeSR fixture as a PNG, and the tags the official code gave it.
fn official_tagged_image(dir: &Path) -> (PathBuf, String) {
    let fx = supir::parity::fixture::Fixture::load(root().join("fixtures/seesr-tiny")).unwrap();
    let case = fx.case("ram_preprocess").unwrap();
    let t = fx.input(case, "image_u8").unwrap();
    let (h, w, _) = t.dims3().unwrap();
    let raw = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let img = ImageBuffer::<Rgb<u8>, _>::from_raw(w as u32, h as u32, raw).unwrap();
    let path = dir.join("ram.png");
    DynamicImage::ImageRgb8(img).save(&path).unwrap();
    let tags = fx.case("ram").unwrap().params["tags"]
        .as_str()
        .unwrap()
        .to_string();
    (path, tags)
}

#[test]
fn caption_prints_the_official_tags() {
    let d = tmpdir("tags");
    let (img, tags) = official_tagged_image(&d);
    let models = root().join("fixtures/seesr-tiny");
    let o = supir(&["caption", s(&img), "--seesr-models", s(&models)]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim_end(), tags);
    // -o DIR writes <name>.txt; --json prints one object per image.
    let out = d.join("captions");
    let o = supir(&[
        "caption",
        s(&img),
        "--ram",
        s(&models.join("ram_swin_large_14m.pth")),
        "--dape",
        s(&models.join("DAPE.pth")),
        "-o",
        s(&out),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(out.join("ram.txt")).unwrap(), tags);
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert_eq!(v["caption"], tags.as_str());
}

#[test]
fn caption_errors_name_the_problem() {
    let d = tmpdir("bad");
    let img = d.join("in.png");
    DynamicImage::ImageRgb8(ImageBuffer::from_pixel(8, 8, Rgb([9u8, 9, 9])))
        .save(&img)
        .unwrap();
    let o = supir(&["caption", s(&img), "--captioner", "llava"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("llava"), "{}", text(&o.stderr));
    let o = supir(&["caption", s(&img)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("--seesr-models"),
        "{}",
        text(&o.stderr)
    );
    let o = supir(&[
        "caption",
        s(&img),
        "--ram",
        s(&d.join("nope.pth")),
        "--dape",
        s(&d.join("nope2.pth")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("nope.pth"), "{}", text(&o.stderr));
}

#[test]
fn supir_caption_auto_writes_and_reuses_the_caption() {
    let d = tmpdir("auto");
    let input = d.join("in.png");
    save_pattern(&input);
    let seesr_tiny = root().join("fixtures/seesr-tiny");
    let restore = |out: &Path| {
        tiny_restore(
            &input,
            out,
            "2",
            &[
                "--caption",
                "auto",
                "--seesr-models",
                s(&seesr_tiny),
                "--seed",
                "3",
            ],
        )
    };
    let a = d.join("a.png");
    let o = restore(&a);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let caption = std::fs::read_to_string(d.join("a.txt")).unwrap();
    assert!(!caption.is_empty());
    assert!(text(&o.stderr).contains(&caption), "{}", text(&o.stderr));
    // A rerun reads the caption file: with it edited, the prompt and so the image change.
    let b = d.join("b.png");
    std::fs::write(d.join("b.txt"), &caption).unwrap();
    let o = restore(&b);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains(": from "), "{}", text(&o.stderr));
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let c = d.join("c.png");
    std::fs::write(d.join("c.txt"), "a completely different caption").unwrap();
    let o = restore(&c);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    // --caption "text" still wins: no caption file is written.
    let e = d.join("e.png");
    let o = tiny_restore(&input, &e, "2", &["--caption", "a cat"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(!d.join("e.txt").exists());
}

#[test]
fn supir_caption_auto_with_a_tiled_sampler_captions_each_tile() {
    let d = tmpdir("tiled");
    let input = d.join("in.png");
    let img = ImageBuffer::from_fn(64, 64, |x, y| {
        Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    DynamicImage::ImageRgb8(img).save(&input).unwrap();
    let out = d.join("out.png");
    let seesr_tiny = root().join("fixtures/seesr-tiny");
    let o = tiny_restore(
        &input,
        &out,
        "1",
        &[
            "--sampler",
            "tiled-edm",
            "--sampler-tile",
            "4",
            "--sampler-stride",
            "4",
            "--caption",
            "auto",
            "--seesr-models",
            s(&seesr_tiny),
            "--seed",
            "1",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    // The 64 x 64 input is an 8 x 8 latent: four 4 x 4 tiles, one caption each.
    let captions: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(d.join("out.txt")).unwrap()).unwrap();
    assert_eq!(captions.len(), 4, "{captions:?}");
    assert!(text(&o.stderr).contains("tile 3"), "{}", text(&o.stderr));
}

/// The tiny LLaVA fixture (made with the official code).
fn llava_tiny() -> PathBuf {
    root().join("crates/supir/tests/data/llava-tiny")
}

#[test]
fn caption_llava_greedy_is_the_official_caption() {
    let fx = llava_tiny();
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("case.json")).unwrap()).unwrap();
    let o = supir(&[
        "caption",
        s(&fx.join("image.png")),
        "--captioner",
        "llava",
        "--llava",
        s(&fx.join("llava")),
        "--llava-clip",
        s(&fx.join("clip")),
        "--llava-dtype",
        "f32",
        "--llava-temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(
        text(&o.stdout).trim_end_matches('\n'),
        case["greedy_caption"].as_str().unwrap()
    );
    // A models folder with llava/ and clip-vit-large-patch14-336/ is found by --supir-models.
    let d = tmpdir("llava-models");
    for (from, to) in [("llava", "llava"), ("clip", "clip-vit-large-patch14-336")] {
        std::fs::create_dir_all(d.join(to)).unwrap();
        for e in std::fs::read_dir(fx.join(from)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, d.join(to).join(p.file_name().unwrap())).unwrap();
        }
    }
    let o = supir(&[
        "caption",
        s(&fx.join("image.png")),
        "--captioner",
        "llava",
        "--supir-models",
        s(&d),
        "--llava-max-tokens",
        "8",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&o.stdout).trim()).unwrap();
    assert!(!v["caption"].as_str().unwrap().is_empty());
    // The original layout without its CLIP folder: one line naming the config.
    std::fs::remove_dir_all(d.join("clip-vit-large-patch14-336")).unwrap();
    let o = supir(&[
        "caption",
        s(&fx.join("image.png")),
        "--captioner",
        "llava",
        "--supir-models",
        s(&d),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    assert!(
        err.contains("config.json") && err.contains("--llava-clip"),
        "{err}"
    );
}

#[test]
fn supir_caption_auto_with_llava_writes_the_caption() {
    let d = tmpdir("auto-llava");
    let input = d.join("in.png");
    save_pattern(&input);
    let fx = llava_tiny();
    let out = d.join("a.png");
    let o = tiny_restore(
        &input,
        &out,
        "1",
        &[
            "--caption",
            "auto",
            "--captioner",
            "llava",
            "--llava",
            s(&fx.join("llava-hf")),
            "--llava-max-tokens",
            "12",
            "--seed",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let caption = std::fs::read_to_string(d.join("a.txt")).unwrap();
    assert!(!caption.is_empty());
    assert!(out.is_file());
}

#[test]
fn an_empty_llava_caption_is_reported() {
    // llava-hf weights with a zero LM head: greedy decoding picks <unk> (skipped): empty answer.
    let d = tmpdir("llava-empty");
    let m = d.join("llava-hf");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(llava_tiny().join("llava-hf")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, m.join(p.file_name().unwrap())).unwrap();
    }
    let st = m.join("model.safetensors");
    let dev = candle_core::Device::Cpu;
    let mut ts = candle_core::safetensors::load(&st, &dev).unwrap();
    let head = &ts["language_model.lm_head.weight"];
    let zero = candle_core::Tensor::zeros(head.shape(), head.dtype(), &dev).unwrap();
    ts.insert("language_model.lm_head.weight".into(), zero);
    candle_core::safetensors::save(&ts, &st).unwrap();
    let input = d.join("in.png");
    DynamicImage::ImageRgb8(ImageBuffer::from_pixel(40, 30, Rgb([90u8, 60, 30])))
        .save(&input)
        .unwrap();
    let llava = [
        "--captioner",
        "llava",
        "--llava",
        s(&m),
        "--llava-temperature",
        "0",
        "--llava-max-tokens",
        "4",
    ];
    // `supir caption`: the image fails, naming the cause.
    let mut args = vec!["caption", s(&input)];
    args.extend(llava);
    let o = supir(&args);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("empty caption"),
        "{}",
        text(&o.stderr)
    );
    // `restore --caption auto`: a warning, and the restore goes on without a caption.
    let out = d.join("a.png");
    let mut args = vec!["--caption", "auto"];
    args.extend(llava);
    let o = tiny_restore(&input, &out, "1", &args);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("LLaVA gave an empty caption; no caption used"),
        "{}",
        text(&o.stderr)
    );
    assert!(out.is_file());
}
