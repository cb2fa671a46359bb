//! Helpers shared by the server's integration tests: a server on a free loopback port, job
//! submission and polling.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use reqwest::multipart::Form;
use reqwest::{Client, StatusCode};
use serde_json::Value;
use supir_server::{Config, Server};

/// Starts `cfg` on a free port of 127.0.0.1; returns the server and its base URL.
pub async fn start(cfg: Config) -> (Server, String) {
    let server = Server::start(Config { port: 0, ..cfg }).await.unwrap();
    let base = format!("http://{}", server.addr());
    (server, base)
}

/// `POST /v1/jobs` with the form; the status and the JSON answer.
pub async fn post(c: &Client, base: &str, f: Form) -> (StatusCode, Value) {
    let r = c
        .post(format!("{base}/v1/jobs"))
        .multipart(f)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap())
}

/// `GET /v1/jobs/{id}`.
pub async fn status(c: &Client, base: &str, id: &str) -> Value {
    c.get(format!("{base}/v1/jobs/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls the job until `pred` holds; panics after `limit`.
pub async fn wait_within(
    c: &Client,
    base: &str,
    id: &str,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let v = status(c, base, id).await;
        if pred(&v) {
            return v;
        }
        assert!(t.elapsed() < limit, "job {id} stuck: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
