//! The HTTP API on the diffusion backends, on the tiny fixture models the library tests use
//! (`fixtures/supir-tiny`, `fixtures/seesr-tiny`): a job's result equals the library's restore
//! with the same options, its metadata names the backend and seed, a bad option is refused with
//! the library's message, and a running job stops at its next step once canceled.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::post;
use image::{DynamicImage, GenericImageView, ImageBuffer, Rgb};
use reqwest::multipart::{Form, Part};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use supir::models::supir_config::SupirConfig;
use supir::pipelines::seesr::{flow, SeesrModel, SeesrOptions, SeesrPaths, SeesrPreset};
use supir::pipelines::supir::restore::{Preset, Residency, RestoreOptions, Restorer, VAE_PASSES};
use supir::schedulers::sampler::SeededNoise;
use supir_server::{Config, ModelConfig, SeesrSetup, Server, SupirSetup};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn photo(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 9 % 256) as u8,
            (y * 13 % 256) as u8,
            ((x * y) % 256) as u8,
        ])
    }))
}

fn png(img: &DynamicImage) -> Vec<u8> {
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

fn form(img: &DynamicImage, options: Value) -> Form {
    Form::new()
        .part("image", Part::bytes(png(img)).file_name("cat.png"))
        .text("options", options.to_string())
}

async fn start(model: ModelConfig) -> (Server, String) {
    common::start(Config {
        model,
        ..Config::default()
    })
    .await
}

/// Polls the job until `pred` holds (panics after 120 s: the first job waits for the load).
async fn wait_for(c: &Client, base: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    common::wait_within(c, base, id, Duration::from_secs(120), pred).await
}

fn ended(v: &Value) -> bool {
    ["succeeded", "failed", "canceled"].contains(&v["status"].as_str().unwrap_or_default())
}

/// The result image and its PNG text chunks.
async fn result(c: &Client, base: &str, id: &str) -> (DynamicImage, Vec<(String, String)>) {
    let r = c
        .get(format!("{base}/v1/jobs/{id}/result"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(bytes.as_ref()))
        .read_info()
        .unwrap();
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    text.extend(
        info.utf8_text
            .iter()
            .map(|t| (t.keyword.clone(), t.get_text().unwrap())),
    );
    (image::load_from_memory(&bytes).unwrap(), text)
}

fn text_of<'a>(text: &'a [(String, String)], key: &str) -> &'a str {
    &text
        .iter()
        .find(|t| t.0 == key)
        .unwrap_or_else(|| panic!("no {key} in {text:?}"))
        .1
}

