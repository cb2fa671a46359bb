//! SeeSR end to end against the official flow (`fixtures/seesr-tiny` pipeline cases, every random
//! draw replayed): RAM embeddings, prompt embeddings, the control image, the latent after each
//! DDPM step, the decoded, colour-fixed and resized images; plus the whole fixture through the
//! parity runner.

use std::path::{Path, PathBuf};

use candle_core::Device;
use supir::pipelines::seesr::flow::{self, gaussian_weights, tile_origins};
use supir::pipelines::seesr::{SeesrModel, SeesrOptions, SeesrPaths};
use supir::schedulers::sampler::SeededNoise;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

#[test]
fn pipeline_cases_match_the_official_flow() {
    let expected = [
        "pipeline_lr_adain",
        "pipeline_noise_wavelet",
        "pipeline_tiled",
        "pipeline_turbo",
    ];
    let report = supir::parity::run(fixture(), Some("pipeline"), |_| {}).unwrap();
    assert_eq!(report.results.len(), expected.len());
    for name in expected {
        let r = report
            .results
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("case {name} did not run"));
        assert!(r.passed(), "{name}: {:?} {:?}", r.error, r.checks);
        // Every stage is compared, not only the final image.
        for out in [
            "prompt_embeds",
            "latents_init",
            "latents_step_01",
            "final_u8",
        ] {
            assert!(
                r.checks.iter().any(|c| c.name == out),
                "{name}: {out} not compared"
            );
        }
        for c in &r.checks {
            eprintln!(
                "{name:24} {:28} {:.3e} (atol {:.3e})",
                c.name, c.max_err, c.atol
            );
        }
    }
}

#[test]
fn every_seesr_case_passes() {
    let report = supir::parity::run(fixture(), None, |_| {}).unwrap();
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    assert_eq!(report.failed(), 0, "{:?}", report.results);
    assert_eq!(report.passed(), 25);
}

#[test]
fn tiles_cover_the_latent_as_the_official_loop() {
    // 28 x 32 latent (h x w), tiles of 16 every 12: x origins 0, 12, 16; y origins 0, 12.
    let t = tile_origins(28, 32, 16, 4);
    assert_eq!(
        t,
        vec![(0, 0), (0, 12), (12, 0), (12, 12), (16, 0), (16, 12)]
    );
    // Each pixel is covered; the last row/column is flush with the border.
    for y in 0..28 {
        for x in 0..32 {
            assert!(t
                .iter()
                .any(|&(ox, oy)| (ox..ox + 16).contains(&x) && (oy..oy + 16).contains(&y)));
        }
    }
    // Weights: x centred at (w - 1) / 2, y at h / 2 (the official asymmetry).
    let w = gaussian_weights(4, 4);
    assert!((w[4 + 1] - w[4 + 2]).abs() < 1e-12, "x symmetric about 1.5");
    assert!(w[4 + 1] < w[2 * 4 + 1], "y peaks at row 2");
}

#[test]
fn a_seed_gives_the_same_image_and_samples_differ() {
    let opts = SeesrOptions {
        steps: 2,
        process_size: 64,
        ..Default::default()
    };
    let paths = SeesrPaths::from_models_dir(&fixture());
    let model = SeesrModel::load(&paths, &opts, &Device::Cpu).unwrap();
    let img = image::RgbImage::from_fn(20, 12, |x, y| {
        image::Rgb([(x * 12) as u8, (y * 20) as u8, ((x + y) * 5) as u8])
    });
    let run = |seed| {
        let mut noise = SeededNoise::new(seed);
        flow::restore_image(&model, &img, &opts, &mut noise, None, &mut |_, _| Ok(())).unwrap()
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a.image.dimensions(), (80, 48));
    assert_eq!(a.image, b.image);
    assert_ne!(a.image, c.image);
    assert!(
        a.prompt.ends_with(", ,clean, high-resolution, 8k"),
        "{}",
        a.prompt
    );
    assert!(!a.tags.is_empty());
}

#[test]
fn a_fixture_of_another_seed_and_structure_passes_too() {
    // One layer per block, transformer depth 2, RAM window 6, upscale 2, 48 px VAE tiles, ...
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-alt2");
    let report = supir::parity::run(&dir, None, |_| {}).unwrap();
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    let failed: Vec<_> = report.results.iter().filter(|r| !r.passed()).collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(report.passed(), 25);
}

/// `--diffusion-dtype q8_0` / `q4_k` (ControlNet + UNet linear layers in Q8_0, or Q4_K where
/// 256 wide and Q8_0 elsewhere; the rest f16): the restored image of the tiny release against
/// the f32 run with the same seed, in 8-bit levels.
#[test]
fn q8_0_diffusion_weights_stay_close_to_f32() {
    use supir::pipelines::supir::restore::Precision;
    let paths = SeesrPaths::from_models_dir(&fixture());
    let img = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x * y) % 251) as u8])
    });
    let run = |diffusion_dtype| {
        let opts = SeesrOptions {
            steps: 4,
            process_size: 64,
            diffusion_dtype,
            ..Default::default()
        };
        let model = SeesrModel::load(&paths, &opts, &Device::Cpu).unwrap();
        let mut noise = SeededNoise::new(5);
        flow::restore_image(&model, &img, &opts, &mut noise, None, &mut |_, _| Ok(()))
            .unwrap()
            .image
    };
    let f32_img = run(Precision::Fp32);
    // (precision, mean bound, max bound) in levels; q4_k measured: see README.
    for (precision, mean_bound, max_bound) in [
        (Precision::Q8_0, 3.0, 32.0),
        (Precision::Q4K, Q4K_MEAN, Q4K_MAX),
    ] {
        let q_img = run(precision);
        let d: Vec<f64> = f32_img
            .as_raw()
            .iter()
            .zip(q_img.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .collect();
        let max = d.iter().cloned().fold(0.0, f64::max);
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        eprintln!("SeeSR {precision} vs f32: max {max} levels, mean {mean:.2} levels");
        assert!(
            max > 0.0,
            "{precision} changed nothing: the layers were not quantised"
        );
        assert!(
            mean < mean_bound && max < max_bound,
            "{precision}: max {max}, mean {mean}"
        );
    }
}

/// Bounds of the q4_k row above, in 8-bit levels. Measured: mean 2.94, max 24 (46 of the
/// tiny release's ControlNet + UNet linear layers are 512 wide and take Q4_K, those 32 or 64
/// wide Q8_0, the 8 and 16 wide ones stay f16).
const Q4K_MEAN: f64 = 4.0;
const Q4K_MAX: f64 = 32.0;
