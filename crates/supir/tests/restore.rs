//! The end-to-end restore path (`supir::pipelines::supir::restore`) on the tiny fixture model: it adds nothing to
//! `batchify_sample`, the tiled VAE agrees with the whole-image VAE, and f16 / bf16 stay close to
//! the f32 golden outputs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module};
use supir::color_fix::ColorFix;
use supir::layers::{Quant, QuantStats};
use supir::models::supir_config::SupirConfig;
use supir::models::tiled_vae::{self, TileDtype, VaeTiling};
use supir::parity::fixture::{max_abs_diff, Case, Fixture};
use supir::pipelines::supir::flow::batchify_sample;
use supir::pipelines::supir::model::{DTypes, SupirModel};
use supir::pipelines::supir::restore::{Residency, RestoreOptions, Restorer};
use supir::schedulers::sampler::{ReplayNoise, SamplerKind};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

fn load(dtypes: DTypes) -> (Fixture, SupirConfig, SupirModel) {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let model = SupirModel::load_with(&cfg, &[fx.weights_path()], dtypes, &Device::Cpu).unwrap();
    (fx, cfg, model)
}

/// The case's `batchify_sample` kwargs as restore options (the mapping a caller writes).
fn options_of(case: &Case, cfg: &SupirConfig) -> RestoreOptions {
    let p = &case.params;
    let f = |k: &str, d: f64| p.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let b = |k: &str| p.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let s = |k: &str, d: &str| {
        p.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| *s != "default")
            .unwrap_or(d)
            .to_string()
    };
    let mut o = RestoreOptions {
        sampler: Some(
            p["sampler"]
                .as_str()
                .unwrap()
                .parse::<SamplerKind>()
                .unwrap(),
        ),
        steps: f("num_steps", 100.0) as usize,
        cfg_scale: f("cfg_scale", 4.0),
        cfg_scale_start: f("cfg_scale_start", 1.0),
        linear_cfg: b("use_linear_CFG"),
        control_scale: f("control_scale", 1.0),
        control_scale_start: f("control_scale_start", 0.0),
        linear_control_scale: b("use_linear_control_scale"),
        restoration_scale: f("restoration_scale", 4.0),
        s_churn: f("s_churn", 0.0),
        s_noise: f("s_noise", 1.003),
        color_fix: s("color_fix_type", "None").parse::<ColorFix>().unwrap(),
        caption: s("prompt", ""),
        positive_prompt: s("p_p", &cfg.model.params.p_p),
        negative_prompt: s("n_p", &cfg.model.params.n_p),
        ..RestoreOptions::default()
    };
    if let Some(sp) = p.get("sampler_params") {
        o.sampler_tile_size = sp
            .get("tile_size")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        o.sampler_tile_stride = sp
            .get("tile_stride")
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
    }
    o
}

fn replay(fx: &Fixture, case: &Case) -> ReplayNoise {
    let draws = case
        .inputs
        .iter()
        .filter(|n| n.starts_with("noise_"))
        .map(|n| (n.clone(), fx.input(case, n).unwrap()))
        .collect();
    ReplayNoise::from_named(draws).unwrap()
}

#[test]
fn restore_options_path_equals_batchify_sample() {
    let (fx, cfg, model) = load(DTypes::uniform(DType::F32));
    let mut r = Restorer::from_model(cfg.clone(), model);
    // One case is enough: the other kinds go through the same code (and `parity` covers them).
    let cases = ["sample_edm_restore"];
    for (i, name) in cases.iter().enumerate() {
        let case = fx.case(name).unwrap();
        let o = options_of(case, &cfg);
        o.validate().unwrap();
        let x = fx.input(case, "x").unwrap();
        let so = o.sample_options(&cfg).unwrap();
        let reference = batchify_sample(
            &r.model,
            &x,
            &[o.caption.as_str()],
            &so,
            &mut replay(&fx, case),
        )
        .unwrap();
        let mut calls = 0usize;
        let mut rng = replay(&fx, case);
        let out = r
            .restore_tensor(
                &x,
                &o,
                &mut rng,
                Some(&mut || {
                    calls += 1;
                    Ok(())
                }),
            )
            .unwrap();
        assert_eq!(rng.remaining(), 0, "{name}");
        let (_, _, h, w) = x.dims4().unwrap();
        // Network calls as counted for the progress bar (min size 0 keeps the size).
        let sized = RestoreOptions {
            min_size: 0,
            ..o.clone()
        };
        assert_eq!(
            calls,
            r.network_calls(&sized, w as u32, h as u32).unwrap(),
            "{name}"
        );
        let same = max_abs_diff(&out, &reference).unwrap();
        let golden = fx.output(case, "samples").unwrap();
        let err = max_abs_diff(&out, &golden).unwrap();
        println!("{name}: vs batchify_sample {same:e}, vs official {err:e}");
        assert_eq!(same, 0.0, "{name}");
        assert!(err <= case.outputs[0].atol, "{name}: {err}");
        if i + 1 == cases.len() {
            // The text encoders can go once the prompts are encoded; the run stays the same.
            r.drop_text_encoders();
            let again = r
                .restore_tensor(&x, &o, &mut replay(&fx, case), None)
                .unwrap();
            assert_eq!(max_abs_diff(&again, &out).unwrap(), 0.0);
            let other = RestoreOptions {
                caption: "another caption".into(),
                ..o.clone()
            };
            let e = r
                .restore_tensor(&x, &other, &mut replay(&fx, case), None)
                .unwrap_err()
                .to_string();
            assert!(e.contains("text encoders"), "{e}");
        }
    }
}

