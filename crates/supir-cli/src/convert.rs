//! `supir convert`: weight files from other formats to safetensors with the model's key names,
//! and checkpoints to GGUF (Q8_0 diffusion weights) under their official key names.

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
    /// Checkpoints (safetensors, torch zip or GGUF; later files override earlier keys, e.g. the
    /// SDXL base then the SUPIR file) -> one GGUF file with the official key names, which
    /// `restore --sdxl`/`--supir` read directly (with `--diffusion-dtype q8_0` / `q4_k` the
    /// Q8_0 / Q4_K layers keep their bytes).
    Gguf {
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// `q8_0`: the GLVControl + UNet linear weights in Q8_0, the rest f16 (vectors f32);
        /// `q4_k`: as q8_0, with the linear weights 256 values wide in Q4_K;
        /// `f16`: everything f16 (vectors f32).
        #[arg(long = "type", value_enum, default_value_t = GgufTypeArg::Q8_0)]
        ty: GgufTypeArg,
        /// Key prefixes whose linear weights are quantised (repeatable; default: SUPIR's
        /// `model.diffusion_model.` and `model.control_model.`; `""` for a diffusers UNet or
        /// ControlNet file).
        #[arg(long = "quantize-prefix")]
        prefixes: Vec<String>,
        /// Output `.gguf` file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum GgufTypeArg {
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_k")]
    Q4K,
    F16,
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
        From::Gguf {
            inputs,
            ty,
            prefixes,
            output,
        } => {
            let prefixes = if prefixes.is_empty() {
                supir::gguf::SUPIR_QUANT_PREFIXES.map(String::from).to_vec()
            } else {
                prefixes
            };
            let target = match ty {
                GgufTypeArg::Q8_0 => supir::gguf::GgufTarget::Q8_0,
                GgufTypeArg::Q4K => supir::gguf::GgufTarget::Q4K,
                GgufTypeArg::F16 => supir::gguf::GgufTarget::F16,
            };
            let s = supir::gguf::convert(&inputs, target, &prefixes, &output)?;
            eprintln!(
                "wrote {} ({} tensors, {} in q8_0, {} in q4_k, {:.2} GiB)",
                output.display(),
                s.tensors,
                s.q8_0,
                s.q4_k,
                s.bytes as f64 / (1u64 << 30) as f64
            );
            Ok(())
        }
    }
}
