//! Blur kernels of Real-ESRGAN (BasicSR `degradations.py`): bivariate Gaussian, generalized
//! Gaussian, plateau (isotropic or anisotropic), and the circular low-pass (sinc / jinc) filter.
//!
//! The anisotropic forms share the quadratic form `q(v) = vᵀ Σ⁻¹ v`, `Σ = U diag(σx², σy²) Uᵀ`
//! with `U` the rotation by `θ` and `v = (x, y)` (x the column offset, y the row offset from the
//! centre). Isotropic kinds use `σy = σx`, `θ = 0`. Every kernel is normalised to sum 1.

use std::f64::consts::PI;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{choose_uniform, choose_weighted, uniform};

/// A square, odd-sized kernel, row-major, float64 (as BasicSR builds them in numpy).
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub size: usize,
    pub data: Vec<f64>,
}

impl Kernel {
    /// Build from `f(x, y)` with x, y the column / row offsets from the centre.
    fn from_offsets(size: usize, f: impl Fn(f64, f64) -> f64) -> Self {
        assert!(size % 2 == 1, "kernel size must be odd, got {size}");
        let r = (size / 2) as f64;
        let mut data = Vec::with_capacity(size * size);
        for i in 0..size {
            for j in 0..size {
                data.push(f(j as f64 - r, i as f64 - r));
            }
        }
        Self { size, data }
    }

    /// Divide by the sum (`kernel / np.sum(kernel)`).
    fn normalized(mut self) -> Self {
        let s: f64 = self.data.iter().sum();
        self.data.iter_mut().for_each(|v| *v /= s);
        self
    }

    /// Value at (row, column).
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.size + j]
    }

    /// The identity ("pulse") kernel: 1 at the centre.
    pub fn pulse(size: usize) -> Self {
        Self::from_offsets(size, |x, y| if x == 0.0 && y == 0.0 { 1.0 } else { 0.0 })
    }

    /// Zero-pad symmetrically to `to` (`np.pad`); unchanged when already that large.
    pub fn padded(&self, to: usize) -> Self {
        if to <= self.size {
            return self.clone();
        }
        let p = (to - self.size) / 2;
        let mut data = vec![0.0; to * to];
        for i in 0..self.size {
            for j in 0..self.size {
                data[(i + p) * to + j + p] = self.at(i, j);
            }
        }
        Self { size: to, data }
    }

    /// Drop the all-zero border rings (keeps the centre, so filtering is unchanged).
    pub fn trimmed(&self) -> Self {
        let ring_zero = |t: usize| {
            let last = self.size - 1 - t;
            (t..=last).all(|k| {
                self.at(t, k) == 0.0
                    && self.at(last, k) == 0.0
                    && self.at(k, t) == 0.0
                    && self.at(k, last) == 0.0
            })
        };
        let mut t = 0;
        while t < self.size / 2 && ring_zero(t) {
            t += 1;
        }
        let size = self.size - 2 * t;
        let mut data = Vec::with_capacity(size * size);
        for i in t..t + size {
            data.extend_from_slice(&self.data[i * self.size + t..i * self.size + t + size]);
        }
        Self { size, data }
    }
}

/// `vᵀ Σ⁻¹ v` of `sigma_matrix2(σx, σy, θ)`: with `(a, b) = Uᵀ v`, `a²/σx² + b²/σy²`.
fn quad_form(x: f64, y: f64, sig_x: f64, sig_y: f64, theta: f64) -> f64 {
    let (s, c) = theta.sin_cos();
    let a = c * x + s * y;
    let b = -s * x + c * y;
    a * a / (sig_x * sig_x) + b * b / (sig_y * sig_y)
}

/// `bivariate_Gaussian`: `exp(-q/2)`, normalised.
pub fn bivariate_gaussian(size: usize, sig_x: f64, sig_y: f64, theta: f64) -> Kernel {
    Kernel::from_offsets(size, |x, y| {
        (-0.5 * quad_form(x, y, sig_x, sig_y, theta)).exp()
    })
    .normalized()
}

