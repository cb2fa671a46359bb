//! The loaded backend and the worker thread that runs the queue.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use image::DynamicImage;
use supir::jobs::{CancelToken, JobId, JobQueue, Outcome, ProgressMeter};
use supir::pipelines::captions::{AutoCaptions, CaptionerConfig};
use supir::pipelines::realesrgan::RealEsrgan;
use supir::pipelines::seesr::{flow as seesr_flow, SeesrModel};
use supir::pipelines::supir::restore::Restorer;
use supir::schedulers::sampler::SeededNoise;

pub use crate::job_options::*;
use crate::png_meta;

/// A loaded model; it stays loaded for every job (SUPIR keeps its text encoders, so each job
/// may bring its own prompts, and its GLVControl + UNet stay resident).
pub enum Engine {
    RealEsrgan(Box<RealEsrgan>),
    /// With the captioner behind `caption: "auto"`, if the server has one.
    Supir(Box<Restorer>, Option<CaptionerConfig>),
    Seesr(Box<SeesrModel>),
}

/// A job's image and what else goes into the result's metadata.
pub struct RunOutput {
    pub image: DynamicImage,
    /// `(PNG text keyword, text)`: the caption or prompt the image was made with.
    pub text: Vec<(&'static str, String)>,
}

impl Engine {
    pub fn load(model: &ModelConfig) -> supir::Result<Self> {
        match model {
            ModelConfig::RealEsrgan(_) => Ok(Engine::RealEsrgan(Box::new(RealEsrgan::embedded(
                &Device::Cpu,
            )?))),
            ModelConfig::Supir(s) => {
                let dev = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
                // `defaults.residency`: staged re-reads GLVControl + UNet (and the text encoders
                // when a job's prompts differ) for each job, resident keeps everything loaded.
                Ok(Engine::Supir(
                    Box::new(Restorer::load(
                        s.config.clone(),
                        &s.checkpoints,
                        &s.defaults,
                        &dev,
                    )?),
                    s.captioner.clone(),
                ))
            }
            ModelConfig::Seesr(s) => Ok(Engine::Seesr(Box::new(SeesrModel::load(
                &s.paths,
                &s.defaults,
                &Device::Cpu,
            )?))),
        }
    }

