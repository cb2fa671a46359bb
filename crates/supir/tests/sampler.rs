//! Samplers, guiders, tiling and noise sources against the official formulas, with fake
//! denoisers (no networks).
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;

use candle_core::{Device, Tensor};
use supir::schedulers::denoiser::LegacyDdpm;
use supir::schedulers::sampler::{
    churn_gamma, karras_sigmas, linear_control_scale, restoration_active, restoration_weight,
    DrawKind, LinearCfg, NoiseSource, ReplayNoise, Sampler, SamplerKind, SamplerOptions,
    SeededNoise, SIGMA_MAX,
};
use supir::schedulers::tiling::{gaussian_profile, gaussian_weights, sliding_windows, TileWindow};

type R<T> = anyhow::Result<T>;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

fn vec4(t: &Tensor) -> R<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[test]
fn linear_cfg_schedule() -> R<()> {
    let g = LinearCfg::new(1.0, 4.0);
    assert!(close(g.scale_at(SIGMA_MAX) as f64, 1.0, 1e-6));
    assert!(close(g.scale_at(0.0) as f64, 4.0, 1e-6));
    assert!(close(g.scale_at(SIGMA_MAX / 2.0) as f64, 2.5, 1e-6));
    let v = LinearCfg::vanilla(7.5);
    assert_eq!(v.scale_at(3.0), 7.5);
    // guide: batch [uc, c] -> uc + s (c - uc)
    let dev = Device::Cpu;
    let uc = Tensor::new(&[[[[1.0f32, 2.0]]]], &dev)?;
    let c = Tensor::new(&[[[[3.0f32, -2.0]]]], &dev)?;
    let both = Tensor::cat(&[&uc, &c], 0)?;
    let sigma = 5.0f32;
    let s = g.scale_at(sigma) as f64;
    let out = vec4(&g.guide(&both, sigma)?)?;
    assert!(close(out[0] as f64, 1.0 + s * 2.0, 1e-6));
    assert!(close(out[1] as f64, 2.0 + s * -4.0, 1e-6));
    assert!(g
        .guide(
            &Tensor::zeros((3, 1, 1, 1), candle_core::DType::F32, &dev)?,
            1.0
        )
        .is_err());
    // batchify_sample's mapping of the flags
    let o = SamplerOptions {
        use_linear_cfg: true,
        cfg_scale: 4.0,
        cfg_scale_start: 1.0,
        ..Default::default()
    };
    assert_eq!(o.guider(), LinearCfg::new(1.0, 4.0));
    let o = SamplerOptions {
        use_linear_cfg: false,
        ..o
    };
    assert_eq!(o.guider(), LinearCfg::vanilla(4.0));
    Ok(())
}

#[test]
fn churn_restoration_control_formulas() {
    let cap = 2f64.sqrt() - 1.0;
    assert!(close(
        churn_gamma(5.0, 5, 3.0, 0.0, f64::INFINITY),
        cap,
        1e-12
    ));
    assert!(close(
        churn_gamma(0.5, 11, 3.0, 0.0, f64::INFINITY),
        0.05,
        1e-12
    ));
    assert_eq!(churn_gamma(0.0, 11, 3.0, 0.0, f64::INFINITY), 0.0);
    assert_eq!(churn_gamma(5.0, 11, 3.0, 4.0, 10.0), 0.0);
    assert_eq!(churn_gamma(5.0, 11, 12.0, 4.0, 10.0), 0.0);

    assert!(close(restoration_weight(SIGMA_MAX, 4.0) as f64, 1.0, 1e-6));
    assert!(close(
        restoration_weight(SIGMA_MAX / 2.0, 4.0) as f64,
        1.0 / 16.0,
        1e-6
    ));
    assert!(restoration_active(0.06, 4.0, 0.05));
    assert!(!restoration_active(0.04, 4.0, 0.05));
    assert!(!restoration_active(0.0, 4.0, 0.05));
    assert!(!restoration_active(3.0, -1.0, 0.05));

    assert!(close(linear_control_scale(SIGMA_MAX, 0.9, 0.0), 0.0, 1e-9));
    assert!(close(linear_control_scale(0.0, 0.9, 0.0), 0.9, 1e-12));
    let s = 3.0f32;
    assert!(close(
        linear_control_scale(s, 0.9, 0.2),
        s as f64 / 14.6146 * (0.2 - 0.9) + 0.9,
        1e-7
    ));
}

