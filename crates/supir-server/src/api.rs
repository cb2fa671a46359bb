//! The HTTP API: handlers, their request/response types (the OpenAPI document is generated
//! from them), the error type and the security layers (token, Origin/Host).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use supir::jobs::{JobEvent, JobId, JobInfo, JobQueue, JobStatus, SubmitError};
use tokio::io::AsyncWriteExt;
use tokio_stream::{Stream, StreamExt};
use utoipa::{OpenApi, ToSchema};

use crate::engine::{
    result_path, AlphaChoice, Backend, EngineState, JobOptions, Payload, RealEsrganJobOptions,
    RealEsrganResolved, ResolvedOptions, SeesrJobOptions, SeesrResolved, SupirJobOptions,
    SupirResolved,
};
use crate::Config;

/// Largest `options` part accepted.
pub const MAX_OPTIONS_BYTES: usize = 16 << 10;
/// Seconds a client is asked to wait when the queue is full.
pub const RETRY_AFTER_S: u64 = 10;

/// What the handlers share.
pub struct AppState {
    pub cfg: Config,
    pub queue: Arc<JobQueue<Payload>>,
    pub records: Mutex<HashMap<JobId, Record>>,
    pub dir: PathBuf,
    pub engine: Arc<Mutex<EngineState>>,
    pub backend: Backend,
    /// The loaded model, in words.
    pub description: String,
    /// The options of a job that gives none.
    pub defaults: ResolvedOptions,
    pub uploads: AtomicU64,
    /// Uploads being received at once (each may hold up to `--max-upload-mb` on disk).
    pub receiving: Arc<tokio::sync::Semaphore>,
}

/// Uploads received at once, at most.
pub const MAX_CONCURRENT_UPLOADS: usize = 4;

/// What the server keeps about a job beside the queue's state.
#[derive(Debug, Clone)]
pub struct Record {
    pub options: ResolvedOptions,
    /// File name stem for the download (upload name reduced to `[A-Za-z0-9._-]`).
    pub name: String,
    pub width: u32,
    pub height: u32,
}

type Shared = Arc<AppState>;

/// An error answer: JSON `{"error": "..."}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    msg: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self {
            status,
            msg: msg.into(),
            retry_after: None,
        }
    }
    fn bad(msg: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, msg)
    }
    fn not_found(id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("no job {id:?}"))
    }
    fn internal(msg: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, msg.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(ErrorBody { error: self.msg })).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

/// A job's status.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusView {
    Queued,
    Processing,
    Succeeded,
    Failed,
    Canceled,
}

impl From<JobStatus> for StatusView {
    fn from(s: JobStatus) -> Self {
        match s {
            JobStatus::Queued => Self::Queued,
            JobStatus::Processing => Self::Processing,
            JobStatus::Succeeded => Self::Succeeded,
            JobStatus::Failed => Self::Failed,
            JobStatus::Canceled => Self::Canceled,
        }
    }
}

/// How far a job is: `step` of `steps` units of `stage` (tiles, sampler steps).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressView {
    pub stage: String,
    pub step: usize,
    pub steps: usize,
    pub fraction: f64,
    /// Seconds left (estimate).
    pub eta_s: Option<f64>,
}

impl From<supir::jobs::Progress> for ProgressView {
    fn from(p: supir::jobs::Progress) -> Self {
        Self {
            stage: p.stage,
            step: p.step,
            steps: p.steps,
            fraction: p.fraction,
            eta_s: p.eta_s,
        }
    }
}

/// Where to find a job's parts.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobUrls {
    #[serde(rename = "self")]
    pub this: String,
    pub events: String,
    pub result: String,
    pub cancel: String,
}

impl JobUrls {
    fn of(id: &JobId) -> Self {
        let base = format!("/v1/jobs/{id}");
        Self {
            events: format!("{base}/events"),
            result: format!("{base}/result"),
            cancel: format!("{base}/cancel"),
            this: base,
        }
    }
}

