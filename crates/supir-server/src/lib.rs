//! `supir serve`: an HTTP API and a web page over one loaded backend.
//!
//! Thin on purpose: the queue, job states, progress events and cancellation are
//! [`supir::jobs`]; this crate maps them to HTTP (axum), streams uploads to a server-owned
//! temporary folder, and runs one worker thread that takes the jobs in order.

pub mod api;
pub mod engine;
pub mod job_options;
pub mod png_meta;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use supir::jobs::{JobId, JobQueue};

pub use job_options::{
    AlphaChoice, Backend, ModelConfig, RealEsrganResolved, ResolvedOptions, SeesrSetup, SupirSetup,
};

use api::AppState;
use engine::{EngineState, Payload};

/// Everything `supir serve` is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub host: IpAddr,
    /// 0: any free port (see [`Server::addr`]).
    pub port: u16,
    /// Required as `Authorization: Bearer <token>` on the API when set.
    pub token: Option<String>,
    pub max_upload_bytes: usize,
    /// Largest input image, in pixels.
    pub max_pixels: u64,
    /// Jobs that may wait (the running one not counted).
    pub queue: usize,
    /// Results are deleted this long after their job ended...
    pub keep_for: Duration,
    /// ... or when more jobs than this have ended since.
    pub keep_max: usize,
    /// The one origin allowed cross-origin requests (CORS), if any.
    pub cors: Option<String>,
    /// The backend to load, its weights and the options of jobs that give none.
    pub model: ModelConfig,
    /// Where the server's temporary folder is made (the system's by default).
    pub temp_root: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8420,
            token: None,
            max_upload_bytes: 64 << 20,
            max_pixels: 16 << 20,
            queue: 16,
            keep_for: Duration::from_secs(3600),
            keep_max: 100,
            cors: None,
            model: ModelConfig::default(),
            temp_root: None,
        }
    }
}

/// What [`Server::shutdown`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// The job that was running, canceled at its next step or tile.
    pub canceled_running: Option<String>,
    /// Queued jobs dropped.
    pub canceled_queued: usize,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop_http: tokio::sync::oneshot::Sender<()>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    worker: std::thread::JoinHandle<()>,
    pruner: tokio::task::JoinHandle<()>,
    temp: tempfile::TempDir,
}

/// The routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let mut r = Router::new()
        .route("/", get(api::index))
        .route("/docs", get(api::docs))
        .route("/health", get(api::health))
        .route("/openapi.json", get(api::openapi))
        .route("/v1/models", get(api::models))
        .route("/v1/jobs", post(api::create_job))
        .route("/v1/jobs/{id}", get(api::get_job))
        .route("/v1/jobs/{id}/events", get(api::job_events))
        .route("/v1/jobs/{id}/result", get(api::job_result))
        .route("/v1/jobs/{id}/cancel", post(api::cancel_job))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::require_token,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            api::same_origin,
        ))
        .layer(DefaultBodyLimit::max(state.cfg.max_upload_bytes))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                api::ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error",
                )
                .into_response()
            },
        ));
    if let Some(origin) = &state.cfg.cors {
        if let Ok(o) = origin.parse::<axum::http::HeaderValue>() {
            use axum::http::{header, Method};
            r = r.layer(
                tower_http::cors::CorsLayer::new()
                    .allow_origin(o)
                    .allow_methods([Method::GET, Method::POST])
                    .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                    .expose_headers([header::CONTENT_DISPOSITION, header::RETRY_AFTER]),
            );
        }
    }
    r.with_state(state)
}

