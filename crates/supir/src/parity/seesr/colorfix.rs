//! SeeSR `colorfix` cases: `wavelet_color_fix` / `adain_color_fix` on PIL images.

use candle_core::Tensor;

use crate::color_fix::{self, ColorFix};
use crate::parity::fixture::{Case, Fixture};
use crate::{Error, Result};

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &["colorfix"];

/// Nothing to load.
#[derive(Default)]
pub(super) struct Cache;

pub(super) fn run_case(
    fx: &Fixture,
    case: &Case,
    _cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    let fix = match case.params.get("function").and_then(|v| v.as_str()) {
        Some("wavelet_color_fix") => ColorFix::Wavelet,
        Some("adain_color_fix") => ColorFix::AdaIn,
        other => {
            return Err(Error::Option(format!(
                "case {}: unknown colour fix function {other:?}",
                case.name
            )))
        }
    };
    let target = fx.input(case, "target_u8")?;
    let source = fx.input(case, "source_u8")?;
    let (out, out_u8) = color_fix::apply_u8_truncating(fix, &target, &source)?;
    Ok(vec![("out".into(), out), ("out_u8".into(), out_u8)])
}
