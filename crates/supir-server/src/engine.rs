//! The loaded backend, the job options it takes, and the worker thread that runs the queue.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use image::DynamicImage;
use serde::{Deserialize, Serialize};
use supir::jobs::{CancelToken, JobId, JobQueue, Outcome, ProgressMeter};
use supir::pipelines::realesrgan::{AlphaUpscale, RealEsrgan, Tiling, UpscaleOptions};
use utoipa::ToSchema;

use crate::png_meta;

/// Largest `outscale` a job may ask for (the output's pixels grow with its square).
pub const MAX_OUTSCALE: f64 = 16.0;
/// Largest `tile` / `tile_pad`, in input pixels.
pub const MAX_TILE: usize = 1 << 16;

/// How the alpha channel is upscaled (`--alpha`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AlphaChoice {
    /// Through the network, as Real-ESRGAN does.
    #[default]
    Model,
    /// Lanczos resampling (faster).
    Lanczos,
}

/// A job's options: the restore options under the CLI's long-flag names (`tile_pad` or
/// `tile-pad`); absent fields take the server's defaults (its own flags).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobOptions {
    /// Output size over input size.
    pub outscale: Option<f64>,
    /// Real-ESRGAN tile side in input pixels (0: whole image at once).
    pub tile: Option<usize>,
    /// Real-ESRGAN context around each tile, in input pixels.
    #[serde(alias = "tile-pad")]
    pub tile_pad: Option<usize>,
    /// How the alpha channel is upscaled.
    pub alpha: Option<AlphaChoice>,
}

/// The options a job runs with, every default filled in.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ResolvedOptions {
    /// The backend that runs the job.
    pub backend: String,
    pub outscale: f64,
    pub tile: usize,
    pub tile_pad: usize,
    pub alpha: AlphaChoice,
}

impl ResolvedOptions {
    /// The embedded Real-ESRGAN's options with the CLI's defaults.
    pub fn realesrgan_defaults() -> Self {
        let t = Tiling::default();
        Self {
            backend: Backend::RealEsrgan.name().into(),
            outscale: 4.0,
            tile: t.tile,
            tile_pad: t.pad,
            alpha: AlphaChoice::Model,
        }
    }

    /// `opts` over these defaults, validated with the CLI's messages.
    pub fn resolve(&self, opts: &JobOptions) -> Result<Self, String> {
        let r = Self {
            backend: self.backend.clone(),
            outscale: opts.outscale.unwrap_or(self.outscale),
            tile: opts.tile.unwrap_or(self.tile),
            tile_pad: opts.tile_pad.unwrap_or(self.tile_pad),
            alpha: opts.alpha.unwrap_or(self.alpha),
        };
        r.validate()?;
        Ok(r)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.outscale.is_finite() && self.outscale > 0.0) {
            return Err(format!(
                "--outscale {}: must be a positive number",
                self.outscale
            ));
        }
        if self.outscale > MAX_OUTSCALE {
            return Err(format!(
                "--outscale {}: at most {MAX_OUTSCALE} on this server",
                self.outscale
            ));
        }
        for (flag, v) in [("--tile", self.tile), ("--tile-pad", self.tile_pad)] {
            if v > MAX_TILE {
                return Err(format!("{flag} {v}: at most {MAX_TILE} on this server"));
            }
        }
        Ok(())
    }

    fn upscale_options(&self) -> UpscaleOptions {
        UpscaleOptions {
            tiling: Tiling {
                tile: self.tile,
                pad: self.tile_pad,
            },
            outscale: self.outscale,
            alpha: match self.alpha {
                AlphaChoice::Model => AlphaUpscale::Model,
                AlphaChoice::Lanczos => AlphaUpscale::Lanczos,
            },
        }
    }
}

/// The backends a server can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    RealEsrgan,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::RealEsrgan => "realesrgan",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Backend::RealEsrgan => "Real-ESRGAN x4plus (embedded weights, CPU)",
        }
    }
}

/// A loaded model.
pub enum Engine {
    RealEsrgan(Box<RealEsrgan>),
}

