//! Conditioner parity with the official `prepare_condition` (fixture case `conditioner`), and the
//! full-size text encoders' requested keys and shapes against the official SUPIR-v0 key list.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use supir::models::clip::{ClipTextConfig, OpenClipTextConfig};
use supir::models::supir_config::SupirConfig;
use supir::parity::fixture::{max_abs_diff, Fixture};
use supir::pipelines::supir::conditioner::{Conditioner, SizeConditioning};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/supir-tiny")
}

fn sizes_of(params: &serde_json::Value) -> SizeConditioning {
    let pair = |k: &str| {
        let v = params[k].as_array().unwrap();
        [v[0].as_f64().unwrap(), v[1].as_f64().unwrap()]
    };
    SizeConditioning {
        original_size: pair("original_size"),
        crop_coords_top_left: pair("crop_coords_top_left"),
        target_size: pair("target_size"),
        ..SizeConditioning::default()
    }
}

#[test]
fn conditioner_parity() {
    let fx = Fixture::load(fixture_dir()).unwrap();
    let case = fx.case("conditioner").unwrap();
    let cfg = SupirConfig::load(fx.config_path()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[fx.weights_path()], DType::F32, &Device::Cpu)
    }
    .unwrap();
    let mut cond = Conditioner::new(
        &cfg.model.params.conditioner_config.params,
        vb.pp("conditioner"),
    )
    .unwrap();
    let sizes = sizes_of(&case.params);
    assert_eq!(sizes, SizeConditioning::default());
    let atol = |name: &str| case.outputs.iter().find(|o| o.name == name).unwrap().atol;

    for s in ["c", "uc"] {
        let text = case.params[format!("text_{s}").as_str()].as_str().unwrap();
        let from_ids = cond
            .encode_ids(
                &fx.input(case, &format!("clip_l_ids_{s}")).unwrap(),
                &fx.input(case, &format!("openclip_ids_{s}")).unwrap(),
                &sizes,
            )
            .unwrap();
        let from_text = cond.encode_texts(&[text], &sizes).unwrap();
        for (how, got) in [("ids", &from_ids), ("text", &from_text)] {
            for (name, t) in [
                (format!("crossattn_{s}"), &got.crossattn),
                (format!("vector_{s}"), &got.vector),
            ] {
                let want = fx.output(case, &name).unwrap();
                let err = max_abs_diff(t, &want).unwrap();
                println!(
                    "{name} from {how}: max abs err {err:.3e} (atol {:.3e})",
                    atol(&name)
                );
                assert!(
                    err <= atol(&name),
                    "{name} from {how}: {err} > {}",
                    atol(&name)
                );
            }
        }
    }

    // prepare_condition: c from caption + positive prompt, uc from the negative prompt.
    let p_p = &cfg.model.params.p_p;
    let text_c = case.params["text_c"].as_str().unwrap();
    let caption = text_c.strip_suffix(p_p.as_str()).unwrap();
    let (c, uc) = cond
        .prepare_condition(&[caption], p_p, &cfg.model.params.n_p)
        .unwrap();
    for (name, t) in [
        ("crossattn_c", &c.crossattn),
        ("vector_c", &c.vector),
        ("crossattn_uc", &uc.crossattn),
        ("vector_uc", &uc.vector),
    ] {
        let err = max_abs_diff(t, &fx.output(case, name).unwrap()).unwrap();
        assert!(err <= atol(name), "prepare_condition {name}: {err}");
    }

    cond.drop_text_encoders();
    assert!(!cond.has_text_encoders());
    assert!(cond.encode_texts(&["x"], &sizes).is_err());
}

/// Records every requested (name, shape); tensors are zero views with the shapes of the official
/// key list, so the full-size model is built without weights.
struct ShapeOnly {
    shapes: BTreeMap<String, Vec<usize>>,
    requested: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(want) = self.shapes.get(name) else {
            candle_core::bail!("`{name}` is not in the official key list")
        };
        if want.as_slice() != s.dims() {
            candle_core::bail!("`{name}`: requested {:?}, official {want:?}", s.dims())
        }
        self.requested
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some(want) = self.shapes.get(name) else {
            candle_core::bail!("`{name}` is not in the official key list")
        };
        Tensor::zeros((), dtype, dev)?.broadcast_as(want.as_slice())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

#[test]
fn full_size_keys_match_official() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tsv = std::fs::read_to_string(root.join("fixtures/supir-v0-keys.tsv")).unwrap();
    let shapes: BTreeMap<String, Vec<usize>> = tsv
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("conditioner."))
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap();
            let dims = s
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().unwrap())
                .collect();
            (k.to_string(), dims)
        })
        .collect();
    let requested = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = ShapeOnly {
        shapes: shapes.clone(),
        requested: requested.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let cfg = SupirConfig::load(root.join("fixtures/official/SUPIR_v0.yaml")).unwrap();
    let cond = Conditioner::new(
        &cfg.model.params.conditioner_config.params,
        vb.pp("conditioner"),
    )
    .unwrap();
    assert!(cond.has_text_encoders());
    let clip_vb = vb.pp("conditioner.embedders.0.transformer.text_model");
    assert_eq!(
        ClipTextConfig::from_weights(&clip_vb).unwrap(),
        ClipTextConfig::vit_l_14()
    );
    let open_vb = vb.pp("conditioner.embedders.1.model");
    assert_eq!(
        OpenClipTextConfig::from_weights(&open_vb, "ViT-bigG-14").unwrap(),
        OpenClipTextConfig::vit_bigg_14()
    );

    let requested = requested.lock().unwrap();
    let buffers = [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
    ];
    let expected: BTreeSet<&String> = shapes
        .keys()
        .filter(|k| !buffers.contains(&k.as_str()))
        .collect();
    let got: BTreeSet<&String> = requested.keys().collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(&expected).collect();
    assert!(
        missing.is_empty(),
        "official keys never requested: {missing:?}"
    );
    assert!(extra.is_empty(), "requested keys not official: {extra:?}");
    println!(
        "{} conditioner keys requested, all with the official shapes",
        got.len()
    );
}
