//! The HTTP API on the embedded Real-ESRGAN, over loopback: results, progress events, cancel,
//! limits, errors, token and a small concurrency check. Each test starts its own server on a
//! free port.

mod common;

use std::time::{Duration, Instant};

use common::{post, start, status};
use image::{DynamicImage, ImageBuffer, Rgb};
use reqwest::multipart::{Form, Part};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use supir_server::Config;

fn gradient(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x * 7 + y * 13) % 256) as u8,
        ])
    }))
}

fn png(img: &DynamicImage) -> Vec<u8> {
    let mut v = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut v), image::ImageFormat::Png)
        .unwrap();
    v
}

fn form(bytes: Vec<u8>, options: Option<Value>) -> Form {
    let f = Form::new().part("image", Part::bytes(bytes).file_name("my photo.png"));
    match options {
        Some(o) => f.text("options", o.to_string()),
        None => f,
    }
}

/// A job of many tiny tiles: runs for seconds, stops at the next tile when canceled.
fn long_job() -> Form {
    form(
        png(&gradient(192, 192)),
        Some(json!({"tile": 4, "tile_pad": 0, "outscale": 1})),
    )
}

/// Polls the job until `pred` holds (panics after 60 s).
async fn wait_for(c: &Client, base: &str, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    common::wait_within(c, base, id, Duration::from_secs(60), pred).await
}

fn running_with_progress(v: &Value) -> bool {
    v["status"] == "processing" && v["progress"]["step"].as_u64().unwrap_or(0) >= 1
}

