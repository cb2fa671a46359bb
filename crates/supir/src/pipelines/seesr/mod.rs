//! SeeSR (CVPR 2024): an SD-2 prior steered by a ControlNet whose blocks, like the UNet's, add a
//! representation cross-attention (RCA) over DAPE image embeddings; DAPE's tags are the prompt.
//! [`options`] holds the typed options and presets, [`model`] the release layout and the loaded
//! networks, [`flow`] `test_seesr.py`'s flow.

pub mod flow;
pub mod model;
pub mod options;

pub use flow::{restore_image, SeesrOutput};
pub use model::{DiffusionNets, SeesrModel, SeesrPaths};
pub use options::{Residency, SeesrOptions, SeesrPreset, StartPoint};
