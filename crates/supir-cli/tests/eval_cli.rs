//! `supir eval` as a user runs it, on the committed photo crops; the numbers are BasicSR 1.4.2's and the
//! `lpips` package's (see `crates/supir/tests/data/metrics/make_niqe_data.py` and `make_lpips_data.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../supir/tests/data/metrics")
}

fn file(name: &str) -> String {
    data().join(name).to_str().unwrap().to_owned()
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

fn expected(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join(name)).unwrap()).unwrap()
}

/// A fresh scratch folder for one test.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("supir-eval-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// Our Y channel is BasicSR's up to its float32 rounding (< 1e-8 on these metrics); NIQE within the
/// spread BasicSR itself has across BLAS builds (see `crates/supir/tests/niqe.rs`).
fn check_against_basicsr(got: &Value, want: &Value) {
    for k in ["psnr", "ssim", "psnr_y", "ssim_y"] {
        let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
        assert!((g - w).abs() < 1e-8, "{k}: {g} vs basicsr {w}");
    }
    let (g, w) = (
        got["niqe"].as_f64().unwrap(),
        want["niqe"].as_f64().unwrap(),
    );
    assert!((g - w).abs() < 1e-4, "niqe: {g} vs basicsr {w}");
}

#[test]
fn json_for_one_pair_matches_basicsr_and_lpips() {
    let exp = expected("expected_niqe.json");
    let lp = expected("expected_lpips.json");
    for (i, name) in ["astronaut_big", "coffee_big"].iter().enumerate() {
        for border in [0, 4] {
            let (ok, stdout, stderr) = supir(&[
                "eval",
                &file(&format!("{name}_deg.png")),
                &file(&format!("{name}_ref.png")),
                "--json",
                "--crop-border",
                &border.to_string(),
                "--lpips-weights",
                &file("lpips_tiny_lin.pth"),
                "--lpips-backbone",
                &file("lpips_tiny_backbone.safetensors"),
            ]);
            assert!(ok, "{stderr}");
            let lines = json_lines(&stdout);
            assert_eq!(lines.len(), 2, "{stdout}");
            assert!(
                stdout.starts_with(&format!("{{\"name\":\"{name}_deg.png\",\"psnr\":")),
                "{stdout}"
            );
            check_against_basicsr(&lines[0], &exp["pairs"][i][format!("crop{border}")]);
            if border == 0 {
                let want = lp["pairs"][i + 2]["lpips"].as_f64().unwrap();
                let got = lines[0]["lpips"].as_f64().unwrap();
                assert!(((got - want) / want).abs() < 1e-4, "lpips {got} vs {want}");
            }
            // The mean of one pair is that pair.
            assert_eq!(lines[1]["name"], "mean");
            assert_eq!(lines[1]["count"], 1);
            for k in ["psnr", "ssim", "psnr_y", "ssim_y", "niqe", "lpips"] {
                assert_eq!(lines[1][k], lines[0][k], "{k}");
            }
        }
    }
}

