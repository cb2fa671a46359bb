//! LLaVA-1.5 captioner timing at full size with seeded random weights (run under
//! `/usr/bin/time -v` for the peak memory):
//!
//! - `llava_bench full 7b|13b f32|bf16|f16 [DECODE]`: the safetensors path (candle's Llama);
//! - `llava_bench write-gguf 7b|13b q4k|q4k_m|q8_0 DIR`: writes a random llama.cpp-style pair
//!   (`llm-<type>.gguf` with random quantised blocks, `mmproj-f16.gguf`) into DIR;
//! - `llava_bench gguf LLM.gguf [DECODE]`: the GGUF pair.
//!
//! `LLAVA_BENCH_LAYERS=N` builds N decoder layers at full width (memory-limited machines);
//! `LLAVA_BENCH_KERNELS=candle` runs the GGUF decoder on candle's `QMatMul` (comparisons).
//!
//! Each run captions one 512x384 image with the official prompt: CLIP + projector, the prompt
//! prefill (576 image positions + the text), then DECODE tokens (default 16), printing each
//! stage's wall time and the decode rate. The vocabulary is the tiny fixture's tokenizer (the
//! decoder's 32000-row head is computed in full; sampling is limited to the tokenizer's ids).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::clip::vision_model::ClipVisionConfig;
use candle_transformers::models::llama::{Config as LlamaConfig, LlamaEosToks};
use supir::models::llava::config::{Layout, LlavaConfig};
use supir::models::llava::preprocess::ClipProcessorConfig;
use supir::models::llava::sampling::{Sampler, SamplingParams};
use supir::models::llava::tokenizer::LlavaTokenizer;
use supir::models::llava::{gguf, Llava};
use supir::pipelines::captions::vicuna_v1_prompt;
use supir::weights::RandomSource;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llava-tiny")
}

/// (hidden, intermediate, layers, heads) of Vicuna-7B / 13B v1.5; `LLAVA_BENCH_LAYERS=N`
/// keeps N decoder layers (full width) where the whole model does not fit in memory.
fn sizes(which: &str) -> Result<(usize, usize, usize, usize)> {
    let (h, i, l, a) = match which {
        "7b" => (4096, 11008, 32, 32),
        "13b" => (5120, 13824, 40, 40),
        _ => bail!("size {which}: 7b or 13b"),
    };
    let l = match std::env::var("LLAVA_BENCH_LAYERS") {
        Ok(v) => v.parse().context("LLAVA_BENCH_LAYERS")?,
        Err(_) => l,
    };
    Ok((h, i, l, a))
}

fn config(which: &str) -> Result<LlavaConfig> {
    let (h, i, l, a) = sizes(which)?;
    Ok(LlavaConfig {
        layout: Layout::Original,
        text: LlamaConfig {
            hidden_size: h,
            intermediate_size: i,
            vocab_size: 32000,
            num_hidden_layers: l,
            num_attention_heads: a,
            num_key_value_heads: a,
            use_flash_attn: false,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            bos_token_id: Some(1),
            eos_token_id: Some(LlamaEosToks::Single(2)),
            rope_scaling: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
        },
        vision: ClipVisionConfig::clip_vit_large_patch14_336(),
        select_layer: -2,
        keep_cls: false,
        projector_type: "mlp2x_gelu".into(),
        mm_hidden_size: 1024,
    })
}

fn image() -> image::RgbImage {
    image::RgbImage::from_fn(512, 384, |x, y| {
        image::Rgb([(x / 2) as u8, (y * 2 / 3) as u8, ((x ^ y) & 255) as u8])
    })
}

