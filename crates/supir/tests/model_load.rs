//! Loading the whole model: bad checkpoints are errors naming the file, the key and the shapes.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use supir::models::supir_config::SupirConfig;
use supir::pipelines::supir::model::{DTypes, SupirModel};

#[test]
fn missing_and_misshapen_weights_are_clear_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny");
    let cfg = SupirConfig::load(dir.join("config.yaml")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(dir.join("weights.safetensors"), &Device::Cpu).unwrap();
    let tmp = std::env::temp_dir().join(format!("supir-model-load-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();

    let key = "model.control_model.input_blocks.0.0.weight";
    let original = tensors.remove(key).unwrap();
    let missing = tmp.join("missing.safetensors");
    candle_core::safetensors::save(&tensors, &missing).unwrap();
    let err = SupirModel::load(&cfg, &[&missing], DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(key) && err.contains("missing.safetensors"),
        "{err}"
    );
    assert!(err.contains(&format!("{:?}", original.dims())), "{err}");
    // Staged loading reads GLVControl + UNet later but checks their keys now.
    let err = SupirModel::load_without_diffusion(
        &cfg,
        &[&missing],
        DTypes::uniform(DType::F32),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains(key) && err.contains("missing.safetensors"),
        "{err}"
    );

    // The same key supplied by a second file completes the model (later files extend earlier ones).
    let patch = tmp.join("patch.safetensors");
    let one = std::collections::HashMap::from([(key.to_string(), original.clone())]);
    candle_core::safetensors::save(&one, &patch).unwrap();
    assert!(SupirModel::load(&cfg, &[&missing, &patch], DType::F32, &Device::Cpu).is_ok());
    let staged = SupirModel::load_without_diffusion(
        &cfg,
        &[&missing, &patch],
        DTypes::uniform(DType::F32),
        &Device::Cpu,
    )
    .unwrap();
    assert!(staged.diffusion.is_none());

    let wrong = Tensor::zeros((3, 3), DType::F16, &Device::Cpu).unwrap();
    tensors.insert(key.to_string(), wrong);
    let misshapen = tmp.join("misshapen.safetensors");
    candle_core::safetensors::save(&tensors, &misshapen).unwrap();
    let err = SupirModel::load(&cfg, &[&misshapen], DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("misshapen.safetensors") && err.contains(key),
        "{err}"
    );
    assert!(
        err.contains("[3, 3]") && err.contains(&format!("{:?}", original.dims())),
        "{err}"
    );
    let err = SupirModel::load_without_diffusion(
        &cfg,
        &[&misshapen],
        DTypes::uniform(DType::F32),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("[3, 3]") && err.contains(key), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}
