//! The web page in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs) opens the page of a server on the embedded Real-ESRGAN, runs its JavaScript
//! (`--virtual-time-budget`, then `--dump-dom`) and the DOM is checked: the option fields of the
//! backend that `/v1/models` names, with its defaults; then `/#selftest` submits a generated
//! picture through the page's own upload path (FormData -> POST /v1/jobs -> the SSE progress ->
//! the result fetched into the compare view), and the DOM must show the finished job and its
//! result. A screenshot of that page is kept as a test artifact.
//!
//! Skips (with a message) when no Chromium is found: `SUPIR_CHROMIUM`, else `chromium`,
//! `chromium-browser`, `google-chrome` on the PATH.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use supir_server::{Config, Server};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SUPIR_CHROMIUM").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `extra` flags; returns its stdout (the DOM with
/// `--dump-dom`). Killed after `limit`.
async fn run_chromium(bin: &PathBuf, url: &str, extra: &[String], limit: Duration) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1280,760",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if t.elapsed() > limit {
            child.kill().ok();
            panic!("chromium did not finish within {limit:?} on {url}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The opening tag of the element with `id`.
fn tag<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap();
    let end = at + dom[at..].find('>').unwrap();
    &dom[start..=end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_the_backend_options_and_runs_a_job_in_chromium() {
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium found (set SUPIR_CHROMIUM or install Debian's `chromium`; .ci/run does)"
        );
        return;
    };
    let t0 = Instant::now();
    let server = Server::start(Config {
        port: 0,
        ..Config::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.addr());
    let models: Value = reqwest::get(format!("{base}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The page's health line says `loading` until the worker has the model.
    loop {
        let h: Value = reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["status"] != "loading" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "model not loaded: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = &models["models"][0];
    assert_eq!(m["name"], "realesrgan", "{models}");

    // 1. The options of the backend /v1/models names, with its defaults.
    let budget = "--virtual-time-budget=5000".to_string();
    let dom = run_chromium(
        &bin,
        &format!("{base}/"),
        &[budget.clone(), "--dump-dom".into()],
        Duration::from_secs(60),
    )
    .await;
    assert!(dom.contains("Options · realesrgan"), "{dom}");
    for k in ["outscale", "alpha", "tile", "tile_pad"] {
        let t = tag(&dom, &format!("o-{k}"));
        let shown = t
            .split("data-default=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("#o-{k} has no data-default: {t}"));
        let same = match &m["defaults"][k] {
            Value::String(s) => shown == s,
            Value::Number(n) => shown.parse::<f64>().ok() == n.as_f64(),
            Value::Null => shown.is_empty(),
            Value::Bool(b) => shown == if *b { "true" } else { "false" },
            v => panic!("unexpected default {v}"),
        };
        assert!(
            same,
            "#o-{k} should show the default {}: {t}",
            m["defaults"][k]
        );
    }
    assert!(
        dom.contains("<b>ready</b>") || dom.contains("<b>busy</b>"),
        "health line: {dom}"
    );
    let t1 = t0.elapsed();

    // 2. A job through the page's own upload path, to its result in the compare view.
    let dom = run_chromium(
        &bin,
        &format!("{base}/#selftest"),
        &["--virtual-time-budget=20000".into(), "--dump-dom".into()],
        Duration::from_secs(90),
    )
    .await;
    assert!(
        dom.contains("data-last-job=\"succeeded with result\""),
        "the job did not finish with a result:\n{dom}"
    );
    assert!(
        tag(&dom, "dl").contains("download=\"selftest"),
        "the download link names the result: {}",
        tag(&dom, "dl")
    );
    assert!(dom.contains("class=\"st succeeded\""), "{dom}");
    let after = {
        let at = dom.find("class=\"after\"").expect("the compare view");
        let start = dom[..at].rfind('<').unwrap();
        &dom[start..at + dom[at..].find('>').unwrap() + 1]
    };
    assert!(
        after.contains("src=\"blob:") && after.contains("visibility: visible"),
        "the compare view shows the result: {after}"
    );
    assert!(
        tag(&dom, "vinfo").contains("vinfo") && dom.contains("selftest.png · 48×32 → ×4"),
        "{dom}"
    );

    // 3. A screenshot of the finished page, kept as an artifact.
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-page-selftest.png");
    std::fs::remove_file(&shot).ok();
    run_chromium(
        &bin,
        &format!("{base}/#selftest"),
        &[
            "--virtual-time-budget=20000".into(),
            format!("--screenshot={}", shot.display()),
        ],
        Duration::from_secs(90),
    )
    .await;
    let img = image::open(&shot).expect("chromium wrote the screenshot");
    assert_eq!((img.width(), img.height()), (1280, 760));
    eprintln!(
        "chromium: options page {:.1?}, job through the page and screenshot {:.1?} (screenshot: {})",
        t1,
        t0.elapsed() - t1,
        shot.display()
    );
    server.shutdown().await.unwrap();
}

/// Writes `docs/serve-page.png` (the README's screenshot): the page on the tiny SUPIR fixture
/// model (random weights: its output is not a restoration) after `/#selftest`.
/// `cargo test -p supir-server --test browser -- --ignored readme_screenshot`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "rewrites docs/serve-page.png"]
async fn readme_screenshot_on_the_tiny_supir_model() {
    use supir::models::supir_config::SupirConfig;
    use supir::pipelines::supir::restore::{Preset, RestoreOptions};
    use supir_server::{ModelConfig, SupirSetup};
    let Some(bin) = chromium() else {
        eprintln!("SKIPPED: no chromium found");
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("fixtures/supir-tiny");
    let mut defaults = RestoreOptions::preset(Preset::Default);
    defaults.steps = 4;
    defaults.min_size = 64;
    defaults.seed = 7;
    let model = ModelConfig::Supir(Box::new(SupirSetup {
        config: SupirConfig::load(dir.join("config.yaml")).unwrap(),
        checkpoints: vec![dir.join("weights.safetensors")],
        description: "tiny fixture".into(),
        preset: Preset::Default,
        defaults,
        random_seed: false,
    }));
    let server = Server::start(Config {
        port: 0,
        model,
        ..Config::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.addr());
    let shot = root.join("docs/serve-page.png");
    run_chromium(
        &bin,
        &format!("{base}/#selftest"),
        &[
            "--virtual-time-budget=20000".into(),
            format!("--screenshot={}", shot.display()),
        ],
        Duration::from_secs(300),
    )
    .await;
    eprintln!("wrote {}", shot.display());
    server.shutdown().await.unwrap();
}