#[test]
fn karras_matches_formula() {
    let (lo, hi) = (0.0292f32, 14.6146f32);
    let s = karras_sigmas(4, lo, hi, 7.0);
    assert_eq!(s.len(), 5);
    assert_eq!(s[4], 0.0);
    for (i, &v) in s[..4].iter().enumerate() {
        let r = i as f64 / 3.0;
        let (a, b) = ((hi as f64).powf(1.0 / 7.0), (lo as f64).powf(1.0 / 7.0));
        let want = (a + r * (b - a)).powf(7.0);
        assert!(close(v as f64, want, 1e-5), "{i}: {v} vs {want}");
    }
    assert!(close(s[0] as f64, hi as f64, 1e-6));
    assert!(close(s[3] as f64, lo as f64, 1e-5));
    assert_eq!(karras_sigmas(1, lo, hi, 7.0).len(), 2);
}

#[test]
fn sampler_sigmas_by_kind() -> R<()> {
    let opts = SamplerOptions {
        num_steps: 4,
        ..Default::default()
    };
    let legacy = LegacyDdpm::default().sampling_sigmas(4)?;
    let edm = Sampler::new(SamplerKind::RestoreEdm, opts.clone())?;
    assert_eq!(edm.sigmas()?, legacy);
    let dpm = Sampler::new(SamplerKind::RestoreDpmpp2m, opts.clone())?;
    assert_eq!(dpm.sigmas()?, karras_sigmas(4, legacy[3], legacy[0], 7.0));
    assert!(Sampler::new(
        SamplerKind::RestoreEdm,
        SamplerOptions {
            num_steps: 0,
            ..opts.clone()
        }
    )
    .is_err());
    assert!(Sampler::new(
        SamplerKind::TiledRestoreEdm,
        SamplerOptions {
            tile_stride: 0,
            ..opts
        }
    )
    .is_err());
    Ok(())
}

#[test]
fn sampler_kind_names() -> R<()> {
    for k in [
        SamplerKind::RestoreEdm,
        SamplerKind::TiledRestoreEdm,
        SamplerKind::RestoreDpmpp2m,
        SamplerKind::TiledRestoreDpmpp2m,
    ] {
        assert_eq!(k.official_name().parse::<SamplerKind>()?, k);
    }
    assert_eq!(
        "sgm.modules.diffusionmodules.sampling.TiledRestoreEDMSampler".parse::<SamplerKind>()?,
        SamplerKind::TiledRestoreEdm
    );
    assert_eq!(
        "restore-dpmpp2m".parse::<SamplerKind>()?,
        SamplerKind::RestoreDpmpp2m
    );
    assert!("EulerEDMSampler".parse::<SamplerKind>().is_err());
    Ok(())
}

#[test]
fn sliding_windows_edges() -> R<()> {
    let origins =
        |v: &[TileWindow]| -> Vec<(usize, usize)> { v.iter().map(|t| (t.h0, t.w0)).collect() };
    // 16x16, tile 8, stride 4: 0, 4, 8 on each axis, row major.
    let t = sliding_windows(16, 16, 8, 4)?;
    assert_eq!(t.len(), 9);
    assert_eq!(origins(&t)[..4], [(0, 0), (0, 4), (0, 8), (4, 0)]);
    assert!(t.iter().all(|w| w.h1 == w.h0 + 8 && w.w1 == w.w0 + 8));
    // `index` is the position in this order (it picks the tile's local prompt).
    assert!(t.iter().enumerate().all(|(i, w)| w.index == i));
    assert_eq!(
        t[5].scaled(8),
        TileWindow {
            index: 5,
            h0: 32,
            h1: 96,
            w0: 64,
            w1: 128
        }
    );
    // last tile flush with the edge: h 10 -> 0, 2; w 8 -> 0 only
    assert_eq!(origins(&sliding_windows(10, 8, 8, 4)?), [(0, 0), (2, 0)]);
    // exact multiple: no extra tile
    assert_eq!(origins(&sliding_windows(12, 8, 8, 4)?), [(0, 0), (4, 0)]);
    // stride larger than the remainder
    assert_eq!(origins(&sliding_windows(8, 21, 8, 16)?), [(0, 0), (0, 13)]);
    // full-size defaults: 160 latent rows, tile 128 stride 64 -> 0, 32
    assert_eq!(
        origins(&sliding_windows(160, 128, 128, 64)?),
        [(0, 0), (32, 0)]
    );
    assert_eq!(sliding_windows(8, 8, 8, 4)?.len(), 1);
    assert!(sliding_windows(7, 8, 8, 4).is_err());
    assert!(sliding_windows(8, 8, 8, 0).is_err());
    assert!(sliding_windows(8, 8, 0, 4).is_err());
    Ok(())
}

