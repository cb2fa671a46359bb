//! Sigma schedules and the denoiser's scalings against the official formulas and golden data.

use std::path::Path;

use candle_core::{Device, Tensor};
use supir::parity::fixture::{max_abs_diff, Fixture};
use supir::schedulers::denoiser::{DiscreteDenoiser, LegacyDdpm};

fn fixture() -> Fixture {
    Fixture::load(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")).unwrap()
}

#[test]
fn sigma_schedules_match_official() {
    let fx = fixture();
    let mut n_cases = 0;
    for case in fx.cases.iter().filter(|c| c.kind == "sigmas") {
        let n = case.params["num_steps"].as_u64().unwrap() as usize;
        let s = LegacyDdpm::default().sampling_sigmas(n).unwrap();
        assert_eq!(s.len(), n + 1);
        let got = Tensor::from_vec(s, n + 1, &Device::Cpu).unwrap();
        let want = fx.output(case, "sigmas").unwrap();
        let err = max_abs_diff(&got, &want).unwrap();
        assert!(err <= case.outputs[0].atol, "{}: {err}", case.name);
        n_cases += 1;
    }
    assert_eq!(n_cases, 4);
}

#[test]
fn schedule_endpoints_and_bad_step_counts() {
    let d = LegacyDdpm::default();
    let table = d.sigma_table();
    assert_eq!(table.len(), 1000);
    // sigma_max of SDXL's schedule, the constant of the official restoration guidance.
    assert!((table[999] - 14.6146).abs() < 1e-3, "{}", table[999]);
    assert!((table[0] - 0.0292).abs() < 1e-3, "{}", table[0]);
    assert!(table.windows(2).all(|w| w[0] < w[1]));
    assert!(d.sampling_sigmas(0).is_err());
    assert!(d.sampling_sigmas(1001).is_err());
    assert_eq!(d.sampling_sigmas(1000).unwrap().len(), 1001);
}

#[test]
fn denoiser_quantises_sigma_and_applies_eps_scaling() {
    let d = DiscreteDenoiser::new(&LegacyDdpm::default());
    let idx = d.sigma_to_idx(3.7);
    let q = d.idx_to_sigma(idx);
    assert!((d.idx_to_sigma(idx - 1) - 3.7).abs() >= (q - 3.7).abs());
    assert!((d.idx_to_sigma(idx + 1) - 3.7).abs() >= (q - 3.7).abs());
    let x = Tensor::ones((2, 1, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    // A network returning its input scaled: eps = c_in * x  =>  D = x - sigma * c_in * x.
    let out = d
        .denoise(&x, &[3.7, 3.7], |xin, t| {
            assert_eq!(t.to_vec1::<f32>().unwrap(), [idx as f32, idx as f32]);
            Ok(xin.clone())
        })
        .unwrap();
    let want = 1.0 - q / (q * q + 1.0).sqrt();
    for v in out.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
        assert!((v - want).abs() < 1e-6);
    }
}
