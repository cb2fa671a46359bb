//! SeeSR parity cases of SD-2-base's diffusers `AutoencoderKL`: encode (posterior moments,
//! scaled mean, std, the sampled latent with the recorded noise), decode (+ `postprocess` to u8),
//! and both through SeeSR's tiled `VAEHook`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

use crate::models::tiled_vae::{VaeTiling, DECODER_PAD, ENCODER_PAD};
use crate::models::vae::{AutoencoderKL, DiagonalGaussian, VaeConfig};
use crate::parity::fixture::{Case, Fixture};
use crate::weights::WeightSource;
use crate::{Error, Result};

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &[
    "vae_encode",
    "vae_decode",
    "tiled_vae_encode",
    "tiled_vae_decode",
];

/// Models this module loaded, kept across cases.
#[derive(Default)]
pub(super) struct Cache {
    vae: Option<(AutoencoderKL, VaeConfig)>,
}

fn vae_dir(fx: &Fixture) -> PathBuf {
    fx.dir.join("stable-diffusion-2-base").join("vae")
}

/// `VaeImageProcessor.postprocess(x, "pil")` as u8 `[H, W, 3]` (batch 1) or `[B, H, W, 3]`:
/// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`, numpy's round (half to even) in f32.
fn postprocess_u8(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let v = ((x.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let u8s: Vec<u8> = v
        .into_iter()
        .map(|p| (p * 255.0).round_ties_even() as u8)
        .collect();
    let t = Tensor::from_vec(u8s, (b, h, w, c), &Device::Cpu)?;
    Ok(if b == 1 { t.squeeze(0)? } else { t })
}

fn param_usize(case: &Case, key: &str) -> Result<usize> {
    case.params[key]
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| Error::Option(format!("case {}: params.{key} missing", case.name)))
}

/// The hook options this implementation has: the official pads, fast modes and colour fix off.
fn check_hook(case: &Case, pad: usize, fast: &str) -> Result<()> {
    let p = &case.params;
    if p.get("pad")
        .and_then(|v| v.as_u64())
        .is_some_and(|v| v as usize != pad)
    {
        return Err(Error::Option(format!(
            "case {}: tile pad {} (VAEHook uses {pad})",
            case.name, p["pad"]
        )));
    }
    for key in [fast, "color_fix"] {
        if p.get(key).and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::Option(format!(
                "case {}: VAEHook `{key}` is not implemented",
                case.name
            )));
        }
    }
    Ok(())
}

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    if cache.vae.is_none() {
        let dir = vae_dir(fx);
        let cfg = VaeConfig::from_diffusers_config(dir.join("config.json"))?;
        let vb = WeightSource::open(&[dir.join("diffusion_pytorch_model.safetensors")])?
            .into_var_builder(DType::F32, &Device::Cpu);
        cache.vae = Some((AutoencoderKL::from_diffusers(vb, &cfg)?, cfg));
    }
    let (vae, cfg) = cache.vae.as_ref().expect("loaded");
    let scale = cfg.scaling_factor;
    match case.kind.as_str() {
        "vae_encode" => {
            let x = fx.input(case, "x")?;
            let noise = fx.input(case, "noise")?;
            let moments = vae.encode_moments(&x)?;
            let post = DiagonalGaussian::from_moments(&moments)?;
            Ok(vec![
                ("mean_scaled".into(), (post.mode() * scale)?),
                ("std".into(), post.std()?),
                ("latents_scaled".into(), (post.sample(&noise)? * scale)?),
                ("moments".into(), moments),
            ])
        }
        "vae_decode" => {
            let x = vae.decode_scaled(&fx.input(case, "latents_scaled")?, scale)?;
            Ok(vec![
                ("image_u8".into(), postprocess_u8(&x)?),
                ("x".into(), x),
            ])
        }
        "tiled_vae_encode" => {
            check_hook(case, ENCODER_PAD, "fast_encoder")?;
            let mut tiled = vae.clone();
            tiled.tiling = Some(VaeTiling {
                encoder_tile: param_usize(case, "encoder_tile_size")?,
                ..VaeTiling::seesr()
            });
            let moments = tiled.encode_moments(&fx.input(case, "x")?)?;
            Ok(vec![("moments".into(), moments)])
        }
        _ => {
            check_hook(case, DECODER_PAD, "fast_decoder")?;
            let mut tiled = vae.clone();
            tiled.tiling = Some(VaeTiling {
                decoder_tile: param_usize(case, "decoder_tile_size")?,
                ..VaeTiling::seesr()
            });
            let x = tiled.decode_scaled(&fx.input(case, "latents_scaled")?, scale)?;
            Ok(vec![("x".into(), x)])
        }
    }
}