fn time_caption(model: &Llava, decode: usize) -> Result<()> {
    let img = image();
    let t = Instant::now();
    let px = model.preprocess(&img)?;
    let feats = model.image_features(&px)?;
    println!("CLIP + projector: {:.2}s", t.elapsed().as_secs_f64());
    let ids = model.tokenizer.tokenizer_image_token(&vicuna_v1_prompt(
        supir::pipelines::captions::LLAVA_QUESTION,
    ))?;
    let embeds = model.prompt_embeds(&ids, &feats)?;
    let mut sampler = Sampler::new(SamplingParams {
        temperature: 0.2,
        top_p: 0.7,
        top_k: 50,
        seed: 0,
    });
    let t = Instant::now();
    let mut first = None;
    let gen = model.generate(&embeds, decode, &mut sampler, None, |n| {
        if n == 1 {
            first = Some(t.elapsed());
        }
    })?;
    let total = t.elapsed().as_secs_f64();
    let f = first.map_or(0.0, |d| d.as_secs_f64());
    let n = gen.ids.len();
    println!(
        "prefill {} positions: {f:.2}s ({:.1} positions/s); decode {} tokens: {:.2}s = {:.3} tokens/s",
        embeds.dim(1)?,
        embeds.dim(1)? as f64 / f,
        n - 1,
        total - f,
        (n - 1) as f64 / (total - f)
    );
    Ok(())
}

fn full(which: &str, dtype: &str, decode: usize) -> Result<()> {
    let dtype = match dtype {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        _ => bail!("dtype {dtype}"),
    };
    let dev = Device::Cpu;
    let t = Instant::now();
    let tok = LlavaTokenizer::from_dir(&fixture().join("llava"))?;
    let src = RandomSource::new(HashMap::new(), 7);
    let model = Llava::from_var_builders(
        config(which)?,
        tok,
        ClipProcessorConfig::default(),
        src.clone().into_var_builder(DType::F32, &dev),
        src.into_var_builder(dtype, &dev),
        dtype,
        &dev,
    )?;
    println!(
        "random {which} {dtype:?} built in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    time_caption(&model, decode)
}

/// splitmix64 bytes.
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// A random quantised tensor with small finite block scales.
fn random_q(dt: GgmlDType, dims: &[usize], seed: u64) -> Result<QTensor> {
    let n: usize = dims.iter().product();
    let blocks = n / dt.block_size();
    let mut raw = random_bytes(blocks * dt.type_size(), seed);
    let scale = half::f16::from_f32(2e-4).to_le_bytes();
    for b in raw.chunks_mut(dt.type_size()) {
        if dt == GgmlDType::Q6K {
            // Q6_K: ql, qh, 16 signed scales, then d.
            b[208..210].copy_from_slice(&half::f16::from_f32(1e-5).to_le_bytes());
            continue;
        }
        // Q8_0: d first; Q4_K: d, dmin first.
        b[..2].copy_from_slice(&scale);
        if dt == GgmlDType::Q4K {
            b[2..4].copy_from_slice(&scale);
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(
        dt,
        &raw,
        dims.to_vec(),
        &Device::Cpu,
    )?)
}

fn float_q(name: &str, dims: &[usize], dt: GgmlDType, src: &RandomSource) -> Result<QTensor> {
    let t = src.tensor(name, dims)?;
    Ok(QTensor::quantize(&t, dt)?)
}

fn write_gguf(
    path: &Path,
    md: &[(&str, gguf_file::Value)],
    ts: &[(String, QTensor)],
) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| path.display().to_string())?,
    );
    let md: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = ts.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md, &ts)?;
    f.flush()?;
    Ok(())
}