#[test]
fn gaussian_weights_formula_and_quirk() -> R<()> {
    let (tw, th) = (8usize, 6usize);
    let w = gaussian_weights(tw, th, &Device::Cpu)?;
    assert_eq!(w.dims(), [th, tw]);
    let w = w.to_vec2::<f32>()?;
    let f = |i: f64, mid: f64, n: f64| {
        (-(i - mid) * (i - mid) / (n * n) / 0.02).exp() / (2.0 * std::f64::consts::PI * 0.01).sqrt()
    };
    for y in 0..th {
        for x in 0..tw {
            let want = f(y as f64, th as f64 / 2.0, th as f64) * f(x as f64, 3.5, tw as f64);
            assert!(close(w[y][x] as f64, want, 1e-6), "({y},{x})");
        }
    }
    // x midpoint (w-1)/2: symmetric; y midpoint h/2: row 0 lighter than the last row,
    // rows 1 and h-1 mirror each other, row h/2 is the peak.
    assert_eq!(w[2][0], w[2][tw - 1]);
    assert!(w[0][3] < w[th - 1][3]);
    assert!(close(w[1][3] as f64, w[th - 1][3] as f64, 1e-6));
    assert!(w[th / 2][3] > w[th / 2 - 1][3] && w[th / 2][3] > w[th / 2 + 1][3]);
    assert!(close(
        gaussian_profile(1, 0.0)[0],
        1.0 / (0.02 * std::f64::consts::PI).sqrt(),
        1e-12
    ));
    Ok(())
}

#[test]
fn replay_noise_order_and_errors() -> R<()> {
    let dev = Device::Cpu;
    let a = Tensor::ones((1, 2), candle_core::DType::F32, &dev)?;
    let b = Tensor::zeros((1, 2), candle_core::DType::F32, &dev)?;
    let mut r = ReplayNoise::from_named(vec![
        ("noise_000_randn".into(), a.clone()),
        ("noise_001_brownian".into(), b.clone()),
        ("noise_002_randn_like".into(), a.clone()),
    ])?;
    assert_eq!(r.remaining(), 3);
    assert_eq!(
        vec4(&r.randn(&[1, 2], &dev)?.reshape((1, 1, 1, 2))?)?,
        [1.0, 1.0]
    );
    // kind mismatch: a Gaussian asked where a Brownian draw was recorded
    let e = r.randn(&[1, 2], &dev).unwrap_err().to_string();
    assert!(e.contains("Brownian") && e.contains("#1"), "{e}");
    // shape mismatch
    let e = r.randn(&[2, 2], &dev).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
    // exhausted
    let e = r.randn(&[1, 2], &dev).unwrap_err().to_string();
    assert!(e.contains("only 3 were recorded"), "{e}");
    assert_eq!(r.remaining(), 0);
    assert!(ReplayNoise::from_named(vec![("noise_x".into(), a)]).is_err());
    let mut r = ReplayNoise::new(vec![("n".into(), DrawKind::Brownian, b)]);
    assert!(r.brownian(1.0, 0.5, &[1, 2], &dev).is_ok());
    Ok(())
}

#[test]
fn seeded_noise_reproducible_and_normal() -> R<()> {
    let dev = Device::Cpu;
    let a = SeededNoise::new(1234).randn(&[4, 8, 8], &dev)?;
    let b = SeededNoise::new(1234).randn(&[4, 8, 8], &dev)?;
    let c = SeededNoise::new(1235).randn(&[4, 8, 8], &dev)?;
    assert_eq!(
        a.flatten_all()?.to_vec1::<f32>()?,
        b.flatten_all()?.to_vec1::<f32>()?
    );
    assert_ne!(
        a.flatten_all()?.to_vec1::<f32>()?,
        c.flatten_all()?.to_vec1::<f32>()?
    );
    let mut g = SeededNoise::new(7);
    let n = 200_000;
    let v: Vec<f64> = (0..n).map(|_| g.normal()).collect();
    let mean = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(
        mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
        "{mean} {var}"
    );
    let br = g.brownian(3.0, 2.0, &[2, 3], &dev)?;
    assert_eq!(br.dims(), [2, 3]);
    Ok(())
}