/// `bivariate_generalized_Gaussian`: `exp(-q^β / 2)`, normalised (β = 1 is the Gaussian).
pub fn bivariate_generalized_gaussian(
    size: usize,
    sig_x: f64,
    sig_y: f64,
    theta: f64,
    beta: f64,
) -> Kernel {
    Kernel::from_offsets(size, |x, y| {
        (-0.5 * quad_form(x, y, sig_x, sig_y, theta).powf(beta)).exp()
    })
    .normalized()
}

/// `bivariate_plateau`: `1 / (q^β + 1)`, normalised.
pub fn bivariate_plateau(size: usize, sig_x: f64, sig_y: f64, theta: f64, beta: f64) -> Kernel {
    Kernel::from_offsets(size, |x, y| {
        1.0 / (quad_form(x, y, sig_x, sig_y, theta).powf(beta) + 1.0)
    })
    .normalized()
}

/// `circular_lowpass_kernel`: the 2-D ideal low-pass (jinc) `ωc·J1(ωc·r) / (2π r)`, with its
/// limit `ωc² / (4π)` at `r = 0`, normalised.
pub fn circular_lowpass(cutoff: f64, size: usize) -> Kernel {
    Kernel::from_offsets(size, |x, y| {
        let r = (x * x + y * y).sqrt();
        if r == 0.0 {
            cutoff * cutoff / (4.0 * PI)
        } else {
            cutoff * libm::j1(cutoff * r) / (2.0 * PI * r)
        }
    })
    .normalized()
}

/// The six mixed blur kinds of `random_mixed_kernels` (`kernel_list` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelKind {
    Iso,
    Aniso,
    GeneralizedIso,
    GeneralizedAniso,
    PlateauIso,
    PlateauAniso,
}

/// A sampled kernel: its kind and parameters (what the JSON sidecar records). `size` is the
/// support before padding to `blur_kernel_size`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KernelSpec {
    Iso {
        size: usize,
        sigma: f64,
    },
    Aniso {
        size: usize,
        sigma_x: f64,
        sigma_y: f64,
        theta: f64,
    },
    GeneralizedIso {
        size: usize,
        sigma: f64,
        beta: f64,
    },
    GeneralizedAniso {
        size: usize,
        sigma_x: f64,
        sigma_y: f64,
        theta: f64,
        beta: f64,
    },
    PlateauIso {
        size: usize,
        sigma: f64,
        beta: f64,
    },
    PlateauAniso {
        size: usize,
        sigma_x: f64,
        sigma_y: f64,
        theta: f64,
        beta: f64,
    },
    /// Circular low-pass with cutoff `omega_c` (radians, π the Nyquist).
    Sinc {
        size: usize,
        omega_c: f64,
    },
    /// No blur (the identity), e.g. when the final sinc filter is not drawn.
    Pulse,
}

impl KernelSpec {
    /// The kernel these parameters describe, zero-padded to `pad_to`.
    pub fn kernel(&self, pad_to: usize) -> Kernel {
        use KernelSpec::*;
        let k = match *self {
            Iso { size, sigma } => bivariate_gaussian(size, sigma, sigma, 0.0),
            Aniso {
                size,
                sigma_x,
                sigma_y,
                theta,
            } => bivariate_gaussian(size, sigma_x, sigma_y, theta),
            GeneralizedIso { size, sigma, beta } => {
                bivariate_generalized_gaussian(size, sigma, sigma, 0.0, beta)
            }
            GeneralizedAniso {
                size,
                sigma_x,
                sigma_y,
                theta,
                beta,
            } => bivariate_generalized_gaussian(size, sigma_x, sigma_y, theta, beta),
            PlateauIso { size, sigma, beta } => bivariate_plateau(size, sigma, sigma, 0.0, beta),
            PlateauAniso {
                size,
                sigma_x,
                sigma_y,
                theta,
                beta,
            } => bivariate_plateau(size, sigma_x, sigma_y, theta, beta),
            Sinc { size, omega_c } => circular_lowpass(omega_c, size),
            Pulse => Kernel::pulse(pad_to.max(1) | 1),
        };
        k.padded(pad_to)
    }
}

