//! [`DegradeConfig`]: every knob of the Real-ESRGAN degradation, named as in BasicSR's options
//! (`train_realesrnet_x4plus.yml`), defaulting to the published values.
//!
//! A config file (YAML or JSON) may set any subset of the fields; the others keep their defaults.
//! A full Real-ESRGAN training options file (with `datasets: {train: ...}`) is also accepted:
//! the known keys are taken from its top level and from `datasets.train`, the rest ignored.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::kernels::{BlurDraw, KernelKind};
use crate::{Error, Result};

const ALL_KINDS: [KernelKind; 6] = [
    KernelKind::Iso,
    KernelKind::Aniso,
    KernelKind::GeneralizedIso,
    KernelKind::GeneralizedAniso,
    KernelKind::PlateauIso,
    KernelKind::PlateauAniso,
];
const KIND_PROB: [f64; 6] = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03];

/// The degradation options. Ranges are `[low, high]`; probabilities of the three resize
/// directions are `[up, down, keep]`; noise sigmas are on the 0..255 scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DegradeConfig {
    /// HQ-to-LQ size factor (`scale`).
    pub scale: u32,
    /// Kernel sizes drawn uniformly (Real-ESRGAN hard-codes 7, 9, ..., 21).
    pub kernel_range: Vec<usize>,
    /// Degrade the USM-sharpened HQ (`USMSharp`), as Real-ESRGAN training does with
    /// `gt_usm: True` (it also trains against that sharpened HQ). Off by default: the pair's HQ
    /// is then the input image as given.
    pub gt_usm: bool,

    // First stage.
    /// Size every stage-1 kernel is padded to.
    pub blur_kernel_size: usize,
    pub kernel_list: Vec<KernelKind>,
    pub kernel_prob: Vec<f64>,
    pub sinc_prob: f64,
    pub blur_sigma: [f64; 2],
    pub betag_range: [f64; 2],
    pub betap_range: [f64; 2],
    pub resize_prob: [f64; 3],
    pub resize_range: [f64; 2],
    pub gaussian_noise_prob: f64,
    pub noise_range: [f64; 2],
    pub poisson_scale_range: [f64; 2],
    pub gray_noise_prob: f64,
    pub jpeg_range: [f64; 2],

    // Second stage.
    pub second_blur_prob: f64,
    pub blur_kernel_size2: usize,
    pub kernel_list2: Vec<KernelKind>,
    pub kernel_prob2: Vec<f64>,
    pub sinc_prob2: f64,
    pub blur_sigma2: [f64; 2],
    pub betag_range2: [f64; 2],
    pub betap_range2: [f64; 2],
    pub resize_prob2: [f64; 3],
    pub resize_range2: [f64; 2],
    pub gaussian_noise_prob2: f64,
    pub noise_range2: [f64; 2],
    pub poisson_scale_range2: [f64; 2],
    pub gray_noise_prob2: f64,
    pub jpeg_range2: [f64; 2],

    // Final step.
    /// Probability of the final sinc filter (else the pulse, no filtering).
    pub final_sinc_prob: f64,
}

impl Default for DegradeConfig {
    /// The published Real-ESRNet / Real-ESRGAN x4plus values.
    fn default() -> Self {
        Self {
            scale: 4,
            kernel_range: (3..11).map(|v| 2 * v + 1).collect(),
            gt_usm: false,
            blur_kernel_size: 21,
            kernel_list: ALL_KINDS.to_vec(),
            kernel_prob: KIND_PROB.to_vec(),
            sinc_prob: 0.1,
            blur_sigma: [0.2, 3.0],
            betag_range: [0.5, 4.0],
            betap_range: [1.0, 2.0],
            resize_prob: [0.2, 0.7, 0.1],
            resize_range: [0.15, 1.5],
            gaussian_noise_prob: 0.5,
            noise_range: [1.0, 30.0],
            poisson_scale_range: [0.05, 3.0],
            gray_noise_prob: 0.4,
            jpeg_range: [30.0, 95.0],
            second_blur_prob: 0.8,
            blur_kernel_size2: 21,
            kernel_list2: ALL_KINDS.to_vec(),
            kernel_prob2: KIND_PROB.to_vec(),
            sinc_prob2: 0.1,
            blur_sigma2: [0.2, 1.5],
            betag_range2: [0.5, 4.0],
            betap_range2: [1.0, 2.0],
            resize_prob2: [0.3, 0.4, 0.3],
            resize_range2: [0.3, 1.2],
            gaussian_noise_prob2: 0.5,
            noise_range2: [1.0, 25.0],
            poisson_scale_range2: [0.05, 2.5],
            gray_noise_prob2: 0.4,
            jpeg_range2: [30.0, 95.0],
            final_sinc_prob: 0.8,
        }
    }
}

