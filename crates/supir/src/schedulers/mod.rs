//! Noise schedules and samplers, independent of the networks.

pub mod denoiser;
pub mod sampler;
pub mod tiling;
