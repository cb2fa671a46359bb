#!/usr/bin/env python3
"""Golden data for the LLaVA captioner from SUPIR's vendored `llava/` (official code, transformers 4.28.1).

A tiny random LLaVA-1.5 (Llama decoder + CLIP vision tower + mlp2x_gelu projector) in the published layouts,
run through the official `LLavaAgent` on the CPU:

  out/llava/      liuhaotian layout (LlavaLlamaForCausalLM, pytorch_model.bin in f16, tokenizer.model)
  out/clip/       the separate CLIP vision folder (LLAVA_CLIP_PATH), pytorch_model.bin in f16
  out/llava-hf/   the same weights in the llava-hf layout (LlavaForConditionalGeneration, model.safetensors,
                  tokenizer.json; vocabulary grown by <image> and <pad> and padded to a multiple of 64)
  out/image.png   the input (non-square RGB)
  out/golden.safetensors, out/case.json, out/README.md

Weights are drawn in f32, rounded to f16 and stored in f16 (as the official release is); the official loader
reads them in f16 and the script then computes in f32 (the official flow runs f16 on a GPU; f16 matmuls are not
available on the CPU here), so the agent's `.half()` of the pixel tensor is made the identity for the call.

usage: PYTHONPATH=<plain checkout of Fanghua-Yu/SUPIR> python make_llava_fixture.py OUT [--seed N] [sizes...]
Needs: torch, transformers==4.28.1, tokenizers==0.13.3, sentencepiece, protobuf, accelerate, pillow, numpy,
safetensors. Run by hand, never in CI.
"""

import argparse
import io
import json
import os
import sys
import types

import numpy as np
import torch
from PIL import Image

CORPUS = """A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: Describe this image and its style in a very detailed manner. ASSISTANT:
The image shows a cat sitting on a wooden table next to a window. The style is a realistic photograph with soft
natural light, warm colours and a shallow depth of field. In the background there are green plants and a white wall.
A person is walking along the street in the city at night, with bright lights, cars and tall buildings.
The painting depicts a landscape with mountains, a lake, trees and clouds in the blue sky, in an impressionist style.
Close-up portrait of an old man with a grey beard, wearing a hat; the photo is sharp and highly detailed.
Numbers like 12, 345 and 2024 appear in text, as do words such as don't, it's, we're and they'll.
"""

TOKENIZER_TEXTS = [
    "Hello world",
    "A chat between a curious user and an artificial intelligence assistant.",
    "\nDescribe this image and its style in a very detailed manner. ASSISTANT:",
    "USER: ",
    "  two leading spaces",
    "trailing spaces  ",
    "multiple   inner    spaces",
    "digits 1234567 and 3.14",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642",
    "new\nline and\ttab\r\n",
    "",
    " ",
    "don't stop, it's fine!",
    "<s> and </s> as literal text",
    "Zebra QUICK xylophone",
]


def ckpt_stub(clip_dir):
    """SUPIR's CKPT_PTH module, pointing LLAVA_CLIP_PATH at the fixture's CLIP folder."""
    mod = types.ModuleType("CKPT_PTH")
    mod.LLAVA_CLIP_PATH = clip_dir
    mod.LLAVA_MODEL_PATH = None
    sys.modules["CKPT_PTH"] = mod


def train_tokenizer(path_prefix, vocab_size):
    import sentencepiece as spm

    # Llama's SentencePiece settings: BPE, byte fallback, digits split, dummy prefix, no normalisation.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 4),
        model_prefix=path_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=True,
        minloglevel=2,
    )


