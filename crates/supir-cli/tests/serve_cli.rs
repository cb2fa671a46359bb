//! `supir serve` end to end on loopback: a job's result is pixel-identical to `supir restore`
//! with the same input and options (embedded Real-ESRGAN, the tiny SUPIR and SeeSR models, with
//! the backend and its defaults given by the same flags), and Ctrl-C (SIGINT) stops the server
//! cleanly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, Rgb, Rgba};
use serde_json::Value;

const WEIGHT_VARS: [&str; 5] = [
    "SUPIR_MODELS",
    "SUPIR_SDXL",
    "SUPIR_CKPT",
    "SUPIR_CONFIG",
    "SEESR_MODELS",
];

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-serve-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// `supir <args>` without weight variables.
fn supir(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_supir"));
    for v in WEIGHT_VARS {
        c.env_remove(v);
    }
    c.args(args);
    c
}

/// `supir restore input -o out <args>`, then the output.
fn restore(input: &Path, out: &Path, args: &[&str]) -> DynamicImage {
    let o = supir(&[
        "restore",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ])
    .args(args)
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image::open(out).unwrap()
}

/// `supir serve --port 0 <args>` and its URL (from the first line it prints).
fn serve(args: &[&str]) -> (Child, String) {
    let mut child = supir(&["serve", "--port", "0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches('/')
        .to_string();
    (child, url)
}

/// One job with `options` (JSON) on `input`: the result image and the job's final state.
fn job(url: &str, input: &Path, options: &str) -> (DynamicImage, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (bytes, v) = rt.block_on(async {
        let c = reqwest::Client::new();
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(std::fs::read(input).unwrap()).file_name("in.png"),
            )
            .text("options", options.to_string());
        let r = c
            .post(format!("{url}/v1/jobs"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let t = Instant::now();
        let v = loop {
            let v: Value = c
                .get(format!("{url}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match v["status"].as_str().unwrap() {
                "succeeded" => break v,
                "queued" | "processing" => {}
                _ => panic!("job ended: {v}"),
            }
            assert!(t.elapsed() < Duration::from_secs(60), "job stuck: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let r = c
            .get(format!("{url}/v1/jobs/{id}/result"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        (r.bytes().await.unwrap(), v)
    });
    (image::load_from_memory(&bytes).unwrap(), v)
}

/// Ctrl-C: the server stops, says so and exits 0.
fn stop(child: Child) {
    // SAFETY: signalling our own child process by its id.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no job was running"), "{err}");
    assert!(err.contains("removed the temporary files"), "{err}");
}

#[test]
fn serve_result_equals_restore_and_ctrl_c_stops() {
    let d = tmpdir("same");
    let input = d.join("in.png");
    // RGBA: the alpha channel goes through the network too.
    let img = ImageBuffer::from_fn(16, 16, |x, y| {
        Rgba([15 * x as u8, 13 * y as u8, (x * y) as u8, 255 - 9 * x as u8])
    });
    DynamicImage::ImageRgba8(img).save(&input).unwrap();
    let want = restore(
        &input,
        &d.join("out.png"),
        &[
            "--backend",
            "realesrgan",
            "--outscale",
            "3",
            "--tile",
            "8",
            "--tile-pad",
            "4",
        ],
    );
    let (child, url) = serve(&["--tile", "64"]);
    let (got, _) = job(&url, &input, r#"{"outscale": 3, "tile": 8, "tile_pad": 4}"#);
    assert_eq!(got.color(), want.color());
    assert_eq!(got, want, "`supir serve` and `supir restore` differ");
    stop(child);
    std::fs::remove_dir_all(&d).ok();
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

/// The flags that pick the backend and set its defaults are `supir restore`'s; a job's options
/// override them under the same names.
#[test]
fn serve_supir_and_seesr_equal_restore() {
    let d = tmpdir("diffusion");
    let input = d.join("in.png");
    photo(&input, 24, 20);
    let supir_dir = fixture("supir-tiny");
    let defaults = [
        "--model-dir",
        &supir_dir,
        "--steps",
        "2",
        "--min-size",
        "64",
    ];
    let want = restore(
        &input,
        &d.join("supir.png"),
        &[
            &defaults[..],
            &[
                "--seed",
                "5",
                "--caption",
                "a cat",
                "--upscale",
                "1.5",
                "--preset",
                "quality",
            ],
        ]
        .concat(),
    );
    let (child, url) = serve(&defaults);
    let (got, v) = job(
        &url,
        &input,
        r#"{"seed": 5, "caption": "a cat", "upscale": 1.5, "preset": "quality"}"#,
    );
    assert_eq!(v["options"]["backend"], "supir", "{v}");
    assert_eq!(
        got.to_rgb8(),
        want.to_rgb8(),
        "SUPIR: `supir serve` and `supir restore` differ"
    );
    stop(child);

    let seesr_dir = fixture("seesr-tiny");
    let defaults = [
        "--seesr-models",
        &seesr_dir,
        "--steps",
        "2",
        "--process-size",
        "64",
    ];
    let want = restore(
        &input,
        &d.join("seesr.png"),
        &[
            &defaults[..],
            &["--seed", "3", "--prompt", "a wall", "--upscale", "2"],
        ]
        .concat(),
    );
    let (child, url) = serve(&defaults);
    let (got, v) = job(
        &url,
        &input,
        r#"{"seed": 3, "prompt": "a wall", "upscale": 2}"#,
    );
    assert_eq!(v["options"]["backend"], "seesr", "{v}");
    assert_eq!(
        got.to_rgb8(),
        want.to_rgb8(),
        "SeeSR: `supir serve` and `supir restore` differ"
    );
    stop(child);
    std::fs::remove_dir_all(&d).ok();
}
