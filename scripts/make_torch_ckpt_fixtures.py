"""Writes the small PyTorch zip checkpoints used by crates/supir/tests/weights.rs (run by hand, needs torch).

usage: python scripts/make_torch_ckpt_fixtures.py crates/supir/tests/data
"""
import os
import sys

import torch


def state(dtype):
    return {"model.diffusion_model.w": torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype),
            "first_stage_model.b": torch.tensor([-1.5, 0.25]).to(dtype)}


out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.save(state(torch.float32), os.path.join(out, "plain_f32.pth"))
# Lightning-style: the state dict wrapped with other entries, as the official SUPIR .ckpt files may be.
for name, dt in (("wrapped_f16.ckpt", torch.float16), ("wrapped_bf16.ckpt", torch.bfloat16)):
    torch.save({"state_dict": state(dt), "global_step": 1000, "epoch": 3}, os.path.join(out, name))
