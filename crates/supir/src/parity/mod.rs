//! Parity runner: replays every golden case of a fixture folder through our components and
//! compares with the official outputs (`supir parity <dir>`).

pub mod fixture;
pub mod llava;
pub mod seesr;

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::color_fix::{self, ColorFix};
use crate::image_io::convert;
use crate::models::supir_config::SupirConfig;
use crate::models::vae::DiagonalGaussian;
use crate::parity::fixture::{max_abs_diff, Case, Fixture};
use crate::pipelines::supir::conditioner::SizeConditioning;
use crate::pipelines::supir::flow::{batchify_sample, BatchifyArgs};
use crate::pipelines::supir::model::SupirModel;
use crate::schedulers::denoiser::LegacyDdpm;
use crate::schedulers::sampler::{ReplayNoise, SamplerConfigParams, SamplerKind};
use crate::Result;

/// One compared output.
#[derive(Debug, Clone)]
pub struct OutputCheck {
    pub name: String,
    pub max_err: f64,
    pub atol: f64,
}

impl OutputCheck {
    pub fn passed(&self) -> bool {
        self.max_err <= self.atol
    }
}

/// The outcome of one case: its checks, or the error that stopped it.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: String,
    pub kind: String,
    pub checks: Vec<OutputCheck>,
    pub error: Option<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.error.is_none() && !self.checks.is_empty() && self.checks.iter().all(|c| c.passed())
    }

    /// Worst output: (max error, its atol).
    pub fn worst(&self) -> Option<&OutputCheck> {
        self.checks
            .iter()
            .max_by(|a, b| (a.max_err / a.atol).total_cmp(&(b.max_err / b.atol)))
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub results: Vec<CaseResult>,
    /// Cases whose kind this build does not implement: (case, kind).
    pub skipped: Vec<(String, String)>,
}

impl Report {
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|r| r.passed()).count()
    }

    pub fn failed(&self) -> usize {
        self.results.len() - self.passed()
    }

    pub fn skipped_kinds(&self) -> BTreeSet<&str> {
        self.skipped.iter().map(|(_, k)| k.as_str()).collect()
    }
}

/// Kinds `run` implements.
pub const KINDS: &[&str] = &[
    "conditioner",
    "vae_encode",
    "vae_decode",
    "control",
    "unet",
    "denoiser",
    "sigmas",
    "colorfix",
    "pil2tensor",
    "tensor2pil",
    "sample",
];

/// Runs every case of the folder whose kind is implemented; `filter` keeps cases whose name
/// contains it. `on_case` sees each result as it completes.
pub fn run(
    dir: impl AsRef<Path>,
    filter: Option<&str>,
    mut on_case: impl FnMut(&CaseResult),
) -> Result<Report> {
    if seesr::is_fixture(dir.as_ref()) {
        return seesr::run(dir.as_ref(), filter, on_case);
    }
    if llava::is_fixture(dir.as_ref()) {
        return llava::run(dir.as_ref(), filter, on_case);
    }
    let fixture = Fixture::load(dir)?;
    let cfg = SupirConfig::load(fixture.config_path())?;
    let mut model: Option<SupirModel> = None;
    let mut report = Report::default();
    for case in &fixture.cases {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        if !KINDS.contains(&case.kind.as_str()) {
            report.skipped.push((case.name.clone(), case.kind.clone()));
            continue;
        }
        let needs_model = !matches!(
            case.kind.as_str(),
            "sigmas" | "colorfix" | "pil2tensor" | "tensor2pil"
        );
        let outcome = (|| -> Result<Vec<(String, Tensor)>> {
            if needs_model && model.is_none() {
                model = Some(SupirModel::load(
                    &cfg,
                    &[fixture.weights_path()],
                    DType::F32,
                    &Device::Cpu,
                )?);
            }
            run_case(&fixture, case, &cfg, model.as_ref())
        })();
        let result = match outcome {
            Ok(outputs) => compare(&fixture, case, outputs),
            Err(e) => CaseResult {
                name: case.name.clone(),
                kind: case.kind.clone(),
                checks: vec![],
                error: Some(e.to_string()),
            },
        };
        on_case(&result);
        report.results.push(result);
    }
    Ok(report)
}

