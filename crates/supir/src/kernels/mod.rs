//! CPU kernels that candle lacks or runs slowly, all on f32 and tested against plain forms.
//!
//! - [`blas`]: row-major sgemm (OpenBLAS loaded at run time, else the `gemm` crate);
//! - [`conv`]: NCHW conv2d as GEMMs (pointwise, im2col, or [`winograd_nchw`] for 3x3);
//! - [`norm`]: GroupNorm fused with SiLU, a vectorisable `exp`;
//! - [`attention`]: multi-head attention in query blocks;
//! - [`winograd`]: channels-last Winograd F(4x4, 3x3) with its own micro-kernels
//!   (Real-ESRGAN's engine).

pub mod attention;
pub mod blas;
pub mod conv;
pub mod norm;
pub mod winograd;
pub mod winograd_nchw;
