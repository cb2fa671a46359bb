//! SeeSR parity cases of this component (not implemented yet: no kinds).

use candle_core::Tensor;

use crate::parity::fixture::{Case, Fixture};
use crate::Result;

/// Case kinds replayed here.
pub(super) const KINDS: &[&str] = &[];

/// Models this module loaded, kept across cases.
#[derive(Default)]
pub(super) struct Cache;

pub(super) fn run_case(
    _fx: &Fixture,
    case: &Case,
    _cache: &mut Cache,
) -> Result<Vec<(String, Tensor)>> {
    Err(crate::Error::Option(format!(
        "case {}: kind `{}` not implemented",
        case.name, case.kind
    )))
}