#[test]
fn image_path_sizes_seed_and_samples() {
    let (_, cfg, model) = load(DTypes::uniform(DType::F32));
    let mut r = Restorer::from_model(cfg, model);
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 24, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 10) as u8, 90])
    }));
    let o = RestoreOptions {
        steps: 2,
        upscale: 1.5,
        min_size: 64,
        num_samples: 2,
        seed: 5,
        ..RestoreOptions::default()
    };
    let a = r.restore_image(&img, &o, None).unwrap();
    assert_eq!(a.len(), 2);
    assert!(a.iter().all(|i| i.dimensions() == (60, 36)));
    assert_ne!(a[0], a[1], "two samples share their noise");
    let b = r.restore_image(&img, &o, None).unwrap();
    assert_eq!(a, b, "same seed, different output");
}

/// Staged residency (GLVControl + UNet read for sampling only) gives the resident model's
/// output bit for bit, image after image, and leaves the diffusion networks released.
#[test]
fn staged_residency_equals_resident() {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(48, 32, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, ((x + y) * 3) as u8])
    }));
    let mut outputs = Vec::new();
    for residency in [Residency::Resident, Residency::Staged] {
        let o = RestoreOptions {
            steps: 2,
            min_size: 64,
            seed: 11,
            residency,
            ..RestoreOptions::default()
        };
        let mut r = Restorer::load(cfg.clone(), &[fx.weights_path()], &o, &Device::Cpu).unwrap();
        assert_eq!(
            r.model.diffusion.is_some(),
            residency == Residency::Resident,
            "{residency}: loaded at start"
        );
        let first = r.restore_image(&img, &o, None).unwrap();
        let second = r.restore_image(&img, &o, None).unwrap();
        assert_eq!(first, second, "{residency}: the second image differs");
        assert_eq!(
            r.model.diffusion.is_some(),
            residency == Residency::Resident,
            "{residency}: loaded after restoring"
        );
        outputs.push(first);
    }
    assert_eq!(outputs[0], outputs[1], "staged differs from resident");
}

/// Staged residency with a caption per image (what `--caption auto` does on a folder): the text
/// encoders are dropped before sampling and read again for the next image's prompt, and every
/// output equals a resident model's with the same caption, bit for bit.
#[test]
fn staged_residency_rereads_the_text_encoders_for_new_prompts() {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(40, 40, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 5) as u8, ((x * y) % 251) as u8])
    }));
    let opts = |caption: &str, residency| RestoreOptions {
        steps: 2,
        min_size: 64,
        seed: 5,
        caption: caption.into(),
        residency,
        ..RestoreOptions::default()
    };
    let captions = ["a cat, ", "a red brick house by the sea, ", "a cat, "];
    let mut resident = Restorer::load(
        cfg.clone(),
        &[fx.weights_path()],
        &opts("", Residency::Resident),
        &Device::Cpu,
    )
    .unwrap();
    let mut staged = Restorer::load(
        cfg.clone(),
        &[fx.weights_path()],
        &opts("", Residency::Staged),
        &Device::Cpu,
    )
    .unwrap();
    let mut outs = Vec::new();
    for c in captions {
        let want = resident
            .restore_image(&img, &opts(c, Residency::Resident), None)
            .unwrap();
        assert!(resident.model.conditioner.has_text_encoders());
        let got = staged
            .restore_image(&img, &opts(c, Residency::Staged), None)
            .unwrap();
        assert!(
            !staged.model.conditioner.has_text_encoders(),
            "staged: text encoders dropped after `{c}`"
        );
        assert_eq!(got, want, "staged differs from resident for `{c}`");
        outs.push(got);
    }
    assert_ne!(outs[0], outs[1], "the caption changes the output");
    assert_eq!(outs[0], outs[2]);
}