fn write_pair(which: &str, qtype: &str, dir: &Path) -> Result<()> {
    use gguf_file::Value as V;
    // `q4k_m`: llama.cpp's Q4_K_M mix, Q6_K for `output.weight` and for `attn_v` / `ffn_down`
    // of the layers its `use_more_bits` picks (the first and last eighth, every third between).
    let (dt, mixed) = match qtype {
        "q4k" => (GgmlDType::Q4K, false),
        "q4k_m" => (GgmlDType::Q4K, true),
        "q8_0" => (GgmlDType::Q8_0, false),
        _ => bail!("type {qtype}: q4k, q4k_m or q8_0"),
    };
    std::fs::create_dir_all(dir)?;
    let (h, i, l, a) = sizes(which)?;
    let src = RandomSource::new(HashMap::new(), 11);
    // The tiny fixture's vocabulary, padded to 32000 unused pieces.
    let sp_dir = fixture().join("gguf/llm-f16.gguf");
    let mut f = std::fs::File::open(&sp_dir)?;
    let tiny = gguf_file::Content::read(&mut f)?;
    let mut tokens = tiny.metadata["tokenizer.ggml.tokens"].to_vec()?.clone();
    let mut scores = tiny.metadata["tokenizer.ggml.scores"].to_vec()?.clone();
    let mut types = tiny.metadata["tokenizer.ggml.token_type"].to_vec()?.clone();
    for k in tokens.len()..32000 {
        tokens.push(V::String(format!("<unused{k}>")));
        scores.push(V::F32(-1e9));
        types.push(V::I32(5));
    }
    let md = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.context_length", V::U32(4096)),
        ("llama.embedding_length", V::U32(h as u32)),
        ("llama.block_count", V::U32(l as u32)),
        ("llama.feed_forward_length", V::U32(i as u32)),
        ("llama.rope.dimension_count", V::U32((h / a) as u32)),
        ("llama.attention.head_count", V::U32(a as u32)),
        ("llama.attention.head_count_kv", V::U32(a as u32)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::String("llama".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens)),
        ("tokenizer.ggml.scores", V::Array(scores)),
        ("tokenizer.ggml.token_type", V::Array(types)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
    ];
    let mut ts: Vec<(String, QTensor)> = vec![];
    let mut seed = 1u64;
    let mut q = |dims: &[usize], more_bits: bool| {
        seed += 1;
        random_q(
            if mixed && more_bits {
                GgmlDType::Q6K
            } else {
                dt
            },
            dims,
            seed,
        )
    };
    let more_bits = |b: usize| b < l / 8 || b >= 7 * l / 8 || (b - l / 8) % 3 == 2;
    ts.push(("token_embd.weight".into(), q(&[32000, h], false)?));
    ts.push(("output.weight".into(), q(&[32000, h], true)?));
    ts.push((
        "output_norm.weight".into(),
        float_q("output_norm.weight", &[h], GgmlDType::F32, &src)?,
    ));
    for b in 0..l {
        for (n, d) in [
            ("attn_q", [h, h]),
            ("attn_k", [h, h]),
            ("attn_v", [h, h]),
            ("attn_output", [h, h]),
            ("ffn_gate", [i, h]),
            ("ffn_up", [i, h]),
            ("ffn_down", [h, i]),
        ] {
            let more = matches!(n, "attn_v" | "ffn_down") && more_bits(b);
            ts.push((format!("blk.{b}.{n}.weight"), q(&d, more)?));
        }
        for n in ["attn_norm", "ffn_norm"] {
            let name = format!("blk.{b}.{n}.weight");
            let t = float_q(&name, &[h], GgmlDType::F32, &src)?;
            ts.push((name, t));
        }
    }
    let llm = dir.join(format!("llm-{qtype}.gguf"));
    write_gguf(&llm, &md, &ts)?;
    drop(ts);
    println!("wrote {}", llm.display());
    // mmproj: CLIP ViT-L/14-336 without its last layer, f16 matrices, f32 vectors.
    let c = ClipVisionConfig::clip_vit_large_patch14_336();
    let e = c.embed_dim;
    let md = vec![
        ("general.architecture", V::String("clip".into())),
        ("clip.projector_type", V::String("mlp".into())),
        ("clip.vision.image_size", V::U32(336)),
        ("clip.vision.patch_size", V::U32(14)),
        ("clip.vision.embedding_length", V::U32(e as u32)),
        (
            "clip.vision.feed_forward_length",
            V::U32(c.intermediate_size as u32),
        ),
        ("clip.vision.projection_dim", V::U32(768)),
        ("clip.vision.attention.head_count", V::U32(16)),
        ("clip.vision.attention.layer_norm_epsilon", V::F32(1e-5)),
        ("clip.vision.block_count", V::U32(23)),
        (
            "clip.vision.image_mean",
            V::Array(
                [0.481_454_66f32, 0.457_827_5, 0.408_210_73]
                    .map(V::F32)
                    .to_vec(),
            ),
        ),
        (
            "clip.vision.image_std",
            V::Array(
                [0.268_629_54f32, 0.261_302_6, 0.275_777_1]
                    .map(V::F32)
                    .to_vec(),
            ),
        ),
        ("clip.use_gelu", V::Bool(false)),
    ];
    let mut ts: Vec<(String, QTensor)> = vec![];
    let mut add = |name: String, dims: &[usize]| -> Result<()> {
        let dt = if dims.len() >= 2 {
            GgmlDType::F16
        } else {
            GgmlDType::F32
        };
        let t = float_q(&name, dims, dt, &src)?;
        ts.push((name, t));
        Ok(())
    };
    add("v.class_embd".into(), &[e])?;
    add("v.patch_embd.weight".into(), &[e, 3, 14, 14])?;
    add("v.position_embd.weight".into(), &[577, e])?;
    add("v.pre_ln.weight".into(), &[e])?;
    add("v.pre_ln.bias".into(), &[e])?;
    for b in 0..23 {
        for n in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            add(format!("v.blk.{b}.{n}.weight"), &[e, e])?;
            add(format!("v.blk.{b}.{n}.bias"), &[e])?;
        }
        for n in ["ln1", "ln2"] {
            add(format!("v.blk.{b}.{n}.weight"), &[e])?;
            add(format!("v.blk.{b}.{n}.bias"), &[e])?;
        }
        add(
            format!("v.blk.{b}.ffn_down.weight"),
            &[c.intermediate_size, e],
        )?;
        add(format!("v.blk.{b}.ffn_down.bias"), &[c.intermediate_size])?;
        add(
            format!("v.blk.{b}.ffn_up.weight"),
            &[e, c.intermediate_size],
        )?;
        add(format!("v.blk.{b}.ffn_up.bias"), &[e])?;
    }
    add("mm.0.weight".into(), &[h, e])?;
    add("mm.0.bias".into(), &[h])?;
    add("mm.2.weight".into(), &[h, h])?;
    add("mm.2.bias".into(), &[h])?;
    let mm = dir.join("mmproj-f16.gguf");
    write_gguf(&mm, &md, &ts)?;
    println!("wrote {}", mm.display());
    Ok(())
}

