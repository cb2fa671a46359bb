//! `supir bench supir` and `supir bench seesr` on the tiny fixtures, as CI can afford them.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn bench(extra: &[&str]) -> (String, String) {
    let tiny = fixtures().join("supir-tiny");
    let out = Command::new(env!("CARGO_BIN_EXE_supir"))
        .args([
            "bench", "supir", "--size", "64", "--reps", "1", "--warmup", "0",
        ])
        .arg("--config")
        .arg(tiny.join("config.yaml"))
        .args(extra)
        // Never start the PyTorch reference from a test.
        .env_remove("SUPIR_TORCH_BENCH")
        .env_remove("SUPIR_OFFICIAL_SRC")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn bench_runs_every_stage_of_the_tiny_config_with_random_weights() {
    let tiny = fixtures().join("supir-tiny");
    let json = std::env::temp_dir().join(format!("supir-bench-{}.json", std::process::id()));
    let (stdout, _) = bench(&[
        "--random-weights",
        "--shapes-from",
        tiny.join("weights.safetensors").to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    for stage in [
        "text_encoders",
        "vae_denoise_encode_b1",
        "vae_decode_b1",
        "vae_encode_b1",
        "stage1_b1 (sum)",
        "glvcontrol_b2",
        "unet_b2",
        "step_b2 (sum)",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(stage)),
            "no row {stage}:\n{stdout}"
        );
    }
    let text = std::fs::read_to_string(&json).unwrap();
    std::fs::remove_file(&json).unwrap();
    assert!(text.contains("\"stage\": \"unet_b2\""), "{text}");
    assert!(text.contains("\"latent\": 8"), "{text}");
}

#[test]
fn bench_runs_on_checkpoint_weights_and_a_subset_of_stages() {
    let weights = fixtures().join("supir-tiny/weights.safetensors");
    let (stdout, _) = bench(&[
        "--weights",
        weights.to_str().unwrap(),
        "--stages",
        "unet",
        "--dtype",
        "f16",
    ]);
    let stages: Vec<&str> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(stages, ["unet_b2"], "{stdout}");
}

/// `supir bench seesr` on the tiny SeeSR release (`fixtures/seesr-tiny`) at 64 x 64.
fn bench_seesr(extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_supir"))
        .args([
            "bench", "seesr", "--size", "64", "--reps", "1", "--warmup", "1",
        ])
        .arg("--models")
        .arg(fixtures().join("seesr-tiny"))
        .args(extra)
        // Never start the PyTorch reference from a test.
        .env_remove("SEESR_OFFICIAL_SRC")
        .env_remove("SEESR_TORCH_BENCH")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    (stdout, stderr)
}

#[test]
fn seesr_bench_runs_every_stage_of_the_tiny_release() {
    let json = std::env::temp_dir().join(format!("supir-bench-seesr-{}.json", std::process::id()));
    let (stdout, _) = bench_seesr(&["--json", json.to_str().unwrap()]);
    assert!(
        stdout.lines().next().is_some_and(|l| l.starts_with("CPU: ")
            && l.contains("AVX-512F")
            && l.contains("AVX2")),
        "{stdout}"
    );
    let header = stdout.lines().nth(1).unwrap();
    for col in ["stage", "first s", "best s", "median s", "peak GiB"] {
        assert!(header.contains(col), "no column {col}:\n{stdout}");
    }
    for stage in [
        "text_b2",
        "dape_b1",
        "controlnet_b2",
        "unet_b2",
        "step_b2 (sum)",
        "vae_encode_b1",
        "vae_decode_b1",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(stage))
            .unwrap_or_else(|| panic!("no row {stage}:\n{stdout}"));
        // first, best, median: numbers.
        let nums: Vec<f64> = row[24..]
            .split_whitespace()
            .take(3)
            .map(|v| v.parse().unwrap())
            .collect();
        assert_eq!(nums.len(), 3, "{row}");
    }
    assert!(stdout.contains("peak RSS"), "{stdout}");
    let text = std::fs::read_to_string(&json).unwrap();
    std::fs::remove_file(&json).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["latent"], 8, "{text}");
    assert_eq!(v["backend"], "seesr", "{text}");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 7, "{text}");
    assert!(rows.iter().all(|r| r["ours"]["first_s"].as_f64().is_some()));
}

#[test]
fn seesr_bench_runs_a_subset_of_stages_in_bf16() {
    let (stdout, _) = bench_seesr(&["--stages", "step,vae_decode", "--diffusion-dtype", "bf16"]);
    let stages: Vec<&str> = stdout
        .lines()
        .skip(2)
        .take_while(|l| !l.starts_with("peak RSS"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["controlnet_b2", "unet_b2", "step_b2", "vae_decode_b1"],
        "{stdout}"
    );
}

#[test]
fn seesr_bench_refuses_torch_without_the_official_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_supir"))
        .args(["bench", "seesr", "--size", "64", "--torch"])
        .env_remove("SEESR_OFFICIAL_SRC")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--official-src"), "{err}");
}