impl DegradeConfig {
    /// Read a YAML or JSON file (by extension; YAML otherwise), defaults for absent fields,
    /// then [`validate`](Self::validate).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        Self::from_str_at(&text, is_json, path)
    }

    /// Parse config text; `origin` names it in errors.
    pub fn from_str_at(text: &str, is_json: bool, origin: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config {
            path: origin.to_path_buf(),
            msg,
        };
        let value: serde_yaml::Value = if is_json {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
            serde_yaml::to_value(v).map_err(|e| bad(e.to_string()))?
        } else {
            serde_yaml::from_str(text).map_err(|e| bad(e.to_string()))?
        };
        // Typed from text (not from the `Value`) so that errors carry the field's path.
        let typed = match value {
            serde_yaml::Value::Null => String::new(),
            serde_yaml::Value::Mapping(m) if m.contains_key("datasets") => {
                serde_yaml::to_string(&Self::from_training_options(&m))
                    .map_err(|e| bad(e.to_string()))?
            }
            m @ serde_yaml::Value::Mapping(_) if is_json => {
                serde_yaml::to_string(&m).map_err(|e| bad(e.to_string()))?
            }
            serde_yaml::Value::Mapping(_) => text.to_string(),
            _ => return Err(bad("expected a mapping of option names to values".into())),
        };
        let cfg: Self = if typed.trim().is_empty() {
            Self::default()
        } else {
            serde_yaml::from_str(&typed).map_err(|e| {
                let msg = e.to_string();
                // Line numbers of re-serialised text would point nowhere in the user's file.
                match msg.rfind(" at line ") {
                    Some(i) if typed.as_str() != text => bad(msg[..i].to_string()),
                    _ => bad(msg),
                }
            })?
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// The known keys of a Real-ESRGAN training options file: top level, then `datasets.train`.
    fn from_training_options(m: &serde_yaml::Mapping) -> serde_yaml::Value {
        let known = serde_yaml::to_value(Self::default()).expect("config serialises");
        let known = known.as_mapping().expect("config is a mapping");
        let mut out = serde_yaml::Mapping::new();
        let train = m
            .get("datasets")
            .and_then(|d| d.get("train"))
            .and_then(|t| t.as_mapping());
        for source in [Some(m), train].into_iter().flatten() {
            for (k, v) in source {
                if known.contains_key(k) {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        serde_yaml::Value::Mapping(out)
    }

    /// Check every value; the error names the field. `origin` is the config's source.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let fail = |field: &str, msg: String| {
            Err(Error::DegradeConfig {
                path: origin.to_path_buf(),
                field: field.to_string(),
                msg,
            })
        };
        let prob = |field: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                fail(field, format!("{p} is not a probability in [0, 1]"))
            }
        };
        let dist = |field: &str, ps: &[f64]| {
            if ps.is_empty() {
                return fail(field, "is empty".into());
            }
            if let Some(p) = ps.iter().find(|p| !(p.is_finite() && **p >= 0.0)) {
                return fail(field, format!("{p} is not a non-negative probability"));
            }
            let s: f64 = ps.iter().sum();
            if (s - 1.0).abs() > 1e-6 {
                return fail(field, format!("{ps:?} sums to {s}, not 1"));
            }
            Ok(())
        };
        // `lo <= hi`, both finite, `lo >= min` (`min_open`: `lo > min`).
        let range = |field: &str, r: [f64; 2], min: f64, min_open: bool| {
            let [lo, hi] = r;
            if !(lo.is_finite() && hi.is_finite()) {
                return fail(field, format!("{r:?} is not finite"));
            }
            if lo > hi {
                return fail(field, format!("{r:?}: low {lo} is above high {hi}"));
            }
            if lo < min || (min_open && lo == min) {
                let op = if min_open { ">" } else { ">=" };
                return fail(field, format!("{r:?}: values must be {op} {min}"));
            }
            Ok(())
        };
        let around_one = |field: &str, r: [f64; 2]| {
            range(field, r, 0.0, true)?;
            if r[0] > 1.0 || r[1] < 1.0 {
                return fail(field, format!("{r:?} must contain 1 (low <= 1 <= high)"));
            }
            Ok(())
        };
        let jpeg = |field: &str, r: [f64; 2]| {
            range(field, r, 1.0, false)?;
            if r[1] > 100.0 {
                return fail(field, format!("{r:?}: JPEG quality must be <= 100"));
            }
            Ok(())
        };

        if self.scale == 0 {
            return fail("scale", "must be at least 1".into());
        }
        if self.kernel_range.is_empty() {
            return fail("kernel_range", "is empty".into());
        }
        for (field, pad) in [
            ("blur_kernel_size", self.blur_kernel_size),
            ("blur_kernel_size2", self.blur_kernel_size2),
        ] {
            if pad % 2 == 0 {
                return fail(field, format!("{pad} is not odd"));
            }
            if let Some(k) = self.kernel_range.iter().find(|&&k| k % 2 == 0 || k > pad) {
                return fail(
                    "kernel_range",
                    format!("size {k} must be odd and at most {field} = {pad}"),
                );
            }
        }
        for (suffix, d) in [("", self.blur_draw(1)), ("2", self.blur_draw(2))] {
            let f = |name: &str| format!("{name}{suffix}");
            if d.kernel_list.is_empty() {
                return fail(&f("kernel_list"), "is empty".into());
            }
            if d.kernel_prob.len() != d.kernel_list.len() {
                return fail(
                    &f("kernel_prob"),
                    format!(
                        "has {} entries but kernel_list{suffix} has {}",
                        d.kernel_prob.len(),
                        d.kernel_list.len()
                    ),
                );
            }
            dist(&f("kernel_prob"), d.kernel_prob)?;
            prob(&f("sinc_prob"), d.sinc_prob)?;
            range(&f("blur_sigma"), d.blur_sigma, 0.0, true)?;
            around_one(&f("betag_range"), d.betag_range)?;
            around_one(&f("betap_range"), d.betap_range)?;
        }
        dist("resize_prob", &self.resize_prob)?;
        dist("resize_prob2", &self.resize_prob2)?;
        around_one("resize_range", self.resize_range)?;
        around_one("resize_range2", self.resize_range2)?;
        for (field, p) in [
            ("gaussian_noise_prob", self.gaussian_noise_prob),
            ("gaussian_noise_prob2", self.gaussian_noise_prob2),
            ("gray_noise_prob", self.gray_noise_prob),
            ("gray_noise_prob2", self.gray_noise_prob2),
            ("second_blur_prob", self.second_blur_prob),
            ("final_sinc_prob", self.final_sinc_prob),
        ] {
            prob(field, p)?;
        }
        range("noise_range", self.noise_range, 0.0, false)?;
        range("noise_range2", self.noise_range2, 0.0, false)?;
        range("poisson_scale_range", self.poisson_scale_range, 0.0, false)?;
        range(
            "poisson_scale_range2",
            self.poisson_scale_range2,
            0.0,
            false,
        )?;
        jpeg("jpeg_range", self.jpeg_range)?;
        jpeg("jpeg_range2", self.jpeg_range2)?;
        Ok(())
    }

    /// The kernel-draw options of stage 1 or 2.
    pub fn blur_draw(&self, stage: u8) -> BlurDraw<'_> {
        if stage == 1 {
            BlurDraw {
                kernel_range: &self.kernel_range,
                kernel_list: &self.kernel_list,
                kernel_prob: &self.kernel_prob,
                sinc_prob: self.sinc_prob,
                blur_sigma: self.blur_sigma,
                betag_range: self.betag_range,
                betap_range: self.betap_range,
            }
        } else {
            BlurDraw {
                kernel_range: &self.kernel_range,
                kernel_list: &self.kernel_list2,
                kernel_prob: &self.kernel_prob2,
                sinc_prob: self.sinc_prob2,
                blur_sigma: self.blur_sigma2,
                betag_range: self.betag_range2,
                betap_range: self.betap_range2,
            }
        }
    }
}

/// The origin named in errors of a config that came from no file.
pub fn defaults_origin() -> PathBuf {
    PathBuf::from("<degrade config>")
}
