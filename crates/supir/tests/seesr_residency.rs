//! SeeSR's staged residency on the tiny release (`fixtures/seesr-tiny`): the same images, tags,
//! prompts and every traced intermediate as with every network resident, over several images
//! and samples (what staged frees is read again), for both presets; the networks are freed
//! where they should be; a bad release fails at load under either residency with the same error.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::RgbImage;
use supir::pipelines::seesr::flow::{self, Trace};
use supir::pipelines::seesr::{Residency, SeesrModel, SeesrOptions, SeesrPaths, SeesrPreset};
use supir::schedulers::sampler::SeededNoise;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

fn image(seed: u32) -> RgbImage {
    RgbImage::from_fn(20, 12, |x, y| {
        image::Rgb([
            (x * 12 + seed * 7) as u8,
            (y * 20 + seed * 3) as u8,
            ((x + y) * 5 + seed) as u8,
        ])
    })
}

fn options(preset: SeesrPreset, residency: Residency) -> SeesrOptions {
    SeesrOptions {
        steps: 2,
        process_size: 64,
        // A tiled latent (10 x 6) too, so every tile's network call goes through the staging.
        latent_tile: 4,
        latent_overlap: 1,
        residency,
        ..SeesrOptions::preset(preset)
    }
}

/// Every traced tensor of a run as raw f32 values, with its name.
fn flat(trace: &Trace) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    trace
        .0
        .iter()
        .map(|(n, t)| {
            let v = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n.clone(), t.dims().to_vec(), v)
        })
        .collect()
}

/// Two images, two samples each, on one model (as a folder run does): outputs and traces.
fn run(model: &SeesrModel, opts: &SeesrOptions) -> Vec<(flow::SeesrOutput, Trace)> {
    let mut out = Vec::new();
    for i in 0..2 {
        let mut noise = SeededNoise::new(7 + i as u64);
        let mut trace = Trace::default();
        let p = flow::prepare(model, &image(i), opts, Some(&mut trace)).unwrap();
        if model.residency() == Residency::Staged {
            assert!(!model.prompt_nets_loaded(), "DAPE + text encoder freed");
        }
        for _ in 0..2 {
            let o = flow::sample_image(
                model,
                &p,
                opts,
                &mut noise,
                Some(&mut trace),
                &mut |_, _| Ok(()),
            )
            .unwrap();
            if model.residency() == Residency::Staged {
                assert!(
                    !model.diffusion_loaded(),
                    "ControlNet + UNet freed before the decode"
                );
            }
            out.push((o, std::mem::take(&mut trace)));
        }
    }
    out
}

fn staged_matches_resident(preset: SeesrPreset) {
    let paths = SeesrPaths::from_models_dir(&fixture());
    let dev = Device::Cpu;
    let staged_opts = options(preset, Residency::Staged);
    let resident_opts = options(preset, Residency::Resident);
    let staged = SeesrModel::load(&paths, &staged_opts, &dev).unwrap();
    assert!(
        !staged.diffusion_loaded(),
        "staged reads ControlNet + UNet for sampling only"
    );
    assert!(staged.prompt_nets_loaded());
    let resident = SeesrModel::load(&paths, &resident_opts, &dev).unwrap();
    assert!(resident.diffusion_loaded() && resident.prompt_nets_loaded());

    let a = run(&staged, &staged_opts);
    let b = run(&resident, &resident_opts);
    assert!(resident.diffusion_loaded() && resident.prompt_nets_loaded());
    assert_eq!(a.len(), 4);
    for (i, ((oa, ta), (ob, tb))) in a.iter().zip(&b).enumerate() {
        assert_eq!(oa.image, ob.image, "{preset} output {i}");
        assert_eq!(oa.tags, ob.tags);
        assert_eq!(oa.prompt, ob.prompt);
        let (fa, fb) = (flat(ta), flat(tb));
        assert!(
            fa.len() >= 5,
            "{preset} output {i}: {} traced tensors",
            fa.len()
        );
        assert_eq!(fa.len(), fb.len());
        for ((na, sa, va), (nb, sb, vb)) in fa.iter().zip(&fb) {
            assert_eq!((na, sa), (nb, sb));
            // Bit for bit (NaN-safe).
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(va), bits(vb), "{preset} output {i}: {na} differs");
        }
    }
    // The samples of one image differ (the stream continues), so the comparison is not vacuous.
    assert_ne!(a[0].0.image, a[1].0.image);
}

#[test]
fn staged_gives_the_resident_outputs_bit_for_bit() {
    staged_matches_resident(SeesrPreset::Default);
}

#[test]
fn staged_gives_the_resident_outputs_bit_for_bit_turbo() {
    staged_matches_resident(SeesrPreset::Turbo);
}

/// Copies the tiny release to a temporary folder.
fn copy_release(tag: &str) -> PathBuf {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let dst = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &dst);
            } else {
                std::fs::copy(e.path(), dst).unwrap();
            }
        }
    }
    let dir = std::env::temp_dir().join(format!(
        "supir-seesr-residency-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&fixture(), &dir);
    dir
}

#[test]
fn a_bad_diffusion_file_fails_at_load_under_either_residency() {
    let dev = Device::Cpu;
    for (sub, other) in [("unet", "controlnet"), ("controlnet", "unet")] {
        let dir = copy_release(sub);
        // The other network's weights: present, readable, with the wrong keys.
        let w = "diffusion_pytorch_model.safetensors";
        std::fs::copy(
            dir.join("seesr").join(other).join(w),
            dir.join("seesr").join(sub).join(w),
        )
        .unwrap();
        let paths = SeesrPaths::from_models_dir(&dir);
        for preset in SeesrPreset::ALL {
            let err = |r| {
                SeesrModel::load(&paths, &options(preset, r), &dev)
                    .err()
                    .unwrap_or_else(|| panic!("{preset} {r}: a bad seesr/{sub} loaded"))
                    .to_string()
                    // The message, without the backtrace candle appends under RUST_BACKTRACE.
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            };
            let (s, r) = (err(Residency::Staged), err(Residency::Resident));
            if preset == SeesrPreset::Default {
                assert_eq!(s, r, "seesr/{sub}");
            }
        }
        // A missing file is named before anything is read, under either residency.
        std::fs::remove_file(dir.join("seesr").join(sub).join(w)).unwrap();
        for r in [Residency::Staged, Residency::Resident] {
            let e = SeesrModel::load(&paths, &options(SeesrPreset::Default, r), &dev)
                .err()
                .expect("missing weights")
                .to_string();
            assert!(e.contains(&format!("seesr/{sub}")), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
