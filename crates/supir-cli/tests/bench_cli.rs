//! `supir bench supir` on the tiny fixture config, as CI can afford it.

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
