//! SeeSR `scheduler` cases: `DDPMScheduler` on SD-2-base's and sd-turbo's scheduler configs
//! (timesteps, `alphas_cumprod`, `add_noise`, `step` with the recorded variance noise).

use candle_core::{DType, Tensor};

use crate::parity::fixture::{Case, Fixture};
use crate::schedulers::ddpm::{DdpmConfig, DdpmScheduler};
use crate::{Error, Result};

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &["scheduler"];

/// Nothing to load (the configs are read per case).
#[derive(Default)]
pub(super) struct Cache;

fn config(fx: &Fixture, which: &str) -> Result<DdpmConfig> {
    let folder = match which {
        "sd2" => "stable-diffusion-2-base",
        "turbo" => "sd-turbo",
        other => return Err(Error::Option(format!("unknown scheduler config `{other}`"))),
    };
    DdpmConfig::from_file(fx.dir.join(folder).join("scheduler/scheduler_config.json"))
}

fn scalar_t(fx: &Fixture, case: &Case, name: &str) -> Result<usize> {
    let t = fx.input(case, name)?.to_dtype(DType::I64)?.flatten_all()?;
    let v = t.to_vec1::<i64>()?;
    match v.as_slice() {
        [x] if *x >= 0 => Ok(*x as usize),
        _ => Err(Error::Option(format!(
            "case {}: `{name}` is not one timestep: {v:?}",
            case.name
        ))),
    }
}

fn timesteps(s: &DdpmScheduler) -> Result<Tensor> {
    let v: Vec<i64> = s.timesteps().iter().map(|&t| t as i64).collect();
    Ok(Tensor::new(v, &candle_core::Device::Cpu)?)
}

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    _cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![];
    if case.outputs.iter().any(|o| o.name == "alphas_cumprod") {
        // Timesteps for each n the case lists, for both configs.
        for o in &case.outputs {
            let Some((which, n)) = o.name.split_once("_timesteps_") else {
                continue;
            };
            let n: usize = n
                .parse()
                .map_err(|_| Error::Option(format!("case {}: output `{}`", case.name, o.name)))?;
            out.push((
                o.name.clone(),
                timesteps(&DdpmScheduler::new(config(fx, which)?, n)?)?,
            ));
        }
        let s = DdpmScheduler::new(config(fx, "sd2")?, 1)?;
        let acp = Tensor::new(s.alphas_cumprod(), &candle_core::Device::Cpu)?;
        out.push(("alphas_cumprod".into(), acp));
        return Ok(out);
    }
    if fx.has_input(case, "original_samples") {
        let s = DdpmScheduler::new(config(fx, "sd2")?, 1)?;
        let t = scalar_t(fx, case, "timesteps")?;
        let x0 = fx.input(case, "original_samples")?;
        let noise = fx.input(case, "noise")?;
        return Ok(vec![("noisy".into(), s.add_noise(&x0, &noise, t)?)]);
    }
    let which = case
        .params
        .get("config")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::Option(format!("case {}: no `config`", case.name)))?;
    let n = case
        .params
        .get("num_inference_steps")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::Option(format!("case {}: no `num_inference_steps`", case.name)))?;
    let s = DdpmScheduler::new(config(fx, which)?, n as usize)?;
    let t = scalar_t(fx, case, "timestep")?;
    let eps = fx.input(case, "model_output")?;
    let sample = fx.input(case, "sample")?;
    let noise = fx.input(case, "noise_000_step")?;
    let prev = s.step(&eps, t, &sample, Some(&noise))?;
    Ok(vec![("prev_sample".into(), prev)])
}
