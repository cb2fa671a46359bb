//! SeeSR's UNet and ControlNet with the representation cross-attention: parity with the
//! official code on `fixtures/seesr-tiny`, and the exact official key set at full size.

use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/seesr-tiny")
}

/// Runs the cases whose name contains `filter` and checks that exactly `expected` ran and passed.
fn check_cases(filter: &str, expected: &[&str]) {
    let report = supir::parity::run(fixture_dir(), Some(filter), |r| {
        for c in &r.checks {
            println!(
                "{} {}: max abs err {:.3e} (atol {:.3e})",
                r.name, c.name, c.max_err, c.atol
            );
        }
    })
    .unwrap();
    let mut ran: Vec<&str> = report.results.iter().map(|r| r.name.as_str()).collect();
    ran.sort();
    let mut want = expected.to_vec();
    want.sort();
    assert_eq!(ran, want, "cases run (skipped: {:?})", report.skipped);
    for r in &report.results {
        assert!(r.error.is_none(), "{}: {:?}", r.name, r.error);
        assert!(!r.checks.is_empty(), "{}: no outputs compared", r.name);
        assert!(r.passed(), "{} failed: {:?}", r.name, r.worst());
    }
}

#[test]
fn controlnet_cases_match_official() {
    check_cases("controlnet", &["controlnet", "controlnet_cs06"]);
}

#[test]
fn unet_cases_match_official() {
    check_cases("unet", &["unet", "unet_no_control"]);
}
