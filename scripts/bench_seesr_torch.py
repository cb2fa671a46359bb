"""Time the official SeeSR networks (full size, random weights, no files) on this CPU with PyTorch, float32.

usage: PYTHONPATH=<copy of the SeeSR code> python bench_seesr_torch.py [--size 512] [--reps 2]
           [--stages text,dape,step,vae_encode,vae_decode] [--config-dir fixtures/official/seesr]

`supir bench seesr --torch` runs it after its own stages (through `python -`, with the configs it embeds in
--config-dir) and puts its figures beside its own. The networks and their inputs, with the shapes the Rust bench
uses (latent side = size / 8, CFG batch 2 as pipelines/pipeline_seesr.py runs them):
  text_b2        transformers CLIPTextModel (SD-2-base text encoder config) on [2, 77] ids
  dape_b1        ram.models.ram_lora.ram(image_size=384, vit='swin_l') .generate_tag on [1, 3, 384, 384]
                 (visual encoder, image_proj, tagging head; test_seesr.py runs the visual encoder a second time
                 for generate_image_embeds)
  controlnet_b2  SeeSR's models/controlnet.py ControlNetModel, as the pipeline calls it per step
  unet_b2        SeeSR's models/unet_2d_condition.py UNet2DConditionModel with the ControlNet residuals
  vae_encode_b1  diffusers AutoencoderKL: quant_conv(encoder(x)) on [1, 3, size, size]
  vae_decode_b1  decoder(post_quant_conv(z)) on [1, 4, size / 8, size / 8]
Prints one line per stage: `label<TAB>median_s=..<TAB>min_s=..<TAB>peak_rss_gib=..<TAB>first_s=..`, as
bench_torch_cpu.py does for SUPIR (first_s: the warm-up call). Peak RSS is the process's peak so far.
"""
import argparse, contextlib, importlib, io, json, os, resource, shutil, sys, tempfile, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel
from models.unet_2d_condition import UNet2DConditionModel
from models.controlnet import ControlNetModel

STAGES = ("text", "dape", "step", "vae_encode", "vae_decode")


def default_config_dir():
    here = os.path.dirname(os.path.abspath(sys.argv[0])) if sys.argv and sys.argv[0] not in ("", "-") else os.getcwd()
    return os.path.normpath(os.path.join(here, "..", "fixtures", "official", "seesr"))


def rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(label, fn, reps):
    t0 = time.perf_counter()
    out = fn()  # warm-up (the cold call)
    first = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    print(f"{label}\tmedian_s={ts[len(ts) // 2]:.3f}\tmin_s={ts[0]:.3f}\tpeak_rss_gib={rss_gib():.1f}"
          f"\tfirst_s={first:.3f}", flush=True)
    return out


def built(what, t0):
    print(f"built {what}\tseconds={time.perf_counter() - t0:.1f}\tpeak_rss_gib={rss_gib():.1f}", flush=True)


def read(config_dir, name):
    with open(os.path.join(config_dir, name)) as f:
        return json.load(f)


@contextlib.contextmanager
def bert_placeholder():
    """RAM's __init__ reads BertTokenizer.from_pretrained('bert-base-uncased') only for its length (to resize an
    embedding of the tagging head that it deletes right after); offline, a local folder of that name with a
    vocabulary of the same size (30,522 entries) stands in for it."""
    work = tempfile.mkdtemp(prefix="seesr-bench-")
    d = os.path.join(work, "bert-base-uncased")
    os.makedirs(d)
    special = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(special + [f"tok{i}" for i in range(30522 - len(special))]) + "\n")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        yield
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--config-dir", default=None)
    a = ap.parse_args()
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    for s in stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s} (expected {', '.join(STAGES)})")
    cdir = a.config_dir or default_config_dir()
    s, l = a.size, a.size // 8
    torch.manual_seed(0)
    print(f"torch {torch.__version__} threads {torch.get_num_threads()} size {s} latent {l}", flush=True)
    text_cfg = read(cdir, "text_encoder_config.json")
    cn_cfg = read(cdir, "controlnet_config.json")
    with torch.no_grad():
        text = ram_embeds = None
        if "text" in stages:
            t0 = time.perf_counter()
            te = CLIPTextModel(CLIPTextConfig.from_dict(text_cfg)).eval()
            built("text encoder", t0)
            n = text_cfg.get("max_position_embeddings", 77)
            ids = torch.randint(0, text_cfg.get("vocab_size", 49408), (2, n))
            text = timed("text_b2", lambda: te(ids)[0], a.reps)
            del te
        if "dape" in stages:
            ram_lora = importlib.import_module("ram.models.ram_lora")
            t0 = time.perf_counter()
            with bert_placeholder(), contextlib.redirect_stdout(io.StringIO()):
                ram = ram_lora.ram(image_size=384, vit="swin_l")
            ram = ram.eval()  # loralib merges the LoRA layers here, as in test_seesr.py
            built("RAM + DAPE", t0)
            px = torch.randn(1, 3, 384, 384)
            timed("dape_b1", lambda: ram.generate_tag(px), a.reps)
            ram_embeds = ram.generate_image_embeds(px)
            del ram
        if "step" in stages:
            if text is None:
                text = torch.randn(2, 77, cn_cfg["cross_attention_dim"])
            ram2 = torch.randn(2, 145, 512) if ram_embeds is None else torch.cat([ram_embeds, ram_embeds])
            x = torch.randn(2, cn_cfg.get("in_channels", 4), l, l)
            control = torch.rand(2, cn_cfg.get("conditioning_channels", 3), s, s)
            t = torch.tensor(500)
            t0 = time.perf_counter()
            cn = ControlNetModel.from_config(cn_cfg).eval()
            built("ControlNet", t0)
            down, mid = timed("controlnet_b2", lambda: cn(
                x, t, encoder_hidden_states=text, controlnet_cond=control, conditioning_scale=1.0,
                guess_mode=False, return_dict=False, image_encoder_hidden_states=ram2), a.reps)
            del cn
            t0 = time.perf_counter()
            unet = UNet2DConditionModel.from_config(read(cdir, "unet_config.json")).eval()
            built("UNet", t0)
            timed("unet_b2", lambda: unet(
                x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid, return_dict=False, image_encoder_hidden_states=ram2)[0], a.reps)
            del unet, down, mid
        if "vae_encode" in stages or "vae_decode" in stages:
            t0 = time.perf_counter()
            vae = AutoencoderKL.from_config(read(cdir, "vae_config.json")).eval()
            built("VAE", t0)
            if "vae_encode" in stages:
                img = torch.rand(1, 3, s, s) * 2 - 1
                timed("vae_encode_b1", lambda: vae.quant_conv(vae.encoder(img)), a.reps)
            if "vae_decode" in stages:
                z = torch.randn(1, 4, l, l)
                timed("vae_decode_b1", lambda: vae.decoder(vae.post_quant_conv(z)), a.reps)


if __name__ == "__main__":
    main()
