//! Per-tile ("local") prompts of the tiled samplers on the tiny fixture model: prompts equal to
//! the caption change nothing, a tile's own prompt changes that tile, and a wrong count, an
//! untiled sampler or several samples are refused.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use supir::models::supir_config::SupirConfig;
use supir::parity::fixture::{max_abs_diff, Fixture};
use supir::pipelines::supir::flow::{sample_latent_with, PromptConditioning};
use supir::pipelines::supir::model::SupirModel;
use supir::pipelines::supir::restore::{RestoreOptions, Restorer, VAE_PASSES};
use supir::schedulers::sampler::{SamplerKind, SeededNoise};
use supir::schedulers::tiling::TileWindow;
use supir::Error;

fn restorer() -> Restorer {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny");
    let fx = Fixture::load(dir).unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let model = SupirModel::load(&cfg, &[fx.weights_path()], DType::F32, &Device::Cpu).unwrap();
    Restorer::from_model(cfg, model)
}

/// A 64x64 model input (8x8 latent), 2 steps of `sampler` with 4x4 latent tiles at `stride`.
fn options(sampler: SamplerKind, stride: usize) -> RestoreOptions {
    RestoreOptions {
        sampler: Some(sampler),
        steps: 2,
        min_size: 64,
        sampler_tile_size: Some(4),
        sampler_tile_stride: Some(stride),
        caption: "a photo of a cat".into(),
        seed: 7,
        ..RestoreOptions::default()
    }
}

fn input() -> Tensor {
    let mut rng = SeededNoise::new(3);
    let v: Vec<f32> = (0..3 * 64 * 64)
        .map(|_| (rng.normal() * 0.5).clamp(-1.0, 1.0) as f32)
        .collect();
    Tensor::from_vec(v, (1, 3, 64, 64), &Device::Cpu).unwrap()
}

#[test]
fn layout_lists_the_tiles_in_pixels() {
    let r = restorer();
    let o = options(SamplerKind::TiledRestoreEdm, 4);
    let l = o.tile_layout(&r.cfg, 64, 64).unwrap();
    assert_eq!(
        (l.width, l.height, l.latent_width, l.latent_height),
        (64, 64, 8, 8)
    );
    let px: Vec<(usize, usize, usize, usize, usize)> = l
        .pixel_windows()
        .iter()
        .map(|t| (t.index, t.w0, t.h0, t.w1, t.h1))
        .collect();
    assert_eq!(
        px,
        [
            (0, 0, 0, 32, 32),
            (1, 32, 0, 64, 32),
            (2, 0, 32, 32, 64),
            (3, 32, 32, 64, 64)
        ]
    );
    // Stride 2: 3 x 3 overlapping tiles; upscale / min size apply first (32x16 -> 128x64 px).
    let o = RestoreOptions {
        upscale: 2.0,
        ..options(SamplerKind::TiledRestoreDpmpp2m, 2)
    };
    let l = o.tile_layout(&r.cfg, 32, 16).unwrap();
    assert_eq!(
        (l.latent_width, l.latent_height, l.tiles.len()),
        (16, 8, 21)
    );
    let e = options(SamplerKind::RestoreEdm, 4)
        .tile_layout(&r.cfg, 64, 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RestoreEDMSampler") && e.contains("Tiled"),
        "{e}"
    );
}

/// Every tile prompt equal to the caption: bit-identical to the global-caption run, for both
/// tiled samplers, with overlapping tiles.
#[test]
fn tile_prompts_equal_to_the_caption_change_nothing() {
    let mut r = restorer();
    let x = input();
    for kind in [
        SamplerKind::TiledRestoreEdm,
        SamplerKind::TiledRestoreDpmpp2m,
    ] {
        let o = options(kind, 2);
        let n = o.tile_layout(&r.cfg, 64, 64).unwrap().tiles.len();
        assert_eq!(n, 9);
        let global = r
            .restore_tensor(&x, &o, &mut SeededNoise::new(o.seed), None)
            .unwrap();
        let local = RestoreOptions {
            tile_prompts: vec![o.caption.clone(); n],
            caption: "ignored when there are tile prompts".into(),
            ..o.clone()
        };
        let mut calls = 0;
        let out = r
            .restore_tensor(
                &x,
                &local,
                &mut SeededNoise::new(o.seed),
                Some(&mut || {
                    calls += 1;
                    Ok(())
                }),
            )
            .unwrap();
        // Two steps on each tile, plus stage 1's three VAE passes and the final decode.
        assert_eq!(calls, 2 * n + VAE_PASSES);
        assert_eq!(max_abs_diff(&out, &global).unwrap(), 0.0, "{kind:?}");
    }
}

