//! `supir serve` end to end on loopback: a job's result is pixel-identical to `supir restore`
//! with the same input and options, and Ctrl-C (SIGINT) stops the server cleanly.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageBuffer, Rgba};
use serde_json::Value;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-serve-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
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
    let out = d.join("out.png");
    let o = Command::new(env!("CARGO_BIN_EXE_supir"))
        .args([
            "restore",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args([
            "--backend",
            "realesrgan",
            "--outscale",
            "3",
            "--tile",
            "8",
            "--tile-pad",
            "4",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = image::open(&out).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_supir"))
        .args(["serve", "--port", "0", "--tile", "64"])
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

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let c = reqwest::Client::new();
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(std::fs::read(&input).unwrap()).file_name("in.png"),
            )
            .text("options", r#"{"outscale": 3, "tile": 8, "tile_pad": 4}"#);
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
        loop {
            let v: Value = c
                .get(format!("{url}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match v["status"].as_str().unwrap() {
                "succeeded" => break,
                "queued" | "processing" => {}
                _ => panic!("job ended: {v}"),
            }
            assert!(t.elapsed() < Duration::from_secs(60), "job stuck: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = c
            .get(format!("{url}/v1/jobs/{id}/result"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap()
    });
    let got = image::load_from_memory(&got).unwrap();
    assert_eq!(got.color(), want.color());
    assert_eq!(got, want, "`supir serve` and `supir restore` differ");

    // Ctrl-C: the server stops, says so and exits 0.
    // SAFETY: signalling our own child process by its id.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no job was running"), "{err}");
    assert!(err.contains("removed the temporary files"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}
