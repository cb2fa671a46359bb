#!/usr/bin/env python3
"""Writes ggml-q4_K-edge.bin (see README.md): 32 blocks of 256 f32 weights (edge cases, then
noise), little-endian, followed by the Q4_K blocks that stable-diffusion.cpp's ggml makes of
them, computed by ggml_q4k (ggml_q4k.c, built against that ggml):

  make_q4k_edge.py PATH/TO/ggml_q4k OUT.bin

Needs numpy."""
import os
import subprocess
import sys
import tempfile

import numpy as np


def blocks():
    rng = np.random.default_rng(7)

    def noise():
        return rng.standard_normal(256).astype(np.float32) * 0.05

    out = [np.zeros(256, np.float32)]  # all zero
    b = noise()
    b[0:32] = 0
    b[32:64] = 0.25
    out.append(b)  # a zero and a constant sub-block
    out.append(np.abs(noise()) + 0.1)  # all positive
    out.append(-np.abs(noise()) - 0.1)  # all negative
    b = noise()
    b[7] = 40.0
    out.append(b)  # a large positive outlier
    b = noise()
    b[100] = -40.0
    out.append(b)  # a large negative one
    out.append(np.full(256, 0.3, np.float32))  # constant
    out.append(np.full(256, -0.3, np.float32))
    out.append(noise() * 1e-12)  # steps below f16's range
    out.append(noise() * 1e-30)
    out.append(noise() * 1e4)
    b = noise()
    b[:224] = 0
    out.append(b)  # one live sub-block
    out.append((np.round(noise() * 100) / 100).astype(np.float32))  # ties
    out.append((np.arange(256) % 16).astype(np.float32) * 0.01)  # an exact grid
    b = noise()
    b[::2] = 0
    out.append(b)
    for _ in range(17):
        out.append(noise() * rng.uniform(0.01, 3))
    return np.concatenate(out).astype("<f4")


def main():
    tool, out = sys.argv[1], sys.argv[2]
    x = blocks()
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "x.f32"), os.path.join(d, "q.bin")
        x.tofile(src)
        subprocess.run([tool, src, dst], check=True)
        q = open(dst, "rb").read()
    assert len(q) == x.size // 256 * 144
    with open(out, "wb") as f:
        f.write(x.tobytes() + q)


if __name__ == "__main__":
    main()
