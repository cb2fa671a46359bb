//! Noise schedules and samplers, independent of the networks.

pub mod ddpm;
pub mod denoiser;
pub mod sampler;
pub mod tiling;
