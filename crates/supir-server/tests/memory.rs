//! Bounded memory under concurrent uploads (issue 14, item 3): 32 clients each upload a 24 MB
//! image at once to a server with `--queue 4` whose worker is busy. The overflow is answered
//! `429` with `Retry-After`, the accepted uploads lie whole in the server's temporary folder
//! (streamed there, not held in memory), and the process's resident set grows by far less than
//! the bytes in flight. Its own test binary, so no other test's allocations mix into the RSS.

use std::time::{Duration, Instant};

use axum::body::Bytes;
use reqwest::multipart::{Form, Part};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use supir_server::{Config, Server};

/// Resident set of this process (the server runs in it), in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut v = (data.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(kind);
    v.extend_from_slice(data);
    let mut c = !0u32;
    for &x in kind.iter().chain(data) {
        c ^= x as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    v.extend_from_slice(&(!c).to_be_bytes());
    v
}

/// A 16 x 12 PNG made `size` bytes long by a private ancillary chunk after its header (which
/// decoders skip): a big upload that is a quick job.
fn padded_png(size: usize) -> Vec<u8> {
    let img = image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(16, 12, |x, y| {
        image::Rgb([(x * 15) as u8, (y * 20) as u8, 128])
    }));
    let mut small = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut small),
        image::ImageFormat::Png,
    )
    .unwrap();
    // Signature (8) + IHDR (25), then the padding chunk, then the rest.
    let pad = size - small.len() - 12;
    let mut filler = vec![0u8; pad];
    let mut x = 0x2545_F491u32;
    for b in filler.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let mut v = small[..33].to_vec();
    v.extend(png_chunk(b"prVt", &filler));
    v.extend_from_slice(&small[33..]);
    assert_eq!(v.len(), size);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_uploads_stream_to_disk_and_overflow_gets_429() {
    const CLIENTS: usize = 32;
    const SIZE: usize = 24 << 20;
    let server = Server::start(Config {
        port: 0,
        queue: 4,
        ..Config::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.addr());
    let c = Client::new();
    // The worker busy on a long job of many tiny tiles, so the queue only fills.
    let long = {
        let img = image::DynamicImage::ImageRgb8(image::ImageBuffer::from_fn(192, 192, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        }));
        let mut b = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
            .unwrap();
        Form::new()
            .part("image", Part::bytes(b).file_name("long.png"))
            .text(
                "options",
                json!({"tile": 4, "tile_pad": 0, "outscale": 1}).to_string(),
            )
    };
    let r: Value = c
        .post(format!("{base}/v1/jobs"))
        .multipart(long)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let long_id = r["id"].as_str().expect("long job accepted").to_string();
    let t = Instant::now();
    loop {
        let v: Value = c
            .get(format!("{base}/v1/jobs/{long_id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "processing" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "long job not started: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // One shared buffer for every client's body: the client side adds no copies to the RSS.
    let body = Bytes::from(padded_png(SIZE));
    let before = rss();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let t = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (base, body) = (base.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let part = Part::stream_with_length(reqwest::Body::from(body), SIZE as u64)
                .file_name(format!("big{i}.png"));
            let r = tokio::time::timeout(
                Duration::from_secs(60),
                Client::new()
                    .post(format!("{base}/v1/jobs"))
                    .multipart(Form::new().part("image", part))
                    .send(),
            )
            .await
            .expect("answered within 60 s")
            .expect("the server answers");
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let s = r.status();
            let v: Value = r.json().await.unwrap();
            (s, retry, v)
        }));
    }
    let mut accepted = Vec::new();
    let (mut busy, mut full) = (0, 0);
    for task in tasks {
        let (s, retry, v) = task.await.unwrap();
        match s {
            StatusCode::ACCEPTED => accepted.push(v["id"].as_str().unwrap().to_string()),
            StatusCode::TOO_MANY_REQUESTS => {
                let secs: u64 = retry
                    .as_deref()
                    .and_then(|r| r.parse().ok())
                    .unwrap_or_else(|| panic!("429 without Retry-After: {v}"));
                assert!(secs >= 1, "{v}");
                let e = v["error"].as_str().unwrap();
                if e.contains("queue is full") {
                    full += 1;
                } else {
                    assert!(e.contains("being received"), "{e}");
                    busy += 1;
                }
            }
            s => panic!("unexpected {s}: {v}"),
        }
    }
    let elapsed = t.elapsed();
    // Once the queue is full, a later upload is refused for that reason.
    let late = Part::stream_with_length(reqwest::Body::from(body.clone()), SIZE as u64)
        .file_name("late.png");
    let r = c
        .post(format!("{base}/v1/jobs"))
        .multipart(Form::new().part("image", late))
        .send()
        .await
        .unwrap();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        accepted.len(),
        4,
        "the queue holds 4 ({busy} busy, {full} full)"
    );
    assert_eq!(busy + full, CLIENTS - 4);
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("queue is full"),
        "{e}"
    );

    // The queued uploads are on disk, whole.
    let on_disk: Vec<u64> = std::fs::read_dir(server.temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("upload-"))
        .map(|e| e.metadata().unwrap().len())
        .collect();
    // (and the running long job's small one).
    let big = on_disk.iter().filter(|&&n| n == SIZE as u64).count();
    assert!(
        big == 4 && on_disk.len() == 5,
        "uploads in the temp folder: {on_disk:?}"
    );

    // Bytes in flight: 32 x 24 MB. Buffering only the 4 accepted uploads whole would add
    // 96 MB (and the refused ones 672 MB more). Streamed, what grows is per connection (the
    // client's and the server's socket buffers, ~1.3 MB each here, the same with 2 MB or 24 MB
    // uploads): about 40 MB for 33 connections.
    let growth = peak.saturating_sub(before);
    eprintln!(
        "{CLIENTS} x {} MB uploads in {elapsed:.1?}: 4 queued, {busy} refused while 4 were being received, {full} refused with the queue full; RSS {} MB before, peak growth {:.1} MB",
        SIZE >> 20,
        before >> 20,
        growth as f64 / (1 << 20) as f64
    );
    assert!(
        growth < 4 * SIZE as u64,
        "RSS grew by {growth} bytes during the uploads (bound: {})",
        4 * SIZE
    );

    // The long job canceled, the four quick ones run and succeed.
    c.post(format!("{base}/v1/jobs/{long_id}/cancel"))
        .send()
        .await
        .unwrap();
    for id in &accepted {
        let t = Instant::now();
        loop {
            let v: Value = c
                .get(format!("{base}/v1/jobs/{id}"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["status"] == "succeeded" {
                break;
            }
            assert!(
                !["failed", "canceled"].contains(&v["status"].as_str().unwrap()),
                "{v}"
            );
            assert!(t.elapsed() < Duration::from_secs(60), "{v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    server.shutdown().await.unwrap();
}