/// A job.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: StatusView,
    /// 0: runs next (only while queued).
    pub queue_position: Option<usize>,
    pub progress: Option<ProgressView>,
    /// The options as resolved (defaults filled in).
    pub options: Option<ResolvedOptions>,
    pub error: Option<String>,
    /// Cancellation was asked for; a processing job stops at its next step or tile.
    pub cancel_requested: bool,
    /// Input size in pixels.
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub urls: JobUrls,
}

fn view(info: JobInfo, rec: Option<&Record>) -> JobView {
    JobView {
        urls: JobUrls::of(&info.id),
        id: info.id.to_string(),
        status: info.status.into(),
        queue_position: info.queue_position,
        progress: info.progress.map(Into::into),
        options: rec.map(|r| r.options.clone()),
        error: info.error,
        cancel_requested: info.cancel_requested,
        width: rec.map(|r| r.width),
        height: rec.map(|r| r.height),
    }
}

impl AppState {
    fn job(&self, id: &str) -> Result<(JobId, JobView), ApiError> {
        let jid = JobId::parse(id).ok_or_else(|| ApiError::not_found(id))?;
        let info = self
            .queue
            .info(&jid)
            .ok_or_else(|| ApiError::not_found(id))?;
        let recs = self.records.lock().unwrap_or_else(|e| e.into_inner());
        Ok((jid.clone(), view(info, recs.get(&jid))))
    }
}

/// The form of `POST /v1/jobs`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct JobForm {
    /// The image file (PNG, JPEG, WebP, TIFF).
    #[schema(value_type = String, format = Binary)]
    pub image: Vec<u8>,
    /// JSON object of restore options named as the CLI's long flags, for the loaded backend
    /// (see `GET /v1/models`).
    pub options: Option<JobOptions>,
}

/// Queues a job.
#[utoipa::path(post, path = "/v1/jobs",
    request_body(content = JobForm, content_type = "multipart/form-data"),
    responses(
        (status = 202, description = "queued", body = JobView),
        (status = 400, description = "unreadable image or invalid option", body = ErrorBody),
        (status = 401, description = "missing or wrong token", body = ErrorBody),
        (status = 413, description = "upload or image too large", body = ErrorBody),
        (status = 429, description = "queue full (see Retry-After)", body = ErrorBody),
    ))]
pub async fn create_job(
    State(s): State<Shared>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let mut form = form.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    let Ok(_slot) = s.receiving.clone().try_acquire_owned() else {
        // The body is read to its end and discarded (never stored, never buffered whole) so
        // that the client, still sending, gets this answer rather than a broken connection.
        drain(&mut form).await;
        return Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            msg: format!("{MAX_CONCURRENT_UPLOADS} uploads are being received; retry shortly"),
            retry_after: Some(1),
        });
    };
    let n = s.uploads.fetch_add(1, Ordering::Relaxed);
    let mut upload = Upload(Some(s.dir.join(format!("upload-{n}"))));
    let path = upload.0.clone().expect("set");
    let res = receive(&s, &mut form, &path).await;
    if res.is_ok() {
        // The queue owns the file now.
        upload.0 = None;
    }
    res
}

/// Reads a refused form to its end, chunk by chunk, keeping nothing (bounded by the body limit).
async fn drain(form: &mut Multipart) {
    while let Ok(Some(mut field)) = form.next_field().await {
        while let Ok(Some(_)) = field.chunk().await {}
    }
}

/// Removes an upload that did not become a job, also when the client goes away mid-request
/// (the handler's future is dropped).
struct Upload(Option<PathBuf>);

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            std::fs::remove_file(p).ok();
        }
    }
}

