//! Robustness of what a request reaches: the job options JSON (resolved against every
//! backend's defaults), the multipart form and the uploaded image's header. Deterministic
//! xorshift inputs: random, mutated and extreme values; every one must be answered with a
//! result or a clear error, never a panic or a 5xx, and the server must stay up.

mod common;

use std::path::{Path, PathBuf};

use common::start;
use reqwest::{Client, StatusCode};
use serde_json::{json, Map, Value};
use supir::models::supir_config::SupirConfig;
use supir::pipelines::seesr::{SeesrOptions, SeesrPaths, SeesrPreset};
use supir::pipelines::supir::restore::{Preset, RestoreOptions};
use supir_server::{Config, ModelConfig, SeesrSetup, SupirSetup};

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(3) {
        match r.below(5) {
            0 => v.truncate(r.below(v.len() + 1)),
            1 => {
                for _ in 0..1 + r.below(8) {
                    if !v.is_empty() {
                        let i = r.below(v.len());
                        v[i] ^= 1 << r.below(8);
                    }
                }
            }
            2 => {
                let i = r.below(v.len() + 1);
                let n = 1 + r.below(32);
                let noise = r.bytes(n);
                v.splice(i..i, noise);
            }
            3 => {
                if !v.is_empty() {
                    let i = r.below(v.len());
                    let n = (1 + r.below(64)).min(v.len() - i);
                    v.drain(i..i + n);
                }
            }
            _ => {
                let n = r.below(2 * seed.len().max(16));
                v = r.bytes(n);
            }
        }
    }
    v
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// The three backends' configurations (nothing is loaded: `resolve` only reads defaults).
fn models() -> Vec<(&'static str, ModelConfig)> {
    let dir = fixtures().join("supir-tiny");
    let mut supir = RestoreOptions::preset(Preset::Default);
    supir.steps = 2;
    let supir = ModelConfig::Supir(Box::new(SupirSetup {
        config: SupirConfig::load(dir.join("config.yaml")).unwrap(),
        checkpoints: vec![dir.join("weights.safetensors")],
        description: "tiny".into(),
        preset: Preset::Default,
        defaults: supir,
        random_seed: true,
        captioner: None,
    }));
    let seesr = ModelConfig::Seesr(Box::new(SeesrSetup {
        paths: SeesrPaths::from_models_dir(&fixtures().join("seesr-tiny")),
        defaults: SeesrOptions::preset(SeesrPreset::Default),
    }));
    vec![
        ("realesrgan", ModelConfig::default()),
        ("supir", supir),
        ("seesr", seesr),
    ]
}

/// A random JSON value: extremes of every type, long strings, nesting.
fn value(r: &mut Rng, depth: usize) -> Value {
    const NUMS: [f64; 12] = [
        0.0,
        -1.0,
        1.0,
        0.5,
        2.0,
        4.0,
        1e308,
        -1e308,
        1e-308,
        4294967296.0,
        1e19,
        -0.0,
    ];
    match r.below(if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(r.below(2) == 1),
        2 => json!(NUMS[r.below(NUMS.len())]),
        3 => json!(r.next() as i64 >> r.below(64)),
        4 => json!(r.next() >> r.below(64)),
        5 => {
            const WORDS: [&str; 10] = [
                "", "quality", "fast", "adain", "wavelet", "none", "png", "jpeg", "a cat", "\u{0}",
            ];
            match r.below(3) {
                0 => json!(WORDS[r.below(WORDS.len())]),
                1 => json!("x".repeat(r.below(100_000))),
                _ => {
                    let n = r.below(64);
                    json!(String::from_utf8_lossy(&r.bytes(n)))
                }
            }
        }
        6 => Value::Array((0..r.below(4)).map(|_| value(r, depth + 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..r.below(4) {
                m.insert(format!("k{}", r.below(4)), value(r, depth + 1));
            }
            Value::Object(m)
        }
    }
}

#[test]
fn options_json_is_validated_never_panics() {
    let mut total = 0;
    for (name, model) in models() {
        // Every known key (the defaults' names) plus hyphenated aliases and unknown ones.
        let defaults = serde_json::to_value(model.defaults_view().unwrap()).unwrap();
        let mut keys: Vec<String> = defaults.as_object().unwrap().keys().cloned().collect();
        let aliases: Vec<String> = keys.iter().map(|k| k.replace('_', "-")).collect();
        keys.extend(aliases);
        keys.extend(["", "image", "../../etc/passwd", "__proto__"].map(String::from));
        let mut r = Rng::new(11);
        let (mut ok, mut refused) = (0, 0);
        for case in 0..2000 {
            let mut m = Map::new();
            for _ in 0..1 + r.below(4) {
                let k = keys[r.below(keys.len())].clone();
                // Half the time a plausible value of the default's type, scaled.
                let v = match (&defaults[&k], r.below(2)) {
                    (Value::Number(n), 0) => {
                        json!(n.as_f64().unwrap_or(1.0) * [0.0, -1.0, 3.0, 1e6][r.below(4)])
                    }
                    _ => value(&mut r, 0),
                };
                m.insert(k, v);
            }
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                match model.resolve(&m) {
                    Ok(res) => {
                        // The size checks run on the resolved options too.
                        let (w, h) = (1 + r.below(70_000) as u32, 1 + r.below(70_000) as u32);
                        let _ = model.work_pixels(&res.run, w, h);
                        true
                    }
                    Err(e) => {
                        assert!(!e.is_empty());
                        false
                    }
                }
            }));
            match res {
                Ok(true) => ok += 1,
                Ok(false) => refused += 1,
                Err(_) => panic!(
                    "{name}: case {case} panicked on options {}",
                    Value::Object(m)
                ),
            }
        }
        eprintln!("options JSON ({name}): 2000 random objects, {ok} resolved, {refused} refused");
        total += ok + refused;
    }
    assert_eq!(total, 6000);
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(w, h, |x, y| {
        image::Rgb([(x * 31) as u8, (y * 17) as u8, 99])
    }));
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

