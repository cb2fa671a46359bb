"""Golden data for the tiled VAE: the official `SUPIR/utils/tilevae.py` (`VAEHook`, as `init_tile_vae` installs
it) run on the tiny fixture model's encoder, denoise encoder and decoder.

usage: PYTHONPATH=<refgen tools dir>:<official src> python tiled_vae_reference.py <fixture dir> <out.safetensors>

The official code is used unmodified; only its runtime environment is adapted: `devices.device` is set to the
CPU (it is hard-wired to CUDA), and `xformers.ops.memory_efficient_attention` (which `attn2task` always picks)
is given by plain softmax attention with the default 1/sqrt(C) scale; the fixture's vanilla attention blocks get the
`attention_op = None` attribute of the official config's memory-efficient ones.
"""
import sys, types

import stubs  # noqa: F401  (diffusers, clip, wandb stand-ins)
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file


def sdpa(q, k, v, attn_bias=None, op=None):
    w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ v


xf = types.ModuleType("xformers")
xf.ops = types.SimpleNamespace(memory_efficient_attention=sdpa)
sys.modules["xformers"] = xf
sys.modules["xformers.ops"] = xf.ops

import SUPIR.utils.devices as devices  # noqa: E402

devices.device = torch.device("cpu")
import SUPIR.utils.tilevae as tilevae  # noqa: E402

tilevae.xformers = xf
from sgm.modules.diffusionmodules.model import Encoder, Decoder  # noqa: E402

fixture, out = sys.argv[1], sys.argv[2]
cfg = OmegaConf.load(f"{fixture}/config.yaml")
dd = cfg.model.params.first_stage_config.params.ddconfig
sd = {k: v.float() for k, v in load_file(f"{fixture}/weights.safetensors").items()}


def net(cls, prefix):
    m = cls(**dd).eval()
    p = f"first_stage_model.{prefix}."
    m.load_state_dict({k[len(p):]: v for k, v in sd.items() if k.startswith(p)})
    return m


def hooked(m, tile, is_decoder):
    # The fixture's `vanilla` AttnBlock lacks the `attention_op` attribute of the official SDXL config's
    # `vanilla-xformers` MemoryEfficientAttnBlock (same maths), which the hook reads.
    for mod in m.modules():
        if type(mod).__name__ == "AttnBlock":
            mod.attention_op = None
    m.original_forward = m.forward
    return tilevae.VAEHook(m, tile, is_decoder=is_decoder, fast_decoder=False, fast_encoder=False,
                           color_fix=False, to_gpu=False)


torch.manual_seed(0)
# A smooth image with some detail: 192 x 256, encoder tiles of 64 px (+32): 2 x 3 tiles.
yy, xx = torch.meshgrid(torch.linspace(-1, 1, 192), torch.linspace(-1, 1, 256), indexing="ij")
x = torch.stack([torch.sin(3 * xx + yy), torch.cos(2 * yy - xx), xx * yy], 0)[None]
x = (0.8 * x + 0.1 * torch.randn_like(x)).clamp(-1, 1)
# A latent of 24 x 40, decoder tiles of 8 latent px (+11): 1 x 3 tiles.
z = torch.randn(1, dd.z_channels, 24, 40)
res = {"x": x.contiguous(), "z": z.contiguous()}
with torch.no_grad():
    for name, prefix in [("encoder", "encoder"), ("denoise_encoder", "denoise_encoder")]:
        m = net(Encoder, prefix)
        res[f"{name}_whole"] = m(x).contiguous()
        res[f"{name}_tiled"] = hooked(m, 64, False)(x).contiguous()
    m = net(Decoder, "decoder")
    res["decoder_whole"] = m(z).contiguous()
    res["decoder_tiled"] = hooked(m, 8, True)(z).contiguous()
for k in ["encoder", "denoise_encoder", "decoder"]:
    d = (res[f"{k}_tiled"] - res[f"{k}_whole"]).abs().max().item()
    print(f"{k}: official tiled vs whole max abs diff {d:.3e} (whole max abs {res[f'{k}_whole'].abs().max().item():.3f})")
# The whole-image outputs are the plain VAE, checked by the `vae_*` cases: not stored.
save_file({k: v for k, v in res.items() if not k.endswith("_whole")}, out)
