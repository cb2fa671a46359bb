//! SeeSR parity cases of the UNet and the ControlNet (`models/unet_2d_condition.py`,
//! `models/controlnet.py`), on the fixture's `seesr/unet` and `seesr/controlnet` folders.

use candle_core::{DType, Device, Tensor};

use crate::models::controlnet::{ControlNetModel, ControlNetOutput};
use crate::models::unet::sd2::UNet2DConditionModel;
use crate::parity::fixture::{Case, Fixture};
use crate::Result;

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &["controlnet", "unet"];

/// Models this module loaded, kept across cases.
#[derive(Default)]
pub(super) struct Cache {
    unet: Option<UNet2DConditionModel>,
    controlnet: Option<ControlNetModel>,
}

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    let inp = |n: &str| fx.input(case, n);
    let (sample, timestep) = (inp("sample")?, inp("timestep")?);
    let (text, image) = (
        inp("encoder_hidden_states")?,
        inp("image_encoder_hidden_states")?,
    );
    match case.kind.as_str() {
        "controlnet" => {
            if cache.controlnet.is_none() {
                cache.controlnet = Some(ControlNetModel::from_pretrained(
                    fx.dir.join("seesr/controlnet"),
                    DType::F32,
                    &Device::Cpu,
                )?);
            }
            let model = cache.controlnet.as_ref().expect("loaded above");
            let scale = case
                .params
                .get("conditioning_scale")
                .and_then(|v| v.as_f64())
                .unwrap_or(1.0);
            let out = model.forward(
                &sample,
                &timestep,
                &text,
                Some(&image),
                &inp("controlnet_cond")?,
                scale,
            )?;
            let mut named: Vec<(String, Tensor)> = out
                .down
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("down_{i:02}"), t))
                .collect();
            named.push(("mid".into(), out.mid));
            Ok(named)
        }
        _ => {
            if cache.unet.is_none() {
                cache.unet = Some(UNet2DConditionModel::from_pretrained(
                    fx.dir.join("seesr/unet"),
                    DType::F32,
                    &Device::Cpu,
                )?);
            }
            let model = cache.unet.as_ref().expect("loaded above");
            // The ControlNet residuals, when the case has them (`down_00..`, `mid`).
            let residuals = if fx.has_input(case, "mid") {
                let down = (0..model.num_down_residuals())
                    .map(|i| inp(&format!("down_{i:02}")))
                    .collect::<Result<Vec<_>>>()?;
                Some(ControlNetOutput {
                    down,
                    mid: inp("mid")?,
                })
            } else {
                None
            };
            let noise_pred =
                model.forward(&sample, &timestep, &text, Some(&image), residuals.as_ref())?;
            Ok(vec![("noise_pred".into(), noise_pred)])
        }
    }
}
