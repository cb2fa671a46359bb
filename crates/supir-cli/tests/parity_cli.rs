//! `supir parity` and `supir inspect` as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn supir(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_supir"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn parity_recognises_a_seesr_folder_and_passes_every_case() {
    let dir = fixtures().join("seesr-tiny");
    let (ok, stdout, stderr) = supir(&["parity", dir.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let n = cases["cases"].as_array().unwrap().len();
    assert_eq!(
        stdout.lines().last().unwrap(),
        format!("{n} passed, 0 failed")
    );
    assert!(!stdout.contains("skipped"), "{stdout}");
    assert_eq!(stdout.matches(" pass\n").count(), n, "{stdout}");
}

#[test]
fn parity_passes_every_case_of_the_tiny_fixture() {
    let dir = fixtures().join("supir-tiny");
    let (ok, stdout, stderr) = supir(&["parity", dir.to_str().unwrap()]);
    assert!(ok, "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap();
    let n_cases = std::fs::read_to_string(dir.join("cases.json"))
        .unwrap()
        .matches("\"kind\":")
        .count();
    let skipped = stdout
        .lines()
        .find_map(|l| l.strip_prefix("skipped "))
        .map(|l| l.split(' ').next().unwrap().parse::<usize>().unwrap())
        .unwrap_or(0);
    assert_eq!(
        last,
        format!("{} passed, 0 failed", n_cases - skipped),
        "{stdout}"
    );
    // One line per case run, each with its error and tolerance.
    assert_eq!(
        stdout.matches(" pass\n").count(),
        n_cases - skipped,
        "{stdout}"
    );
}

#[test]
fn parity_on_a_broken_folder_is_a_clear_error() {
    let tmp = std::env::temp_dir().join(format!("supir-parity-broken-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let (ok, _, stderr) = supir(&["parity", tmp.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("cases.json"), "{stderr}");
    // A failing case makes the exit status non-zero: a fixture whose expected output is off.
    let src = fixtures().join("supir-tiny");
    for f in ["config.yaml", "weights.safetensors", "cases.safetensors"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(src.join("cases.json")).unwrap();
    // Tighten one tolerance to zero on a case with a float error: the run must fail.
    let tightened = manifest.replacen("\"atol\": 0.0004894163131713867", "\"atol\": 0.0", 1);
    assert_ne!(manifest, tightened);
    std::fs::write(tmp.join("cases.json"), tightened).unwrap();
    let (ok, stdout, _) = supir(&["parity", tmp.to_str().unwrap(), "--filter", "conditioner"]);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains("FAIL") && stdout.contains("0 passed, 1 failed"),
        "{stdout}"
    );
}

#[test]
fn inspect_reports_parts_and_dtypes() {
    let w = fixtures().join("supir-tiny/weights.safetensors");
    let (ok, stdout, stderr) = supir(&["inspect", w.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1472 tensors"), "{stdout}");
    assert!(stdout.contains("f16 x1471"), "{stdout}");
    assert!(stdout.contains("model.control_model"), "{stdout}");
    // A tiny model is not the full-size one: every part has other shapes.
    assert!(stdout.contains("complete SUPIR-v0 model: no"), "{stdout}");

    let bad = std::env::temp_dir().join(format!("supir-not-a-ckpt-{}.ckpt", std::process::id()));
    std::fs::write(&bad, b"definitely not weights").unwrap();
    let (ok, _, stderr) = supir(&["inspect", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("not a checkpoint") && stderr.contains(".ckpt"),
        "{stderr}"
    );
}
