//! LLaVA-1.5 captioner: parity with the official code on the tiny fixtures (tokenizer, image
//! preprocessing, vision tower, projector, first logits, greedy continuation, caption), both
//! published layouts, the GGUF pair, sampling determinism and the error cases.

use std::path::{Path, PathBuf};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

fn run_parity(name: &str) {
    let report = supir::parity::run(data(name), None, |r| {
        for c in &r.checks {
            eprintln!(
                "{} {}: max err {:.3e} (atol {:.1e})",
                r.name, c.name, c.max_err, c.atol
            );
        }
        if let Some(e) = &r.error {
            eprintln!("{}: error {e}", r.name);
        }
    })
    .unwrap();
    assert!(report.results.len() >= 4, "{name}: too few cases");
    let failed: Vec<_> = report
        .results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.name.clone())
        .collect();
    assert!(failed.is_empty(), "{name}: failed {failed:?}");
}

#[test]
fn parity_llava_tiny() {
    run_parity("llava-tiny");
}

#[test]
fn parity_llava_alt() {
    run_parity("llava-alt");
}
