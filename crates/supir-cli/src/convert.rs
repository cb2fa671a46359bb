//! `supir convert`: weight files from other formats to safetensors with the model's key names.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use supir::pipelines::realesrgan::{self, RrdbNetConfig};

#[derive(Args)]
pub struct ConvertArgs {
    #[command(subcommand)]
    from: From,
}

#[derive(Subcommand)]
enum From {
    /// An ncnn RRDBNet (Real-ESRGAN x4plus) `.param` + `.bin` -> safetensors (RRDBNet key names;
    /// kernels keep the file's precision, biases f32).
    Ncnn {
        param: PathBuf,
        bin: PathBuf,
        /// Output `.safetensors` file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    match args.from {
        From::Ncnn { param, bin, output } => {
            let convs = realesrgan::ncnn::read_convolutions(&param, &bin)?;
            let tensors = realesrgan::weights_from_ncnn(&convs, &RrdbNetConfig::x4plus(), &param)?;
            supir::image_io::file::write_atomic_with(&output, |tmp| {
                candle_core::safetensors::save(&tensors, tmp).map_err(|e| {
                    supir::Error::Checkpoint {
                        path: output.clone(),
                        msg: e.to_string(),
                    }
                })
            })?;
            eprintln!("wrote {} ({} tensors)", output.display(), tensors.len());
            Ok(())
        }
    }
}
