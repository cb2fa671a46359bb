//! The full-size model built from the unchanged official config asks for exactly the keys and
//! shapes of the official model (`fixtures/supir-v0-keys.tsv`), so the published checkpoints load.

use std::path::Path;

use candle_core::{DType, Device};
use supir::inspect::full_size_keys;
use supir::models::supir_config::SupirConfig;
use supir::pipelines::supir::model::SupirModel;
use supir::weights::ShapeSource;

#[test]
fn full_size_model_requests_exactly_the_official_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let cfg = SupirConfig::load(root.join("official/SUPIR_v0.yaml")).unwrap();
    let official = full_size_keys();
    // The committed copy of the key list is the one the library embeds.
    let tsv = std::fs::read_to_string(root.join("supir-v0-keys.tsv")).unwrap();
    assert_eq!(tsv, supir::inspect::FULL_SIZE_KEYS_TSV);
    assert_eq!(tsv.lines().count() - 1, 3549);

    // Shape-less requests (sizes read off the weights) are answered from the official list.
    let src = ShapeSource::new(official.clone().into_iter().collect());
    let vb = src.clone().into_var_builder(DType::F16, &Device::Cpu);
    let _model = SupirModel::new(vb, &cfg).unwrap();
    let requested = src.requested();

    let missing: Vec<_> = official
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    let extra: Vec<_> = requested
        .keys()
        .filter(|k| !official.contains_key(*k))
        .collect();
    let wrong: Vec<_> = requested
        .iter()
        .filter(|(k, s)| official.get(*k).is_some_and(|o| o != *s))
        .collect();
    assert!(missing.is_empty(), "not requested: {missing:?}");
    assert!(extra.is_empty(), "not in the official model: {extra:?}");
    assert!(wrong.is_empty(), "wrong shapes: {wrong:?}");
    // 3,549 rows less two buffers (CLIP-L position_ids, OpenCLIP logit_scale).
    assert_eq!(requested.len(), 3547);
}
