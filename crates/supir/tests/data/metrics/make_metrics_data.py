"""Make the metrics test data: two photo crops from scikit-image's bundled sample images, a degraded copy of
each, and the expected PSNR/SSIM values (RGB and Y, with and without a border crop).

Run with numpy, scipy, pillow and scikit-image installed: python make_metrics_data.py  (writes into this folder)
The expected values are computed twice: with scikit-image (peak_signal_noise_ratio / structural_similarity with
BasicSR's settings) and with a direct numpy transcription of the BasicSR formulas; the two must agree.
"""
import json
import os

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

HERE = os.path.dirname(os.path.abspath(__file__))


def degrade(img, seed):
    """Bicubic down/up by 2 plus seeded Gaussian noise, back to uint8."""
    h, w = img.shape[:2]
    pil = Image.fromarray(img)
    low = pil.resize((w // 2, h // 2), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    rng = np.random.default_rng(seed)
    noisy = np.asarray(low).astype(np.float64) + rng.normal(0, 4.0, img.shape)
    return noisy.round().clip(0, 255).astype(np.uint8)


def y_channel(img):
    """MATLAB rgb2ycbcr Y in [16, 235], as BasicSR's to_y_channel (float32 input / 255, BGR dot order, the
    result handed back as float32 in [0, 1] by bgr2ycbcr and scaled by 255 in float32)."""
    x = img.astype(np.float32) / 255.0
    y = np.dot(x[..., ::-1], [24.966, 128.553, 65.481]) + 16.0
    return (y / 255.0).astype(np.float32) * 255.0


def crop(img, b):
    return img[b:-b, b:-b, ...] if b else img


def psnr_ref(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0 * 255.0 / mse)


def gauss_window():
    k = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    k /= k.sum()
    return np.outer(k, k)


def ssim_plane(a, b):
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    w = gauss_window()
    f = lambda x: ndimage.correlate(x, w, mode="reflect")[5:-5, 5:-5]
    mu1, mu2 = f(a), f(b)
    s1, s2, s12 = f(a * a) - mu1**2, f(b * b) - mu2**2, f(a * b) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2))
    return m.mean()


def ssim_ref(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    if a.ndim == 2:
        return ssim_plane(a, b)
    return float(np.mean([ssim_plane(a[..., i], b[..., i]) for i in range(a.shape[2])]))


def ssim_skimage(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    if a.ndim == 3:
        kw["channel_axis"] = -1
    return float(structural_similarity(a, b, **kw))


def main():
    sources = {
        # name: (skimage.data function, crop rows, crop cols)
        "astronaut": ("astronaut", slice(60, 124), slice(180, 236)),   # 64 x 56, face and helmet
        "coffee": ("coffee", slice(150, 198), slice(250, 310)),       # 48 x 60, cup rim and saucer
    }
    cases = []
    for i, (name, (fn, rows, cols)) in enumerate(sources.items()):
        ref = np.ascontiguousarray(getattr(data, fn)()[rows, cols, :3])
        deg = degrade(ref, seed=i)
        Image.fromarray(ref).save(os.path.join(HERE, f"{name}_ref.png"))
        Image.fromarray(deg).save(os.path.join(HERE, f"{name}_deg.png"))
        for border in (0, 4):
            for y in (False, True):
                a, b = crop(ref, border), crop(deg, border)
                if y:
                    a, b = y_channel(a), y_channel(b)
                p_ref, s_ref = psnr_ref(a, b), ssim_ref(a, b)
                p_sk = peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=255)
                s_sk = ssim_skimage(a, b)
                assert abs(p_ref - p_sk) < 1e-9 and abs(s_ref - s_sk) < 1e-9, (name, p_ref, p_sk, s_ref, s_sk)
                cases.append({"image": name, "crop_border": border, "y_channel": y, "psnr": p_sk, "ssim": s_sk})
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump({"source": "skimage.data (scikit-image bundled samples)", "cases": cases}, f, indent=1)
    for c in cases:
        print(c)


if __name__ == "__main__":
    main()