async fn receive(
    s: &Shared,
    form: &mut Multipart,
    upload: &std::path::Path,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let multipart_err =
        |e: axum::extract::multipart::MultipartError| ApiError::new(e.status(), e.body_text());
    let mut options = serde_json::Map::new();
    let mut name = None;
    let mut got_image = false;
    while let Some(mut field) = form.next_field().await.map_err(multipart_err)? {
        match field.name() {
            Some("image") => {
                if got_image {
                    return Err(ApiError::bad("one `image` part per job"));
                }
                got_image = true;
                name = field.file_name().map(download_stem);
                let mut f = tokio::fs::File::create(upload)
                    .await
                    .map_err(ApiError::internal)?;
                while let Some(chunk) = field.chunk().await.map_err(multipart_err)? {
                    f.write_all(&chunk).await.map_err(ApiError::internal)?;
                }
                f.flush().await.map_err(ApiError::internal)?;
            }
            Some("options") => {
                let mut buf = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_err)? {
                    if buf.len() + chunk.len() > MAX_OPTIONS_BYTES {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("`options` is over {MAX_OPTIONS_BYTES} bytes"),
                        ));
                    }
                    buf.extend_from_slice(&chunk);
                }
                let v: serde_json::Value = serde_json::from_slice(&buf)
                    .map_err(|e| ApiError::bad(format!("`options`: {e}")))?;
                options = match v {
                    serde_json::Value::Object(m) => m,
                    _ => {
                        return Err(ApiError::bad(
                            "`options`: expected a JSON object of restore options",
                        ))
                    }
                };
            }
            Some(other) => {
                return Err(ApiError::bad(format!(
                    "unknown form part {:?}: expected `image` and optionally `options`",
                    other.chars().take(64).collect::<String>()
                )))
            }
            None => return Err(ApiError::bad("a form part has no name")),
        }
    }
    if !got_image {
        return Err(ApiError::bad("no `image` part in the form"));
    }
    let resolved = s.cfg.model.resolve(&options).map_err(ApiError::bad)?;
    let path = upload.to_path_buf();
    let (w, h) = tokio::task::spawn_blocking(move || image_size(&path))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::bad)?;
    let pixels = w as u64 * h as u64;
    if pixels > s.cfg.max_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "image is {w}x{h} = {pixels} pixels, over this server's --max-pixels {}",
                s.cfg.max_pixels
            ),
        ));
    }
    // What the job processes and outputs (x4 inside Real-ESRGAN, then `outscale`; SUPIR's
    // model input and output) is bounded too.
    let work = s.cfg.model.work_pixels(&resolved.run, w, h).map_err(|e| {
        let status = if e.too_large {
            StatusCode::PAYLOAD_TOO_LARGE
        } else {
            StatusCode::BAD_REQUEST
        };
        ApiError::new(status, e.msg)
    })?;
    if work > 16.0 * s.cfg.max_pixels as f64 {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "a {w}x{h} image with these options is {work:.0} output pixels, over this server's limit (16 x --max-pixels)"
            ),
        ));
    }
    crate::prune(s);
    let view = resolved.view.clone();
    let payload = Payload {
        input: upload.to_path_buf(),
        options: resolved,
        // 16-bit RGBA pixels, and as much again for the decoders' own buffers.
        max_decode_bytes: s.cfg.max_pixels.saturating_mul(16),
    };
    let (id, _) = s.queue.submit(payload).map_err(|e| match e {
        SubmitError::Full => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            msg: format!(
                "the queue is full ({} jobs waiting); retry later",
                s.queue.capacity()
            ),
            retry_after: Some(RETRY_AFTER_S),
        },
        SubmitError::Closed => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ),
    })?;
    let rec = Record {
        options: view,
        name: name.unwrap_or_else(|| "image".into()),
        width: w,
        height: h,
    };
    s.records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), rec);
    let (_, v) = s.job(id.as_str())?;
    Ok((StatusCode::ACCEPTED, Json(v)))
}

/// The image's size from its header, or why it is not an image we read.
fn image_size(path: &std::path::Path) -> Result<(u32, u32), String> {
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("image: {e}"))?;
    if reader.format().is_none() {
        return Err("image: not an image (unknown format; use PNG, JPEG, WebP or TIFF)".into());
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("image: cannot decode: {e}"))?;
    if w == 0 || h == 0 {
        return Err(format!("image is {w}x{h}: empty"));
    }
    Ok((w, h))
}

