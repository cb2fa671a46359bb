//! supir-rs: SUPIR generative-prior image restoration on candle.
//!
//! Modules follow the official code's pipeline: weights and config in, text conditioning
//! (`tokenizer`, `clip`, `conditioner`), the degradation-robust VAE (`vae`), the adaptor
//! (`control`) wired into the SDXL UNet (`unet`) through `zero_sft`, the discrete denoiser
//! (`denoiser`), and image conversion (`image_io`, `color_fix`).

pub mod clip;
pub mod color_fix;
pub mod conditioner;
pub mod config;
pub mod control;
pub mod degrade;
pub mod denoiser;
pub mod error;
pub mod fixture;
pub mod image_io;
pub mod inspect;
pub mod kernels;
pub mod layers;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod parity;
pub mod pipeline;
pub mod realesrgan;
pub mod restore;
pub mod sampler;
pub mod tiled_vae;
pub mod tiling;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
pub mod zero_sft;

pub use error::{Error, Result};
