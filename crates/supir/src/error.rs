//! Library error type: every failure names the file, key or option at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not found ({what})")]
    NotFound { path: PathBuf, what: String },
    #[error("{path}: not a valid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("missing weight `{key}` (expected shape {expected:?}) in {files}")]
    MissingKey {
        key: String,
        expected: Vec<usize>,
        files: String,
    },
    #[error("{path}: weight `{key}` has shape {actual:?}, the model expects {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: {msg}")]
    Image { path: PathBuf, msg: String },
    #[error("fixture {path}: {msg}")]
    Fixture { path: PathBuf, msg: String },
    #[error("invalid option: {0}")]
    Option(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: ncnn model: {msg}")]
    Ncnn { path: PathBuf, msg: String },
    #[error("{0}: not available yet in this build")]
    NotAvailable(String),
    #[error("{path}: degradation option `{field}`: {msg}")]
    DegradeConfig {
        path: PathBuf,
        field: String,
        msg: String,
    },
    #[error(
        "{prompts} tile prompts for {tiles} tiles: a {image_w}x{image_h} px model input is a \
         {latent_w}x{latent_h} latent, cut into tiles of {tile_size} at stride {tile_stride} \
         (latent pixels); give one prompt per tile"
    )]
    TilePromptCount {
        prompts: usize,
        tiles: usize,
        image_h: usize,
        image_w: usize,
        latent_h: usize,
        latent_w: usize,
        tile_size: usize,
        tile_stride: usize,
    },
    #[error("canceled")]
    Canceled,
    #[error("JPEG round trip at quality {quality}: {msg}")]
    Jpeg { quality: u8, msg: String },
    #[error("the {captioner} captioner wrote an empty caption ({detail})")]
    EmptyCaption { captioner: String, detail: String },
}

pub type Result<T> = std::result::Result<T, Error>;
