//! One folder per restoration backend: model assembly, typed options, presets and the flow.

pub mod captions;
pub mod realesrgan;
pub mod seesr;
pub mod supir;