/// The official `VAEHook` (tilevae.py) on the tiny model, made by
/// `scripts/tiled_vae_reference.py`: encoder tiles of 64 px (2 x 3 tiles of a 192 x 256 image),
/// decoder tiles of 8 latent px (1 x 3 tiles of a 24 x 40 latent).
#[test]
fn tiled_vae_matches_the_official_tilevae() {
    let (_, _, mut model) = load(DTypes::uniform(DType::F32));
    let data = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tiled_vae.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let (x, z) = (&data["x"], &data["z"]);
    let tiling = VaeTiling {
        encoder_tile: 64,
        decoder_tile: 8,
        tile_dtype: TileDtype::Fp32,
    };
    let vae = &mut model.vae;
    let whole = (
        vae.encoder.forward(x).unwrap(),
        vae.denoise_encoder.as_ref().unwrap().forward(x).unwrap(),
        vae.decoder.forward(z).unwrap(),
    );
    let fp32 = TileDtype::Fp32;
    let enc = tiled_vae::encode(&vae.encoder, x, tiling.encoder_tile, fp32).unwrap();
    let denc = tiled_vae::encode(
        vae.denoise_encoder.as_ref().unwrap(),
        x,
        tiling.encoder_tile,
        fp32,
    )
    .unwrap();
    let dec = tiled_vae::decode(&vae.decoder, z, tiling.decoder_tile, fp32).unwrap();
    for (name, ours, whole) in [
        ("encoder", &enc, &whole.0),
        ("denoise_encoder", &denc, &whole.1),
        ("decoder", &dec, &whole.2),
    ] {
        let official = &data[&format!("{name}_tiled")];
        let err = max_abs_diff(ours, official).unwrap();
        let vs_whole = max_abs_diff(ours, whole).unwrap();
        let scale = official
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        println!("{name}: tiled vs official tiled {err:.2e}, tiled vs whole {vs_whole:.2e} (max abs {scale:.2})");
        assert!(err <= 1e-4 * scale.max(1.0), "{name}: {err}");
    }
    // Through the autoencoder: `tiling` switches the tiled path on, and below the threshold
    // (long side <= tile + 2 pad) the tiled path is the whole-image path.
    vae.tiling = Some(tiling);
    let m = vae.encode_moments(x).unwrap();
    assert_eq!(
        max_abs_diff(&m, &vae.quant_conv.forward(&enc).unwrap()).unwrap(),
        0.0
    );
    let small = x.narrow(2, 0, 64).unwrap().narrow(3, 0, 128).unwrap();
    let tiled = vae.encode_moments(&small).unwrap();
    vae.tiling = None;
    assert_eq!(
        max_abs_diff(&tiled, &vae.encode_moments(&small).unwrap()).unwrap(),
        0.0
    );

    // Tiles held in half precision between layers (`--vae-tile-dtype`): each layer's output
    // is rounded once to 8 (bf16) or 11 (fp16) significant bits before the next layer reads
    // it. Relative to the output's largest value the error must stay within 8 units of the
    // format's precision u (2^-8 for bf16, 2^-11 for fp16): this random tiny VAE amplifies
    // the roundings to 3.6u (bf16) and 4.5u (fp16, encoder; measured), and a coarser format
    // than asked (bf16 for fp16: 29u) or a second rounding per layer fails. It must also
    // differ from the fp32 run (the option is not ignored).
    for (hold, u) in [
        (TileDtype::Bf16, 1.0 / 256.0),
        (TileDtype::Fp16, 1.0 / 2048.0),
    ] {
        let bound = 8.0 * u;
        for (name, got, want) in [
            (
                "encoder",
                tiled_vae::encode(&vae.encoder, x, tiling.encoder_tile, hold).unwrap(),
                &enc,
            ),
            (
                "decoder",
                tiled_vae::decode(&vae.decoder, z, tiling.decoder_tile, hold).unwrap(),
                &dec,
            ),
        ] {
            assert_eq!(got.dtype(), DType::F32, "{name}: results stay in f32");
            let err = max_abs_diff(&got, want).unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            println!(
                "{name} tiles held in {hold}: {:.2e} of the max abs",
                err / scale
            );
            assert!(err > 0.0, "{name}: {hold} tiles gave the fp32 result");
            assert!(
                err <= bound * scale,
                "{name} {hold}: {err} (max abs {scale})"
            );
        }
    }
}