pub(crate) fn compare(
    fixture: &Fixture,
    case: &Case,
    outputs: Vec<(String, Tensor)>,
) -> CaseResult {
    let mut checks = vec![];
    let mut error = None;
    for expected in &case.outputs {
        let got = outputs.iter().find(|(n, _)| *n == expected.name);
        let check = got
            .ok_or_else(|| crate::Error::Option(format!("no output `{}`", expected.name)))
            .and_then(|(_, t)| {
                let want = fixture.output(case, &expected.name)?;
                let t = t.to_dtype(DType::F32)?.reshape(want.dims())?;
                max_abs_diff(&t, &want)
            });
        match check {
            Ok(max_err) => checks.push(OutputCheck {
                name: expected.name.clone(),
                max_err,
                atol: expected.atol,
            }),
            Err(e) => {
                error = Some(format!("{}: {e}", expected.name));
                break;
            }
        }
    }
    CaseResult {
        name: case.name.clone(),
        kind: case.kind.clone(),
        checks,
        error,
    }
}

pub(crate) fn param_f64(case: &Case, key: &str) -> Result<f64> {
    case.params
        .get(key)
        .and_then(|v| v.as_f64())
        .ok_or_else(|| crate::Error::Option(format!("case {}: no number `{key}`", case.name)))
}

pub(crate) fn param_str<'a>(case: &'a Case, key: &str) -> Result<&'a str> {
    case.params
        .get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| crate::Error::Option(format!("case {}: no text `{key}`", case.name)))
}

fn param_pair(case: &Case, key: &str) -> Result<[f64; 2]> {
    let v = case.params.get(key).and_then(|v| v.as_array());
    match v.map(|a| a.iter().filter_map(|x| x.as_f64()).collect::<Vec<_>>()) {
        Some(a) if a.len() == 2 => Ok([a[0], a[1]]),
        _ => Err(crate::Error::Option(format!(
            "case {}: `{key}` is not a pair of numbers",
            case.name
        ))),
    }
}

