//! The networks, each with a `new(vb, &cfg)` constructor taking weights by their official names
//! and a `forward`.

pub mod clip;
pub mod controlnet;
pub mod glv_control;
pub mod llava;
pub mod ram;
pub mod supir_config;
pub mod tiled_vae;
pub mod unet;
pub mod vae;
pub mod zero_sft;