def f16_round_(module, gen, std_scale):
    """Random weights (normal, std scaled per kind), rounded to f16 values."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm" in name:
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1] if p.ndim >= 2 else 1
                if p.ndim == 4:
                    fan_in = p.shape[1] * p.shape[2] * p.shape[3]
                std = std_scale / np.sqrt(fan_in) if p.ndim >= 2 else std_scale
                p.copy_(std * torch.randn(p.shape, generator=gen))
            p.copy_(p.half().float())


def permute_qk(w, n_head):
    """llama.cpp's q/k row permutation for its interleaved RoPE (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llm_gguf(path, sd, a, sp_path, qtype):
    """The language model as llama.cpp's convert_hf_to_gguf.py writes a Llama (`llama` arch, SentencePiece
    vocabulary, q/k rows permuted, 1-D tensors in f32, 2-D ones in `qtype`)."""
    import gguf
    import sentencepiece as spm

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llava-tiny")
    w.add_context_length(4096)
    w.add_embedding_length(a.hidden)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.intermediate)
    w.add_rope_dimension_count(a.hidden // a.heads)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types.append(t)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
                 "mlp.up_proj": "ffn_up"}
    for k, v in sd.items():
        if k.startswith("model.mm_projector.") or k.endswith("rotary_emb.inv_freq"):
            continue
        if k in names:
            name = names[k]
        else:
            parts = k.split(".")
            assert parts[0] == "model" and parts[1] == "layers", k
            sub = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{per_layer[sub]}.{parts[-1]}"
        data = v.float().numpy()
        if k.endswith("q_proj.weight") or k.endswith("k_proj.weight"):
            data = permute_qk(data, a.heads)
        if data.ndim == 1:
            w.add_tensor(name, data.astype(np.float32))
        elif qtype == "f16":
            w.add_tensor(name, data.astype(np.float16))
        else:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_mmproj_gguf(path, clip_sd, proj_sd, vcfg, a):
    """The vision tower + projector as llama.cpp's legacy LLaVA path writes them
    (llava_surgery.py + convert_image_encoder_to_gguf.py --llava-projector): `clip` arch, names through its
    get_tensor_name (fc1 -> ffn_down, fc2 -> ffn_up), the last encoder layer and post_layernorm dropped
    (block_count = layers - 1), conv and 2-D weights in f16, the rest f32."""
    import gguf

    w = gguf.GGUFWriter(path, "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_file_type(1)
    w.add_description("image encoder for LLaVA")
    w.add_string("clip.projector_type", "mlp")
    w.add_uint32("clip.vision.image_size", vcfg.image_size)
    w.add_uint32("clip.vision.patch_size", vcfg.patch_size)
    w.add_uint32("clip.vision.embedding_length", vcfg.hidden_size)
    w.add_uint32("clip.vision.feed_forward_length", vcfg.intermediate_size)
    w.add_uint32("clip.vision.projection_dim", vcfg.projection_dim)
    w.add_uint32("clip.vision.attention.head_count", vcfg.num_attention_heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", vcfg.layer_norm_eps)
    w.add_uint32("clip.vision.block_count", vcfg.num_hidden_layers - 1)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    w.add_bool("clip.use_gelu", vcfg.hidden_act == "gelu")

    def name_of(n):
        if "mm_projector" in n:
            return n.replace("model.mm_projector", "mm")
        for x, y in (("vision_model", "v"), ("encoder.layers", "blk"), ("embeddings.", ""), ("_proj", ""),
                     ("self_attn.", "attn_"), ("layer_norm", "ln"), ("layernorm", "ln"), ("mlp.fc1", "ffn_down"),
                     ("mlp.fc2", "ffn_up"), ("embedding", "embd"), ("final", "post"), ("layrnorm", "ln")):
            n = n.replace(x, y)
        return n

    last = f"vision_model.encoder.layers.{vcfg.num_hidden_layers - 1}."
    items = list(proj_sd.items()) + list(clip_sd.items())
    for k, v in items:
        if k.endswith("position_ids") or k.startswith(last) or "post_layernorm" in k:
            continue
        data = v.float().squeeze().numpy()
        name = name_of(k)
        if data.ndim == 4 or (name.endswith(".weight") and data.ndim == 2):
            data = data.astype(np.float16)
        else:
            data = data.astype(np.float32)
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    g = 255 * xx / (w - 1)
    b = 255 * (1 - yy / (h - 1))
    img = np.stack([r, g, b], -1) + rng.normal(0, 18, (h, w, 3))
    Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB").save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=192)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=32)
    ap.add_argument("--vision-intermediate", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=3)
    ap.add_argument("--vision-heads", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--image-wh", type=int, nargs=2, default=[83, 61])
    ap.add_argument("--logit-scale", type=float, default=3.0, help="std scale of lm_head (spreads the logits)")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    out = os.path.abspath(a.out)
    llava_dir, clip_dir, hf_dir = (os.path.join(out, d) for d in ("llava", "clip", "llava-hf"))
    for d in (llava_dir, clip_dir, hf_dir):
        os.makedirs(d, exist_ok=True)
    ckpt_stub(clip_dir)

    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaTokenizer, LlamaTokenizerFast
    from safetensors.torch import save_file

    # --- tokenizer (liuhaotian layout: tokenizer.model only) ---
    train_tokenizer(os.path.join(llava_dir, "tokenizer"), a.vocab)
    tok = LlamaTokenizer(os.path.join(llava_dir, "tokenizer.model"), legacy=False)
    tok.save_pretrained(llava_dir)
    cfg_path = os.path.join(llava_dir, "tokenizer_config.json")
    tcfg = json.load(open(cfg_path))
    tcfg.update({"model_max_length": 2048, "padding_side": "right", "clean_up_tokenization_spaces": False,
                 "legacy": False, "pad_token": None})
    json.dump(tcfg, open(cfg_path, "w"), indent=2)
    os.remove(os.path.join(llava_dir, "tokenizer.vocab"))

    # --- CLIP vision tower (LLAVA_CLIP_PATH) ---
    vcfg = CLIPVisionConfig(hidden_size=a.vision_hidden, intermediate_size=a.vision_intermediate,
                            num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
                            image_size=a.image_size, patch_size=a.patch, projection_dim=16,
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)
    clip = CLIPVisionModel(vcfg)
    f16_round_(clip, gen, 1.0)
    clip.half().save_pretrained(clip_dir, safe_serialization=False)
    json.dump({"crop_size": a.image_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
               "feature_extractor_type": "CLIPFeatureExtractor",
               "image_mean": [0.48145466, 0.4578275, 0.40821073],
               "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": a.image_size},
              open(os.path.join(clip_dir, "preprocessor_config.json"), "w"), indent=2)

    # --- LLaVA (liuhaotian layout) ---
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM

    lcfg = LlavaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_act="silu",
                       tie_word_embeddings=False, use_cache=True, architectures=["LlavaLlamaForCausalLM"],
                       mm_vision_tower="openai/clip-vit-large-patch14-336", mm_hidden_size=a.vision_hidden,
                       mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
                       mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                       image_aspect_ratio="pad", use_mm_proj=True, tune_mm_mlp_adapter=False,
                       freeze_mm_mlp_adapter=False, mm_projector_lr=None, group_by_modality_length=False,
                       tokenizer_padding_side="right", tokenizer_model_max_length=2048, torch_dtype="float16")
    model = LlavaLlamaForCausalLM(lcfg)
    f16_round_(model, gen, 1.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(a.logit_scale).copy_(model.lm_head.weight.half().float())
        model.model.embed_tokens.weight.copy_(torch.randn(model.model.embed_tokens.weight.shape,
                                                          generator=gen).half().float())
    sd = {k: v.half() for k, v in model.state_dict().items()}
    assert not any("vision_tower" in k for k in sd), "the published layout has no vision weights inside"
    model.half().save_pretrained(llava_dir, safe_serialization=False)
    del model

    # --- the official agent on the CPU ---
    from llava.llava_agent import LLavaAgent
    from llava.mm_utils import tokenizer_image_token
    from llava.constants import IMAGE_TOKEN_INDEX

    agent = LLavaAgent(llava_dir, device="cpu")
    agent.model.float()
    agent.model.get_vision_tower().float()
    agent.model.eval()

    img_path = os.path.join(out, "image.png")
    make_image(img_path, a.image_wh[0], a.image_wh[1], a.seed)
    image = Image.open(img_path).convert("RGB")

    captured = {}
    orig_generate = agent.model.generate

    def generate(*args, **kw):
        ids = orig_generate(*args, **kw)
        captured["ids"] = ids
        captured["kw"] = {k: v for k, v in kw.items() if k != "images"}
        return ids

    agent.model.generate = generate
    # f32 throughout: `gen_image_caption` casts the pixels with `.half()` for the GPU's f16 model; here the
    # model is f32, so the cast is made the identity for the call (the vision tower would otherwise hand f16
    # features to the f32 projector).
    half = torch.Tensor.half
    torch.Tensor.half = lambda self, *args, **kw: self
    try:
        caption = agent.gen_image_caption([image], temperature=0.0)[0]
    finally:
        torch.Tensor.half = half
    input_ids = agent.input_ids[0]
    greedy_ids = captured["ids"][0, input_ids.shape[0]:]

    with torch.no_grad():
        pixel = agent.image_processor.preprocess(image, return_tensors="pt")["pixel_values"]
        pixel_half = pixel
        vt = agent.model.get_vision_tower()
        outs = vt.vision_tower(pixel_half, output_hidden_states=True)
        vision_hidden = outs.hidden_states[vt.select_layer]
        feats = agent.model.encode_images(pixel_half)
        ids_b = input_ids.unsqueeze(0)
        _, _, _, embeds, _ = agent.model.prepare_inputs_labels_for_multimodal(
            ids_b, torch.ones_like(ids_b), None, None, pixel_half)
        logits = agent.model.lm_head(agent.model.model(inputs_embeds=embeds, use_cache=False)[0])[0, -1]
        # the smallest top-2 gap along the greedy path (must be far above the tolerance)
        full = torch.cat([ids_b[0], greedy_ids])
        all_ids = full.unsqueeze(0)
        _, _, _, e2, _ = agent.model.prepare_inputs_labels_for_multimodal(
            all_ids, torch.ones_like(all_ids), None, None, pixel_half)
        step_logits = agent.model.lm_head(agent.model.model(inputs_embeds=e2, use_cache=False)[0])[0]
        n_img = feats.shape[1]
        start = input_ids.shape[0] - 1 + n_img - 1
        gaps = []
        for t in range(greedy_ids.shape[0]):
            top = torch.topk(step_logits[start + t], 2).values
            gaps.append(float(top[0] - top[1]))
        min_gap = min(gaps) if gaps else None

    # --- tokenizer and decode cases (slow tokenizer, as builder.py loads it) ---
    tok = agent.tokenizer
    tok_cases = [{"text": t, "ids": tok(t).input_ids} for t in TOKENIZER_TEXTS]
    rng = np.random.default_rng(a.seed + 1)
    dec_ids = [greedy_ids.tolist(), [1, 2] + rng.integers(3, a.vocab, 24).tolist(),
               rng.integers(3, 3 + 256, 12).tolist(), [0] + rng.integers(3, a.vocab, 8).tolist() + [2]]
    dec_cases = [{"ids": d, "text": tok.batch_decode([d], skip_special_tokens=True)[0]} for d in dec_ids]

    prompt = agent.conv.get_prompt()
    # --- llava-hf layout ---
    fast = LlamaTokenizerFast.from_pretrained(llava_dir)
    fast_mismatch = [c["text"] for c in tok_cases if fast(c["text"]).input_ids != c["ids"]]
    fast.add_tokens(["<image>"], special_tokens=True)
    fast.add_special_tokens({"pad_token": "<pad>"})
    fast.save_pretrained(hf_dir, legacy_format=False)
    with open(os.path.join(llava_dir, "tokenizer.model"), "rb") as src, \
            open(os.path.join(hf_dir, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())  # llava-hf ships both tokenizer.model and tokenizer.json
    n_tok = len(fast)
    padded = (n_tok + 63) // 64 * 64
    hf = {}
    for k, v in sd.items():
        if k.startswith("model.mm_projector."):
            idx = k.split(".")[2]
            hf["multi_modal_projector." + {"0": "linear_1", "2": "linear_2"}[idx] + "." + k.split(".")[-1]] = v
        elif k.startswith("model."):
            hf["language_model." + k] = v
        elif k.startswith("lm_head."):
            hf["language_model." + k] = v
    for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        w = hf[k].float()
        mean = w.mean(0, keepdim=True)
        hf[k] = torch.cat([w, mean.expand(padded - w.shape[0], -1)], 0).half()
    clip_sd = torch.load(os.path.join(clip_dir, "pytorch_model.bin"), map_location="cpu")
    for k, v in clip_sd.items():
        if k.startswith("vision_model."):
            hf["vision_tower." + k] = v.half()
    save_file({k: v.contiguous() for k, v in hf.items()}, os.path.join(hf_dir, "model.safetensors"),
              metadata={"format": "pt"})
    vdict = vcfg.to_dict()
    vkeep = {k: vdict[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "image_size", "patch_size", "projection_dim", "hidden_act", "layer_norm_eps")}
    vkeep.update({"model_type": "clip_vision_model", "vocab_size": 32000})
    json.dump({"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100,
               "image_token_index": a.vocab, "model_type": "llava", "pad_token_id": a.vocab + 1,
               "projector_hidden_act": "gelu", "torch_dtype": "float16",
               "text_config": {"architectures": ["LlamaForCausalLM"], "hidden_size": a.hidden,
                               "intermediate_size": a.intermediate, "max_position_embeddings": 4096,
                               "model_type": "llama", "num_attention_heads": a.heads,
                               "num_hidden_layers": a.layers, "num_key_value_heads": a.heads, "pad_token_id": 0,
                               "rms_norm_eps": 1e-5, "torch_dtype": "float16", "vocab_size": padded},
               "vision_config": vkeep, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
               "vocab_size": padded}, open(os.path.join(hf_dir, "config.json"), "w"), indent=2)
    for f in ("preprocessor_config.json",):
        with open(os.path.join(clip_dir, f)) as src, open(os.path.join(hf_dir, f), "w") as dst:
            dst.write(src.read())

    gguf_dir = os.path.join(out, "gguf")
    os.makedirs(gguf_dir, exist_ok=True)
    sp_path = os.path.join(llava_dir, "tokenizer.model")
    write_llm_gguf(os.path.join(gguf_dir, "llm-f16.gguf"), sd, a, sp_path, "f16")
    write_llm_gguf(os.path.join(gguf_dir, "llm-q8_0.gguf"), sd, a, sp_path, "q8_0")
    proj_sd = {k: v for k, v in sd.items() if k.startswith("model.mm_projector.")}
    write_mmproj_gguf(os.path.join(gguf_dir, "mmproj-f16.gguf"), clip_sd, proj_sd, vcfg, a)

    save_file({
        "input_ids": input_ids.to(torch.int64).contiguous(),
        "pixel_values": pixel.float().contiguous(),
        "vision_hidden": vision_hidden.float().contiguous(),
        "image_features": feats.float().contiguous(),
        "inputs_embeds": embeds.float().contiguous(),
        "logits0": logits.float().contiguous(),
        "greedy_ids": greedy_ids.to(torch.int64).contiguous(),
    }, os.path.join(out, "golden.safetensors"))
    case = {
        "kind": "llava",
        "seed": a.seed,
        "conv_mode": agent.conv_mode,
        "question": "Describe this image and its style in a very detailed manner.",
        "prompt": prompt,
        "image_token_index": IMAGE_TOKEN_INDEX,
        "max_new_tokens": captured["kw"].get("max_new_tokens"),
        "generate_kwargs": {k: v for k, v in captured["kw"].items() if isinstance(v, (int, float, bool, str))},
        "greedy_caption": caption,
        "greedy_min_top2_gap": min_gap,
        "precision_note": "weights stored in f16, computed in f32; the agent's .half() of the pixel tensor "
                          "(for the official f16 GPU model) is the identity here",
        "tokenizer_cases": tok_cases,
        "decode_cases": dec_cases,
        "fast_tokenizer_mismatches": fast_mismatch,
        "hf_vocab_padded": padded,
        "hf_added_tokens": {"<image>": a.vocab, "<pad>": a.vocab + 1},
        "tolerances": {"pixel_values": 1e-6, "vision_hidden": 1e-4, "image_features": 1e-4,
                       "inputs_embeds": 1e-4, "logits0": 1e-4, "greedy_ids": "equal", "greedy_caption": "equal",
                       "tokenizer_cases": "equal", "decode_cases": "equal"},
        "sizes": vars(a),
    }
    json.dump(case, open(os.path.join(out, "case.json"), "w"), indent=1, ensure_ascii=False)
    print(f"prompt ids {input_ids.shape[0]}, image tokens {n_img}, greedy {greedy_ids.shape[0]} tokens, "
          f"min top-2 gap {min_gap}, fast-tokenizer mismatches {fast_mismatch}")
    print("caption:", caption[:200])


if __name__ == "__main__":
    main()