#[test]
fn folders_are_matched_by_stem_with_a_table_and_means() {
    let dir = scratch("folders");
    let (res, gt) = (dir.join("restored"), dir.join("gt"));
    std::fs::create_dir_all(&res).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    for name in ["astronaut_big", "coffee_big", "astronaut"] {
        std::fs::copy(
            data().join(format!("{name}_deg.png")),
            res.join(format!("{name}.png")),
        )
        .unwrap();
        std::fs::copy(
            data().join(format!("{name}_ref.png")),
            gt.join(format!("{name}.png")),
        )
        .unwrap();
    }
    std::fs::copy(data().join("coffee_deg.png"), res.join("lonely.png")).unwrap();
    std::fs::write(res.join("notes.txt"), "not an image").unwrap();
    let (r, g) = (res.to_str().unwrap(), gt.to_str().unwrap());

    let (ok, stdout, stderr) = supir(&["eval", r, g, "--json"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("no reference for") && stderr.contains("lonely.png"),
        "{stderr}"
    );
    assert!(stderr.contains("LPIPS skipped"), "{stderr}");
    // The 64x56 crop is too small for NIQE: noted, null, and left out of the NIQE mean.
    assert!(
        stderr.contains("no NIQE for") && stderr.contains("astronaut.png"),
        "{stderr}"
    );
    let lines = json_lines(&stdout);
    let names: Vec<&str> = lines.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["astronaut", "astronaut_big", "coffee_big", "mean"]);
    assert!(lines[0]["niqe"].is_null());
    assert!(lines[0].get("lpips").is_none());
    let exp = expected("expected_niqe.json");
    check_against_basicsr(&lines[1], &exp["pairs"][0]["crop0"]);
    check_against_basicsr(&lines[2], &exp["pairs"][1]["crop0"]);
    let mean = &lines[3];
    assert_eq!(mean["count"], 3);
    for k in ["psnr", "ssim", "psnr_y", "ssim_y"] {
        let avg = lines[..3]
            .iter()
            .map(|l| l[k].as_f64().unwrap())
            .sum::<f64>()
            / 3.0;
        assert!((mean[k].as_f64().unwrap() - avg).abs() < 1e-12, "{k}");
    }
    let niqe_avg = (lines[1]["niqe"].as_f64().unwrap() + lines[2]["niqe"].as_f64().unwrap()) / 2.0;
    assert!((mean["niqe"].as_f64().unwrap() - niqe_avg).abs() < 1e-12);

    let (ok, table, stderr) = supir(&["eval", r, g]);
    assert!(ok, "{stderr}");
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 5, "{table}");
    assert!(
        rows[0].starts_with("name") && rows[0].ends_with("niqe"),
        "{table}"
    );
    assert!(
        rows[1].starts_with("astronaut ") && rows[1].ends_with('-'),
        "{table}"
    );
    assert!(rows[4].starts_with("mean (3)"), "{table}");
    let psnr: f64 = rows[2].split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(
        (psnr - lines[1]["psnr"].as_f64().unwrap()).abs() < 1e-4,
        "{table}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    let dir = scratch("bad");
    let fail = |args: &[&str], needles: &[&str]| {
        let (ok, _, stderr) = supir(args);
        assert!(!ok, "{args:?} should fail");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: `{n}` not in {stderr}");
        }
    };
    // Size mismatch names both files and sizes.
    fail(
        &["eval", &file("coffee_deg.png"), &file("astronaut_ref.png")],
        &[
            "size mismatch",
            "coffee_deg.png is 60x48",
            "astronaut_ref.png is 56x64",
        ],
    );
    // Unreadable image names the file.
    let broken = dir.join("broken.png");
    std::fs::write(&broken, b"\x89PNG but not really").unwrap();
    fail(
        &["eval", broken.to_str().unwrap(), &file("astronaut_ref.png")],
        &["cannot read image", "broken.png"],
    );
    // Missing path, empty folder, no matching names, file against folder.
    fail(
        &["eval", "/no/such/image.png", &file("astronaut_ref.png")],
        &["/no/such/image.png does not exist"],
    );
    let (empty, other) = (dir.join("empty"), dir.join("other"));
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(data().join("coffee_ref.png"), other.join("x.png")).unwrap();
    let (e, o) = (empty.to_str().unwrap(), other.to_str().unwrap());
    fail(&["eval", e, o], &["no images", "empty"]);
    let data_dir = data();
    let d = data_dir.to_str().unwrap();
    fail(&["eval", o, d], &["no file name stem of", "matches"]);
    fail(
        &["eval", o, &file("coffee_ref.png")],
        &["must both be image files or both be folders"],
    );
    // LPIPS needs both files, and good ones.
    let (ok, _, stderr) = supir(&[
        "eval",
        &file("coffee_deg.png"),
        &file("coffee_ref.png"),
        "--lpips-weights",
        &file("lpips_tiny_lin.pth"),
    ]);
    assert!(!ok && stderr.contains("--lpips-backbone"), "{stderr}");
    fail(
        &[
            "eval",
            &file("coffee_deg.png"),
            &file("coffee_ref.png"),
            "--lpips-weights",
            &file("lpips_tiny_backbone.safetensors"),
            "--lpips-backbone",
            &file("lpips_tiny_backbone.safetensors"),
        ],
        &["cannot load the LPIPS weights", "lin0.model.1.weight"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
