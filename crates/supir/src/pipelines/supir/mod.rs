//! SUPIR (SDXL prior + GLVControl + ZeroSFT): the assembled model ([`model`]), SDXL
//! conditioning ([`conditioner`]), `batchify_sample` ([`flow`]) and the end-to-end restore with
//! its options and presets ([`restore`]).

pub mod conditioner;
pub mod flow;
pub mod model;
pub mod restore;