/// The upload's file name reduced to a safe download stem (never used as a server path).
fn download_stem(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let stem = base.rsplit_once('.').map_or(base, |(s, _)| s);
    let s: String = stem
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "image".into()
    } else {
        s
    }
}

/// A job's state.
#[utoipa::path(get, path = "/v1/jobs/{id}", params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
pub async fn get_job(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(s.job(&id)?.1))
}

/// Cancels a job: a queued one is dropped, a running one stops at its next step or tile.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = ErrorBody)))]
pub async fn cancel_job(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let jid = JobId::parse(&id).ok_or_else(|| ApiError::not_found(&id))?;
    let (_, payload) = s
        .queue
        .cancel(&jid)
        .ok_or_else(|| ApiError::not_found(&id))?;
    if let Some(p) = payload {
        tokio::fs::remove_file(&p.input).await.ok();
    }
    Ok(Json(s.job(&id)?.1))
}

/// Server-Sent Events of a job's progress (`data`: a `JobView`), replayed after `Last-Event-ID`.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "text/event-stream of JobView", content_type = "text/event-stream"),
              (status = 404, body = ErrorBody)))]
pub async fn job_events(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let jid = JobId::parse(&id).ok_or_else(|| ApiError::not_found(&id))?;
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<JobEvent>();
    let past = s
        .queue
        .subscribe(&jid, after, Box::new(move |ev| tx.send(ev.clone()).is_ok()))
        .ok_or_else(|| ApiError::not_found(&id))?;
    let rec = s
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&jid)
        .cloned();
    let live = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
    let stream = tokio_stream::iter(past).chain(live).map(move |ev| {
        let info = JobInfo {
            id: jid.clone(),
            status: ev.status,
            queue_position: None,
            progress: ev.progress,
            error: ev.error,
            cancel_requested: false,
        };
        let v = view(info, rec.as_ref());
        let name = if ev.status == JobStatus::Processing {
            "progress"
        } else {
            ev.status.as_str()
        };
        Ok(Event::default()
            .id(ev.seq.to_string())
            .event(name)
            .json_data(&v)
            .unwrap_or_else(|_| Event::default().comment("unencodable event")))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The result image (PNG with the options and backend in text chunks).
#[utoipa::path(get, path = "/v1/jobs/{id}/result", params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "the image", content_type = "image/png"),
              (status = 404, body = ErrorBody), (status = 409, description = "not succeeded (yet)", body = ErrorBody)))]
