"""The ops of `crates/supir/examples/kernels.rs`, timed with PyTorch (float32, CPU, default threads).

usage: python scripts/kernels_torch.py [reps] [filter]
Prints `op<TAB>best_s<TAB>rate` lines with the same names and rate definitions as the Rust example.
Attention is timed twice: as the official sgm CrossAttention runs it (F.scaled_dot_product_attention)
and written out (softmax(q k^T) v), as the Rust code runs it.
"""
import sys
import time

import torch
import torch.nn.functional as F


def best(reps, fn):
    fn()
    b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t0)
    return b


def conv3x3(b, cin, cout, hw):
    x, w, bias = torch.randn(b, cin, hw, hw), torch.randn(cout, cin, 3, 3) / (9 * cin) ** 0.5, torch.randn(cout)
    return f"conv3x3 {cin}->{cout} {hw}x{hw} b{b}", ("flop", 2.0 * b * cout * hw * hw * cin * 9), lambda: F.conv2d(x, w, bias, padding=1)


def matmul(m, k, n):
    a, w = torch.randn(m, k), torch.randn(k, n)
    return f"matmul {m}x{k} @ {k}x{n}", ("flop", 2.0 * m * k * n), lambda: a @ w


def linear(b, n, k, out):
    x, w, bias = torch.randn(b, n, k), torch.randn(out, k), torch.randn(out)
    return f"linear [{b},{n},{k}] -> {out}", ("flop", 2.0 * b * n * k * out), lambda: F.linear(x, w, bias)


def attention(b, h, n, m, d, sdpa):
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, m, d), torch.randn(b, h, m, d)
    f = (lambda: F.scaled_dot_product_attention(q, k, v)) if sdpa else (lambda: torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    tag = " (sdpa)" if sdpa else ""
    return f"attention b{b} h{h} {n}x{m} d{d}{tag}", ("flop", 4.0 * b * h * n * m * d), f


def fmt(shape):
    return "[" + ", ".join(str(s) for s in shape) + "]"


def group_norm(shape, eps):
    x = torch.randn(*shape)
    g = torch.nn.GroupNorm(32, shape[1], eps=eps)
    return f"group_norm+silu {fmt(shape)}", ("bytes", 8.0 * x.numel()), lambda: F.silu(g(x))


def layer_norm(shape):
    x = torch.randn(*shape)
    ln = torch.nn.LayerNorm(shape[-1])
    return f"layer_norm {fmt(shape)}", ("bytes", 8.0 * x.numel()), lambda: ln(x)


def silu(shape):
    x = torch.randn(*shape)
    return f"silu {fmt(shape)}", ("bytes", 8.0 * x.numel()), lambda: F.silu(x)


def geglu(b, n, inner):
    p = torch.randn(b, n, 2 * inner)

    def f():
        a, gate = p.chunk(2, dim=-1)
        return a * F.gelu(gate)
    return f"geglu [{b},{n},{2 * inner}]", ("bytes", 12.0 * b * n * inner), f


def add(shape):
    x, y = torch.randn(*shape), torch.randn(*shape)
    return f"add {fmt(shape)}", ("bytes", 12.0 * x.numel()), lambda: x + y


def to_tokens(shape):
    x = torch.randn(*shape)
    b, c, hw = shape[0], shape[1], shape[2] * shape[3]
    return f"transpose-copy {fmt(shape)}", ("bytes", 8.0 * x.numel()), lambda: x.reshape(b, c, hw).transpose(1, 2).contiguous()


def ops():
    yield lambda: matmul(2048, 1280, 1280)
    yield lambda: conv3x3(2, 640, 640, 32)
    yield lambda: conv3x3(2, 320, 320, 64)
    yield lambda: conv3x3(1, 128, 128, 256)
    yield lambda: conv3x3(2, 1280, 1280, 16)
    yield lambda: linear(2, 1024, 640, 640)
    yield lambda: linear(2, 1024, 640, 5120)
    yield lambda: linear(2, 1024, 2560, 640)
    yield lambda: linear(2, 256, 1280, 1280)
    yield lambda: linear(2, 256, 1280, 10240)
    yield lambda: linear(2, 256, 5120, 1280)
    yield lambda: linear(2, 77, 2048, 1280)
    for sdpa in (False, True):
        yield lambda: attention(2, 10, 1024, 1024, 64, sdpa)
        yield lambda: attention(2, 20, 256, 256, 64, sdpa)
        yield lambda: attention(2, 10, 1024, 77, 64, sdpa)
        yield lambda: attention(2, 20, 256, 77, 64, sdpa)
    yield lambda: group_norm([2, 320, 64, 64], 1e-5)
    yield lambda: group_norm([2, 640, 32, 32], 1e-5)
    yield lambda: group_norm([2, 1280, 16, 16], 1e-5)
    yield lambda: layer_norm([2, 1024, 640])
    yield lambda: layer_norm([2, 256, 1280])
    yield lambda: silu([2, 320, 64, 64])
    yield lambda: geglu(2, 1024, 2560)
    yield lambda: geglu(2, 256, 5120)
    yield lambda: add([2, 320, 64, 64])
    yield lambda: to_tokens([2, 640, 32, 32])
    yield lambda: conv3x3(1, 512, 512, 64)
    yield lambda: conv3x3(1, 512, 512, 128)
    yield lambda: conv3x3(1, 256, 256, 256)
    yield lambda: conv3x3(1, 128, 128, 512)
    yield lambda: group_norm([1, 128, 512, 512], 1e-6)
    yield lambda: silu([1, 128, 512, 512])


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    filt = sys.argv[2] if len(sys.argv) > 2 else ""
    print(f"# torch {torch.__version__} threads {torch.get_num_threads()}", flush=True)
    print("op\tbest_s\trate", flush=True)
    with torch.no_grad():
        for make in ops():
            name, (unit, work), fn = make()
            if filt not in name:
                continue
            s = best(reps, fn)
            rate = f"{work / s / 1e9:.1f} GFLOP/s" if unit == "flop" else f"{work / s / 1e9:.1f} GB/s"
            print(f"{name}\t{s:.5f}\t{rate}", flush=True)


if __name__ == "__main__":
    main()
