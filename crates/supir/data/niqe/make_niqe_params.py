"""Re-create niqe_pris_params.json from BasicSR's `niqe_pris_params.npz` (not run in CI).

    pip download basicsr==1.4.2 --no-deps && tar xzf basicsr-1.4.2.tar.gz
    python make_niqe_params.py basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz

Needs numpy. Floats are written with repr(), which round-trips f64 exactly.
"""
import json
import os
import sys

import numpy as np


def main():
    npz = np.load(sys.argv[1])
    out = {
        "source": "basicsr 1.4.2 (PyPI sdist), basicsr/metrics/niqe_pris_params.npz, Apache-2.0",
        "mu_pris_param": [float(v) for v in npz["mu_pris_param"].reshape(-1)],
        "cov_pris_param": [[float(v) for v in row] for row in npz["cov_pris_param"]],
        "gaussian_window": [[float(v) for v in row] for row in npz["gaussian_window"]],
    }
    assert len(out["mu_pris_param"]) == 36 and npz["cov_pris_param"].shape == (36, 36)
    assert npz["gaussian_window"].shape == (7, 7)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "niqe_pris_params.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