const BOUNDARY: &str = "XyZzY0123";

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, file, data) in parts {
        b.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match file {
            Some(f) => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(data);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

async fn post_raw(c: &Client, base: &str, body: Vec<u8>) -> (StatusCode, String) {
    let r = c
        .post(format!("{base}/v1/jobs"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .expect("the server answers");
    let s = r.status();
    (s, r.text().await.unwrap_or_default())
}

/// Mutated multipart bodies, images and options over HTTP. `--max-pixels 1` makes every image
/// that decodes a 413 at its header, so nothing is queued and the cases stay fast; the worker's
/// full decode is the library's `image_io::file::load_limited` (tests/parser_robustness.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_get_4xx_and_the_server_stays_up() {
    let (server, base) = start(Config {
        max_pixels: 1,
        max_upload_bytes: 1 << 20,
        ..Config::default()
    })
    .await;
    let c = Client::new();
    let img = png(5, 4);
    let opts = br#"{"outscale": 2, "tile": 0, "tile_pad": 10, "alpha": "lanczos"}"#;
    let seed = multipart(&[("image", Some("a.png"), &img), ("options", None, opts)]);
    let (s, body) = post_raw(&c, &base, seed.clone()).await;
    assert_eq!(
        s,
        StatusCode::PAYLOAD_TOO_LARGE,
        "the seed form parses: {body}"
    );

    let mut r = Rng::new(21);
    let mut counts = std::collections::BTreeMap::new();
    let mut check = |what: &str, s: StatusCode, body: &str, input_len: usize| {
        assert!(
            s.is_client_error(),
            "{what} ({input_len} bytes): {s} {body}"
        );
        let v: Value = serde_json::from_str(body)
            .unwrap_or_else(|_| panic!("{what}: error body is not JSON: {body}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
        *counts.entry(format!("{what} {}", s.as_u16())).or_insert(0) += 1;
    };
    // The form's bytes (boundaries, headers, parts) mutated.
    for _ in 0..1500 {
        let body = mutate(&seed, &mut r);
        let n = body.len();
        let (s, text) = post_raw(&c, &base, body).await;
        check("form", s, &text, n);
    }
    // A well-formed form around a mutated image.
    for _ in 0..1500 {
        let bad = mutate(&img, &mut r);
        let n = bad.len();
        let body = multipart(&[("image", Some("b.png"), &bad)]);
        let (s, text) = post_raw(&c, &base, body).await;
        check("image", s, &text, n);
    }
    // A well-formed form around mutated options text.
    for _ in 0..500 {
        let bad = mutate(opts, &mut r);
        let n = bad.len();
        let body = multipart(&[("image", Some("c.png"), &img), ("options", None, &bad)]);
        let (s, text) = post_raw(&c, &base, body).await;
        check("options", s, &text, n);
    }
    eprintln!("HTTP: 3500 mutated requests: {counts:?}");
    let h: Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(h["status"], Value::Null, "{h}");
    // Nothing was queued, and no upload is left behind.
    let left: Vec<_> = std::fs::read_dir(server.temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "uploads left in the temp folder: {left:?}");
    server.shutdown().await.unwrap();
}