    /// Runs one image; `progress` after each unit of work (tile, network call, sampler step);
    /// stops with [`supir::Error::Canceled`] at the next unit once `cancel` is set.
    pub fn run(
        &mut self,
        img: &DynamicImage,
        opts: &RunOptions,
        cancel: &CancelToken,
        progress: &mut dyn FnMut(supir::jobs::Progress),
    ) -> supir::Result<RunOutput> {
        cancel.check()?;
        match (self, opts) {
            (Engine::RealEsrgan(m), RunOptions::RealEsrgan(o)) => {
                let units = m.work_units(
                    img.width() as usize,
                    img.height() as usize,
                    img.color().has_alpha(),
                    o,
                );
                let mut meter = ProgressMeter::new("tiles", units);
                progress(meter.progress());
                let image = m.upscale_image_cancellable(img, o, Some(cancel), &mut || {
                    progress(meter.tick())
                })?;
                Ok(RunOutput {
                    image,
                    text: vec![],
                })
            }
            (Engine::Supir(r, captioner), RunOptions::Supir(o)) => {
                let mut o = o.clone();
                if o.caption == "auto" {
                    // As `supir restore --caption auto`: the captioner is loaded, captions the
                    // pre-denoised image (or its tiles) and is freed before the restore.
                    let config = captioner.as_ref().ok_or_else(|| {
                        supir::Error::Option("caption `auto`: this server has no captioner".into())
                    })?;
                    let c = config.load(&r.model.device())?;
                    cancel.check()?;
                    let captions = AutoCaptions::make(r, &c, img, &o)?;
                    drop(c);
                    supir::memory::release_free_heap();
                    o.caption = String::new();
                    captions.apply(&mut o);
                    tracing::info!("caption ({}): {:?}", config.kind(), captions.texts());
                }
                let o = &o;
                let calls = r.network_calls(o, img.width(), img.height())?;
                // Units: stage 1's VAE passes, every sampler network call, the final decode.
                let mut meter = ProgressMeter::new("restoring", calls);
                progress(meter.progress());
                let mut out = r.restore_image(
                    img,
                    o,
                    Some(&mut || {
                        progress(meter.tick());
                        cancel.check()
                    }),
                )?;
                if out.is_empty() {
                    return Err(supir::Error::Option("SUPIR returned no image".into()));
                }
                Ok(RunOutput {
                    image: DynamicImage::ImageRgb8(out.swap_remove(0)),
                    text: vec![("supir:caption", o.caption.clone())],
                })
            }
            (Engine::Seesr(m), RunOptions::Seesr(o)) => {
                let seed = o
                    .seed
                    .ok_or_else(|| supir::Error::Option("SeeSR job without a seed".into()))?;
                let rgb = supir::image_io::convert::pil_convert_rgb8(img);
                let mut meter = ProgressMeter::new("sampling", o.steps);
                progress(meter.progress());
                let prepared = seesr_flow::prepare(m, &rgb, o, None)?;
                cancel.check()?;
                let mut noise = SeededNoise::new(seed);
                let res =
                    seesr_flow::sample_image(m, &prepared, o, &mut noise, None, &mut |_, _| {
                        progress(meter.tick());
                        cancel.check()
                    })?;
                Ok(RunOutput {
                    image: DynamicImage::ImageRgb8(res.image),
                    text: vec![("supir:prompt", res.prompt), ("supir:tags", res.tags)],
                })
            }
            _ => Err(supir::Error::Option(
                "internal: the job's options are for another backend".into(),
            )),
        }
    }
}

/// What the worker needs to run a job.
pub struct Payload {
    /// The upload, in the server's temporary folder.
    pub input: PathBuf,
    pub options: Resolved,
    /// Cap on the decoder's allocations (from `--max-pixels`, checked on the header already).
    pub max_decode_bytes: u64,
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
    model: ModelConfig,
    queue: Arc<JobQueue<Payload>>,
    dir: PathBuf,
    state: Arc<std::sync::Mutex<EngineState>>,
) {
    let set_state = |s: EngineState| *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    let t = std::time::Instant::now();
    let mut engine = match Engine::load(&model) {
        Ok(e) => {
            tracing::info!("{} loaded in {:.1?}", model.description(), t.elapsed());
            set_state(EngineState::Ready);
            Some(e)
        }
        Err(e) => {
            tracing::error!("loading {}: {e}", model.description());
            set_state(EngineState::Failed(e.to_string()));
            None
        }
    };
    while let Some(job) = queue.next() {
        let outcome = match &mut engine {
            None => Outcome::Failed(format!("{} failed to load", model.description())),
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
        // Activations of the job go back to the system between jobs.
        supir::memory::release_free_heap();
        queue.finish(&job.id, outcome);
    }
}

fn run_one(
    engine: &mut Engine,
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
    let img = match supir::image_io::file::load_limited(&p.input, p.max_decode_bytes) {
        Ok(i) => i,
        Err(e) => return Outcome::Failed(scrub(&e)),
    };
    let out = match engine.run(&img, &p.options.run, cancel, &mut |pr| {
        queue.progress(id, pr)
    }) {
        Ok(o) => o,
        Err(supir::Error::Canceled) => return Outcome::Canceled,
        Err(e) => return Outcome::Failed(scrub(&e)),
    };
    let view = &p.options.view;
    let options = serde_json::to_string(view).unwrap_or_default();
    let mut text = vec![
        (
            "Software",
            format!("supir-rs {}", env!("CARGO_PKG_VERSION")),
        ),
        ("supir:backend", view.backend().to_string()),
        ("supir:options", options),
    ];
    if let Some(seed) = view.seed() {
        text.push(("supir:seed", seed.to_string()));
    }
    text.extend(out.text);
    let bytes = match png_meta::encode(&out.image, &text) {
        Ok(b) => b,
        Err(e) => return Outcome::Failed(format!("encoding the result: {e}")),
    };
    match std::fs::write(result_path(dir, id), bytes) {
        Ok(()) => Outcome::Succeeded,
        Err(e) => Outcome::Failed(format!("writing the result: {e}")),
    }
}