/// A `sample` case: `batchify_sample` on `x` with the case's kwargs and sampler, replaying
/// its recorded draws (`noise_*` inputs, in order); every draw must be used.
pub fn run_sample_case(
    fixture: &Fixture,
    case: &Case,
    cfg: &SupirConfig,
    model: &SupirModel,
) -> Result<Tensor> {
    let bad = |msg: String| crate::Error::Option(format!("case {}: {msg}", case.name));
    let args: BatchifyArgs =
        serde_json::from_value(case.params.clone()).map_err(|e| bad(e.to_string()))?;
    let kind: SamplerKind = case
        .params
        .get("sampler")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no `sampler`".into()))?
        .parse()?;
    let sampler_params: SamplerConfigParams = match case.params.get("sampler_params") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| bad(e.to_string()))?,
        None => SamplerConfigParams::default(),
    };
    let p = &cfg.model.params;
    let opts = args.to_options(kind, &sampler_params, &p.p_p, &p.n_p)?;
    let prompt = case
        .params
        .get("prompt")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no `prompt`".into()))?;
    let draws = case
        .inputs
        .iter()
        .filter(|n| n.starts_with("noise_"))
        .map(|n| Ok((n.clone(), fixture.input(case, n)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut rng = ReplayNoise::from_named(draws)?;
    let out = batchify_sample(
        model,
        &fixture.input(case, "x")?,
        &[prompt],
        &opts,
        &mut rng,
    )?;
    if rng.remaining() != 0 {
        return Err(bad(format!(
            "{} recorded draws left unused",
            rng.remaining()
        )));
    }
    Ok(out)
}

fn run_case(
    fixture: &Fixture,
    case: &Case,
    cfg: &SupirConfig,
    model: Option<&SupirModel>,
) -> Result<Vec<(String, Tensor)>> {
    let input = |name: &str| fixture.input(case, name);
    let model = || model.ok_or_else(|| crate::Error::Option("model not loaded".into()));
    Ok(match case.kind.as_str() {
        "conditioner" => {
            let m = model()?;
            let sizes = SizeConditioning {
                original_size: param_pair(case, "original_size")?,
                crop_coords_top_left: param_pair(case, "crop_coords_top_left")?,
                target_size: param_pair(case, "target_size")?,
                ..SizeConditioning::default()
            };
            let mut out = vec![];
            for branch in ["c", "uc"] {
                let cond = m.conditioner.encode_ids(
                    &input(&format!("clip_l_ids_{branch}"))?,
                    &input(&format!("openclip_ids_{branch}"))?,
                    &sizes,
                )?;
                out.push((format!("crossattn_{branch}"), cond.crossattn));
                out.push((format!("vector_{branch}"), cond.vector));
            }
            out
        }
        "colorfix" => {
            let fix: ColorFix = param_str(case, "type")?.parse()?;
            let out = color_fix::apply(fix, &input("content")?, &input("style")?)?;
            vec![("out".into(), out)]
        }
        "pil2tensor" => {
            let img = input("image_u8")?;
            let (h, w, _) = img.dims3()?;
            let data = img.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
            let img = image::RgbImage::from_raw(w as u32, h as u32, data)
                .ok_or_else(|| crate::Error::Option("image_u8 is not HxWx3".into()))?;
            let (x, h0, w0) = convert::pil2tensor(
                &img,
                param_f64(case, "upscale")?,
                param_f64(case, "min_size")? as u32,
            )?;
            let (want_h0, want_w0) = (param_f64(case, "h0")?, param_f64(case, "w0")?);
            if (h0 as f64, w0 as f64) != (want_h0, want_w0) {
                return Err(crate::Error::Option(format!(
                    "pre-rounding size {h0}x{w0}, official {want_h0}x{want_w0}"
                )));
            }
            vec![("x".into(), x)]
        }
        "tensor2pil" => {
            let (h0, w0) = (param_f64(case, "h0")? as u32, param_f64(case, "w0")? as u32);
            let img = convert::tensor2pil(&input("x")?, h0, w0)?;
            let t = Tensor::from_vec(img.into_raw(), (h0 as usize, w0 as usize, 3), &Device::Cpu)?;
            vec![("image_u8".into(), t.to_dtype(DType::F32)?)]
        }
        "vae_encode" => {
            let m = model()?;
            let x = input("x")?;
            let scale = param_f64(case, "scale_factor").unwrap_or(m.scale_factor);
            let moments = m.vae.encode_moments(&x)?;
            let denoise_moments = m.vae.denoise_encode_moments(&x)?;
            let mode = |mo: &Tensor| -> Result<Tensor> {
                Ok(DiagonalGaussian::from_moments(mo)?
                    .mode()
                    .affine(scale, 0.0)?)
            };
            vec![
                ("z_mode_scaled".into(), mode(&moments)?),
                ("z_denoise_mode_scaled".into(), mode(&denoise_moments)?),
                ("moments".into(), moments),
                ("denoise_moments".into(), denoise_moments),
            ]
        }
        "control" => {
            let m = model()?;
            let hints = m.diffusion()?.control.forward(
                &input("control")?,
                &input("timesteps")?,
                &input("xt")?,
                &input("context")?,
                &input("y")?,
            )?;
            hints
                .into_iter()
                .enumerate()
                .map(|(i, h)| (format!("hint_{i:02}"), h))
                .collect()
        }
        "unet" => {
            let m = model()?;
            let unet = &m.diffusion()?.unet;
            let hints = (0..unet.num_hints())
                .map(|i| input(&format!("hint_{i:02}")))
                .collect::<Result<Vec<_>>>()?;
            let eps = unet.forward(
                &input("xt")?,
                &input("timesteps")?,
                &input("context")?,
                &input("y")?,
                &hints,
                param_f64(case, "control_scale")?,
            )?;
            vec![("eps".into(), eps)]
        }
        "denoiser" => {
            let m = model()?;
            let sigmas = input("sigma")?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let out = m.denoise(
                &input("x")?,
                &sigmas,
                &input("crossattn")?,
                &input("vector")?,
                &input("control")?,
                param_f64(case, "control_scale")?,
            )?;
            vec![("denoised".into(), out)]
        }
        "vae_decode" => {
            let m = model()?;
            let scale = param_f64(case, "scale_factor").unwrap_or(m.scale_factor);
            vec![("x".into(), m.vae.decode_scaled(&input("z_scaled")?, scale)?)]
        }
        "sample" => {
            vec![(
                "samples".into(),
                run_sample_case(fixture, case, cfg, model()?)?,
            )]
        }
        "sigmas" => {
            let n = param_f64(case, "num_steps")? as usize;
            let s = LegacyDdpm::default().sampling_sigmas(n)?;
            let len = s.len();
            vec![("sigmas".into(), Tensor::from_vec(s, len, &Device::Cpu)?)]
        }
        kind => {
            return Err(crate::Error::Option(format!(
                "kind `{kind}` not wired in yet"
            )))
        }
    })
}
