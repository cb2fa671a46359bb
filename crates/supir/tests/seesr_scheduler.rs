//! SeeSR's DDPM scheduler and colour fixes against the official outputs (`fixtures/seesr-tiny`).

use std::path::{Path, PathBuf};

use supir::schedulers::ddpm::{DdpmConfig, DdpmScheduler};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

fn run_kind(filter: &str, expected: &[&str]) {
    let report = supir::parity::run(fixture(), Some(filter), |_| {}).unwrap();
    for name in expected {
        let r = report
            .results
            .iter()
            .find(|r| r.name == *name)
            .unwrap_or_else(|| panic!("case {name} did not run"));
        assert!(r.passed(), "{name}: {:?} {:?}", r.error, r.checks);
    }
}

#[test]
fn scheduler_cases_match_the_official_ddpm() {
    run_kind(
        "scheduler",
        &[
            "scheduler_timesteps",
            "scheduler_add_noise",
            "scheduler_step_sd2_4_751",
            "scheduler_step_sd2_4_1",
            "scheduler_step_sd2_50_781",
            "scheduler_step_turbo_2_999",
            "scheduler_step_turbo_2_499",
        ],
    );
}

#[test]
fn colour_fix_cases_match_the_official_functions() {
    run_kind("colorfix", &["colorfix_wavelet", "colorfix_adain"]);
}

#[test]
fn leading_and_trailing_spacing_as_the_notes_say() {
    let sd2 = DdpmConfig::from_file(
        fixture().join("stable-diffusion-2-base/scheduler/scheduler_config.json"),
    )
    .unwrap();
    let s = DdpmScheduler::new(sd2.clone(), 50).unwrap();
    assert_eq!(s.timesteps()[..3], [981, 961, 941]);
    assert_eq!(*s.timesteps().last().unwrap(), 1);
    let turbo =
        DdpmConfig::from_file(fixture().join("sd-turbo/scheduler/scheduler_config.json")).unwrap();
    assert_eq!(
        DdpmScheduler::new(turbo, 2).unwrap().timesteps(),
        [999, 499]
    );
    // Out of range step counts are errors, not panics.
    assert!(DdpmScheduler::new(sd2.clone(), 0).is_err());
    assert!(DdpmScheduler::new(sd2, 1001).is_err());
    assert!(DdpmConfig::from_json("{\"beta_schedule\": \"cosine\"}").is_err());
}
