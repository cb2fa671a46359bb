//! The `supir` binary end to end: backend choice, folder mode, and bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use image::{DynamicImage, GenericImageView, ImageBuffer, Rgb, Rgba};

fn supir(args: &[&str]) -> Output {
    clean(Command::new(env!("CARGO_BIN_EXE_supir")).args(args))
        .output()
        .expect("run supir")
}

/// Without any SUPIR weight variable of the environment running the tests.
fn clean(c: &mut Command) -> &mut Command {
    for v in ["SUPIR_MODELS", "SUPIR_SDXL", "SUPIR_CKPT", "SUPIR_CONFIG"] {
        c.env_remove(v);
    }
    c
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-cli-{tag}-{}", std::process::id()));
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

fn tiny_rgb(path: &Path) {
    let img = ImageBuffer::from_fn(6, 5, |x, y| Rgb([40 * x as u8, 50 * y as u8, 128]));
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
fn restore_defaults_to_embedded_realesrgan() {
    let d = tmpdir("default");
    let input = d.join("in.png");
    tiny_rgb(&input);
    let out = d.join("out.png");
    let o = supir(&["restore", s(&input), "-o", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("Real-ESRGAN") && err.contains("SUPIR_MODELS"),
        "{err}"
    );
    let img = image::open(&out).unwrap();
    assert_eq!(img.dimensions(), (24, 20));
    assert_eq!(files_in(&d), ["in.png", "out.png"]);
}

#[test]
fn sixteen_bit_alpha_and_outscale_through_the_cli() {
    let d = tmpdir("16");
    let input = d.join("in.png");
    let img = ImageBuffer::from_fn(6, 4, |x, y| {
        Rgba([9000 * x as u16, 60_001, 7 * y as u16, 40_000])
    });
    DynamicImage::ImageRgba16(img).save(&input).unwrap();
    let out = d.join("out.png");
    let o = supir(&[
        "restore",
        s(&input),
        "-o",
        s(&out),
        "--outscale",
        "2",
        "--alpha",
        "lanczos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&out).unwrap();
    assert_eq!(img.color(), image::ColorType::Rgba16);
    assert_eq!(img.dimensions(), (12, 8));
}

#[test]
fn supir_backend_is_a_clear_error() {
    let d = tmpdir("supir");
    let input = d.join("in.png");
    tiny_rgb(&input);
    let out = d.join("out.png");
    let o = supir(&["restore", s(&input), "-o", s(&out), "--backend", "supir"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no SUPIR weights configured"),
        "{}",
        stderr(&o)
    );
    // Configured weights: chosen automatically; unreadable files are a clear error.
    let models = d.join("models");
    std::fs::create_dir(&models).unwrap();
    for f in ["sd_xl_base_1.0_0.9vae.safetensors", "SUPIR-v0Q.ckpt"] {
        std::fs::write(models.join(f), b"x").unwrap();
    }
    let o = clean(&mut Command::new(env!("CARGO_BIN_EXE_supir")))
        .args(["restore", s(&input), "-o", s(&out)])
        .env("SUPIR_MODELS", &models)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("sd_xl_base_1.0_0.9vae.safetensors"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
    assert!(!out.exists());
    // Forcing Real-ESRGAN still works with SUPIR configured.
    let o = clean(&mut Command::new(env!("CARGO_BIN_EXE_supir")))
        .args([
            "restore",
            s(&input),
            "-o",
            s(&out),
            "--backend",
            "realesrgan",
        ])
        .env("SUPIR_MODELS", &models)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}

#[test]
fn folder_mode_and_never_over_an_input() {
    let d = tmpdir("folder");
    let inputs = d.join("in");
    std::fs::create_dir(&inputs).unwrap();
    tiny_rgb(&inputs.join("a.png"));
    tiny_rgb(&inputs.join("b.jpg"));
    std::fs::write(inputs.join("notes.txt"), b"not an image").unwrap();
    let outs = d.join("out");
    let o = supir(&["restore", s(&inputs), "-o", s(&outs)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(files_in(&outs), ["a.png", "b.jpg"]);
    assert_eq!(
        image::open(outs.join("b.jpg")).unwrap().dimensions(),
        (24, 20)
    );
    // The input folder as output, or an input file as its own output: refused, inputs intact.
    let before = std::fs::read(inputs.join("a.png")).unwrap();
    let o = supir(&["restore", s(&inputs), "-o", s(&inputs)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("input folder"), "{}", stderr(&o));
    let a = inputs.join("a.png");
    let o = supir(&["restore", s(&a), "-o", s(&a)]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("overwrite the input"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&a).unwrap(), before);
}

/// A PNG whose header says 0 x 0.
fn zero_sized_png() -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], body: &[u8]| {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        let mut kb = kind.to_vec();
        kb.extend_from_slice(body);
        v.extend_from_slice(&kb);
        v.extend(crc32(&kb).to_be_bytes());
        v
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let ihdr = [0, 0, 0, 0, 0, 0, 0, 0, 8, 2, 0, 0, 0];
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

#[test]
fn bad_inputs_fail_clearly_and_write_nothing() {
    let d = tmpdir("bad");
    let good = d.join("good.png");
    tiny_rgb(&good);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = d.join("truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = d.join("garbage.png");
    std::fs::write(&garbage, b"definitely not a png").unwrap();
    let zero = d.join("zero.png");
    std::fs::write(&zero, zero_sized_png()).unwrap();
    let out = d.join("out.png");
    for bad in [&truncated, &garbage, &zero, &d.join("missing.png")] {
        let o = supir(&["restore", s(bad), "-o", s(&out)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", bad.display());
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name), "error does not name {name}: {err}");
        assert!(!out.exists(), "{} left an output", bad.display());
    }
    // Unwritable output: its folder is a file.
    let o = supir(&["restore", s(&good), "-o", s(&good.join("out.png"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("good.png/out.png"), "{}", stderr(&o));
    // Unknown output format: refused before the output is created.
    let o = supir(&["restore", s(&good), "-o", s(&d.join("out.xyz"))]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("out.xyz"), "{}", stderr(&o));
    // Nothing but the inputs is left (no temporary files either).
    assert_eq!(
        files_in(&d),
        ["garbage.png", "good.png", "truncated.png", "zero.png"]
    );
    // A folder with one bad image: the others are written, the exit status says it failed.
    let inputs = d.join("mixed");
    std::fs::create_dir(&inputs).unwrap();
    tiny_rgb(&inputs.join("ok.png"));
    std::fs::copy(&truncated, inputs.join("truncated.png")).unwrap();
    let outs = d.join("mixed-out");
    let o = supir(&["restore", s(&inputs), "-o", s(&outs)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("truncated.png"), "{}", stderr(&o));
    assert_eq!(files_in(&outs), ["ok.png"]);
}

#[test]
fn convert_ncnn_reports_bad_files() {
    let d = tmpdir("convert");
    let param = d.join("m.param");
    std::fs::write(&param, "7767517\n1 1\nInput in 0 1 data\n").unwrap();
    let bin = d.join("m.bin");
    std::fs::write(&bin, b"").unwrap();
    let out = d.join("w.safetensors");
    let o = supir(&["convert", "ncnn", s(&param), s(&bin), "-o", s(&out)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("0 convolutions"), "{}", stderr(&o));
    assert!(!out.exists());
}

#[test]
fn convert_gguf_q4_k_writes_a_file_that_inspects() {
    let d = tmpdir("convert-q4k");
    let weights =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny/weights.safetensors");
    let out = d.join("m.gguf");
    let o = supir(&[
        "convert",
        "gguf",
        s(&weights),
        "--type",
        "q4_k",
        "-o",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The tiny fixture's 256 and 512 wide linears take Q4_K, the other 32-aligned ones Q8_0.
    let e = stderr(&o);
    let count = |what: &str| -> usize {
        let i = e.find(what).unwrap_or_else(|| panic!("{e}"));
        e[..i].rsplit([' ', '(']).next().unwrap().parse().unwrap()
    };
    assert!(count(" in q4_k") > 0 && count(" in q8_0") > 20, "{e}");
    let o = supir(&["inspect", s(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&d);
}
