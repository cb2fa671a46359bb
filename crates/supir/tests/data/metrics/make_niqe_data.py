"""Make the NIQE / `supir eval` test data: two larger photo crops (NIQE needs at least 192x192 for two
scales of 96x96 blocks), a degraded copy of each, and the values BasicSR 1.4.2 itself computes for them.

Not run in CI. Needs numpy, scipy, pillow, scikit-image, opencv-python, torch (BasicSR's imresize), and the
extracted BasicSR 1.4.2 source distribution:

    pip download basicsr==1.4.2 --no-deps && tar xzf basicsr-1.4.2.tar.gz
    python make_niqe_data.py basicsr-1.4.2

BasicSR's package `__init__` imports its whole training stack, so only the metric modules are loaded here,
straight from the source files (`calculate_niqe`, `calculate_psnr`, `calculate_ssim` run unmodified).
"""
import importlib.util
import json
import os
import sys
import types

import cv2
import numpy as np
from PIL import Image
from skimage import data

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_metrics_data import degrade  # noqa: E402


def load_basicsr_metrics(src):
    """Registers the few BasicSR modules the metrics need and returns (niqe module, psnr_ssim module)."""

    def pkg(name, path):
        m = types.ModuleType(name)
        m.__path__ = [path]
        sys.modules[name] = m
        return m

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        m = importlib.util.module_from_spec(spec)
        sys.modules[name] = m
        spec.loader.exec_module(m)
        return m

    root = os.path.join(src, "basicsr")
    pkg("basicsr", root)
    utils = pkg("basicsr.utils", os.path.join(root, "utils"))
    utils.bgr2ycbcr = load("basicsr.utils.color_util", os.path.join(root, "utils", "color_util.py")).bgr2ycbcr
    load("basicsr.utils.registry", os.path.join(root, "utils", "registry.py"))
    load("basicsr.utils.matlab_functions", os.path.join(root, "utils", "matlab_functions.py"))
    pkg("basicsr.metrics", os.path.join(root, "metrics"))
    load("basicsr.metrics.metric_util", os.path.join(root, "metrics", "metric_util.py"))
    niqe = load("basicsr.metrics.niqe", os.path.join(root, "metrics", "niqe.py"))
    psnr_ssim = load("basicsr.metrics.psnr_ssim", os.path.join(root, "metrics", "psnr_ssim.py"))
    return niqe, psnr_ssim


TAPS = np.array([-0.01171875, -0.03515625, 0.11328125, 0.43359375, 0.43359375, 0.11328125, -0.03515625,
                 -0.01171875], dtype=np.float32)  # BasicSR's imresize weights for scale 1/2 with antialiasing


def imresize_half_exact(img, scale, antialiasing=True):
    """BasicSR's `imresize(img, 0.5)` with a BLAS-independent float32 summation order: the row pass accumulates
    tap by tap in float32 (what torch's `mv` does on that strided view), the column pass rounds the exact dot
    product once (torch hands it to the BLAS, e.g. MKL, whose order varies with the CPU)."""
    assert scale == 0.5 and antialiasing
    mirror = lambda i, n: -i - 1 if i < 0 else (2 * n - 1 - i if i >= n else i)
    img = img.astype(np.float32)
    h, w = img.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    rows = np.zeros((oh, w), np.float32)
    for o in range(oh):
        for k in range(8):
            rows[o] = rows[o] + TAPS[k] * img[mirror(2 * o - 3 + k, h)]
    out = np.zeros((oh, ow), np.float32)
    for o in range(ow):
        idx = [mirror(2 * o - 3 + k, w) for k in range(8)]
        out[:, o] = (rows[:, idx].astype(np.float64) @ TAPS.astype(np.float64)).astype(np.float32)
    return out


def niqe_exact_resize(niqe, img, border):
    stock = niqe.imresize
    niqe.imresize = imresize_half_exact
    try:
        return niqe.calculate_niqe(img, border)
    finally:
        niqe.imresize = stock


def main():
    niqe, psnr_ssim = load_basicsr_metrics(sys.argv[1])
    sources = {
        # name: (skimage.data function, crop rows, crop cols)
        "astronaut_big": ("astronaut", slice(10, 210), slice(140, 350)),  # 200 x 210: 2 x 2 blocks
        "coffee_big": ("coffee", slice(100, 330), slice(180, 480)),  # 230 x 300: 2 x 3 blocks
    }
    images, pairs = {}, []
    for i, (name, (fn, rows, cols)) in enumerate(sources.items()):
        ref = np.ascontiguousarray(getattr(data, fn)()[rows, cols, :3])
        deg = degrade(ref, seed=10 + i)
        for kind, img in (("ref", ref), ("deg", deg)):
            file = f"{name}_{kind}.png"
            Image.fromarray(img).save(os.path.join(HERE, file))
            bgr = cv2.imread(os.path.join(HERE, file))  # as BasicSR's scripts read images
            images[file] = {f"niqe_crop{b}": niqe.calculate_niqe(bgr, b) for b in (0, 4)}
            images[file].update({f"niqe_exact_resize_crop{b}": niqe_exact_resize(niqe, bgr, b) for b in (0, 4)})
        a = cv2.imread(os.path.join(HERE, f"{name}_deg.png"))
        b = cv2.imread(os.path.join(HERE, f"{name}_ref.png"))
        pair = {"restored": f"{name}_deg.png", "reference": f"{name}_ref.png"}
        for border in (0, 4):
            pair[f"crop{border}"] = {
                "psnr": psnr_ssim.calculate_psnr(a, b, border),
                "ssim": psnr_ssim.calculate_ssim(a, b, border),
                "psnr_y": psnr_ssim.calculate_psnr(a, b, border, test_y_channel=True),
                "ssim_y": psnr_ssim.calculate_ssim(a, b, border, test_y_channel=True),
                "niqe": images[pair["restored"]][f"niqe_crop{border}"],
            }
        pairs.append(pair)
    out = {
        "source": "skimage.data crops; values from basicsr 1.4.2 calculate_niqe/psnr/ssim (cv2.imread BGR input)",
        "images": images,
        "pairs": pairs,
    }
    with open(os.path.join(HERE, "expected_niqe.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
