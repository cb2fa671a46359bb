//! SeeSR `pipeline` cases: `test_seesr.py`'s flow (or `test_seesr_turbo.py`'s for a case named
//! `*turbo*`) on the fixture's release folders, with every random draw replayed.

use candle_core::{DType, Device, Tensor};

use crate::color_fix::ColorFix;
use crate::image_io::convert::hwc_to_rgb8;
use crate::parity::fixture::{Case, Fixture};
use crate::parity::{param_f64, param_str};
use crate::pipelines::seesr::flow::{self, Trace};
use crate::pipelines::seesr::model::{SeesrModel, SeesrPaths};
use crate::pipelines::seesr::options::{SeesrOptions, SeesrPreset};
use crate::schedulers::sampler::{DrawKind, ReplayNoise};
use crate::{Error, Result};

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &["pipeline"];

/// The loaded release, per preset.
#[derive(Default)]
pub(super) struct Cache {
    default: Option<SeesrModel>,
    turbo: Option<SeesrModel>,
}

/// The case's options: `test_seesr.py`'s defaults with the case's parameters.
fn options(case: &Case, preset: SeesrPreset) -> Result<SeesrOptions> {
    let mut o = SeesrOptions::preset(preset);
    o.guidance = param_f64(case, "guidance_scale")?;
    o.steps = param_f64(case, "num_inference_steps")? as usize;
    o.start_point = param_str(case, "start_point")?.parse()?;
    o.conditioning_scale = param_f64(case, "conditioning_scale")?;
    o.upscale = param_f64(case, "upscale")? as u32;
    o.process_size = param_f64(case, "process_size")? as u32;
    o.color_fix = match param_str(case, "align_method")? {
        "nofix" => ColorFix::None,
        other => other.parse()?,
    };
    o.latent_tile = param_f64(case, "latent_tiled_size")? as usize;
    o.latent_overlap = param_f64(case, "latent_tiled_overlap")? as usize;
    o.vae_encoder_tile = param_f64(case, "vae_encoder_tiled_size")? as usize;
    o.vae_decoder_tile = param_f64(case, "vae_decoder_tiled_size")? as usize;
    o.negative_prompt = param_str(case, "negative_prompt")?.to_string();
    Ok(o)
}

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    let preset = if case.name.contains("turbo") {
        SeesrPreset::Turbo
    } else {
        SeesrPreset::Default
    };
    let opts = options(case, preset)?;
    let slot = match preset {
        SeesrPreset::Default => &mut cache.default,
        SeesrPreset::Turbo => &mut cache.turbo,
    };
    if slot.is_none() {
        let paths = SeesrPaths::from_models_dir(&fx.dir);
        let ram_cfg = super::ram::fixture_ram_config(fx)?;
        *slot = Some(SeesrModel::load_with_ram_config(
            &paths,
            &opts,
            &ram_cfg,
            &Device::Cpu,
        )?);
    }
    let model = slot.as_ref().expect("loaded above");
    // Every draw, in call order (names `noise_NNN_<caller>`).
    let mut draws: Vec<&String> = case
        .inputs
        .iter()
        .filter(|n| n.starts_with("noise_"))
        .collect();
    draws.sort();
    let draws = draws
        .into_iter()
        .map(|n| Ok((n.clone(), DrawKind::Gaussian, fx.input(case, n)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut noise = ReplayNoise::new(draws);
    let image = hwc_to_rgb8(&fx.input(case, "image_u8")?.to_dtype(DType::U8)?)?;
    let mut trace = Trace::default();
    let out = flow::restore_image(
        model,
        &image,
        &opts,
        &mut noise,
        Some(&mut trace),
        &mut |_, _| Ok(()),
    )?;
    let want = param_str(case, "prompt")?;
    if out.prompt != want {
        return Err(Error::Option(format!(
            "case {}: prompt `{}`, the official flow built `{want}`",
            case.name, out.prompt
        )));
    }
    Ok(trace.0)
}
