"""Make the LPIPS test data: a tiny AlexNet-shaped backbone and linear layers with seeded random weights, and
the distances the `lpips` package (0.1.4, its own `LPIPS.forward`) computes with them on the photo crops.

Not run in CI. Needs torch, torchvision, safetensors, pillow and the `lpips` wheel (pip install lpips, or
`pip download lpips --no-deps` and put the unpacked wheel on PYTHONPATH):

    python make_lpips_data.py

The layout is AlexNet's (kernels 11/5/3/3/3, strides and paddings, the two max-pools) with fewer channels
(8, 12, 16, 12, 12 instead of 64, 192, 384, 256, 256), so the weights stay small. The backbone is saved with
torchvision's `features.N.*` keys as safetensors; the linear layers with `lpips`' `linK.model.1.weight` keys in
the legacy (pre-zip) torch.save format, the format of the `alex.pth` that ships in the `lpips` wheel.
"""
import json
import os

import lpips
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
CHNS = [8, 12, 16, 12, 12]


def tiny_lpips():
    torch.manual_seed(0)
    m = lpips.LPIPS(pretrained=False, net="alex", pnet_rand=True, verbose=False)
    c = CHNS
    convs = {
        (1, 0): torch.nn.Conv2d(3, c[0], 11, stride=4, padding=2),
        (2, 3): torch.nn.Conv2d(c[0], c[1], 5, padding=2),
        (3, 6): torch.nn.Conv2d(c[1], c[2], 3, padding=1),
        (4, 8): torch.nn.Conv2d(c[2], c[3], 3, padding=1),
        (5, 10): torch.nn.Conv2d(c[3], c[4], 3, padding=1),
    }
    for (s, i), conv in convs.items():
        getattr(m.net, f"slice{s}")._modules[str(i)] = conv
    for k in range(5):
        lin = torch.nn.Conv2d(c[k], 1, 1, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.rand(1, c[k], 1, 1) * 0.2)  # trained LPIPS weights are non-negative
        getattr(m, f"lin{k}").model._modules["1"] = lin
        m.lins[k] = getattr(m, f"lin{k}")
    m.eval()
    backbone = {f"features.{i}.{p}": getattr(conv, p).detach().contiguous() for (_, i), conv in convs.items()
                for p in ("weight", "bias")}
    lins = {f"lin{k}.model.1.weight": getattr(m, f"lin{k}").model[1].weight.detach().clone() for k in range(5)}
    return m, backbone, lins


def load(name):
    img = np.asarray(Image.open(os.path.join(HERE, name)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img).permute(2, 0, 1)[None]


def main():
    m, backbone, lins = tiny_lpips()
    save_file(backbone, os.path.join(HERE, "lpips_tiny_backbone.safetensors"))
    torch.save(lins, os.path.join(HERE, "lpips_tiny_lin.pth"), _use_new_zipfile_serialization=False)
    pairs = []
    for name in ("astronaut", "coffee", "astronaut_big", "coffee_big"):
        a, b = load(f"{name}_deg.png"), load(f"{name}_ref.png")
        with torch.no_grad():
            d = m(a, b, normalize=True).item()
            d_swap = m(b, a, normalize=True).item()
        pairs.append({"restored": f"{name}_deg.png", "reference": f"{name}_ref.png", "lpips": d})
        print(name, d, d_swap)
    out = {"source": "lpips 0.1.4 LPIPS(net='alex').forward(normalize=True), tiny random weights", "pairs": pairs}
    with open(os.path.join(HERE, "expected_lpips.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
