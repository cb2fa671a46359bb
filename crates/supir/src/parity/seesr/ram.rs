//! SeeSR parity cases of RAM / DAPE: `ram_preprocess` (`ram_transforms(tensor_transforms(img))`)
//! and `ram` (`inference_ram`, `generate_image_embeds`, `condition_forward` of the RAM built from
//! `ram_swin_large_14m.pth` + `DAPE.pth`).

use candle_core::{DType, Device, Tensor};

use crate::models::ram::{self, Ram, RamConfig};
use crate::parity::fixture::{Case, Fixture};
use crate::{Error, Result};

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &["ram_preprocess", "ram"];

/// Models this module loaded, kept across cases.
#[derive(Default)]
pub(super) struct Cache {
    ram: Option<Ram>,
}

fn bad(case: &Case, msg: String) -> Error {
    Error::Option(format!("case {}: {msg}", case.name))
}

/// The RAM config a `ram` case was made with (its `ram_config` and `q2l_config` params).
fn case_ram_config(case: &Case) -> Result<RamConfig> {
    let null = serde_json::Value::Null;
    RamConfig::from_official(
        case.params.get("ram_config").unwrap_or(&null),
        case.params.get("q2l_config").unwrap_or(&null),
    )
}

/// The RAM model of the fixture folder, configured as the `ram` case says.
pub fn load_ram(fx: &Fixture, case: &Case) -> Result<Ram> {
    Ram::load(
        &fx.dir.join("ram_swin_large_14m.pth"),
        Some(&fx.dir.join("DAPE.pth")),
        &case_ram_config(case)?,
        DType::F32,
        &Device::Cpu,
    )
}

/// The RAM config of the fixture folder, from its `ram` case (the pipeline cases load RAM too).
pub(super) fn fixture_ram_config(fx: &Fixture) -> Result<RamConfig> {
    let case = fx
        .cases
        .iter()
        .find(|c| c.kind == "ram")
        .ok_or_else(|| Error::Option("fixture has no `ram` case (RAM config)".into()))?;
    case_ram_config(case)
}

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    match case.kind.as_str() {
        "ram_preprocess" => {
            let size: Vec<usize> = case
                .params
                .get("size")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
                .unwrap_or(vec![ram::RAM_INPUT_SIZE, ram::RAM_INPUT_SIZE]);
            let [h, w] = size[..] else {
                return Err(bad(case, format!("params.size {size:?} is not [h, w]")));
            };
            let img = fx.input(case, "image_u8")?;
            Ok(vec![(
                "pixel_values".into(),
                ram::preprocess_to(&img, h, w)?,
            )])
        }
        "ram" => {
            if cache.ram.is_none() {
                cache.ram = Some(load_ram(fx, case)?);
            }
            let model = cache.ram.as_ref().expect("loaded");
            let x = fx.input(case, "pixel_values")?;
            let out = model.forward(&x)?;
            if let Some(want) = case.params.get("tags").and_then(|t| t.as_str()) {
                if out.tags.first().map(String::as_str) != Some(want) {
                    return Err(bad(case, format!("tags {:?}, official {want:?}", out.tags)));
                }
            }
            Ok(vec![
                ("visual_features".into(), out.visual_features),
                ("image_embeds".into(), out.image_embeds),
                ("logits".into(), out.logits),
                ("probs".into(), out.probs),
                ("targets".into(), out.targets),
            ])
        }
        k => Err(bad(case, format!("kind `{k}` is not a RAM case"))),
    }
}