fn gguf(llm: &Path, decode: usize) -> Result<()> {
    let t = Instant::now();
    let kernels = match std::env::var("LLAVA_BENCH_KERNELS").as_deref() {
        Ok("candle") => gguf::DecoderKernels::Candle,
        _ => gguf::DecoderKernels::Supir,
    };
    let pair = gguf::GgufPair::find(llm)?.context("no GGUF pair")?;
    let model = gguf::load_with(&pair, None, DType::F32, &Device::Cpu, kernels)?;
    println!("decoder kernels: {kernels:?}");
    println!(
        "loaded {} in {:.1}s",
        llm.display(),
        t.elapsed().as_secs_f64()
    );
    time_caption(&model, decode)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu)?;
    match a.as_slice() {
        ["full", which, dt, rest @ ..] => full(which, dt, rest.first().map_or(Ok(16), |s| s.parse())?),
        ["write-gguf", which, qt, dir] => write_pair(which, qt, Path::new(dir)),
        ["gguf", llm, rest @ ..] => gguf(Path::new(llm), rest.first().map_or(Ok(16), |s| s.parse())?),
        _ => bail!("usage: llava_bench full 7b|13b f32|bf16|f16 [DECODE] | write-gguf 7b|13b q4k|q4k_m|q8_0 DIR | gguf LLM.gguf [DECODE]"),
    }
}
