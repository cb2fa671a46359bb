use supir::models::supir_config::SupirConfig;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

#[test]
fn official_and_tiny_configs_parse() {
    let full = SupirConfig::load(root().join("official/SUPIR_v0.yaml")).unwrap();
    let unet = &full.model.params.network_config.params;
    assert_eq!(unet.model_channels, 320);
    assert_eq!(unet.transformer_depth, vec![1, 2, 10]);
    assert_eq!(unet.project_channel_scale, Some(2.0));
    assert_eq!(
        full.model.params.first_stage_config.params.ddconfig.ch_mult,
        vec![1, 2, 4, 4]
    );
    assert_eq!(
        full.model.params.conditioner_config.params.emb_models.len(),
        5
    );

    let tiny = SupirConfig::load(root().join("supir-tiny/config.yaml")).unwrap();
    assert_eq!(
        tiny.model.params.control_stage_config.params.model_channels,
        32
    );
    assert_eq!(
        tiny.model.params.control_stage_config.params.input_upscale,
        Some(1.0)
    );
}

#[test]
fn bad_config_names_the_file() {
    let err = SupirConfig::from_yaml_str("model: 3", std::path::Path::new("x.yaml")).unwrap_err();
    assert!(
        err.to_string().starts_with("x.yaml: not a valid config"),
        "{err}"
    );
}
