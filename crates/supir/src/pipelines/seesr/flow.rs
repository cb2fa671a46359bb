//! `test_seesr.py`'s flow for one image, with `pipelines/pipeline_seesr.py::__call__` inside:
//!
//! 1. DAPE on the original image: tags -> the prompt `"{tags}, {prompt}," + added_prompt`, image
//!    embeddings -> the RCA context;
//! 2. the resize chain (PIL bicubic): short side up to `process_size / upscale` if below it,
//!    x `upscale`, sides floored to multiples of 8: the control image;
//! 3. text embeddings `[negative, positive]` under guidance (guidance > 1), else `[positive]`;
//! 4. the initial latent `randn` (draw 1); start point `lr`: the control image's VAE posterior
//!    sample (draw 2, batch doubled under guidance, row 0 used) noised to t = 999 by `add_noise`
//!    with that initial latent as the noise;
//! 5. per DDPM timestep: ControlNet + UNet on the CFG batch (whole latent, or Gaussian-weighted
//!    tiles when its area exceeds `latent_tile^2`), guidance, `step` (one variance draw per step);
//! 6. VAE decode (tiled hook), `round(clamp(x / 2 + 0.5) * 255)` half to even;
//! 7. colour fix against the control image, resize to the original size x `upscale`.
//!
//! Every random draw comes from one [`NoiseSource`] in the official order, so recorded draws can
//! be replayed. Latent maths runs in f32.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::model::SeesrModel;
use super::options::{SeesrOptions, StartPoint, MAX_PIXELS};
use crate::color_fix::{self, ColorFix};
use crate::image_io::convert::{hwc_to_rgb8, pil_bicubic_resize_rgb8, rgb8_to_hwc};
use crate::models::controlnet::ControlNetOutput;
use crate::schedulers::ddpm::DdpmScheduler;
use crate::schedulers::sampler::NoiseSource;
use crate::{Error, Result};

/// The start step of the `lr` start point (`--start_steps`, never passed on by `test_seesr.py`).
pub const START_STEP: usize = 999;

/// Named intermediate tensors of a run (the parity runner compares them with the official ones).
#[derive(Debug, Default)]
pub struct Trace(pub Vec<(String, Tensor)>);

impl Trace {
    fn record(trace: &mut Option<&mut Trace>, name: impl Into<String>, t: &Tensor) {
        if let Some(tr) = trace.as_deref_mut() {
            tr.0.push((name.into(), t.clone()));
        }
    }
}

/// Progress of a run: the DDPM step just finished (1-based) of the total. An error from it
/// (e.g. [`Error::Canceled`]) stops the run after that step.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> Result<()>;

/// One restored image and what it was made with.
#[derive(Debug, Clone)]
pub struct SeesrOutput {
    /// Original size x upscale.
    pub image: RgbImage,
    /// DAPE's tags (", "-joined).
    pub tags: String,
    /// The full positive prompt.
    pub prompt: String,
}

/// `"{tags}, {prompt},"` + added prompt (`get_validation_prompt` + `main`).
pub fn build_prompt(tags: &str, prompt: &str, added_prompt: &str) -> String {
    format!("{tags}, {prompt},{added_prompt}")
}

/// The control image size of the resize chain for an input of `w` x `h`.
pub fn control_size(w: u32, h: u32, upscale: u32, process_size: u32) -> Result<(u32, u32)> {
    let (mut w1, mut h1) = (w, h);
    let min_side = process_size / upscale;
    if w < min_side || h < min_side {
        let scale = min_side as f64 / w.min(h) as f64;
        w1 = (scale * w as f64) as u32;
        h1 = (scale * h as f64) as u32;
    }
    let (w2, h2) = ((w1 * upscale) / 8 * 8, (h1 * upscale) / 8 * 8);
    if w2 == 0 || h2 == 0 {
        return Err(Error::Option(format!(
            "a {w}x{h} image is too small for SeeSR at x{upscale} (under 8 px after resizing)"
        )));
    }
    if w2 as u64 * h2 as u64 > MAX_PIXELS {
        return Err(Error::Option(format!(
            "a {w}x{h} image at x{upscale} is a {w2}x{h2} model input, over the {MAX_PIXELS}-pixel limit"
        )));
    }
    Ok((w2, h2))
}

