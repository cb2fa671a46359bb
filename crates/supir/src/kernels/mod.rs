//! CPU kernels that candle lacks or runs slowly.
//!
//! - [`winograd`]: 3x3 stride-1 pad-1 convolution by Winograd F(4x4, 3x3) on channels-last maps,
//!   with a fused per-pixel epilogue; [`winograd::conv2d_nchw`] wraps it for NCHW candle tensors.

pub mod winograd;
