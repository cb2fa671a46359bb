//! The web page in a real browser: headless Chromium (Debian's `chromium`, which `.ci/run`
//! installs) opens the page of a server on the embedded Real-ESRGAN, runs its JavaScript
//! (`--virtual-time-budget`, then `--dump-dom`) and the DOM is checked: the option fields of the
//! backend that `/v1/models` names, with its defaults; then `/#selftest` submits a generated
//! picture through the page's own upload path (FormData -> POST /v1/jobs -> the SSE progress ->
//! the result fetched into the compare view), and the DOM must show the finished job and its
//! result. A screenshot of that page is kept as a test artifact.
//!
//! A second test drives Chromium over the DevTools protocol as a person would: a file chosen in
//! the file picker and a file dropped on the drop zone.
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

/// Headless Chromium at 1280 x 760 with its own profile folder.
fn chromium_command(bin: &PathBuf, profile: &std::path::Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1280,760",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Waits until `/health` no longer says `loading` (the worker has the model).
async fn wait_until_loaded(base: &str) {
    let t0 = Instant::now();
    loop {
        let h: Value = reqwest::get(format!("{base}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["status"] != "loading" {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "model not loaded: {h}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs headless Chromium on `url` with `extra` flags; returns its stdout (the DOM with
/// `--dump-dom`). Killed after `limit`.
async fn run_chromium(bin: &PathBuf, url: &str, extra: &[String], limit: Duration) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = chromium_command(bin, profile.path())
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
    wait_until_loaded(&base).await;
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
        captioner: None,
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

/// A minimal Chrome DevTools Protocol client: one WebSocket to the browser, commands sent to
/// one page session (`Target.attachToTarget` with `flatten`), events skipped.
mod cdp {
    use std::net::TcpStream;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use tungstenite::stream::MaybeTlsStream;
    use tungstenite::{Message, WebSocket};

    pub struct Cdp {
        ws: WebSocket<MaybeTlsStream<TcpStream>>,
        next: u64,
        session: Option<String>,
    }

    /// The DevTools port Chromium wrote into its profile (`--remote-debugging-port=0`).
    pub fn browser_url(profile: &Path, limit: Duration) -> String {
        let file = profile.join("DevToolsActivePort");
        let t = Instant::now();
        loop {
            if let Ok(s) = std::fs::read_to_string(&file) {
                let mut lines = s.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(t.elapsed() < limit, "chromium wrote no {}", file.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    impl Cdp {
        pub fn connect(url: &str) -> Self {
            let (ws, _) = tungstenite::connect(url).expect("DevTools WebSocket");
            if let MaybeTlsStream::Plain(s) = ws.get_ref() {
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            }
            Self {
                ws,
                next: 0,
                session: None,
            }
        }

        /// Sends `method` and waits for its answer; a protocol error fails the test.
        pub fn call(&mut self, method: &str, params: Value) -> Value {
            self.next += 1;
            let id = self.next;
            let mut msg = json!({"id": id, "method": method, "params": params});
            if let Some(s) = &self.session {
                msg["sessionId"] = json!(s);
            }
            self.ws
                .send(Message::text(msg.to_string()))
                .expect("send to chromium");
            loop {
                let m = self.ws.read().expect("answer from chromium");
                let Message::Text(t) = m else { continue };
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["id"] == json!(id) {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }

        /// Opens `url` in a new page and sends later commands to it.
        pub fn open_page(&mut self, url: &str) {
            let t = self.call("Target.createTarget", json!({ "url": url }));
            let s = self.call(
                "Target.attachToTarget",
                json!({"targetId": t["targetId"], "flatten": true}),
            );
            self.session = Some(s["sessionId"].as_str().unwrap().to_string());
        }

        /// The value of a JavaScript expression (promises awaited).
        pub fn eval(&mut self, expr: &str) -> Value {
            let r = self.call(
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            );
            assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
            r["result"]["value"].clone()
        }

        /// Polls `expr` until it is truthy.
        pub fn wait_for(&mut self, expr: &str, limit: Duration) -> Value {
            let t = Instant::now();
            loop {
                let v = self.eval(expr);
                if !(v.is_null() || v == json!(false) || v == json!("")) {
                    return v;
                }
                assert!(t.elapsed() < limit, "timed out waiting for {expr}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        pub fn close(&mut self) {
            self.session = None;
            self.call("Browser.close", json!({}));
        }
    }
}

/// The upload paths a person uses: a file chosen in the page's file picker (the `<input
/// type=file>` given a file by `DOM.setFileInputFiles`, which fires its `change` event as the
/// dialog does) and a file dropped on the drop zone (`Input.dispatchDragEvent` with the file),
/// each to its result in the compare view, checked in the live DOM; a screenshot is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_picker_and_drop_upload_in_chromium() {
    use serde_json::json;
    let Some(bin) = chromium() else {
        eprintln!(
            "SKIPPED: no chromium found (set SUPIR_CHROMIUM or install Debian's `chromium`; .ci/run does)"
        );
        return;
    };
    let server = Server::start(Config {
        port: 0,
        ..Config::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.addr());
    let t0 = Instant::now();
    wait_until_loaded(&base).await;
    let dir = tempfile::tempdir().unwrap();
    let picked = dir.path().join("picked photo.png");
    let dropped = dir.path().join("dropped.png");
    image::RgbImage::from_fn(40, 28, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 9) as u8, 128])
    })
    .save(&picked)
    .unwrap();
    image::RgbImage::from_fn(24, 36, |x, y| {
        image::Rgb([200, (x * 10) as u8, (y * 7) as u8])
    })
    .save(&dropped)
    .unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut child = chromium_command(&bin, profile.path())
        .args(["--remote-debugging-port=0", "about:blank"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-page-file-picker.png");
    let profile_dir = profile.path().to_path_buf();
    let (picked_s, dropped_s) = (picked.display().to_string(), dropped.display().to_string());
    let shot_c = shot.clone();
    let checks = tokio::task::spawn_blocking(move || {
        let limit = Duration::from_secs(90);
        let mut c = cdp::Cdp::connect(&cdp::browser_url(&profile_dir, limit));
        c.open_page(&format!("{base}/"));
        c.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 760, "deviceScaleFactor": 1, "mobile": false}),
        );
        c.wait_for(
            "document.readyState === 'complete' && !!document.querySelector('#pick') && \
             document.body.textContent.includes('Options')",
            limit,
        );
        // 1. The file picker.
        let doc = c.call("DOM.getDocument", json!({"depth": 0}));
        let input = c.call(
            "DOM.querySelector",
            json!({"nodeId": doc["root"]["nodeId"], "selector": "#pick"}),
        );
        c.call(
            "DOM.setFileInputFiles",
            json!({"files": [picked_s], "nodeId": input["nodeId"]}),
        );
        let first = c.wait_for("document.body.dataset.lastJob", limit);
        let view = c.eval(
            "(async () => { const a = document.querySelector('.after'); \
             if (!a.complete) await new Promise((r) => a.onload = r); \
             return [a.naturalWidth, a.naturalHeight, getComputedStyle(a).visibility, \
             a.src.startsWith('blob:'), document.querySelector('#dl').download, \
             document.querySelector('#vinfo').textContent]; })()",
        );
        // 2. A file dropped on the drop zone.
        let r = c.eval(
            "(() => { const r = document.querySelector('#drop').getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; })()",
        );
        let (x, y) = (r[0].as_f64().unwrap(), r[1].as_f64().unwrap());
        c.eval("delete document.body.dataset.lastJob; 1");
        let data = json!({"items": [], "files": [dropped_s], "dragOperationsMask": 1});
        for kind in ["dragEnter", "dragOver", "drop"] {
            c.call(
                "Input.dispatchDragEvent",
                json!({"type": kind, "x": x, "y": y, "data": data}),
            );
        }
        let second = c.wait_for("document.body.dataset.lastJob", limit);
        let jobs = c.eval(
            "[...document.querySelectorAll('.job')].map((j) => [j.querySelector('.name').textContent, \
             j.querySelector('.st').className])",
        );
        let png = c.call("Page.captureScreenshot", json!({"format": "png"}));
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(&shot_c, bytes).unwrap();
        c.close();
        (first, view, second, jobs)
    })
    .await;
    child.kill().ok();
    child.wait().ok();
    let (first, view, second, jobs) = checks.expect("the DevTools session");
    assert_eq!(first, json!("succeeded with result"), "picked file's job");
    assert_eq!(view[0], json!(160), "x4 result in the compare view: {view}");
    assert_eq!(view[1], json!(112), "{view}");
    assert_eq!(view[2], json!("visible"), "{view}");
    assert_eq!(view[3], json!(true), "{view}");
    assert!(
        view[4].as_str().unwrap().starts_with("picked")
            && view[4].as_str().unwrap().ends_with("-realesrgan.png"),
        "the download names the picked file: {view}"
    );
    assert!(
        view[5]
            .as_str()
            .unwrap()
            .contains("picked photo.png · 40×28"),
        "{view}"
    );
    assert_eq!(second, json!("succeeded with result"), "dropped file's job");
    let names: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j[0].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"picked photo.png") && names.contains(&"dropped.png"),
        "both jobs are listed: {jobs}"
    );
    assert!(
        jobs.as_array()
            .unwrap()
            .iter()
            .all(|j| j[1].as_str().unwrap().contains("succeeded")),
        "{jobs}"
    );
    let img = image::open(&shot).expect("the screenshot");
    assert_eq!((img.width(), img.height()), (1280, 760));
    eprintln!(
        "chromium over DevTools: picked and dropped files restored in {:.1?} (screenshot: {})",
        t0.elapsed(),
        shot.display()
    );
    server.shutdown().await.unwrap();
}