/// The resize chain of `test_seesr.py` (PIL bicubic at each change of size).
pub fn resize_chain(img: &RgbImage, upscale: u32, process_size: u32) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    control_size(w, h, upscale, process_size)?;
    let mut cur = img.clone();
    let min_side = process_size / upscale;
    if w < min_side || h < min_side {
        let scale = min_side as f64 / w.min(h) as f64;
        cur = pil_bicubic_resize_rgb8(&cur, (scale * w as f64) as u32, (scale * h as f64) as u32)?;
    }
    let (w1, h1) = cur.dimensions();
    cur = pil_bicubic_resize_rgb8(&cur, w1 * upscale, h1 * upscale)?;
    let (w2, h2) = cur.dimensions();
    pil_bicubic_resize_rgb8(&cur, w2 / 8 * 8, h2 / 8 * 8)
}

/// `prepare_image`: u8 / 255 as `[1, 3, H, W]` f32 in [0, 1] (numpy's true division).
fn control_tensor(img: &RgbImage, dev: &Device) -> Result<Tensor> {
    let x = rgb8_to_hwc(img, dev)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .to_dtype(DType::F32)?;
    Ok(x.broadcast_div(&Tensor::new(255f32, dev)?)?)
}

/// `VaeImageProcessor.postprocess` to PIL: `round(clamp(x / 2 + 0.5, 0, 1) * 255)`, numpy's
/// half-to-even rounding. `x`: `[1, 3, H, W]`.
pub fn decoded_to_rgb8(x: &Tensor) -> Result<RgbImage> {
    let (_, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(Error::Option(format!("decoded image has {c} channels")));
    }
    let v = ((x.to_dtype(DType::F32)?.squeeze(0)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let raw = v
        .into_iter()
        .map(|p| (p * 255.0).round_ties_even() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, raw)
        .ok_or_else(|| Error::Option("image buffer size mismatch".into()))
}

/// `_gaussian_weights(tile_w, tile_h)` in f64, `[tile_h * tile_w]` row-major: x centred at
/// `(w - 1) / 2`, y at `h / 2` (as the official code does), variance 0.01.
pub fn gaussian_weights(tile_w: usize, tile_h: usize) -> Vec<f64> {
    use std::f64::consts::PI;
    let var = 0.01;
    let prob = |i: usize, mid: f64, n: usize| {
        let d = i as f64 - mid;
        (-d * d / (n * n) as f64 / (2.0 * var)).exp() / (2.0 * PI * var).sqrt()
    };
    let xs: Vec<f64> = (0..tile_w)
        .map(|x| prob(x, (tile_w as f64 - 1.0) / 2.0, tile_w))
        .collect();
    let ys: Vec<f64> = (0..tile_h)
        .map(|y| prob(y, tile_h as f64 / 2.0, tile_h))
        .collect();
    ys.iter()
        .flat_map(|y| xs.iter().map(move |x| y * x))
        .collect()
}

/// The latent tiles of `__call__` for an `h` x `w` latent: `(x0, y0)` origins of square tiles of
/// `tile` (already `min(tile, h, w)`), in the official order (x outer, y inner), every
/// `tile - overlap`, the last row and column flush with the border.
pub fn tile_origins(h: usize, w: usize, tile: usize, overlap: usize) -> Vec<(usize, usize)> {
    let count = |extent: usize| {
        let mut n = 0usize;
        let mut cur = 0usize;
        while cur < extent {
            cur = (n * tile).saturating_sub(overlap * n) + tile;
            n += 1;
        }
        n
    };
    let (nx, ny) = (count(w), count(h));
    let mut out = Vec::with_capacity(nx * ny);
    let (mut ox, mut oy) = (0, 0);
    for row in 0..nx {
        for col in 0..ny {
            if col < ny - 1 || row < nx - 1 {
                ox = (row * tile).saturating_sub(overlap * row);
                oy = (col * tile).saturating_sub(overlap * col);
            }
            if row == nx - 1 {
                ox = w - tile;
            }
            if col == ny - 1 {
                oy = h - tile;
            }
            out.push((ox, oy));
        }
    }
    out
}

/// Text embeddings of the positive prompt, preceded by the negative one under guidance.
pub fn encode_prompts(
    model: &SeesrModel,
    positive: &str,
    negative: Option<&str>,
) -> Result<Tensor> {
    let pos = model.encode_text(positive)?;
    Ok(match negative {
        Some(n) => Tensor::cat(&[model.encode_text(n)?, pos], 0)?,
        None => pos,
    })
}

/// ControlNet + UNet -> epsilon for the CFG batch `x` `[B, 4, h, w]`, its control image
/// `[B, 3, 8h, 8w]`.
fn eps(
    model: &SeesrModel,
    x: &Tensor,
    t: usize,
    text: &Tensor,
    ram: &Tensor,
    control: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let nets = model.diffusion()?;
    let res: ControlNetOutput =
        nets.controlnet
            .forward(x, t as f64, text, Some(ram), control, scale)?;
    nets.unet.forward(x, t as f64, text, Some(ram), Some(&res))
}

/// Epsilon over the latent cut into Gaussian-weighted tiles (each tile one network call on the
/// CFG batch), blended as the official loop does: f64 weights, f32 sums.
#[allow(clippy::too_many_arguments)]
fn eps_tiled(
    model: &SeesrModel,
    x: &Tensor,
    t: usize,
    text: &Tensor,
    ram: &Tensor,
    control: &Tensor,
    scale: f64,
    tile: usize,
    overlap: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let tile = tile.min(h).min(w);
    let overlap = overlap.min(tile - 1);
    let weights = gaussian_weights(tile, tile);
    let mut sum = vec![0f32; b * c * h * w];
    let mut contrib = vec![0f32; b * c * h * w];
    for (ox, oy) in tile_origins(h, w, tile, overlap) {
        let xt = x.narrow(2, oy, tile)?.narrow(3, ox, tile)?.contiguous()?;
        let ct = control
            .narrow(2, oy * 8, tile * 8)?
            .narrow(3, ox * 8, tile * 8)?
            .contiguous()?;
        let out = eps(model, &xt, t, text, ram, &ct, scale)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for plane in 0..b * c {
            for ty in 0..tile {
                for tx in 0..tile {
                    let wgt = weights[ty * tile + tx];
                    let v = out[(plane * tile + ty) * tile + tx];
                    let i = (plane * h + oy + ty) * w + ox + tx;
                    // In-place adds of an f64 operand into f32 tensors: summed in f64, stored f32.
                    sum[i] = (sum[i] as f64 + v as f64 * wgt) as f32;
                    contrib[i] = (contrib[i] as f64 + wgt) as f32;
                }
            }
        }
    }
    let blended: Vec<f32> = sum.iter().zip(&contrib).map(|(s, n)| s / n).collect();
    Ok(Tensor::from_vec(blended, (b, c, h, w), x.device())?)
}

/// The denoising loop of `__call__` from the control image to the final latent.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    model: &SeesrModel,
    control: &RgbImage,
    text: &Tensor,
    ram_embeds: &Tensor,
    opts: &SeesrOptions,
    noise: &mut dyn NoiseSource,
    mut trace: Option<&mut Trace>,
    progress: Progress,
) -> Result<Tensor> {
    let dev = model.device().clone();
    let cfg = opts.uses_cfg();
    let (w, h) = control.dimensions();
    let (lh, lw) = (h as usize / 8, w as usize / 8);
    let image = control_tensor(control, &dev)?;
    let scheduler = DdpmScheduler::new(model.scheduler.clone(), opts.steps)?;
    let init = (noise.randn(&[1, 4, lh, lw], &dev)? * scheduler.init_noise_sigma())?;
    let mut latents = match opts.start_point {
        StartPoint::Noise => init,
        StartPoint::Lr => {
            let moments = model.vae_encode_moments(&((&image * 2.0)? - 1.0)?, opts)?;
            let batch = if cfg { 2 } else { 1 };
            let e = noise.randn(&[batch, 4, lh, lw], &dev)?.narrow(0, 0, 1)?;
            let z = (crate::models::vae::DiagonalGaussian::from_moments(&moments)?.sample(&e)?
                * model.vae_scale)?;
            scheduler.add_noise(&z, &init, START_STEP)?
        }
    };
    Trace::record(&mut trace, "latents_init", &latents);
    let (text, ram, image) = if cfg {
        (
            text.clone(),
            Tensor::cat(&[ram_embeds, ram_embeds], 0)?,
            Tensor::cat(&[&image, &image], 0)?,
        )
    } else {
        (text.clone(), ram_embeds.clone(), image)
    };
    let timesteps = scheduler.timesteps().to_vec();
    let tiled = lh * lw > opts.latent_tile * opts.latent_tile;
    for (i, &t) in timesteps.iter().enumerate() {
        let x = if cfg {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let e = if tiled {
            eps_tiled(
                model,
                &x,
                t,
                &text,
                &ram,
                &image,
                opts.conditioning_scale,
                opts.latent_tile,
                opts.latent_overlap,
            )?
        } else {
            eps(model, &x, t, &text, &ram, &image, opts.conditioning_scale)?
        };
        let e = e.to_dtype(DType::F32)?;
        let e = if cfg {
            let (u, c) = (e.narrow(0, 0, 1)?, e.narrow(0, 1, 1)?);
            (&u + ((c - &u)? * opts.guidance)?)?
        } else {
            e
        };
        let z = if scheduler.draws_noise(t) {
            Some(noise.randn(&[1, 4, lh, lw], &dev)?)
        } else {
            None
        };
        latents = scheduler.step(&e, t, &latents, z.as_ref())?;
        Trace::record(&mut trace, format!("latents_step_{i:02}"), &latents);
        progress(i + 1, timesteps.len())?;
    }
    Ok(latents)
}

/// What every sample of one image shares: DAPE's tags and embeddings, the prompt, its text
/// embeddings, the control image (steps 1-3 of the flow).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub tags: String,
    pub prompt: String,
    /// `[1, 145, 512]`.
    pub ram_embeds: Tensor,
    /// `[negative, positive]` under guidance, else `[positive]`: `[B, 77, width]`.
    pub text: Tensor,
    pub control: RgbImage,
    /// The input's size.
    pub input_size: (u32, u32),
}

/// Steps 1-3 for one image.
pub fn prepare(
    model: &SeesrModel,
    image: &RgbImage,
    opts: &SeesrOptions,
    mut trace: Option<&mut Trace>,
) -> Result<Prepared> {
    opts.validate()?;
    let dev = model.device().clone();
    let (w0, h0) = image.dimensions();
    control_size(w0, h0, opts.upscale, opts.process_size)?;
    let (tags, ram_embeds) = model.tag(image)?;
    Trace::record(&mut trace, "ram_encoder_hidden_states", &ram_embeds);
    let prompt = build_prompt(&tags, &opts.prompt, &opts.added_prompt);
    let negative = opts.uses_cfg().then_some(opts.negative_prompt.as_str());
    let text = encode_prompts(model, &prompt, negative)?;
    model.release_after_prepare();
    Trace::record(&mut trace, "prompt_embeds", &text);
    let control = resize_chain(image, opts.upscale, opts.process_size)?;
    Trace::record(&mut trace, "control_u8", &rgb8_to_hwc(&control, &dev)?);
    Ok(Prepared {
        tags,
        prompt,
        ram_embeds,
        text,
        control,
        input_size: (w0, h0),
    })
}

/// Steps 4-7: one sample of a prepared image.
pub fn sample_image(
    model: &SeesrModel,
    p: &Prepared,
    opts: &SeesrOptions,
    noise: &mut dyn NoiseSource,
    mut trace: Option<&mut Trace>,
    progress: Progress,
) -> Result<SeesrOutput> {
    let dev = model.device().clone();
    let latents = sample(
        model,
        &p.control,
        &p.text,
        &p.ram_embeds,
        opts,
        noise,
        trace.as_deref_mut(),
        progress,
    )?;
    model.release_after_sampling();
    let decoded = model.vae_decode(&(latents / model.vae_scale)?, opts)?;
    let out = decoded_to_rgb8(&decoded)?;
    Trace::record(&mut trace, "image_u8", &rgb8_to_hwc(&out, &dev)?);
    let fixed = match opts.color_fix {
        ColorFix::None => out,
        fix => {
            let (_, u8) = color_fix::apply_u8_truncating(
                fix,
                &rgb8_to_hwc(&out, &dev)?,
                &rgb8_to_hwc(&p.control, &dev)?,
            )?;
            hwc_to_rgb8(&u8)?
        }
    };
    Trace::record(&mut trace, "fixed_u8", &rgb8_to_hwc(&fixed, &dev)?);
    let (w0, h0) = p.input_size;
    let final_image = pil_bicubic_resize_rgb8(&fixed, w0 * opts.upscale, h0 * opts.upscale)?;
    Trace::record(&mut trace, "final_u8", &rgb8_to_hwc(&final_image, &dev)?);
    Ok(SeesrOutput {
        image: final_image,
        tags: p.tags.clone(),
        prompt: p.prompt.clone(),
    })
}

/// The whole flow for one image, one sample.
pub fn restore_image(
    model: &SeesrModel,
    image: &RgbImage,
    opts: &SeesrOptions,
    noise: &mut dyn NoiseSource,
    mut trace: Option<&mut Trace>,
    progress: Progress,
) -> Result<SeesrOutput> {
    let p = prepare(model, image, opts, trace.as_deref_mut())?;
    sample_image(model, &p, opts, noise, trace, progress)
}
