//! SeeSR fixture folders (`fixtures/seesr-tiny` layout, made by
//! `tools/refgen-seesr/gen_seesr_fixtures.py`): the official download layout
//! (`stable-diffusion-2-base/`, `seesr/{unet,controlnet}/`, `ram_swin_large_14m.pth`, `DAPE.pth`,
//! `sd-turbo/`) beside `cases.json` / `cases.safetensors`.
//!
//! Each case kind is replayed by the module of its component; models are loaded once, on the
//! first case that needs them, and kept in that module's `Cache`.

mod colorfix;
mod pipeline;
mod ram;
mod scheduler;
mod text;
mod unet;
mod vae;

use std::path::Path;

use candle_core::Tensor;

use super::fixture::{Case, Fixture};
use super::{compare, CaseResult, Report};
use crate::Result;

/// Whether `dir` is a SeeSR fixture folder (it holds the SD-2 base folder of the release).
pub fn is_fixture(dir: &Path) -> bool {
    dir.join("cases.json").is_file() && dir.join("stable-diffusion-2-base").is_dir()
}

/// Models loaded so far, one cache per component module.
#[derive(Default)]
struct Caches {
    text: text::Cache,
    vae: vae::Cache,
    scheduler: scheduler::Cache,
    colorfix: colorfix::Cache,
    ram: ram::Cache,
    unet: unet::Cache,
    pipeline: pipeline::Cache,
}

/// Kinds the SeeSR runner implements.
pub fn kinds() -> Vec<&'static str> {
    [
        text::KINDS,
        vae::KINDS,
        scheduler::KINDS,
        colorfix::KINDS,
        ram::KINDS,
        unet::KINDS,
        pipeline::KINDS,
    ]
    .concat()
}

fn run_case(fx: &Fixture, case: &Case, c: &mut Caches) -> Result<Vec<(String, Tensor)>> {
    let k = case.kind.as_str();
    if text::KINDS.contains(&k) {
        text::run_case(fx, case, &mut c.text)
    } else if vae::KINDS.contains(&k) {
        vae::run_case(fx, case, &mut c.vae)
    } else if scheduler::KINDS.contains(&k) {
        scheduler::run_case(fx, case, &mut c.scheduler)
    } else if colorfix::KINDS.contains(&k) {
        colorfix::run_case(fx, case, &mut c.colorfix)
    } else if ram::KINDS.contains(&k) {
        ram::run_case(fx, case, &mut c.ram)
    } else if unet::KINDS.contains(&k) {
        unet::run_case(fx, case, &mut c.unet)
    } else {
        pipeline::run_case(fx, case, &mut c.pipeline)
    }
}

/// Runs every implemented case of a SeeSR fixture folder (`filter`: name contains), as
/// [`super::run`] does for SUPIR.
pub fn run(
    dir: &Path,
    filter: Option<&str>,
    mut on_case: impl FnMut(&CaseResult),
) -> Result<Report> {
    let fixture = Fixture::load(dir)?;
    let kinds = kinds();
    let mut caches = Caches::default();
    let mut report = Report::default();
    for case in &fixture.cases {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        if !kinds.contains(&case.kind.as_str()) {
            report.skipped.push((case.name.clone(), case.kind.clone()));
            continue;
        }
        let result = match run_case(&fixture, case, &mut caches) {
            Ok(outputs) => compare(&fixture, case, outputs),
            Err(e) => CaseResult {
                name: case.name.clone(),
                kind: case.kind.clone(),
                checks: vec![],
                error: Some(e.to_string()),
            },
        };
        on_case(&result);
        report.results.push(result);
    }
    Ok(report)
}