/// Parameters of one stage's blur-kernel draw (`RealESRGANDataset` options).
#[derive(Clone, Copy, Debug)]
pub struct BlurDraw<'a> {
    pub kernel_range: &'a [usize],
    pub kernel_list: &'a [KernelKind],
    pub kernel_prob: &'a [f64],
    pub sinc_prob: f64,
    pub blur_sigma: [f64; 2],
    pub betag_range: [f64; 2],
    pub betap_range: [f64; 2],
}

/// β of the generalized / plateau kernels: with probability ½ from `[lo, 1)`, else `[1, hi)`.
/// As in BasicSR, with `betap_range = [1, 2]` half of the plateau draws have β = 1 exactly.
fn sample_beta(range: [f64; 2], rng: &mut impl Rng) -> f64 {
    if rng.random::<f64>() < 0.5 {
        uniform(rng, range[0], 1.0)
    } else {
        uniform(rng, 1.0, range[1])
    }
}

/// Draw a kernel as `RealESRGANDataset.__getitem__` does: a size from `kernel_range`; with
/// `sinc_prob` a sinc with `ωc ~ U(π/3, π)` (`U(π/5, π)` from size 13), else
/// `random_mixed_kernels` with `σ ~ U(blur_sigma)`, `θ ~ U(-π, π)`.
pub fn sample_blur(d: &BlurDraw, rng: &mut impl Rng) -> KernelSpec {
    let size = d.kernel_range[choose_uniform(rng, d.kernel_range.len())];
    if rng.random::<f64>() < d.sinc_prob {
        let lo = if size < 13 { PI / 3.0 } else { PI / 5.0 };
        return KernelSpec::Sinc {
            size,
            omega_c: uniform(rng, lo, PI),
        };
    }
    let kind = d.kernel_list[choose_weighted(rng, d.kernel_prob)];
    let [s0, s1] = d.blur_sigma;
    let sigma_x = uniform(rng, s0, s1);
    let aniso = matches!(
        kind,
        KernelKind::Aniso | KernelKind::GeneralizedAniso | KernelKind::PlateauAniso
    );
    let (sigma_y, theta) = if aniso {
        (uniform(rng, s0, s1), uniform(rng, -PI, PI))
    } else {
        (sigma_x, 0.0)
    };
    match kind {
        KernelKind::Iso => KernelSpec::Iso {
            size,
            sigma: sigma_x,
        },
        KernelKind::Aniso => KernelSpec::Aniso {
            size,
            sigma_x,
            sigma_y,
            theta,
        },
        KernelKind::GeneralizedIso => KernelSpec::GeneralizedIso {
            size,
            sigma: sigma_x,
            beta: sample_beta(d.betag_range, rng),
        },
        KernelKind::GeneralizedAniso => KernelSpec::GeneralizedAniso {
            size,
            sigma_x,
            sigma_y,
            theta,
            beta: sample_beta(d.betag_range, rng),
        },
        KernelKind::PlateauIso => KernelSpec::PlateauIso {
            size,
            sigma: sigma_x,
            beta: sample_beta(d.betap_range, rng),
        },
        KernelKind::PlateauAniso => KernelSpec::PlateauAniso {
            size,
            sigma_x,
            sigma_y,
            theta,
            beta: sample_beta(d.betap_range, rng),
        },
    }
}

/// The final sinc filter: with `final_sinc_prob` a sinc of a size from `kernel_range` and
/// `ωc ~ U(π/3, π)`, else the pulse.
pub fn sample_final_sinc(
    kernel_range: &[usize],
    final_sinc_prob: f64,
    rng: &mut impl Rng,
) -> KernelSpec {
    if rng.random::<f64>() < final_sinc_prob {
        let size = kernel_range[choose_uniform(rng, kernel_range.len())];
        KernelSpec::Sinc {
            size,
            omega_c: uniform(rng, PI / 3.0, PI),
        }
    } else {
        KernelSpec::Pulse
    }
}