/// One RestoreEDM run of 2 steps with denoised = 0.5 x, checked against the formulas by hand on
/// a single-element latent.
#[test]
fn restore_edm_by_hand() -> R<()> {
    let dev = Device::Cpu;
    let opts = SamplerOptions {
        num_steps: 2,
        s_churn: 0.5,
        s_noise: 1.003,
        restoration_scale: 4.0,
        use_linear_control_scale: true,
        control_scale: 0.9,
        control_scale_start: 0.1,
        ..Default::default()
    };
    let sampler = Sampler::new(SamplerKind::RestoreEdm, opts.clone())?;
    let sig = sampler.sigmas()?;
    let calls = RefCell::new(vec![]);
    let mut den = |x: &Tensor, sigma: f32, cs: f64, tile: Option<&TileWindow>| {
        assert!(tile.is_none());
        calls.borrow_mut().push((sigma, cs));
        Ok((x * 0.5)?)
    };
    let x0 = 0.7f64;
    let xc = 0.3f64;
    let churn = [1.2f64, -0.4];
    let mut rng = ReplayNoise::from_named(vec![
        (
            "c0_randn_like".into(),
            Tensor::new(&[[[[churn[0] as f32]]]], &dev)?,
        ),
        (
            "c1_randn_like".into(),
            Tensor::new(&[[[[churn[1] as f32]]]], &dev)?,
        ),
    ])?;
    let out = sampler.sample(
        &mut den,
        &mut rng,
        &Tensor::new(&[[[[x0 as f32]]]], &dev)?,
        Some(&Tensor::new(&[[[[xc as f32]]]], &dev)?),
    )?;
    assert_eq!(rng.remaining(), 0);

    // by hand
    let gamma = 0.5f64 / 2.0;
    let mut x = x0 * (1.0f64 + (sig[0] as f64).powi(2)).sqrt();
    for i in 0..2 {
        let (s, sn) = (sig[i] as f64, sig[i + 1] as f64);
        let sh = s * (1.0 + gamma);
        x += churn[i] * 1.003 * (sh * sh - s * s).sqrt();
        let cs = s / 14.6146 * (0.1 - 0.9) + 0.9;
        let (cs_got_sigma, cs_got) = calls.borrow()[i];
        assert!(close(cs_got_sigma as f64, sh, 1e-6));
        assert!(close(cs_got, cs, 1e-6));
        let mut d = 0.5 * x;
        if sn > 0.05 {
            d -= (d - xc) * (s / 14.6146).powf(4.0);
        }
        x += (x - d) / sh * (sn - sh);
    }
    let got = vec4(&out)?[0] as f64;
    assert!(close(got, x, 1e-5), "{got} vs {x}");
    Ok(())
}

/// DPM++2M (eta 1) with denoised = 0.5 x over 3 Karras steps, by hand.
#[test]
fn restore_dpmpp2m_by_hand() -> R<()> {
    let dev = Device::Cpu;
    let opts = SamplerOptions {
        num_steps: 3,
        s_noise: 1.003,
        control_scale: 0.8,
        use_linear_control_scale: true, // ignored by DPM++2M
        ..Default::default()
    };
    let sampler = Sampler::new(SamplerKind::RestoreDpmpp2m, opts)?;
    let sig: Vec<f64> = sampler.sigmas()?.iter().map(|&s| s as f64).collect();
    let s0 = LegacyDdpm::default().sampling_sigmas(3)?[0] as f64;
    let mut den = |x: &Tensor, _: f32, cs: f64, _: Option<&TileWindow>| {
        assert_eq!(cs, 0.8);
        Ok((x * 0.5)?)
    };
    let x0 = -0.6f64;
    let bn = 0.9f64; // the one Brownian draw (step 1: i > 0, next sigma > 0)
    let mut rng = ReplayNoise::from_named(vec![(
        "b_brownian".into(),
        Tensor::new(&[[[[bn as f32]]]], &dev)?,
    )])?;
    let out = sampler.sample(
        &mut den,
        &mut rng,
        &Tensor::new(&[[[[x0 as f32]]]], &dev)?,
        None,
    )?;
    assert_eq!(rng.remaining(), 0);

    let mut x = x0 * (1.0f64 + s0 * s0).sqrt();
    let mut old: Option<f64> = None;
    for i in 0..3 {
        let (s, sn) = (sig[i], sig[i + 1]);
        let d = 0.5 * x;
        if sn == 0.0 {
            x = d;
            break;
        }
        let (t, tn): (f64, f64) = (-s.ln(), -sn.ln());
        let h = tn - t;
        let m1 = (-tn).exp() / (-t).exp() * (-h).exp();
        let m2 = (-2.0 * h).exp_m1();
        match old {
            None => x = m1 * x - m2 * d,
            Some(od) => {
                let r = (t + sig[i - 1].ln()) / h;
                let dd = (1.0 + 1.0 / (2.0 * r)) * d - 1.0 / (2.0 * r) * od;
                x = m1 * x - m2 * dd + bn * sn * (-(-2.0 * h).exp_m1()).sqrt() * 1.003;
            }
        }
        old = Some(d);
    }
    let got = vec4(&out)?[0] as f64;
    assert!(close(got, x, 1e-5), "{got} vs {x}");
    Ok(())
}