/// Bounds of the q4_k rows below, in 8-bit levels. Measured (25 layers in Q4_K, 298 in Q8_0):
/// mean 1.02-6.45, max 8.3-46.7 (linear control scale the worst, as for the others).
const Q4K_MEAN: f64 = 10.0;
const Q4K_MAX: f64 = 64.0;

/// f16 / bf16 weights (the CPU computes in f32 with them) and Q8_0 linear layers against the
/// official f32 outputs on every `sample` case: diffusion in half precision or Q8_0 with an f32
/// VAE, and both in bf16.
#[test]
fn reduced_precision_stays_close_to_f32() {
    for dtypes in [
        DTypes::new(DType::F16, DType::F32),
        DTypes::new(DType::BF16, DType::F32),
        DTypes::new(DType::BF16, DType::BF16),
        DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q8_0)),
        DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q4K)),
    ] {
        let (fx, cfg, model) = load(dtypes);
        let stats = model.diffusion.as_ref().unwrap().quant_stats;
        if let Some(q) = dtypes.diffusion_quant {
            // Every linear layer of the tiny GLVControl + UNet is 32-aligned.
            assert!(stats.quantised > 20 && stats.kept == 0, "{stats:?}");
            if q == Quant::Q4K {
                // Its widths are 32 to 1568: the 256 and 512 wide ones (25 of 323 weights in
                // the file, the GLVControl + UNet ones among them) take Q4_K, the rest Q8_0.
                let q4 = stats.quantised - stats.fallback;
                assert!(q4 > 0 && stats.fallback > 0, "{stats:?}");
                println!(
                    "q4_k: {q4} linear layers in q4_k, {} in q8_0",
                    stats.fallback
                );
            } else {
                assert_eq!(stats.fallback, 0);
            }
        } else {
            assert_eq!(stats, QuantStats::default());
        }
        assert_eq!(model.weight_dtypes(), (Some(dtypes.diffusion), dtypes.vae));
        assert_eq!(
            model.diffusion_dtype(),
            DType::F32,
            "the CPU computes in f32"
        );
        let mut r = Restorer::from_model(cfg.clone(), model);
        let mut seen = Vec::new();
        for name in [
            "sample_edm_restore",
            "sample_edm_linear_control",
            "sample_tiled_edm",
            "sample_dpmpp2m",
        ] {
            let case = fx.case(name).unwrap();
            let o = options_of(case, &cfg);
            let x = fx.input(case, "x").unwrap();
            let s = r
                .restore_tensor(&x, &o, &mut replay(&fx, case), None)
                .unwrap();
            let want = fx.output(case, "samples").unwrap();
            let err = max_abs_diff(&s, &want).unwrap();
            let mean = (&s - &want)
                .unwrap()
                .abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            println!(
                "diffusion {:?} {:?} / vae {:?}: {name}: max abs err {err:.3e} ({:.2} levels of 8 bits), mean {mean:.2e} ({:.2} levels)",
                dtypes.diffusion,
                dtypes.diffusion_quant,
                dtypes.vae,
                err * 127.5,
                mean * 127.5
            );
            seen.push((err, mean));
        }
        for (name, (err, mean)) in ["edm", "linear_control", "tiled", "dpmpp2m"]
            .iter()
            .zip(seen)
        {
            if dtypes.diffusion_quant == Some(Quant::Q4K) {
                // Q4_K weights (where 256-aligned) on Q8_K activations.
                // Measured: see README (Precision).
                assert!(
                    (mean as f64) < Q4K_MEAN / 127.5,
                    "{dtypes:?} {name}: mean {mean}"
                );
                assert!(err < Q4K_MAX / 127.5, "{dtypes:?} {name}: max {err}");
            } else if dtypes.diffusion_quant.is_some() {
                // Q8_0 on weights and activations (8 bits per 32-value block each).
                // Measured: see README (Precision); the guards match bf16's.
                assert!(mean < 3.0 / 127.5, "{dtypes:?} {name}: mean {mean}");
                assert!(err < 32.0 / 127.5, "{dtypes:?} {name}: max {err}");
            } else if dtypes.diffusion == DType::F16 {
                // The fixture's weights are f16-exact: f16 storage must give the f32 result.
                assert!(err < 1e-4, "{dtypes:?} {name}: {err}");
            } else {
                // bf16 keeps 8 significant bits (relative rounding up to 2^-9 per weight).
                // Measured: mean 0.2-2.1 levels of 8 bits, max 1.4-22 (README); the guards sit
                // above the worst case (linear control scale, the most sensitive here).
                assert!(mean < 3.0 / 127.5, "{dtypes:?} {name}: mean {mean}");
                assert!(err < 32.0 / 127.5, "{dtypes:?} {name}: max {err}");
            }
        }
    }
}