/// Submits a job of `steps` sampler steps, waits until it runs, cancels it: it ends canceled
/// before its last unit of work (in progress stage `stage`), promptly, and the worker goes on
/// with the next job.
async fn cancel_running(
    c: &Client,
    base: &str,
    img: &DynamicImage,
    long: Value,
    short: Value,
    stage: &str,
) {
    let (s, v) = post(c, base, form(img, long)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let v = wait_for(c, base, &id, |v| {
        ended(v) || v["status"] == "processing" && v["progress"]["step"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(v["status"], "processing", "{v}");
    let t = Instant::now();
    let r: Value = c
        .post(format!("{base}/v1/jobs/{id}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["cancel_requested"], true, "{r}");
    let done = wait_for(c, base, &id, ended).await;
    assert_eq!(done["status"], "canceled", "{done}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "cancel took {:?}",
        t.elapsed()
    );
    let p = &done["progress"];
    assert_eq!(p["stage"], stage);
    assert!(
        p["step"].as_u64().unwrap() < p["steps"].as_u64().unwrap(),
        "{p}"
    );
    let r = c
        .get(format!("{base}/v1/jobs/{id}/result"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let (_, v) = post(c, base, form(img, short)).await;
    let id = v["id"].as_str().unwrap().to_string();
    let v = wait_for(c, base, &id, ended).await;
    assert_eq!(v["status"], "succeeded", "{v}");
}

/// The tiny SUPIR model with `supir restore --model-dir fixtures/supir-tiny --steps 2
/// --min-size 64` as the server's flags.
fn supir_model() -> (SupirConfig, PathBuf, RestoreOptions) {
    let dir = fixtures().join("supir-tiny");
    let cfg = SupirConfig::load(dir.join("config.yaml")).unwrap();
    let mut o = RestoreOptions::preset(Preset::Default);
    o.steps = 2;
    o.min_size = 64;
    (cfg, dir.join("weights.safetensors"), o)
}

/// The server's SUPIR model: the tiny checkpoint, default preset, fixed seed.
fn supir_setup(
    cfg: &SupirConfig,
    weights: &Path,
    defaults: &RestoreOptions,
    captioner: Option<supir::pipelines::captions::CaptionerConfig>,
) -> ModelConfig {
    ModelConfig::Supir(Box::new(SupirSetup {
        config: cfg.clone(),
        checkpoints: vec![weights.to_path_buf()],
        description: "tiny".into(),
        preset: Preset::Default,
        defaults: defaults.clone(),
        random_seed: false,
        captioner,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supir_jobs_match_the_library_and_cancel() {
    let (cfg, weights, defaults) = supir_model();
    let model = supir_setup(&cfg, &weights, &defaults, None);
    let (server, base) = start(model).await;
    let c = Client::new();
    let input = photo(24, 20);
    let opts =
        json!({"upscale": 1.5, "seed": 7, "caption": "a cat", "cfg": 5.5, "color-fix": "adain"});
    let (s, v) = post(&c, &base, form(&input, opts)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for(&c, &base, &id, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let o = &done["options"];
    assert_eq!(o["backend"], "supir");
    assert_eq!(o["seed"], 7);
    assert_eq!(o["steps"], 2);
    assert_eq!(o["cfg"], 5.5);
    assert_eq!(o["color_fix"], "adain");
    assert_eq!(o["caption"], "a cat");
    assert_eq!(o["sampler"], "edm");
    let p = &done["progress"];
    assert_eq!(
        (p["stage"].as_str(), p["step"].as_u64()),
        (Some("restoring"), Some(2 + VAE_PASSES as u64)),
        "SUPIR's units: its sampler steps and VAE passes"
    );
    assert_eq!(p["fraction"], 1.0);

    let (got, text) = result(&c, &base, &id).await;
    assert_eq!(got.dimensions(), (36, 30));
    assert_eq!(text_of(&text, "supir:backend"), "supir");
    assert_eq!(text_of(&text, "supir:seed"), "7");
    assert_eq!(text_of(&text, "supir:caption"), "a cat");
    let meta: Value = serde_json::from_str(text_of(&text, "supir:options")).unwrap();
    assert_eq!(&meta, o);
    // The library's restore with the same options (what `supir restore` runs).
    let mut want_opts = defaults.clone();
    want_opts.upscale = 1.5;
    want_opts.seed = 7;
    want_opts.caption = "a cat".into();
    want_opts.cfg_scale = 5.5;
    want_opts.color_fix = supir::color_fix::ColorFix::AdaIn;
    want_opts.residency = Residency::Resident;
    let mut r = Restorer::load(cfg, &[&weights], &want_opts, &candle_core::Device::Cpu).unwrap();
    let want = r.restore_image(&input, &want_opts, None).unwrap();
    assert_eq!(
        got.to_rgb8(),
        want[0],
        "server result differs from the library's"
    );

    // Another prompt on the same loaded model (text encoders kept), and a preset.
    let (_, v) = post(
        &c,
        &base,
        form(
            &input,
            json!({"caption": "a dog", "preset": "quality", "seed": -1}),
        ),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for(&c, &base, &id, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["options"]["preset"], "quality");
    assert_eq!(done["options"]["cfg"], 7.5);
    // The server's own `--steps 2` holds over the preset's 50.
    assert_eq!(done["options"]["steps"], 2);
    assert!(done["options"]["seed"].is_u64(), "{done}");

    // Bad values: the library's messages; options of another backend are refused.
    for (bad, msg) in [
        (
            json!({"steps": 0}),
            "invalid option: steps 0: must be in 1..=1000",
        ),
        (
            json!({"control_scale": 3}),
            "invalid option: control scale 3: must be in 0..=2",
        ),
        (
            json!({"seed": -5}),
            "--seed -5: must be >= 0, or -1 for a random seed",
        ),
    ] {
        let (s, v) = post(&c, &base, form(&input, bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"], msg, "{bad}");
    }
    let (s, v) = post(&c, &base, form(&input, json!({"outscale": 2}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `outscale`"),
        "{v}"
    );

    let m: Value = c
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["models"][0]["name"], "supir");
    assert_eq!(m["models"][0]["loaded"], true);
    assert_eq!(m["models"][0]["defaults"]["steps"], 2);
    assert_eq!(m["models"][0]["defaults"]["seed"], 1234);

    cancel_running(
        &c,
        &base,
        &input,
        json!({"steps": 1000}),
        json!({"steps": 1}),
        "restoring",
    )
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seesr_jobs_match_the_library_and_cancel() {
    let paths = SeesrPaths::from_models_dir(&fixtures().join("seesr-tiny"));
    let mut defaults = SeesrOptions::preset(SeesrPreset::Default);
    defaults.steps = 2;
    defaults.process_size = 64;
    let model = ModelConfig::Seesr(Box::new(SeesrSetup {
        paths: paths.clone(),
        defaults: defaults.clone(),
    }));
    let (server, base) = start(model).await;
    let c = Client::new();
    let input = photo(20, 16);
    let opts =
        json!({"seed": 3, "upscale": 2, "prompt": "a red brick wall", "color_fix": "wavelet"});
    let (s, v) = post(&c, &base, form(&input, opts)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for(&c, &base, &id, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let o = &done["options"];
    assert_eq!(o["backend"], "seesr");
    assert_eq!(o["seed"], 3);
    assert_eq!(o["upscale"], 2);
    assert_eq!(o["cfg"], 5.5);
    assert_eq!(o["prompt"], "a red brick wall");
    let p = &done["progress"];
    assert_eq!(
        (p["stage"].as_str(), p["step"].as_u64()),
        (Some("sampling"), Some(2))
    );
    assert_eq!(p["steps"], 2);

    let (got, text) = result(&c, &base, &id).await;
    assert_eq!(got.dimensions(), (40, 32));
    assert_eq!(text_of(&text, "supir:backend"), "seesr");
    assert_eq!(text_of(&text, "supir:seed"), "3");
    let prompt = text_of(&text, "supir:prompt");
    assert!(
        prompt.ends_with(", a red brick wall,clean, high-resolution, 8k"),
        "{prompt}"
    );
    let meta: Value = serde_json::from_str(text_of(&text, "supir:options")).unwrap();
    assert_eq!(&meta, o);
    // The library's flow with the same options (what `supir restore --backend seesr` runs).
    let mut want_opts = defaults.clone();
    want_opts.seed = Some(3);
    want_opts.upscale = 2;
    want_opts.prompt = "a red brick wall".into();
    want_opts.color_fix = supir::color_fix::ColorFix::Wavelet;
    let m = SeesrModel::load(&paths, &want_opts, &candle_core::Device::Cpu).unwrap();
    let rgb = supir::image_io::convert::pil_convert_rgb8(&input);
    let prepared = flow::prepare(&m, &rgb, &want_opts, None).unwrap();
    let want = flow::sample_image(
        &m,
        &prepared,
        &want_opts,
        &mut SeededNoise::new(3),
        None,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(
        got.to_rgb8(),
        want.image,
        "server result differs from the library's"
    );
    assert_eq!(prompt, want.prompt);

    // No seed: a random one, reported.
    let (_, v) = post(&c, &base, form(&input, json!({}))).await;
    assert!(v["options"]["seed"].is_u64(), "{v}");

    for (bad, msg) in [
        (
            json!({"steps": 0}),
            "invalid option: --steps: must be 1 to 999 (1000 DDPM steps with SD-2's leading spacing and steps_offset 1 start at timestep 1000, past the trained 0..999; diffusers fails there too)",
        ),
        (
            json!({"upscale": 1.5}),
            "--upscale 1.5: SeeSR upscales by a whole factor, 1 to 16",
        ),
        (
            json!({"latent_overlap": 200}),
            "invalid option: --latent-overlap: must be smaller than --latent-tile",
        ),
    ] {
        let (s, v) = post(&c, &base, form(&input, bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert_eq!(v["error"], msg, "{bad}");
    }
    let (s, v) = post(&c, &base, form(&input, json!({"preset": "turbo"}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("loaded SeeSR's default preset"),
        "{v}"
    );

    cancel_running(
        &c,
        &base,
        &input,
        // At most 999 steps (see SeesrOptions::validate).
        json!({"steps": 500, "seed": 1}),
        json!({"steps": 1, "seed": 1}),
        "sampling",
    )
    .await;
    server.shutdown().await.unwrap();
}

/// `caption: "auto"` on a SUPIR server: its captioner (the tiny LLaVA GGUF pair, greedy) captions
/// the pre-denoised image as `supir restore --caption auto` does (the same library code), and
/// the restore uses that caption; a server without a captioner refuses such a job (400) with how
/// to give one; a captioner whose files are missing fails the job with a message naming them,
/// and the server goes on with the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supir_auto_caption_jobs() {
    use supir::models::llava::LlavaPaths;
    use supir::pipelines::captions::{AutoCaptions, CaptionerConfig, LlavaOptions};
    let (cfg, weights, defaults) = supir_model();
    let llava = |model: PathBuf| CaptionerConfig::Llava {
        paths: LlavaPaths { model, clip: None },
        options: LlavaOptions {
            temperature: 0.0,
            max_new_tokens: 12,
            ..LlavaOptions::default()
        },
        dtype: candle_core::DType::F32,
    };
    let pair = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../supir/tests/data/llava-tiny/gguf/llm-f16.gguf");
    let setup =
        |captioner: Option<CaptionerConfig>| supir_setup(&cfg, &weights, &defaults, captioner);
    let c = Client::new();
    let input = photo(24, 20);
    let auto = json!({"seed": 3, "caption": "auto"});

    let (server, base) = start(setup(Some(llava(pair.clone())))).await;
    let (s, v) = post(&c, &base, form(&input, auto.clone())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for(&c, &base, &id, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, text) = result(&c, &base, &id).await;
    // The library's captions of the same image with the same options.
    let mut o = defaults.clone();
    o.seed = 3;
    o.residency = Residency::Resident;
    let r = Restorer::load(cfg.clone(), &[&weights], &o, &candle_core::Device::Cpu).unwrap();
    let captioner = llava(pair).load(&candle_core::Device::Cpu).unwrap();
    let want = AutoCaptions::make(&r, &captioner, &input, &o).unwrap();
    let AutoCaptions::Global(caption) = &want else {
        panic!("{want:?}: one caption expected")
    };
    assert!(!caption.is_empty());
    o.caption = String::new();
    want.apply(&mut o);
    assert_eq!(text_of(&text, "supir:caption"), o.caption);
    server.shutdown().await.unwrap();

    // No captioner: refused at submission, with the flags to give.
    let (server, base) = start(setup(None)).await;
    let (s, v) = post(&c, &base, form(&input, auto.clone())).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(v.to_string().contains("--captioner"), "{v}");
    server.shutdown().await.unwrap();

    // A captioner whose files are gone: the job fails naming them; the next job runs.
    let gone = std::env::temp_dir().join("supir-no-such-llava");
    let (server, base) = start(setup(Some(llava(gone)))).await;
    let (_, v) = post(&c, &base, form(&input, auto)).await;
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for(&c, &base, &id, ended).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done.to_string().contains("supir-no-such-llava"), "{done}");
    let (_, v) = post(
        &c,
        &base,
        form(&input, json!({"caption": "a cat", "seed": 1})),
    )
    .await;
    let id = v["id"].as_str().unwrap().to_string();
    let done = wait_for(&c, &base, &id, ended).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    server.shutdown().await.unwrap();
}