impl Server {
    /// Binds, starts the worker (which loads the backend) and serves. Must run in a tokio
    /// runtime.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        if let Some(o) = &cfg.cors {
            o.parse::<axum::http::HeaderValue>()
                .with_context(|| format!("--cors {o:?}: not a valid origin"))?;
        }
        cfg.model.validate().map_err(anyhow::Error::msg)?;
        let defaults = cfg.model.defaults_view().map_err(anyhow::Error::msg)?;
        let mut tb = tempfile::Builder::new();
        tb.prefix("supir-serve-");
        let temp = match &cfg.temp_root {
            Some(root) => tb.tempdir_in(root),
            None => tb.tempdir(),
        }
        .context("creating the server's temporary folder")?;
        let listener = tokio::net::TcpListener::bind((cfg.host, cfg.port))
            .await
            .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?;
        let addr = listener.local_addr()?;
        let queue = Arc::new(JobQueue::<Payload>::new(cfg.queue));
        let engine = Arc::new(Mutex::new(EngineState::Loading));
        let state = Arc::new(AppState {
            backend: cfg.model.backend(),
            description: cfg.model.description(),
            defaults,
            queue: queue.clone(),
            records: Mutex::new(Default::default()),
            dir: temp.path().to_path_buf(),
            engine: engine.clone(),
            uploads: Default::default(),
            receiving: Arc::new(tokio::sync::Semaphore::new(api::MAX_CONCURRENT_UPLOADS)),
            cfg,
        });
        let worker = {
            let (queue, dir, model) = (queue.clone(), state.dir.clone(), state.cfg.model.clone());
            std::thread::Builder::new()
                .name("supir-worker".into())
                .spawn(move || engine::worker(model, queue, dir, engine))
                .context("starting the worker thread")?
        };
        let pruner = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    prune(&state);
                }
            })
        };
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(state.clone());
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    stopped.await.ok();
                })
                .await
        });
        Ok(Server {
            addr,
            state,
            stop_http,
            http,
            worker,
            pruner,
            temp,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's temporary folder (uploads and results).
    pub fn temp_dir(&self) -> &std::path::Path {
        self.temp.path()
    }

    /// Stops taking jobs, cancels the queued ones and the running one (at its next step or
    /// tile), waits for the worker and the open connections (a few seconds at most), and
    /// removes the temporary folder.
    pub async fn shutdown(self) -> anyhow::Result<Stopped> {
        let (dropped, running) = self.state.queue.close();
        for (_, p) in &dropped {
            std::fs::remove_file(&p.input).ok();
        }
        self.stop_http.send(()).ok();
        self.pruner.abort();
        let mut http = self.http;
        if tokio::time::timeout(Duration::from_secs(5), &mut http)
            .await
            .is_err()
        {
            http.abort();
        }
        let worker = self.worker;
        tokio::task::spawn_blocking(move || worker.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the worker thread panicked"))?;
        self.temp
            .close()
            .context("removing the server's temporary folder")?;
        Ok(Stopped {
            canceled_running: running.map(|id| id.to_string()),
            canceled_queued: dropped.len(),
        })
    }
}

/// Forgets expired jobs and deletes their files.
pub(crate) fn prune(state: &AppState) {
    let gone: Vec<JobId> = state.queue.prune(state.cfg.keep_for, state.cfg.keep_max);
    if gone.is_empty() {
        return;
    }
    let mut recs = state.records.lock().unwrap_or_else(|e| e.into_inner());
    for id in gone {
        recs.remove(&id);
        std::fs::remove_file(engine::result_path(&state.dir, &id)).ok();
    }
}

/// `supir serve`: starts the server, prints its URL, serves until Ctrl-C, then stops.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        if !cfg.host.is_loopback() && cfg.token.is_none() {
            eprintln!(
                "warning: binding {} (beyond this machine) without --token: anyone who can reach it can run jobs",
                cfg.host
            );
        }
        let desc = cfg.model.description();
        let server = Server::start(cfg).await?;
        let addr = server.addr();
        let host = if addr.ip().is_ipv6() {
            format!("[{}]", addr.ip())
        } else {
            addr.ip().to_string()
        };
        println!("supir serve: http://{host}:{}/ ({desc}); Ctrl-C stops", addr.port());
        eprintln!("API: http://{host}:{}/docs", addr.port());
        stop_signal().await?;
        eprintln!("stopping: no new jobs (Ctrl-C again to quit at once)");
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("quitting without waiting");
                std::process::exit(130);
            }
        });
        let stopped = server.shutdown().await?;
        match &stopped.canceled_running {
            Some(id) => eprintln!("canceled the running job {id}"),
            None => eprintln!("no job was running"),
        }
        if stopped.canceled_queued > 0 {
            eprintln!("dropped {} queued jobs", stopped.canceled_queued);
        }
        eprintln!("removed the temporary files; bye");
        Ok(())
    })
}

/// Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