impl Engine {
    pub fn load(backend: Backend) -> supir::Result<Self> {
        match backend {
            Backend::RealEsrgan => Ok(Engine::RealEsrgan(Box::new(RealEsrgan::embedded(
                &Device::Cpu,
            )?))),
        }
    }

    /// Runs one image; `progress` after each unit of work; stops at the next tile once
    /// `cancel` is set.
    pub fn run(
        &self,
        img: &DynamicImage,
        opts: &ResolvedOptions,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(supir::jobs::Progress),
    ) -> supir::Result<DynamicImage> {
        match self {
            Engine::RealEsrgan(m) => {
                let o = opts.upscale_options();
                let units = m.work_units(
                    img.width() as usize,
                    img.height() as usize,
                    img.color().has_alpha(),
                    &o,
                );
                let mut meter = ProgressMeter::new("tiles", units);
                progress(meter.progress());
                m.upscale_image_cancellable(img, &o, Some(cancel), &mut || progress(meter.tick()))
            }
        }
    }
}

/// What the worker needs to run a job.
pub struct Payload {
    /// The upload, in the server's temporary folder.
    pub input: PathBuf,
    pub options: ResolvedOptions,
}

/// The file a job's result is written to.
pub fn result_path(dir: &Path, id: &JobId) -> PathBuf {
    dir.join(format!("{id}.png"))
}

/// The engine's state, for `/health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineState {
    Loading,
    Ready,
    Failed(String),
}

/// The worker: loads the backend, then runs the queue's jobs in order until it is closed.
pub fn worker(
    backend: Backend,
    queue: Arc<JobQueue<Payload>>,
    dir: PathBuf,
    state: Arc<std::sync::Mutex<EngineState>>,
) {
    let set_state = |s: EngineState| *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    let engine = match Engine::load(backend) {
        Ok(e) => {
            set_state(EngineState::Ready);
            Some(e)
        }
        Err(e) => {
            tracing::error!("loading {}: {e}", backend.description());
            set_state(EngineState::Failed(e.to_string()));
            None
        }
    };
    while let Some(job) = queue.next() {
        let outcome = match &engine {
            None => Outcome::Failed(format!("{} failed to load", backend.description())),
            Some(engine) => {
                // A panic in a job fails that job, never the worker.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run_one(engine, &queue, &job.id, &job.payload, &job.cancel, &dir)
                }))
                .unwrap_or_else(|_| Outcome::Failed("internal error while running the job".into()))
            }
        };
        std::fs::remove_file(&job.payload.input).ok();
        if outcome != Outcome::Succeeded {
            std::fs::remove_file(result_path(&dir, &job.id)).ok();
        }
        queue.finish(&job.id, outcome);
    }
}

fn run_one(
    engine: &Engine,
    queue: &JobQueue<Payload>,
    id: &JobId,
    p: &Payload,
    cancel: &CancelToken,
    dir: &Path,
) -> Outcome {
    // Error messages name the upload as "image", never the server's path.
    let scrub = |e: &dyn std::fmt::Display| {
        e.to_string()
            .replace(&p.input.display().to_string(), "image")
    };
    let img = match supir::image_io::file::load(&p.input) {
        Ok(i) => i,
        Err(e) => return Outcome::Failed(scrub(&e)),
    };
    let out = match engine.run(&img, &p.options, cancel, &mut |pr| queue.progress(id, pr)) {
        Ok(o) => o,
        Err(supir::Error::Canceled) => return Outcome::Canceled,
        Err(e) => return Outcome::Failed(scrub(&e)),
    };
    let options = serde_json::to_string(&p.options).unwrap_or_default();
    let text = [
        (
            "Software",
            format!("supir-rs {}", env!("CARGO_PKG_VERSION")),
        ),
        ("supir:backend", p.options.backend.clone()),
        ("supir:options", options),
    ];
    let bytes = match png_meta::encode(&out, &text) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(format!("encoding the result: {e}")),
    };
    match std::fs::write(result_path(dir, id), bytes) {
        Ok(()) => Outcome::Succeeded,
        Err(e) => Outcome::Failed(format!("writing the result: {e}")),
    }
}