/// `supir convert gguf`'s files load as checkpoints: the Q8_0 file gives the same restore as
/// quantising the original file at load (the same Q8_0 bytes: ggml's quantiser on both sides),
/// and the f16 file the f32 result (the fixture's weights are f16-exact).
#[test]
fn gguf_conversions_load_and_match_the_original() {
    use supir::gguf::{convert, GgufTarget, SUPIR_QUANT_PREFIXES};
    let (fx, cfg, dir) = fixture_and_dir("gguf-test");
    let prefixes = SUPIR_QUANT_PREFIXES.map(String::from).to_vec();
    let restore = |path: &Path, dtypes: DTypes| restore_edm_case(&fx, &cfg, path, dtypes);
    let q8 = DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q8_0));
    let q4 = DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q4K));
    for (target, dtypes, name) in [
        (GgufTarget::Q8_0, q8, "q8_0.gguf"),
        // Q4_K's quantiser searches scales: requantising the file's dequantised values would
        // not give its blocks back, so this equality holds only because the loader keeps them.
        (GgufTarget::Q4K, q4, "q4_k.gguf"),
        (GgufTarget::F16, DTypes::uniform(DType::F32), "f16.gguf"),
    ] {
        let out = dir.join(name);
        let summary = convert(&[fx.weights_path()], target, &prefixes, &out).unwrap();
        match target {
            GgufTarget::Q8_0 => assert!(summary.q8_0 > 20 && summary.q4_k == 0, "{summary:?}"),
            GgufTarget::Q4K => assert!(summary.q8_0 > 20 && summary.q4_k > 0, "{summary:?}"),
            GgufTarget::F16 => assert_eq!((summary.q8_0, summary.q4_k), (0, 0)),
        }
        let from_gguf = restore(&out, dtypes);
        let from_original = restore(&fx.weights_path(), dtypes);
        assert_eq!(
            max_abs_diff(&from_gguf, &from_original).unwrap(),
            0.0,
            "{name}"
        );
        if target == GgufTarget::Q4K {
            // The file's blocks are used as stored, whichever quantisation is asked for.
            let as_q8 = restore(&out, q8);
            assert_eq!(max_abs_diff(&as_q8, &from_gguf).unwrap(), 0.0);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tiny SUPIR fixture, its config, and a fresh scratch folder named after `tag`.
fn fixture_and_dir(tag: &str) -> (Fixture, SupirConfig, PathBuf) {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let dir = std::env::temp_dir().join(format!("supir-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    (fx, cfg, dir)
}

/// The fixture's `sample_edm_restore` case restored from the weights at `path` held as `dtypes`
/// (its recorded noise replayed).
fn restore_edm_case(
    fx: &Fixture,
    cfg: &SupirConfig,
    path: &Path,
    dtypes: DTypes,
) -> candle_core::Tensor {
    let case = fx.case("sample_edm_restore").unwrap();
    let model = SupirModel::load_with(cfg, &[path], dtypes, &Device::Cpu).unwrap();
    let mut r = Restorer::from_model(cfg.clone(), model);
    let x = fx.input(case, "x").unwrap();
    r.restore_tensor(&x, &options_of(case, cfg), &mut replay(fx, case), None)
        .unwrap()
}

/// A GGUF file laid out as stable-diffusion.cpp's `-M convert --type q8_0 --convert-name`
/// writes one (`supir::gguf::convert_sdcpp_style`, our writer imitating its names and its
/// choice of quantised tensors; see `gguf.rs`, and the files stable-diffusion.cpp itself wrote
/// in `files_written_by_stable_diffusion_cpp_restore`): text encoders under `cond_stage_model.*`
/// in HF CLIP naming, norms' weights and the text encoders' linears in Q8_0 too. With our own choice
/// of types but its names, it restores exactly as our file does (every key is found under its
/// stable-diffusion.cpp name); with its types, it stays within the q8_0 bounds of the f32 run.
#[test]
fn stable_diffusion_cpp_gguf_files_load() {
    use supir::gguf::{convert, convert_sdcpp_style, sdcpp_name, GgufIndex, GgufTarget, GgufType};
    let (fx, cfg, dir) = fixture_and_dir("sdcpp-test");
    let case = fx.case("sample_edm_restore").unwrap();
    let q8 = DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q8_0));
    let restore = |path: &Path| restore_edm_case(&fx, &cfg, path, q8);
    // Its layout, checked on the file's index.
    let sdcpp = dir.join("sdcpp-q8_0.gguf");
    let summary = convert_sdcpp_style(&[fx.weights_path()], GgufType::Q8_0, true, &sdcpp).unwrap();
    let bytes = std::fs::read(&sdcpp).unwrap();
    let index = GgufIndex::read(&bytes, &sdcpp).unwrap();
    let ty = |k: &str| index.tensors[k].0;
    use candle_core::quantized::GgmlDType as G;
    let l0 = "cond_stage_model.1.transformer.text_model.encoder.layers.0";
    assert_eq!(ty(&format!("{l0}.self_attn.in_proj.weight")), G::Q8_0);
    // Not converted: kept in the input's type.
    assert_eq!(ty(&format!("{l0}.self_attn.in_proj.bias")), G::F16);
    assert!(index.tensors.keys().all(|k| !k.starts_with("conditioner.")));
    assert!(summary.q8_0 > 100, "{summary:?}");
    assert_eq!(
        sdcpp_name("conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight")
            .as_deref(),
        Some("cond_stage_model.1.transformer.text_model.encoder.layers.3.mlp.fc1.weight")
    );
    let from_sdcpp = restore(&sdcpp);
    let want = fx.output(case, "samples").unwrap();
    let err = max_abs_diff(&from_sdcpp, &want).unwrap();
    let mean = (&from_sdcpp - &want)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    println!(
        "stable-diffusion.cpp-style q8_0 file vs official f32: max {:.2} levels, mean {:.2}",
        err * 127.5,
        mean * 127.5
    );
    assert!(
        mean < 3.0 / 127.5 && err < 32.0 / 127.5,
        "max {err}, mean {mean}"
    );

    // Its names with our types: the same restore as our own file.
    let ours = dir.join("ours-q8_0.gguf");
    let prefixes = supir::gguf::SUPIR_QUANT_PREFIXES.map(String::from).to_vec();
    convert(&[fx.weights_path()], GgufTarget::Q8_0, &prefixes, &ours).unwrap();
    let renamed = dir.join("renamed-q8_0.gguf");
    {
        // Rewrite our file's tensors under stable-diffusion.cpp's names, types unchanged.
        let src = supir::weights::Checkpoint::open(&ours).unwrap();
        let ours_bytes = std::fs::read(&ours).unwrap();
        let ours_index = GgufIndex::read(&ours_bytes, &ours).unwrap();
        let planned: Vec<supir::gguf::PlannedTensor> = src
            .tensors()
            .into_iter()
            .map(|(k, m)| supir::gguf::PlannedTensor {
                name: sdcpp_name(&k).unwrap_or(k.clone()),
                ty: match ours_index.tensors[&k].0 {
                    G::Q8_0 => GgufType::Q8_0,
                    G::F16 => GgufType::F16,
                    _ => GgufType::F32,
                },
                shape: m.shape,
            })
            .collect();
        let back: std::collections::HashMap<String, String> = src
            .tensors()
            .into_keys()
            .map(|k| (sdcpp_name(&k).unwrap_or(k.clone()), k))
            .collect();
        let mut w = std::io::BufWriter::new(std::fs::File::create(&renamed).unwrap());
        supir::gguf::write(&mut w, "renamed", &planned, |t| {
            Ok(src.load(&back[&t.name], DType::F32, &Device::Cpu)?.unwrap())
        })
        .unwrap();
    }
    assert_eq!(
        max_abs_diff(&restore(&renamed), &restore(&ours)).unwrap(),
        0.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// GGUF files stable-diffusion.cpp itself wrote from the fixture (`sd-cli -M convert`, see
/// `tests/data/sdcpp/README.md`; rebuilt from their parts and checked against their SHA-1):
/// every tensor is the one `convert_sdcpp_style` writes (name, type, shape, and bytes, its Q8_0
/// and Q4_K blocks included), its `--convert-name`
/// names are `sdcpp_name`'s, and the files restore as the original does: f16 exactly, q8_0 and
/// q4_k within the bounds of `reduced_precision_stays_close_to_f32`.
#[test]
fn files_written_by_stable_diffusion_cpp_restore() {
    use candle_core::quantized::GgmlDType as G;
    use supir::gguf::{convert_sdcpp_style, sdcpp_name, GgufIndex, GgufType};
    let (fx, cfg, dir) = fixture_and_dir("sdcpp-files");
    let case = fx.case("sample_edm_restore").unwrap();
    let restore = |path: &Path, dtypes: DTypes| restore_edm_case(&fx, &cfg, path, dtypes);
    let want = fx.output(case, "samples").unwrap();
    let levels = |s: &candle_core::Tensor| {
        let max = max_abs_diff(s, &want).unwrap() as f64;
        let mean = (s - &want).unwrap().abs().unwrap().mean_all().unwrap();
        (max * 127.5, mean.to_scalar::<f32>().unwrap() as f64 * 127.5)
    };
    let f32s = DTypes::uniform(DType::F32);
    let q8 = DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q8_0));
    let q4 = DTypes::new(DType::F16, DType::F32).with_diffusion_quant(Some(Quant::Q4K));
    let original = fx.weights_path();
    let (base_f32, base_q8) = (restore(&original, f32s), restore(&original, q8));

    // Its `--convert-name` names, found from the bytes of its files.
    let names = sdcpp_files::names();
    assert_eq!(names.len(), 93, "the text encoders' tensors");
    for (theirs, key) in &names {
        assert_eq!(sdcpp_name(key).as_ref(), Some(theirs), "{key}");
    }
    for (file, ty, convert_name) in [
        ("sd-f16.gguf", GgufType::F16, false),
        ("sd-f16-cn.gguf", GgufType::F16, true),
        ("sd-q8_0.gguf", GgufType::Q8_0, false),
        ("sd-q8_0-cn.gguf", GgufType::Q8_0, true),
        ("sd-q4_K.gguf", GgufType::Q4K, false),
    ] {
        let path = sdcpp_files::rebuild(&original, &names, file, &dir);
        let ours = dir.join(format!("ours-{file}"));
        convert_sdcpp_style(&[&original], ty, convert_name, &ours).unwrap();
        let (theirs_bytes, ours_bytes) =
            (std::fs::read(&path).unwrap(), std::fs::read(&ours).unwrap());
        let theirs_index = GgufIndex::read(&theirs_bytes, &path).unwrap();
        let ours_index = GgufIndex::read(&ours_bytes, &ours).unwrap();
        let mut keys: Vec<&String> = theirs_index.tensors.keys().collect();
        keys.sort();
        let mut ours_keys: Vec<&String> = ours_index.tensors.keys().collect();
        ours_keys.sort();
        assert_eq!(keys, ours_keys, "{file}: the tensors");
        let mut blocks = 0;
        for k in keys {
            let (t_ty, t_shape, ts, te) = &theirs_index.tensors[k];
            let (o_ty, o_shape, os, oe) = &ours_index.tensors[k];
            assert_eq!((t_ty, t_shape), (o_ty, o_shape), "{file}: {k}");
            let same = theirs_bytes[*ts..*te] == ours_bytes[*os..*oe];
            assert!(same, "{file}: {k} ({t_ty:?}) holds other bytes");
            blocks += usize::from(matches!(t_ty, G::Q8_0 | G::Q4K));
        }
        let (restored, bound) = match ty {
            GgufType::F16 => {
                // The fixture's weights are f16: the same restore, whatever the layers hold.
                assert_eq!(max_abs_diff(&restore(&path, f32s), &base_f32).unwrap(), 0.0);
                assert_eq!(max_abs_diff(&restore(&path, q8), &base_q8).unwrap(), 0.0);
                (base_f32.clone(), None)
            }
            GgufType::Q8_0 => (restore(&path, q8), Some((32.0, 3.0))),
            _ => (restore(&path, q4), Some((Q4K_MAX, Q4K_MEAN))),
        };
        let (max, mean) = levels(&restored);
        println!(
            "{file}: {} tensors, {blocks} block-quantised; restore vs official f32: max \
             {max:.2} levels, mean {mean:.2}",
            theirs_index.tensors.len()
        );
        if let Some((max_bound, mean_bound)) = bound {
            assert!(blocks > 20, "{file}: {blocks}");
            assert!(
                max < max_bound && mean < mean_bound,
                "{file}: max {max}, mean {mean}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Our Q4_K quantiser (`supir::kernels::q4k::quantize_row_gguf`, used by `supir convert` and at
/// load) writes the very blocks stable-diffusion.cpp wrote in `sd-q4_K.gguf`: all 5060 blocks of
/// its 29 Q4_K tensors, from the fixture's f16 weights widened to f32 as it does.
#[test]
fn q4_k_blocks_equal_stable_diffusion_cpps() {
    use candle_core::quantized::GgmlDType as G;
    use supir::gguf::GgufIndex;
    use supir::kernels::q4k;
    let fx = Fixture::load(fixture_dir()).unwrap();
    let dir = std::env::temp_dir().join(format!("supir-sdcpp-q4k-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let names = sdcpp_files::names();
    let path = sdcpp_files::rebuild(&fx.weights_path(), &names, "sd-q4_K.gguf", &dir);
    let bytes = std::fs::read(&path).unwrap();
    let index = GgufIndex::read(&bytes, &path).unwrap();
    let fixture = supir::weights::Checkpoint::open(fx.weights_path()).unwrap();
    let (mut tensors, mut blocks, mut differ) = (0, 0, Vec::new());
    for (name, (ty, _, start, end)) in &index.tensors {
        if *ty != G::Q4K {
            continue;
        }
        let w = fixture
            .load(name, DType::F16, &Device::Cpu)
            .unwrap()
            .unwrap();
        let w: Vec<f32> = w
            .flatten_all()
            .unwrap()
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let mut ours = Vec::new();
        q4k::quantize_row_gguf(&w, &mut ours);
        let theirs = &bytes[*start..*end];
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (b, (o, t)) in ours
            .chunks(q4k::BLOCK_BYTES)
            .zip(theirs.chunks(q4k::BLOCK_BYTES))
            .enumerate()
        {
            if o != t {
                differ.push(format!("{name} block {b}"));
            }
        }
        tensors += 1;
        blocks += theirs.len() / q4k::BLOCK_BYTES;
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!((tensors, blocks), (29, 5060));
    assert!(
        differ.is_empty(),
        "{} of {blocks} blocks differ, e.g. {:?}",
        differ.len(),
        &differ[..differ.len().min(5)]
    );
}

/// The files in `tests/data/sdcpp/`: each `FILE.part` is stable-diffusion.cpp's FILE without the
/// data of its F16 tensors, which are byte copies of the fixture's (see its README.md).
mod sdcpp_files {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use sha1::{Digest, Sha1};

    fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sdcpp")
    }

    /// `names.tsv`: its name -> the fixture's key, for the tensors stored under other names.
    pub fn names() -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(data_dir().join("names.tsv")).unwrap();
        text.lines()
            .map(|l| {
                let (theirs, key) = l.split_once('\t').unwrap();
                (theirs.to_string(), key.to_string())
            })
            .collect()
    }

    /// (data start, [(name, ggml type, offset)] in file order) of a GGUF v3 header without
    /// key-values, as stable-diffusion.cpp writes it.
    fn tensors(b: &[u8]) -> (usize, Vec<(String, u32, usize)>) {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        assert_eq!((&b[..4], u32_at(4), u64_at(16)), (&b"GGUF"[..], 3, 0));
        let mut pos = 24;
        let mut out = Vec::new();
        for _ in 0..u64_at(8) {
            let n = u64_at(pos);
            let name = String::from_utf8(b[pos + 8..pos + 8 + n].to_vec()).unwrap();
            pos += 8 + n;
            pos += 4 + 8 * u32_at(pos) as usize;
            out.push((name, u32_at(pos), u64_at(pos + 4)));
            pos += 12;
        }
        out.sort_by_key(|t| t.2);
        (pos.next_multiple_of(32), out)
    }

    /// Writes FILE, rebuilt from `FILE.part` and the fixture `weights`, to `dir`, and checks its
    /// SHA-1 against `SHA1SUMS`.
    pub fn rebuild(
        weights: &Path,
        names: &BTreeMap<String, String>,
        file: &str,
        dir: &Path,
    ) -> PathBuf {
        const F16: u32 = 1;
        let part = std::fs::read(data_dir().join(format!("{file}.part"))).unwrap();
        let fixture = supir::weights::Checkpoint::open(weights).unwrap();
        let (start, tensors) = tensors(&part);
        let mut out = part[..start].to_vec();
        let mut pos = start;
        for (i, (name, ty, off)) in tensors.iter().enumerate() {
            let next = tensors.get(i + 1).map(|t| t.2);
            if *ty == F16 {
                let key = names.get(name).unwrap_or(name);
                let t = fixture.load(key, candle_core::DType::F16, &candle_core::Device::Cpu);
                let t = t
                    .unwrap()
                    .unwrap_or_else(|| panic!("{file}: no fixture key {key}"));
                let v = t.flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
                out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
                // Zeros to the next tensor (after the last one: to the alignment).
                let end = next.unwrap_or_else(|| (off + 2 * v.len()).next_multiple_of(32));
                out.resize(start + end, 0);
            } else {
                let end = next.map_or(part.len(), |n| pos + n - off);
                out.extend_from_slice(&part[pos..end]);
                pos = end;
            }
        }
        let sums = std::fs::read_to_string(data_dir().join("SHA1SUMS")).unwrap();
        let want = sums
            .lines()
            .find_map(|l| l.strip_suffix(&format!("  {file}")))
            .unwrap_or_else(|| panic!("{file} not in SHA1SUMS"));
        let got: String = Sha1::digest(&out)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            got, want,
            "{file} rebuilt: the fixture changed? (see its README.md)"
        );
        let path = dir.join(file);
        std::fs::write(&path, out).unwrap();
        path
    }
}
