//! `supir degrade` end to end: outputs, reproducibility across thread counts, and failures
//! (exit status, message naming the file / field, nothing half-written).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use supir::eval::degrade::Planes;

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("supir-degrade-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_png(path: &Path, h: usize, w: usize, phase: f32) {
    Planes::from_fn(3, h, w, |c, y, x| {
        0.5 + 0.4 * ((x as f32 * 0.3 + phase + c as f32) * (y as f32 * 0.2).cos()).sin()
    })
    .to_rgb8()
    .save(path)
    .unwrap();
}

fn supir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_supir"))
        .arg("degrade")
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn folder_run_is_reproducible_across_thread_counts() {
    let d = temp_dir("folder");
    let input = d.join("hq");
    std::fs::create_dir_all(&input).unwrap();
    write_png(&input.join("one.png"), 40, 48, 0.0);
    write_png(&input.join("two.png"), 33, 29, 1.0);
    std::fs::write(input.join("readme.txt"), "not an image").unwrap();
    let (o1, o2) = (d.join("o1"), d.join("o2"));
    let r1 = supir(&[s(&input), "-o", s(&o1), "--seed", "9", "-j", "1"]);
    assert!(
        r1.status.success(),
        "{}",
        String::from_utf8_lossy(&r1.stderr)
    );
    let r2 = supir(&[s(&input), "-o", s(&o2), "--seed", "9", "-j", "3"]);
    assert!(r2.status.success());
    assert_eq!(
        listing(&o1),
        vec!["one.json", "one.png", "two.json", "two.png"]
    );
    for f in listing(&o1) {
        assert_eq!(
            std::fs::read(o1.join(&f)).unwrap(),
            std::fs::read(o2.join(&f)).unwrap(),
            "{f}"
        );
    }
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o1.join("two.json")).unwrap()).unwrap();
    assert_eq!(side["lq_size"], serde_json::json!([8, 7]));
    assert_eq!(side["input"], "two.png");
    // A single file, another scale, another seed.
    let o3 = d.join("o3");
    let r3 = supir(&[
        s(&input.join("one.png")),
        "-o",
        s(&o3),
        "--scale",
        "2",
        "--seed",
        "10",
    ]);
    assert!(r3.status.success());
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(o3.join("one.json")).unwrap()).unwrap();
    assert_eq!(side["lq_size"], serde_json::json!([20, 24]));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_inputs_fail_cleanly() {
    let d = temp_dir("bad");
    let input = d.join("hq");
    std::fs::create_dir_all(&input).unwrap();
    write_png(&input.join("good.png"), 16, 16, 0.0);

    // Bad config: names the file and the field; no output folder made.
    let cfg = d.join("bad.yml");
    std::fs::write(&cfg, "resize_prob: [0.5, 0.5, 0.5]\n").unwrap();
    let out = d.join("out_cfg");
    let r = supir(&[s(&input), "-o", s(&out), "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.contains("bad.yml") && err.contains("resize_prob"),
        "{err}"
    );
    assert!(!out.exists());

    // Empty folder.
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let r = supir(&[s(&empty), "-o", s(&d.join("out_empty"))]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no image files"));

    // An unreadable image: named, exit non-zero, the good one written, no temporaries.
    std::fs::write(input.join("broken.png"), b"\x89PNG but not really").unwrap();
    let out = d.join("out_broken");
    let r = supir(&[s(&input), "-o", s(&out)]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    assert!(
        err.contains("broken.png") && err.contains("1 of 2 images failed"),
        "{err}"
    );
    assert_eq!(listing(&out), vec!["good.json", "good.png"]);

    // Writing into the input folder would overwrite an input PNG: refused up front.
    let r = supir(&[s(&input), "-o", s(&input)]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("overwrite an input"));
    assert_eq!(listing(&input), vec!["broken.png", "good.png"]);
    let _ = std::fs::remove_dir_all(&d);
}