pub async fn job_result(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (jid, v) = s.job(&id)?;
    match v.status {
        StatusView::Succeeded => {}
        StatusView::Failed | StatusView::Canceled => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "job {id} has no result: {}",
                    v.error.unwrap_or_else(|| "no result".into())
                ),
            ))
        }
        StatusView::Queued | StatusView::Processing => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("job {id} is not done yet"),
            ))
        }
    }
    let bytes = tokio::fs::read(result_path(&s.dir, &jid))
        .await
        .map_err(|_| ApiError::not_found(&id))?;
    let name = s
        .records
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&jid)
        .map(|r| r.name.clone())
        .unwrap_or_else(|| "image".into());
    let disposition = format!("attachment; filename=\"{name}-{}.png\"", s.backend.name());
    Ok((
        [
            (header::CONTENT_TYPE, "image/png".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}

/// The server's state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `loading`, `ready`, `busy` (a job is running) or `failed` (the model did not load).
    pub status: String,
    pub backend: String,
    pub queued: usize,
    pub queue_capacity: usize,
    pub error: Option<String>,
}

/// Whether the server is loading, ready or busy.
#[utoipa::path(get, path = "/health", responses((status = 200, body = Health)))]
pub async fn health(State(s): State<Shared>) -> Json<Health> {
    let (queued, running) = s.queue.load();
    let engine = s.engine.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (status, error) = match engine {
        EngineState::Loading => ("loading", None),
        EngineState::Failed(e) => ("failed", Some(e)),
        EngineState::Ready if running.is_some() => ("busy", None),
        EngineState::Ready => ("ready", None),
    };
    Json(Health {
        status: status.into(),
        backend: s.backend.name().into(),
        queued,
        queue_capacity: s.queue.capacity(),
        error,
    })
}

/// A backend this build knows.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    pub name: String,
    pub description: String,
    /// Loaded by this server and ready (jobs run on it); the first entry is the server's
    /// backend, loaded or still loading.
    pub loaded: bool,
    /// The options a job gets when it gives none.
    pub defaults: Option<ResolvedOptions>,
}

/// The backends, and which one is loaded.
#[derive(Debug, Serialize, ToSchema)]
pub struct Models {
    pub models: Vec<ModelView>,
}

/// Backends available and weights loaded.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = Models)))]
pub async fn models(State(s): State<Shared>) -> Json<Models> {
    let loaded = *s.engine.lock().unwrap_or_else(|e| e.into_inner()) == EngineState::Ready;
    let mut models = vec![ModelView {
        name: s.backend.name().into(),
        description: s.description.clone(),
        loaded,
        defaults: Some(s.defaults.clone()),
    }];
    for b in Backend::ALL.into_iter().filter(|b| *b != s.backend) {
        models.push(ModelView {
            name: b.name().into(),
            description: format!(
                "{} (not loaded: start `supir serve --backend {}` with its weights)",
                b.description(),
                b.name()
            ),
            loaded: false,
            defaults: None,
        });
    }
    Json(Models { models })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "supir serve",
        description = "Image restoration jobs on the loaded backend."
    ),
    paths(
        create_job, get_job, cancel_job, job_events, job_result, health, models
    ),
    components(schemas(
        JobView,
        JobForm,
        JobOptions,
        RealEsrganJobOptions,
        SupirJobOptions,
        SeesrJobOptions,
        ResolvedOptions,
        RealEsrganResolved,
        SupirResolved,
        SeesrResolved,
        AlphaChoice,
        StatusView,
        ProgressView,
        JobUrls,
        ErrorBody,
        Health,
        Models,
        ModelView
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document of this API, generated from the handlers' types.
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub async fn index() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

pub async fn docs() -> Html<&'static str> {
    Html(include_str!("../assets/docs.html"))
}

pub async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no such endpoint (see /openapi.json)",
    )
}

/// `--token`: every API request but the page, its docs and `/health` carries
/// `Authorization: Bearer <token>`.
pub async fn require_token(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/" | "/docs" | "/health");
    if let (Some(token), false) = (&s.cfg.token, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong token: send `Authorization: Bearer <token>` (the server's --token)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses cross-site requests: on a loopback bind every request's `Host` must name the
/// loopback (DNS rebinding), and a state-changing request's `Origin`, when sent, must match
/// `Host` (or be the `--cors` origin).
pub async fn same_origin(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let h = req.headers();
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    if s.cfg.host.is_loopback() {
        let name = host.map(host_name);
        if !name.is_some_and(|n| matches!(n, "localhost" | "127.0.0.1" | "[::1]")) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {:?} is not this loopback server",
                    host.unwrap_or_default()
                ),
            )
            .into_response();
        }
    }
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if let Some(origin) = h
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .filter(|_| !reads)
    {
        let allowed = s.cfg.cors.as_deref() == Some(origin)
            || host.is_some_and(|host| {
                origin
                    .split_once("://")
                    .is_some_and(|(_, authority)| authority == host)
            });
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-site request refused: Origin {origin:?} is not this server"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// `host:port` or `[v6]:port` -> the host part.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hosts() {
        assert_eq!(download_stem("../../etc/pa ss.wd.png"), "pass.wd");
        assert_eq!(download_stem("C:\\x\\photo 1.jpg"), "photo1");
        assert_eq!(download_stem(".."), "image");
        assert_eq!(host_name("127.0.0.1:8420"), "127.0.0.1");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("localhost"), "localhost");
    }
}