/// With a pointwise denoiser the tiled samplers must equal the untiled ones (the Gaussian
/// blend is a normalised average of identical values), and see every window in order.
#[test]
fn tiled_equals_untiled_for_pointwise_denoiser() -> R<()> {
    let dev = Device::Cpu;
    let shape = [1usize, 4, 10, 12];
    let noise = SeededNoise::new(5).randn(&shape, &dev)?;
    let xc = SeededNoise::new(6).randn(&shape, &dev)?;
    let f = |x: &Tensor| -> candle_core::Result<Tensor> { (x * 0.5)?.tanh() };
    for (plain, tiled) in [
        (SamplerKind::RestoreEdm, SamplerKind::TiledRestoreEdm),
        (
            SamplerKind::RestoreDpmpp2m,
            SamplerKind::TiledRestoreDpmpp2m,
        ),
    ] {
        let opts = SamplerOptions {
            num_steps: 3,
            s_churn: 5.0,
            tile_size: 8,
            tile_stride: 4,
            ..Default::default()
        };
        let mut seen = vec![];
        let a = Sampler::new(plain, opts.clone())?.sample(
            &mut |x: &Tensor, _: f32, _: f64, _: Option<&TileWindow>| Ok(f(x)?),
            &mut SeededNoise::new(9),
            &noise,
            Some(&xc),
        )?;
        let b = Sampler::new(tiled, opts)?.sample(
            &mut |x: &Tensor, _: f32, _: f64, t: Option<&TileWindow>| {
                seen.push(*t.expect("tiled call"));
                Ok(f(x)?)
            },
            &mut SeededNoise::new(9),
            &noise,
            Some(&xc),
        )?;
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{plain:?} vs {tiled:?}: {diff}");
        let windows = sliding_windows(10, 12, 8, 4)?;
        assert_eq!(seen.len(), 3 * windows.len());
        assert_eq!(seen[..windows.len()], windows[..]);
    }
    Ok(())
}

/// The tiled EDM sampler blends with `gaussian_weights`: one step, a denoiser returning a
/// per-tile constant, checked against the weighted average by hand at every pixel.
#[test]
fn tiled_blend_weights() -> R<()> {
    let dev = Device::Cpu;
    let (h, w, t, st) = (6usize, 9usize, 4usize, 3usize);
    let opts = SamplerOptions {
        num_steps: 1,
        restoration_scale: -1.0,
        tile_size: t,
        tile_stride: st,
        ..Default::default()
    };
    let sampler = Sampler::new(SamplerKind::TiledRestoreEdm, opts)?;
    let sig = sampler.sigmas()?; // [14.6146, 0]: x_next = denoised
    assert_eq!(sig[1], 0.0);
    let windows = sliding_windows(h, w, t, st)?;
    let tile_value = |win: &TileWindow| (win.h0 * 10 + win.w0) as f32;
    let out = sampler.sample(
        &mut |x: &Tensor, _: f32, _: f64, tile: Option<&TileWindow>| {
            Ok(x.zeros_like()?
                .affine(1.0, tile_value(tile.unwrap()) as f64)?)
        },
        &mut SeededNoise::new(1),
        &Tensor::zeros((1, 1, h, w), candle_core::DType::F32, &dev)?,
        None,
    )?;
    let out = out.reshape((h, w))?.to_vec2::<f32>()?;
    let gw = gaussian_weights(t, t, &dev)?.to_vec2::<f32>()?;
    for y in 0..h {
        for x in 0..w {
            let (mut num, mut den) = (0f64, 0f64);
            for win in &windows {
                if (win.h0..win.h1).contains(&y) && (win.w0..win.w1).contains(&x) {
                    let wt = gw[y - win.h0][x - win.w0] as f64;
                    num += wt * tile_value(win) as f64;
                    den += wt;
                }
            }
            assert!(close(out[y][x] as f64, num / den, 1e-5), "({y},{x})");
        }
    }
    Ok(())
}