/// Reads an SSE response to its end: `(id, event, data)` per event.
async fn read_sse(mut r: reqwest::Response) -> Vec<(u64, String, Value)> {
    let mut buf = String::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), r.chunk())
        .await
        .expect("SSE stalled")
        .unwrap()
    {
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    buf.split("\n\n")
        .filter_map(|block| {
            let (mut id, mut ev, mut data) = (None, String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            Some((id?, ev, serde_json::from_str(&data).unwrap()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_result_matches_the_library_with_metadata_and_events() {
    let (server, base) = start(Config::default()).await;
    let c = Client::new();
    let input = gradient(16, 12);
    let opts = json!({"outscale": 2, "tile": 8, "tile-pad": 4});
    let (s, v) = post(&c, &base, form(png(&input), Some(opts))).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["status"], "queued");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["urls"]["result"], format!("/v1/jobs/{id}/result"));
    let done = wait_for(&c, &base, &id, |v| {
        v["status"] != "queued" && v["status"] != "processing"
    })
    .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["options"]["tile_pad"], 4);
    assert_eq!(done["progress"]["steps"], 4);
    assert_eq!(done["progress"]["fraction"], 1.0);

    let r = c
        .get(format!("{base}/v1/jobs/{id}/result"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"myphoto-realesrgan.png\""
    );
    let bytes = r.bytes().await.unwrap();
    let got = image::load_from_memory(&bytes).unwrap();
    // The library call `supir restore` makes with the same options.
    let model =
        supir::pipelines::realesrgan::RealEsrgan::embedded(&candle_core::Device::Cpu).unwrap();
    let o = supir::pipelines::realesrgan::UpscaleOptions {
        tiling: supir::pipelines::realesrgan::Tiling { tile: 8, pad: 4 },
        outscale: 2.0,
        alpha: Default::default(),
    };
    let want = model.upscale_image(&input, &o, &mut || {}).unwrap();
    assert_eq!(got.color(), want.color());
    assert_eq!(got, want, "server result differs from the library's");
    let reader = png::Decoder::new(std::io::Cursor::new(bytes.as_ref()))
        .read_info()
        .unwrap();
    let text: Vec<(String, String)> = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    assert!(
        text.contains(&("supir:backend".into(), "realesrgan".into())),
        "{text:?}"
    );
    let o: Value =
        serde_json::from_str(&text.iter().find(|t| t.0 == "supir:options").unwrap().1).unwrap();
    assert_eq!(o["outscale"], 2.0);

    // Events: full history of a finished job, then a replay after Last-Event-ID.
    let evs = read_sse(
        c.get(format!("{base}/v1/jobs/{id}/events"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let names: Vec<&str> = evs.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.first(), Some(&"queued"));
    assert_eq!(names.last(), Some(&"succeeded"));
    assert!(
        names.iter().filter(|n| **n == "progress").count() >= 4,
        "{names:?}"
    );
    let ids: Vec<u64> = evs.iter().map(|e| e.0).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    let replay = read_sse(
        c.get(format!("{base}/v1/jobs/{id}/events"))
            .header("Last-Event-ID", "3")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(replay.first().map(|e| e.0), Some(4));
    assert_eq!(replay.len(), evs.len() - 3);

    let stopped = server.shutdown().await.unwrap();
    assert_eq!(stopped.canceled_running, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_queued_and_a_running_job() {
    let (server, base) = start(Config::default()).await;
    let temp = server.temp_dir().to_path_buf();
    let c = Client::new();
    let (_, a) = post(&c, &base, long_job()).await;
    let a = a["id"].as_str().unwrap().to_string();
    let (_, b) = post(&c, &base, form(png(&gradient(8, 8)), None)).await;
    let b = b["id"].as_str().unwrap().to_string();
    let events = c
        .get(format!("{base}/v1/jobs/{a}/events"))
        .send()
        .await
        .unwrap();
    wait_for(&c, &base, &a, running_with_progress).await;
    let q = status(&c, &base, &b).await;
    assert_eq!(q["status"], "queued");
    assert_eq!(q["queue_position"], 0);

    let r = c
        .post(format!("{base}/v1/jobs/{b}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "canceled");

    let t = Instant::now();
    let r: Value = c
        .post(format!("{base}/v1/jobs/{a}/cancel"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["cancel_requested"], true);
    let done = wait_for(&c, &base, &a, |v| v["status"] == "canceled").await;
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "cancel took {:?}",
        t.elapsed()
    );
    let steps = done["progress"]["steps"].as_u64().unwrap();
    assert_eq!(steps, 48 * 48);
    assert!(done["progress"]["step"].as_u64().unwrap() < steps);
    let evs = read_sse(events).await;
    assert_eq!(evs.last().unwrap().1, "canceled");

    for id in [&a, &b] {
        let r = c
            .get(format!("{base}/v1/jobs/{id}/result"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT);
    }
    // B never ran: the worker goes on with the next job.
    let (_, d) = post(
        &c,
        &base,
        form(png(&gradient(8, 8)), Some(json!({"tile": 0}))),
    )
    .await;
    let d = d["id"].as_str().unwrap().to_string();
    let v = wait_for(&c, &base, &d, |v| {
        v["status"] == "succeeded" || v["status"] == "failed"
    })
    .await;
    assert_eq!(v["status"], "succeeded", "{v}");
    server.shutdown().await.unwrap();
    assert!(!temp.exists(), "temporary folder left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_errors_full_queue_and_shutdown() {
    let cfg = Config {
        queue: 1,
        max_upload_bytes: 256 << 10,
        max_pixels: 192 * 192,
        ..Config::default()
    };
    let (server, base) = start(cfg).await;
    let temp = server.temp_dir().to_path_buf();
    let c = Client::new();
    let err = |v: &Value| v["error"].as_str().unwrap_or_default().to_string();

    let (s, v) = post(&c, &base, form(b"this is not an image".to_vec(), None)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&v).contains("not an image"), "{v}");
    let mut truncated = png(&gradient(16, 16));
    truncated.truncate(20);
    let (s, _) = post(&c, &base, form(truncated, None)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let small = png(&gradient(8, 8));
    let (s, v) = post(
        &c,
        &base,
        form(small.clone(), Some(json!({"outscale": -1}))),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(err(&v), "--outscale -1: must be a positive number");
    let (s, v) = post(&c, &base, form(small.clone(), Some(json!({"steps": 3})))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&v).contains("unknown field `steps`"), "{v}");
    let (s, v) = post(&c, &base, Form::new().text("options", "{}")).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err(&v).contains("no `image`"), "{v}");
    let r = c
        .post(format!("{base}/v1/jobs"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());

    let big: Vec<u8> = (0..400u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let (s, v) = post(&c, &base, form(big, None)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    let (s, v) = post(&c, &base, form(png(&gradient(200, 200)), None)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(err(&v).contains("--max-pixels"), "{v}");
    let (s, v) = post(
        &c,
        &base,
        form(png(&gradient(192, 192)), Some(json!({"outscale": 8}))),
    )
    .await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(err(&v).contains("output pixels"), "{v}");

    for id in ["0123456789abcdef", "nope", "..%2F..%2Fetc"] {
        let r = c.get(format!("{base}/v1/jobs/{id}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }
    let r = c
        .post(format!("{base}/v1/jobs/0123456789abcdef/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c.get(format!("{base}/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // Full queue: one running, one waiting (--queue 1), the next refused.
    let (_, a) = post(&c, &base, long_job()).await;
    let a = a["id"].as_str().unwrap().to_string();
    wait_for(&c, &base, &a, running_with_progress).await;
    let (s, _) = post(&c, &base, form(small.clone(), None)).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let r = c
        .post(format!("{base}/v1/jobs"))
        .multipart(form(small.clone(), None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "10");
    let h: Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "busy");
    assert_eq!(h["queued"], 1);
    // Refused uploads leave nothing behind: only the running job's input is there.
    let files = std::fs::read_dir(&temp).unwrap().count();
    assert!(files <= 2, "{files} files in the temporary folder");

    let stopped = server.shutdown().await.unwrap();
    assert_eq!(stopped.canceled_running.as_deref(), Some(a.as_str()));
    assert_eq!(stopped.canceled_queued, 1);
    assert!(!temp.exists());
    assert!(
        c.get(format!("{base}/health")).send().await.is_err(),
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_origin_openapi_and_page() {
    let cfg = Config {
        token: Some("s3cret".into()),
        ..Config::default()
    };
    let (server, base) = start(cfg).await;
    let c = Client::new();
    let r = c.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("token"));
    let r = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .post(format!("{base}/v1/jobs"))
        .multipart(form(png(&gradient(8, 8)), None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let m: Value = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["models"][0]["name"], "realesrgan");
    assert_eq!(m["models"][0]["defaults"]["tile"], 384);
    // Cross-site POST refused even with the token.
    let r = c
        .post(format!("{base}/v1/jobs"))
        .bearer_auth("s3cret")
        .header("Origin", "http://evil.example")
        .multipart(form(png(&gradient(8, 8)), None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Same-origin POST accepted.
    let r = c
        .post(format!("{base}/v1/jobs"))
        .bearer_auth("s3cret")
        .header("Origin", base.as_str())
        .multipart(form(png(&gradient(8, 8)), Some(json!({"tile": 0}))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // DNS rebinding: a loopback server answers only requests naming the loopback.
    let r = c
        .get(format!("{base}/v1/models"))
        .bearer_auth("s3cret")
        .header("Host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    let doc: Value = c
        .get(format!("{base}/openapi.json"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for p in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/result",
        "/v1/jobs/{id}/cancel",
        "/health",
        "/v1/models",
    ] {
        assert!(
            doc["paths"][p].is_object(),
            "{p} missing from /openapi.json"
        );
    }
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["RealEsrganJobOptions"]["properties"]["tile_pad"].is_object());
    assert!(schemas["SupirJobOptions"]["properties"]["cfg"].is_object());
    assert!(schemas["SeesrJobOptions"]["properties"]["process_size"].is_object());
    assert!(
        schemas["JobOptions"]["oneOf"].is_array(),
        "{}",
        schemas["JobOptions"]
    );
    for page in ["/", "/docs"] {
        let r = c.get(format!("{base}{page}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let html = r.text().await.unwrap();
        assert!(
            html.contains("<html") && !html.contains("http://cdn"),
            "{page}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_are_all_answered() {
    let (server, base) = start(Config::default()).await;
    let c = Client::new();
    let (_, a) = post(&c, &base, long_job()).await;
    let id = a["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..8 {
        let (base, id) = (base.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let c = Client::new();
            let mut ok = 0;
            for i in 0..5 {
                let url = match (client + i) % 3 {
                    0 => format!("{base}/health"),
                    1 => format!("{base}/v1/jobs/{id}"),
                    _ => format!("{base}/v1/models"),
                };
                let r = tokio::time::timeout(Duration::from_secs(20), c.get(url).send())
                    .await
                    .expect("request not answered in 20 s")
                    .unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                let _: Value = r.json().await.unwrap();
                ok += 1;
            }
            ok
        }));
    }
    let mut answered = 0;
    for t in tasks {
        answered += t.await.unwrap();
    }
    assert_eq!(answered, 40);
    assert!(t.elapsed() < Duration::from_secs(30));
    let h: Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        ["loading", "busy", "ready"].contains(&h["status"].as_str().unwrap()),
        "{h}"
    );
    let stopped = server.shutdown().await.unwrap();
    assert!(
        stopped.canceled_running.is_none()
            || stopped.canceled_running.as_deref() == Some(id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_results_are_deleted() {
    let cfg = Config {
        keep_max: 1,
        ..Config::default()
    };
    let (server, base) = start(cfg).await;
    let temp = server.temp_dir().to_path_buf();
    let c = Client::new();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, v) = post(
            &c,
            &base,
            form(png(&gradient(8, 8)), Some(json!({"tile": 0}))),
        )
        .await;
        let id = v["id"].as_str().unwrap().to_string();
        let v = wait_for(&c, &base, &id, |v| {
            v["status"] == "succeeded" || v["status"] == "failed"
        })
        .await;
        assert_eq!(v["status"], "succeeded", "{v}");
        ids.push(id);
    }
    assert!(temp.join(format!("{}.png", ids[0])).exists());
    // Pruned at the next submission: only the newest finished job is kept.
    let (s, _) = post(
        &c,
        &base,
        form(png(&gradient(8, 8)), Some(json!({"tile": 0}))),
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let r = c
        .get(format!("{base}/v1/jobs/{}", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(!temp.join(format!("{}.png", ids[0])).exists());
    let r = c
        .get(format!("{base}/v1/jobs/{}/result", ids[1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    server.shutdown().await.unwrap();
}

/// Random, truncated and mutated uploads and options: always a JSON answer (202, 400 or 413),
/// never a 5xx, and every accepted job ends (succeeded or failed). 150 uploads + 60 options.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_uploads_and_options_never_break_the_server() {
    let cfg = Config {
        queue: 256,
        ..Config::default()
    };
    let (server, base) = start(cfg).await;
    let c = Client::new();
    let valid = png(&gradient(6, 5));
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut accepted = Vec::new();
    for i in 0..150 {
        let mut b = valid.clone();
        match i % 3 {
            0 => b.truncate(rnd() as usize % b.len()),
            1 => {
                for _ in 0..1 + rnd() % 8 {
                    let at = rnd() as usize % b.len();
                    b[at] = rnd() as u8;
                }
            }
            _ => b = (0..rnd() % 300).map(|_| rnd() as u8).collect(),
        }
        let (s, v) = post(&c, &base, form(b, Some(json!({"tile": 0})))).await;
        assert!(
            [StatusCode::ACCEPTED, StatusCode::BAD_REQUEST].contains(&s),
            "upload {i}: {s} {v}"
        );
        assert!(v["error"].is_string() || v["id"].is_string(), "{v}");
        if s == StatusCode::ACCEPTED {
            accepted.push(v["id"].as_str().unwrap().to_string());
        }
    }
    let fields = ["outscale", "tile", "tile_pad", "alpha", "seed", ""];
    let values = [
        json!(-1),
        json!(1e308),
        json!("x"),
        json!(null),
        json!([1]),
        json!(2),
        json!(u64::MAX),
    ];
    for i in 0..60 {
        let opts = if i % 4 == 0 {
            // Not JSON at all, or truncated JSON.
            let s = r#"{"outscale": 2, "tile": 16}"#;
            s[..rnd() as usize % s.len()].to_string()
        } else {
            let f = fields[rnd() as usize % fields.len()];
            let v = &values[rnd() as usize % values.len()];
            json!({ f: v, "tile": 0 }).to_string()
        };
        let f = Form::new()
            .part("image", Part::bytes(valid.clone()).file_name("x.png"))
            .text("options", opts.clone());
        let (s, v) = post(&c, &base, f).await;
        assert!(
            [StatusCode::ACCEPTED, StatusCode::BAD_REQUEST].contains(&s),
            "options {opts}: {s} {v}"
        );
        if s == StatusCode::ACCEPTED {
            accepted.push(v["id"].as_str().unwrap().to_string());
        }
    }
    for id in &accepted {
        let v = wait_for(&c, &base, id, |v| {
            v["status"] == "succeeded" || v["status"] == "failed"
        })
        .await;
        if v["status"] == "failed" {
            assert!(v["error"].is_string(), "{v}");
            assert!(
                !v["error"]
                    .as_str()
                    .unwrap()
                    .contains(std::env::temp_dir().to_str().unwrap()),
                "server path leaked: {v}"
            );
        }
    }
    let h: Value = c
        .get(format!("{base}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["status"], "ready");
    server.shutdown().await.unwrap();
}
