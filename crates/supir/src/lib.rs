//! supir-rs: generative-prior image restoration (SUPIR, SeeSR) on candle.
//!
//! Layout, after diffusers:
//! - [`models`]: the networks, each built from its official config with weights under their
//!   official names (UNet, GLVControl + ZeroSFT, VAE and tiled VAE, CLIP text encoders);
//! - [`schedulers`]: noise schedules and samplers (SDXL's discrete EDM denoiser, SUPIR's
//!   restoration-guided EDM / DPM++2M samplers, latent tiling);
//! - [`pipelines`]: one folder per backend (SUPIR, Real-ESRGAN): model assembly, options,
//!   presets and the restoration flow;
//! - beside them: the compute layer ([`layers`], [`kernels`], [`memory`]), weight and image
//!   I/O ([`weights`], [`gguf`], [`inspect`], [`image_io`], [`tokenizer`]), shared post-processing
//!   ([`color_fix`]), evaluation ([`eval`]: degradation synthesis, metrics) and golden-data
//!   replay ([`parity`]).

pub mod color_fix;
pub mod error;
pub mod eval;
pub mod gguf;
pub mod image_io;
pub mod inspect;
pub mod jobs;
pub mod kernels;
pub mod layers;
pub mod memory;
pub mod models;
pub mod parity;
pub mod pipelines;
pub mod schedulers;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