/// Non-overlapping 2x2 tiles: another prompt for tile 1 changes the sampled latent in tile 1
/// only (each latent pixel is blended from one tile), and the decoded image.
#[test]
fn a_tile_prompt_changes_its_tile() {
    let mut r = restorer();
    let x = input();
    let cat = "a photo of a cat";
    let prompts_a = [cat; 4];
    let prompts_b = [cat, "a red brick wall, sharp focus", cat, cat];
    for kind in [
        SamplerKind::TiledRestoreEdm,
        SamplerKind::TiledRestoreDpmpp2m,
    ] {
        let o = options(kind, 4);
        let so = o.sample_options(&r.cfg).unwrap();
        let tiles = o.tile_layout(&r.cfg, 64, 64).unwrap().tiles;
        let latent = |prompts: &[&str]| {
            let (c, uc) = r
                .model
                .conditioner
                .prepare_tile_condition(prompts, &so.p_p, &so.n_p)
                .unwrap();
            let c = PromptConditioning::PerTile(c);
            sample_latent_with(&r.model, &x, &c, &uc, &so, &mut SeededNoise::new(1), None)
                .unwrap()
                .latent
        };
        let (a, b) = (latent(&prompts_a), latent(&prompts_b));
        let diff_in = |t: &TileWindow| max_abs_diff(&t.slice(&a).unwrap(), &t.slice(&b).unwrap());
        for t in &tiles {
            let d = diff_in(t).unwrap();
            println!("{kind:?} tile {}: latent max abs diff {d:.3e}", t.index);
            if t.index == 1 {
                assert!(d > 1e-3, "{kind:?}: tile 1 unchanged ({d})");
            } else {
                assert_eq!(d, 0.0, "{kind:?}: tile {} changed", t.index);
            }
        }
        // Through the restore path: the image changes too.
        let with = |p: &[&str]| RestoreOptions {
            tile_prompts: p.iter().map(|s| s.to_string()).collect(),
            ..o.clone()
        };
        let ia = r
            .restore_tensor(&x, &with(&prompts_a), &mut SeededNoise::new(1), None)
            .unwrap();
        let ib = r
            .restore_tensor(&x, &with(&prompts_b), &mut SeededNoise::new(1), None)
            .unwrap();
        assert!(max_abs_diff(&ia, &ib).unwrap() > 1e-3, "{kind:?}");
    }
}

#[test]
fn wrong_count_untiled_sampler_and_samples_are_refused() {
    let mut r = restorer();
    let x = input();
    let o = RestoreOptions {
        tile_prompts: vec!["a".into(), "b".into(), "c".into()],
        ..options(SamplerKind::TiledRestoreEdm, 4)
    };
    let e = r
        .restore_tensor(&x, &o, &mut SeededNoise::new(1), None)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TilePromptCount {
                prompts: 3,
                tiles: 4,
                latent_h: 8,
                latent_w: 8,
                tile_size: 4,
                tile_stride: 4,
                ..
            }
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    for part in [
        "3 tile prompts for 4 tiles",
        "8x8 latent",
        "tiles of 4 at stride 4",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
    let untiled = RestoreOptions {
        sampler: Some(SamplerKind::RestoreDpmpp2m),
        tile_prompts: vec!["a".into()],
        ..o.clone()
    };
    let e = r
        .restore_tensor(&x, &untiled, &mut SeededNoise::new(1), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tiled sampler") && e.contains("RestoreDPMPP2MSampler"),
        "{e}"
    );
    let samples = RestoreOptions {
        num_samples: 2,
        tile_prompts: vec!["a".into(); 4],
        ..o.clone()
    };
    let e = samples.validate().unwrap_err().to_string();
    assert!(e.contains("one sample"), "{e}");
    // The pipeline itself refuses a batch of two images.
    let so = o.sample_options(&r.cfg).unwrap();
    let (c, uc) = r
        .model
        .conditioner
        .prepare_tile_condition(&["a"; 4], &so.p_p, &so.n_p)
        .unwrap();
    let x2 = Tensor::cat(&[&x, &x], 0).unwrap();
    let e = sample_latent_with(
        &r.model,
        &x2,
        &PromptConditioning::PerTile(c),
        &uc,
        &so,
        &mut SeededNoise::new(1),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("batch of 2"), "{e}");
}
