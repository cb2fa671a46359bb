//! The networks' building layers — `Linear`, `Conv2d`, `GroupNorm` (+ fused SiLU), `LayerNorm`
//! and multi-head attention — as `torch.nn` defines them, with weights by their official names.
//!
//! Each layer keeps its weights in the dtype they were loaded in (the storage dtype: f32, f16 or
//! bf16) and computes in the dtype of its input, casting the weight per call when they differ.
//! On the CPU the models run in f32 ([`compute_dtype`]), so f16/bf16 weights halve the memory
//! while every product accumulates in f32. CPU f32 calls go to [`crate::kernels`] (BLAS GEMMs,
//! Winograd convolutions, fused norms, blocked attention); every other device/dtype runs
//! candle's own ops, so a CUDA path needs nothing from here. `SUPIR_KERNELS=candle` forces
//! candle's ops on the CPU too (comparisons).

use std::cell::Cell;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Result, Storage, Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels::packed::{self, PackedWeight};
use crate::kernels::q4k::{self, Q4KWeight};
use crate::kernels::q8::{self, Q8Weight};
use crate::kernels::{attention as attn, conv, norm, winograd_nchw};

/// The activations' dtype for weights stored in `storage` on `dev`: f32 on the CPU (f16/bf16
/// weights are widened per layer), the storage dtype elsewhere.
pub fn compute_dtype(storage: DType, dev: &Device) -> DType {
    if dev.is_cpu() {
        DType::F32
    } else {
        storage
    }
}

/// Whether `x` takes the [`crate::kernels`] path.
fn fast(x: &Tensor) -> bool {
    kernels_enabled() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// Whether `x` can be read in place by the Winograd input transform: [`fast`], or a CPU map
/// held in bf16 / f16 (widened exactly as it is read).
fn fast_src(x: &Tensor) -> bool {
    kernels_enabled()
        && x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// Runs `f` on the elements of a contiguous CPU map in its own dtype (f32, bf16 or f16).
fn with_src<R>(x: &Tensor, f: impl FnOnce(winograd_nchw::Src) -> R) -> Result<R> {
    use winograd_nchw::Src;
    match x.dtype() {
        DType::BF16 => with_slice::<half::bf16, _>(x, |s| f(Src::Bf16(s))),
        DType::F16 => with_slice::<half::f16, _>(x, |s| f(Src::F16(s))),
        _ => with_f32(x, |s| f(Src::F32(s))),
    }
}

/// `SUPIR_KERNELS=candle` is not set.
fn kernels_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        !std::env::var("SUPIR_KERNELS").is_ok_and(|v| v.eq_ignore_ascii_case("candle"))
    })
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_slice(&t.to_dtype(DType::F32)?, f)
}

/// Runs `f` on the elements of a contiguous CPU tensor of element type `T` (its own dtype).
fn with_slice<T: candle_core::cpu::kernels::VecOps + candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (o0, o1) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("layers: tensor not contiguous".into()))?;
    match &*storage {
        Storage::Cpu(cs) => Ok(f(&cs.as_slice::<T>()?[o0..o1])),
        _ => candle_core::bail!("layers: CPU tensor expected"),
    }
}

/// [`with_f32`] on an optional tensor.
fn with_opt_f32<R>(t: Option<&Tensor>, f: impl FnOnce(Option<&[f32]>) -> R) -> Result<R> {
    match t {
        Some(t) => with_f32(t, |s| f(Some(s))),
        None => Ok(f(None)),
    }
}

/// A CPU map held in half precision, widened to f32 (the CPU's compute dtype,
/// [`compute_dtype`]) for the layers that cannot read it in place; anything else as it is.
fn widen_held(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() {
        x.to_dtype(DType::F32)
    } else {
        Ok(x.clone())
    }
}

fn cpu_tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

// ---------------------------------------------------------------------------- Linear

/// Block-quantised storage for linear weights, in GGUF's formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Blocks of 32 signed bytes and an f16 scale (8.5 bits per weight), multiplied on 8-bit
    /// integer dot products ([`crate::kernels::q8`]).
    Q8_0,
    /// Blocks of 256 4-bit weights with 6-bit sub-block scales and mins (4.5 bits per weight)
    /// on 8-bit activations ([`crate::kernels::q4k`]). Layers whose input width is a multiple
    /// of 32 but not of 256 fall back to Q8_0 (llama.cpp likewise falls back to a smaller
    /// block type); [`QuantStats::fallback`] counts them.
    Q4K,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        }
    }
}

/// What a [`with_linear_quant`] scope built: linear layers quantised, and those kept as loaded
/// because their input width is not a multiple of the block size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuantStats {
    pub quantised: usize,
    pub kept: usize,
    /// Of `quantised`, the layers stored in Q8_0 under [`Quant::Q4K`] (Q4_K's 256-value
    /// blocks do not fit, or a GGUF file holds them in Q8_0).
    pub fallback: usize,
}

thread_local! {
    static LINEAR_QUANT: Cell<(Option<Quant>, QuantStats)> =
        const { Cell::new((None, QuantStats { quantised: 0, kept: 0, fallback: 0 })) };
    /// GGUF blocks of weights just read from a file (by the loaded tensor's id), offered by the
    /// loader under a [`with_linear_quant`] scope so a [`Linear`] keeps the file's own bytes
    /// instead of quantising their dequantised values again.
    static GGUF_BLOCKS: std::cell::RefCell<Vec<(candle_core::TensorId, Quant, Vec<u8>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Offers the GGUF `quant` blocks `bytes` that `tensor` (a `[out, in]` weight) was decoded
/// from: kept (until the scope ends) only inside a [`with_linear_quant`] scope, so that the
/// [`Linear`] built from `tensor` holds these bytes. A few entries at most are pending (one
/// layer's weight between its read and its construction).
pub fn offer_gguf_blocks(tensor: &Tensor, quant: Quant, bytes: &[u8]) {
    if linear_quant().is_none() || tensor.rank() != 2 {
        return;
    }
    GGUF_BLOCKS.with(|b| {
        let mut b = b.borrow_mut();
        // A weight read but not turned into a Linear (a conv, say) is dropped after a while.
        if b.len() >= 4 {
            b.remove(0);
        }
        b.push((tensor.id(), quant, bytes.to_vec()));
    });
}

/// The blocks [`offer_gguf_blocks`] left for `tensor`, if any.
fn take_gguf_blocks(tensor: &Tensor) -> Option<(Quant, Vec<u8>)> {
    GGUF_BLOCKS.with(|b| {
        let mut b = b.borrow_mut();
        let i = b.iter().position(|(id, _, _)| *id == tensor.id())?;
        let (_, q, bytes) = b.remove(i);
        Some((q, bytes))
    })
}

/// Runs `build` with every [`Linear`] it constructs on this thread stored as `quant` (`None`:
/// as loaded), and counts them. The networks take their weights by name from a `VarBuilder`,
/// whose dtypes have no quantised kinds; this scope is how one part (GLVControl + UNet,
/// ControlNet + UNet) asks for quantised linear layers while its convolutions and norms keep
/// the builder's dtype.
pub fn with_linear_quant<R>(quant: Option<Quant>, build: impl FnOnce() -> R) -> (R, QuantStats) {
    struct Restore((Option<Quant>, QuantStats));
    impl Drop for Restore {
        fn drop(&mut self) {
            LINEAR_QUANT.with(|q| q.set(self.0));
        }
    }
    let restore = Restore(LINEAR_QUANT.with(|q| q.replace((quant, QuantStats::default()))));
    let out = build();
    let stats = LINEAR_QUANT.with(|q| q.get().1);
    GGUF_BLOCKS.with(|b| b.borrow_mut().clear());
    drop(restore);
    (out, stats)
}

fn linear_quant() -> Option<Quant> {
    LINEAR_QUANT.with(|q| q.get().0)
}

fn count_linear(quantised: bool, fallback: bool) {
    LINEAR_QUANT.with(|q| {
        let (quant, mut stats) = q.get();
        if quantised {
            stats.quantised += 1;
            stats.fallback += fallback as usize;
        } else {
            stats.kept += 1;
        }
        q.set((quant, stats));
    });
}

/// `torch.nn.Linear`: `y = x Wᵀ + b`, `weight [out, in]`, on the last dimension of `x`.
///
/// f32, bf16 and f16 weights on a CPU with AVX-512 are packed once at construction for
/// [`packed`](crate::kernels::packed) (the same values in the micro-kernel's order, half
/// precision kept at its size; the BLAS would re-pack them on every call); under [`with_linear_quant`] weights whose input width is
/// a multiple of 32 are quantised (Q4_K needs 256; CPU, f32 inputs: integer kernels; elsewhere
/// dequantised per call); other weights stay as loaded.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    Loaded {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Packed(Arc<PackedWeight>),
    Q8(Arc<Q8Weight>),
    Q4K(Arc<Q4KWeight>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        if let Some(quant) = linear_quant() {
            let q = Self::quantize(quant, &weight, bias.as_ref());
            let fallback = quant == Quant::Q4K && matches!(q, Some(LinearWeight::Q8(_)));
            count_linear(q.is_some(), fallback);
            if let Some(weight) = q {
                return Self { weight };
            }
        }
        let packable = |t: &Tensor| {
            t.device().is_cpu()
                && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
                && t.is_contiguous()
                && t.rank() <= 2
        };
        if kernels_enabled()
            && packed::available()
            && weight.rank() == 2
            && packable(&weight)
            && bias.as_ref().is_none_or(|b| b.rank() == 1 && packable(b))
        {
            let (n, k) = weight.dims2().expect("rank 2");
            let pack = with_opt_f32(bias.as_ref(), |b| match weight.dtype() {
                DType::BF16 => {
                    with_slice::<half::bf16, _>(&weight, |w| PackedWeight::new(w, n, k, b))
                }
                DType::F16 => {
                    with_slice::<half::f16, _>(&weight, |w| PackedWeight::new(w, n, k, b))
                }
                _ => with_f32(&weight, |w| PackedWeight::new(w, n, k, b)),
            });
            if let Ok(Ok(p)) = pack {
                return Self {
                    weight: LinearWeight::Packed(Arc::new(p)),
                };
            }
        }
        Self {
            weight: LinearWeight::Loaded { weight, bias },
        }
    }

    /// `quant` of a `[out, in]` weight: Q4_K when `in` is a multiple of 256, Q8_0 when it is a
    /// multiple of 32 (read as f32 one layer at a time); or the GGUF blocks the weight was read
    /// from, in their own type, when the loader offered them ([`offer_gguf_blocks`]).
    fn quantize(quant: Quant, weight: &Tensor, bias: Option<&Tensor>) -> Option<LinearWeight> {
        let (n, k) = weight.dims2().ok()?;
        let from_file = take_gguf_blocks(weight);
        if !k.is_multiple_of(q8::QK) || bias.is_some_and(|b| b.dims1().ok() != Some(n)) {
            return None;
        }
        // A file's own Q8_0 / Q4_K blocks are used as stored, whichever of the two was asked
        // for (quantising them again would only add rounding).
        let ty = match &from_file {
            Some((file_quant, _)) => *file_quant,
            None if quant == Quant::Q4K && k.is_multiple_of(q4k::QK_K) => Quant::Q4K,
            None => Quant::Q8_0,
        };
        let b = bias.map(|b| b.to_device(&Device::Cpu)).transpose().ok()?;
        let made = with_opt_f32(b.as_ref(), |b| match (ty, from_file) {
            (Quant::Q4K, Some((Quant::Q4K, bytes))) => {
                Q4KWeight::from_gguf(&bytes, n, k, b).map(|q| LinearWeight::Q4K(Arc::new(q)))
            }
            (Quant::Q8_0, Some((Quant::Q8_0, bytes))) => {
                Q8Weight::from_gguf(&bytes, n, k, b).map(|q| LinearWeight::Q8(Arc::new(q)))
            }
            _ => {
                let w = weight.to_device(&Device::Cpu)?;
                with_f32(&w, |w| match ty {
                    Quant::Q4K => {
                        Q4KWeight::quantize(w, n, k, b).map(|q| LinearWeight::Q4K(Arc::new(q)))
                    }
                    Quant::Q8_0 => {
                        Q8Weight::quantize(w, n, k, b).map(|q| LinearWeight::Q8(Arc::new(q)))
                    }
                })?
            }
        });
        made.ok()?.ok()
    }

    /// A `[n, k]` weight from GGUF `quant` blocks as a file stores them (`n` rows of
    /// `k / block` blocks), held once in the kernels' order (no quantisation again).
    pub fn from_gguf_blocks(
        quant: Quant,
        blocks: &[u8],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let weight = match quant {
            Quant::Q8_0 => LinearWeight::Q8(Arc::new(Q8Weight::from_gguf(blocks, n, k, bias)?)),
            Quant::Q4K => LinearWeight::Q4K(Arc::new(Q4KWeight::from_gguf(blocks, n, k, bias)?)),
        };
        Ok(Self { weight })
    }

    /// `w [n, k]` (row-major f32) quantised to `quant` (`k` a multiple of its block size).
    pub fn quantized(
        quant: Quant,
        w: &[f32],
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Result<Self> {
        let weight = match quant {
            Quant::Q8_0 => LinearWeight::Q8(Arc::new(Q8Weight::quantize(w, n, k, bias)?)),
            Quant::Q4K => LinearWeight::Q4K(Arc::new(Q4KWeight::quantize(w, n, k, bias)?)),
        };
        Ok(Self { weight })
    }

    /// Bytes the weight holds (quantised or packed kernels' buffers; a loaded tensor's size).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Loaded { weight, bias } => {
                let b = bias
                    .as_ref()
                    .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
                weight.elem_count() * weight.dtype().size_in_bytes() + b
            }
            LinearWeight::Packed(p) => p.bytes(),
            LinearWeight::Q8(q) => q.bytes(),
            LinearWeight::Q4K(q) => q.bytes(),
        }
    }

    /// How the weight is held: `"packed"`, `"q8_0"` or the loaded dtype.
    pub fn storage(&self) -> String {
        match &self.weight {
            LinearWeight::Loaded { weight, .. } => format!("{:?}", weight.dtype()).to_lowercase(),
            LinearWeight::Packed(_) => "packed".into(),
            LinearWeight::Q8(_) => Quant::Q8_0.name().into(),
            LinearWeight::Q4K(_) => Quant::Q4K.name().into(),
        }
    }

    /// `weight` (and `bias` when `with_bias`) under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, with_bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(weight, bias))
    }

    /// `(out, in)`.
    fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            LinearWeight::Loaded { weight, .. } => weight.dims2(),
            LinearWeight::Packed(p) => Ok((p.n(), p.k())),
            LinearWeight::Q8(q) => Ok((q.n(), q.k())),
            LinearWeight::Q4K(q) => Ok((q.n(), q.k())),
        }
    }

    /// The weight and bias as tensors (for a packed weight, unpacked anew).
    fn tensors(&self) -> Result<(Tensor, Option<Tensor>)> {
        match &self.weight {
            LinearWeight::Loaded { weight, bias } => Ok((weight.clone(), bias.clone())),
            LinearWeight::Packed(p) => Ok((
                cpu_tensor(p.unpack_weight(), &[p.n(), p.k()])?,
                p.bias()
                    .map(|b| cpu_tensor(b.to_vec(), &[p.n()]))
                    .transpose()?,
            )),
            LinearWeight::Q8(q) => Ok((
                cpu_tensor(q.dequantize(), &[q.n(), q.k()])?,
                q.bias()
                    .map(|b| cpu_tensor(b.to_vec(), &[q.n()]))
                    .transpose()?,
            )),
            LinearWeight::Q4K(q) => Ok((
                cpu_tensor(q.dequantize(), &[q.n(), q.k()])?,
                q.bias()
                    .map(|b| cpu_tensor(b.to_vec(), &[q.n()]))
                    .transpose()?,
            )),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.dims()?;
        if x.dim(D::Minus1)? != in_dim {
            candle_core::bail!(
                "linear: input {:?} has last dimension != {in_dim}",
                x.shape()
            );
        }
        let mut shape = x.dims().to_vec();
        *shape.last_mut().expect("rank >= 1") = out_dim;
        let m = x.elem_count() / in_dim.max(1);
        match &self.weight {
            LinearWeight::Packed(p) if fast(x) => {
                let out = with_f32(x, |xs| p.matmul(xs, m))?;
                cpu_tensor(out, &shape)
            }
            LinearWeight::Q8(q) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let out = with_f32(x, |xs| q.matmul(xs, m))?;
                cpu_tensor(out, &shape)
            }
            LinearWeight::Q4K(q) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let out = with_f32(x, |xs| q.matmul(xs, m))?;
                cpu_tensor(out, &shape)
            }
            LinearWeight::Loaded { weight, bias } if fast(x) => {
                let out = with_f32(x, |xs| {
                    with_f32(weight, |w| {
                        with_opt_f32(bias.as_ref(), |b| gemm_rows(xs, w, b, m, in_dim, out_dim))
                    })
                })???;
                cpu_tensor(out, &shape)
            }
            _ => {
                let (weight, bias) = self.tensors()?;
                let w = weight.to_dtype(x.dtype())?;
                let y = x.broadcast_matmul(&w.t()?)?;
                match &bias {
                    Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?),
                    None => Ok(y),
                }
            }
        }
    }
}

/// `x [m, k] · wᵀ [k, n] (+ bias)` as a new `[m, n]` buffer, without zeroing it first: with a
/// bias the rows start as copies of it (`beta = 1`); without one sgemm writes every element
/// (`beta = 0`, `k > 0`) into the reserved buffer before its length is set.
fn gemm_rows(x: &[f32], w: &[f32], bias: Option<&[f32]>, m: usize, k: usize, n: usize) -> Vec<f32> {
    use crate::kernels::blas;
    assert!(
        x.len() == m * k && w.len() == n * k,
        "linear: operand sizes"
    );
    if let Some(b) = bias {
        let mut out = Vec::with_capacity(m * n);
        for _ in 0..m {
            out.extend_from_slice(b);
        }
        blas::sgemm_slices(false, true, m, n, k, 1.0, x, k, w, k, 1.0, &mut out, n);
        return out;
    }
    if k == 0 || m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let mut out = Vec::<f32>::with_capacity(m * n);
    // SAFETY: the operands cover their shapes (checked above); with beta = 0 sgemm writes all
    // m·n elements of C (row stride n) and reads none before writing, so after the call the
    // first m·n elements are initialised.
    unsafe {
        blas::sgemm(
            false,
            true,
            m,
            n,
            k,
            1.0,
            x.as_ptr(),
            k,
            w.as_ptr(),
            k,
            0.0,
            out.as_mut_ptr(),
            n,
        );
        out.set_len(m * n);
    }
    out
}

// ---------------------------------------------------------------------------- Conv2d

/// `torch.nn.Conv2d` (groups 1, zero padding): `weight [out, in, k, k]`, NCHW.
///
/// With f32 weights, a layer that runs as Winograd keeps its filter transforms after the first
/// call (36/9 of the weight's size) up to [`conv::KEPT_FILTER_MAX_BYTES`]: the speed setting.
/// Bigger layers and half-precision weights are transformed per call, keeping the memory at the
/// weights' own size.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    winograd_u: Arc<OnceLock<Vec<f32>>>,
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
            winograd_u: Arc::default(),
        }
    }

    /// `k x k` convolution with bias under `vb`.
    pub fn load(
        vb: VarBuilder,
        in_ch: usize,
        out_ch: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self::new(
            vb.get((out_ch, in_ch, k, k), "weight")?,
            Some(vb.get(out_ch, "bias")?),
            stride,
            padding,
        ))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `[B, in, H, W]` -> `[B, out, H', W']`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (cout, cin, kh, kw) = self.weight.dims4()?;
        let (n, c, h, w) = x.dims4()?;
        if c != cin {
            candle_core::bail!("conv2d: input has {c} channels, the weight {cin}");
        }
        if !fast(x) {
            let wt = self.weight.to_dtype(x.dtype())?;
            let cfg = candle_nn::Conv2dConfig {
                padding: self.padding,
                stride: self.stride,
                ..Default::default()
            };
            let y = candle_nn::Conv2d::new(wt, None, cfg);
            let y = candle_core::Module::forward(&y, x)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?.reshape((1, cout, 1, 1))?),
                None => Ok(y),
            };
        }
        let s = conv::ConvShape {
            n,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            stride: self.stride,
            pad: self.padding,
        };
        if h + 2 * self.padding < kh || w + 2 * self.padding < kw {
            candle_core::bail!("conv2d: {h}x{w} map smaller than the {kh}x{kw} kernel");
        }
        let (oh, ow) = s.out_hw();
        let mut out = vec![0.0f32; n * cout * oh * ow];
        let keep = self.weight.dtype() == DType::F32 && conv::keeps_filter(&s);
        if keep && conv::choose(&s, true) == conv::ConvAlgo::Winograd {
            if self.winograd_u.get().is_none() {
                let u = with_f32(&self.weight, |w| {
                    crate::kernels::winograd_nchw::filter_transform(w, cout, cin)
                })?;
                let _ = self.winograd_u.set(u);
            }
            let u = self.winograd_u.get().expect("set above");
            with_f32(x, |xs| {
                with_opt_f32(self.bias.as_ref(), |b| {
                    crate::kernels::winograd_nchw::conv3x3_transformed(&s, xs, u, b, &mut out)
                })
            })??;
            return cpu_tensor(out, &[n, cout, oh, ow]);
        }
        with_f32(x, |xs| {
            with_f32(&self.weight, |wt| {
                with_opt_f32(self.bias.as_ref(), |b| {
                    conv::conv2d(&s, xs, wt, b, &mut out)
                })
            })
        })???;
        cpu_tensor(out, &[n, cout, oh, ow])
    }

    /// `forward(upsample_nearest2d(x, 2h, 2w))` (the `Upsample` layers): `[B, in, H, W]` ->
    /// `[B, out, 2H, 2W]`. Where the upsampled map goes through Winograd its pixels are read
    /// from `x` in place (the same values, bit for bit, without the map, 4x the input, in
    /// memory); otherwise the map is made.
    pub fn forward_upsampled2x(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        match self.forward_read(x, true, None)? {
            Some(y) => Ok(y),
            None => self.forward(&widen_held(x)?.upsample_nearest2d(2 * h, 2 * w)?),
        }
    }

    /// `forward(norm.forward_with_stats(x, mean, inv_std, silu))` (a resnet's norm + SiLU +
    /// conv in the tiled VAE): where the conv goes through Winograd the norm is applied to
    /// each pixel as it is read (the same operations, so the same bits, without the normalised
    /// copy of `x` in memory); otherwise the normalised map is made. On the CPU `x` may be held
    /// in bf16 / f16 (the tiled VAE's held tiles): read in place too, else widened first.
    pub fn forward_normed(
        &self,
        x: &Tensor,
        norm: &GroupNorm,
        mean: &Tensor,
        inv_std: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        if fast_src(x) && x.rank() == 4 {
            let (_, c, _, _) = x.dims4()?;
            let n = x.dim(0)?;
            if c == norm.gamma.dim(0)? && c.is_multiple_of(norm.groups) {
                let (a, b) = norm.folded_affine(n, mean, inv_std)?;
                let affine = winograd_nchw::Affine { a: &a, b: &b, silu };
                if let Some(y) = self.forward_read(x, false, Some(affine))? {
                    return Ok(y);
                }
            }
        }
        self.forward(&norm.forward_with_stats(&widen_held(x)?, mean, inv_std, silu)?)
    }

    /// The conv of the map `x` stands for (upsampled x2 by nearest neighbour, and/or mapped by
    /// `affine`), read in place by Winograd; `None` where this layer and shape do not take
    /// Winograd (the caller makes the map and calls [`Self::forward`]).
    fn forward_read(
        &self,
        x: &Tensor,
        up2: bool,
        affine: Option<winograd_nchw::Affine>,
    ) -> Result<Option<Tensor>> {
        let (cout, cin, kh, kw) = self.weight.dims4()?;
        let (n, c, h, w) = x.dims4()?;
        let f = if up2 { 2 } else { 1 };
        let s = conv::ConvShape {
            n,
            cin,
            h: f * h,
            w: f * w,
            cout,
            kh,
            kw,
            stride: self.stride,
            pad: self.padding,
        };
        let keep = self.weight.dtype() == DType::F32 && conv::keeps_filter(&s);
        if !fast_src(x) || c != cin || conv::choose(&s, keep) != conv::ConvAlgo::Winograd {
            return Ok(None);
        }
        let mut out = vec![0.0f32; n * cout * s.h * s.w];
        if keep && self.winograd_u.get().is_none() {
            let u = with_f32(&self.weight, |w| {
                winograd_nchw::filter_transform(w, cout, cin)
            })?;
            let _ = self.winograd_u.set(u);
        }
        with_src(x, |xs| {
            let input = winograd_nchw::Input { x: xs, up2, affine };
            with_opt_f32(self.bias.as_ref(), |b| match self.winograd_u.get() {
                Some(u) if keep => {
                    winograd_nchw::conv3x3_transformed_input(&s, input, u, b, &mut out);
                    Ok(())
                }
                _ => with_f32(&self.weight, |wt| {
                    winograd_nchw::conv3x3_input(&s, input, wt, b, &mut out)
                }),
            })
        })???;
        Ok(Some(cpu_tensor(out, &[n, cout, s.h, s.w])?))
    }
}

// ---------------------------------------------------------------------------- norms

/// `torch.nn.GroupNorm(groups, channels, eps, affine=True)` on `[B, C, ...]`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(gamma: Tensor, beta: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = gamma.dim(0)?;
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "group norm: {channels} channels not divisible into {groups} groups"
            );
        }
        Ok(Self {
            gamma,
            beta,
            groups,
            eps,
        })
    }

    pub fn load(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Self::new(
            vb.get(channels, "weight")?,
            vb.get(channels, "bias")?,
            groups,
            eps,
        )
    }

    /// `[n, c, h·w...]` of an input with this norm's channel count.
    fn dims(&self, x: &Tensor) -> Result<(Vec<usize>, usize, usize, usize)> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 || dims[1] != self.gamma.dim(0)? {
            candle_core::bail!(
                "group norm: input {dims:?}, {} channels",
                self.gamma.dim(0)?
            );
        }
        let (n, c) = (dims[0], dims[1]);
        let hw = dims[2..].iter().product();
        Ok((dims, n, c, hw))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }

    /// `silu(group_norm(x))` in one pass (the `in_layers` / `out_layers` of every ResBlock).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    /// The statistics and affine weights folded per (item, channel) into `y = x·a + b`,
    /// `a = gamma·inv_std`, `b = beta - mean·a`, `[n][c]` each: the operations of
    /// `kernels::norm::group_norm_with_stats`, so the same bits.
    fn folded_affine(
        &self,
        n: usize,
        mean: &Tensor,
        inv_std: &Tensor,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.gamma.dim(0)?;
        let cg = c / self.groups;
        let (m, r) = (
            mean.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            inv_std
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
        let (g, bt) = (
            self.gamma.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            self.beta.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        );
        if m.len() != n * self.groups || r.len() != n * self.groups {
            candle_core::bail!("group norm: statistics for {} items expected", n);
        }
        let (mut a, mut b) = (Vec::with_capacity(n * c), Vec::with_capacity(n * c));
        for item in 0..n {
            for ch in 0..c {
                let i = item * self.groups + ch / cg;
                let ai = g[ch] * r[i];
                a.push(ai);
                b.push(bt[ch] - m[i] * ai);
            }
        }
        Ok((a, b))
    }

    /// The affine map (+ SiLU) with given statistics `mean`, `inv_std` `[B, groups, 1]` (F32),
    /// e.g. gathered over the tiles of an image.
    pub fn forward_with_stats(
        &self,
        x: &Tensor,
        mean: &Tensor,
        inv_std: &Tensor,
        silu: bool,
    ) -> Result<Tensor> {
        let (dims, n, c, hw) = self.dims(x)?;
        if !fast(x) {
            let dt = x.dtype();
            let v = x.to_dtype(DType::F32)?.reshape((n, self.groups, ()))?;
            let y = v
                .broadcast_sub(mean)?
                .broadcast_mul(inv_std)?
                .reshape((n, c, hw))?
                .broadcast_mul(&self.gamma.to_dtype(DType::F32)?.reshape((1, c, 1))?)?
                .broadcast_add(&self.beta.to_dtype(DType::F32)?.reshape((1, c, 1))?)?;
            let y = if silu { y.silu()? } else { y };
            return y.reshape(dims)?.to_dtype(dt);
        }
        let mut out = vec![0.0f32; x.elem_count()];
        let groups = self.groups;
        with_f32(x, |xs| {
            with_f32(mean, |m| {
                with_f32(inv_std, |r| {
                    with_f32(&self.gamma, |g| {
                        with_f32(&self.beta, |b| {
                            norm::group_norm_with_stats(
                                xs, n, c, hw, groups, m, r, g, b, silu, &mut out,
                            )
                        })
                    })
                })
            })
        })?????;
        cpu_tensor(out, &dims)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (dims, n, c, hw) = self.dims(x)?;
        if !fast(x) {
            // Candle ops: the statistics here, the affine map in `forward_with_stats`.
            let xf = x.to_dtype(DType::F32)?.reshape((n, self.groups, ()))?;
            let mean = xf.mean_keepdim(2)?;
            let var = xf.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
            let inv_std = (var + self.eps)?.sqrt()?.recip()?;
            return self.forward_with_stats(x, &mean, &inv_std, silu);
        }
        let mut out = vec![0.0f32; x.elem_count()];
        with_f32(x, |xs| {
            with_f32(&self.gamma, |g| {
                with_f32(&self.beta, |b| {
                    norm::group_norm(
                        xs,
                        n,
                        c,
                        hw,
                        self.groups,
                        self.eps,
                        Some(g),
                        Some(b),
                        silu,
                        &mut out,
                    )
                })
            })
        })???;
        cpu_tensor(out, &dims)
    }
}

/// `torch.nn.LayerNorm(dim, eps)` on the last dimension (candle's fused op, weights cast to the
/// input's dtype).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight.to_dtype(dt)?,
            &self.bias.to_dtype(dt)?,
            self.eps as f32,
        )
    }
}

// ---------------------------------------------------------------------------- attention

/// `softmax(scale · q kᵀ) v` per head on token-major `q [B, N, h·d]`, `k`/`v` `[B, M, h·d]` ->
/// `[B, N, h·d]` (the UNet's `CrossAttention` between its projections).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let (b, n, hd) = q.dims3()?;
    let (_, m, _) = k.dims3()?;
    if hd % heads != 0 {
        candle_core::bail!("attention: width {hd} not divisible by {heads} heads");
    }
    let d = hd / heads;
    if !fast(q) {
        let split =
            |t: &Tensor, len: usize| t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous();
        let (qh, kh, vh) = (split(&(q * scale)?, n)?, split(k, m)?, split(v, m)?);
        let a = candle_nn::ops::softmax_last_dim(&qh.matmul(&kh.t()?)?)?;
        return a.matmul(&vh)?.transpose(1, 2)?.reshape((b, n, hd));
    }
    let s = attn::AttnShape { b, n, m, heads, d };
    let mut out = vec![0.0f32; b * n * hd];
    with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                attn::attention(&s, attn::Layout::Tokens, scale as f32, qs, ks, vs, &mut out)
            })
        })
    })???;
    cpu_tensor(out, &[b, n, hd])
}

/// Single-head attention on channel-major maps `q`, `k`, `v` `[B, C, N]` -> `[B, C, N]`:
/// `out[:, :, i] = Σ_j softmax_j(scale · q_i · k_j) v_j` (the VAE's `AttnBlock`).
pub fn attention_channels(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, c, n) = q.dims3()?;
    if !fast(q) {
        let a = candle_nn::ops::softmax_last_dim(&(q.t()?.matmul(k)? * scale)?)?;
        return v.matmul(&a.t()?);
    }
    let s = attn::AttnShape {
        b,
        n,
        m: n,
        heads: 1,
        d: c,
    };
    let mut out = vec![0.0f32; b * c * n];
    with_f32(q, |qs| {
        with_f32(k, |ks| {
            with_f32(v, |vs| {
                attn::attention(
                    &s,
                    attn::Layout::Channels,
                    scale as f32,
                    qs,
                    ks,
                    vs,
                    &mut out,
                )
            })
        })
    })???;
    cpu_tensor(out, &[b, c, n])
}

// ---------------------------------------------------------------------------- activations

/// GEGLU on the last dimension: `p [..., 2·inner]` = `[a, gate]` -> `a · gelu(gate)` (exact erf
/// GELU) `[..., inner]`.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let two = p.dim(D::Minus1)?;
    if !two.is_multiple_of(2) {
        candle_core::bail!("geglu: odd last dimension {two}");
    }
    let inner = two / 2;
    if !fast(p) {
        let a = p.narrow(D::Minus1, 0, inner)?;
        let gate = p.narrow(D::Minus1, inner, inner)?;
        return a * gate.gelu_erf()?;
    }
    let mut shape = p.dims().to_vec();
    *shape.last_mut().expect("rank >= 1") = inner;
    let mut out = vec![0.0f32; p.elem_count() / 2];
    with_f32(p, |ps| {
        crate::kernels::elementwise::geglu(ps, inner, &mut out)
    })?;
    cpu_tensor(out, &shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{conv, test_noise};

    fn tensor(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(test_noise(n, seed), shape, &Device::Cpu).unwrap()
    }

    /// The fused x2 upsample-conv equals the conv of the stored upsampled map bit for bit:
    /// f32 weights (filter transforms kept), bf16 weights (transformed per call), a map whose
    /// upsampled size is not a multiple of the 4x4 tiles, and a map too small for Winograd
    /// (the fallback).
    #[test]
    fn upsampled_conv_equals_the_conv_of_the_upsampled_map() {
        let cases: [(usize, usize, usize, usize, usize, DType); 4] = [
            (2, 24, 16, 9, 13, DType::F32),
            (1, 32, 8, 17, 15, DType::BF16),
            (1, 20, 20, 33, 32, DType::F32),
            (1, 16, 8, 2, 3, DType::F32),
        ];
        for (i, &(n, cin, cout, h, w, dt)) in cases.iter().enumerate() {
            let x = tensor(&[n, cin, h, w], 11 + i as u64);
            let weight = tensor(&[cout, cin, 3, 3], 23 + i as u64)
                .to_dtype(dt)
                .unwrap();
            let bias = tensor(&[cout], 37 + i as u64).to_dtype(dt).unwrap();
            let c = Conv2d::new(weight, Some(bias), 1, 1);
            let s = conv::ConvShape::same3x3(n, cin, 2 * h, 2 * w, cout);
            let winograd = conv::choose(&s, dt == DType::F32) == conv::ConvAlgo::Winograd;
            assert_eq!(winograd, i < 3, "case {i}: algorithm");
            let want = c
                .forward(&x.upsample_nearest2d(2 * h, 2 * w).unwrap())
                .unwrap();
            let got = c.forward_upsampled2x(&x).unwrap();
            assert_eq!(got.dims(), want.dims(), "case {i}");
            // A map held in bf16 / f16 reads as its f32 widening, in place or not.
            for held in [DType::BF16, DType::F16] {
                let xh = x.to_dtype(held).unwrap();
                let wide = xh.to_dtype(DType::F32).unwrap();
                assert_eq!(
                    bits(&c.forward_upsampled2x(&xh).unwrap()),
                    bits(&c.forward_upsampled2x(&wide).unwrap()),
                    "case {i}: map held in {held:?}"
                );
            }
            let (g, wv) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let differing = g
                .iter()
                .zip(&wv)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differing, 0, "case {i}: {differing} of {} differ", g.len());
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    /// The norm applied as Winograd reads the map equals the normalised map convolved, bit for
    /// bit: with and without SiLU, f32 and bf16 weights and norm parameters, a batch of two
    /// (statistics per item), and a map too small for Winograd (the fallback).
    #[test]
    fn normed_conv_equals_the_conv_of_the_normalised_map() {
        // (batch, in, out, height, width, groups, silu, weights' dtype)
        type Case = (usize, usize, usize, usize, usize, usize, bool, DType);
        let cases: [Case; 4] = [
            (2, 32, 16, 18, 27, 8, true, DType::F32),
            (1, 48, 24, 35, 33, 16, true, DType::BF16),
            (1, 32, 8, 33, 30, 4, false, DType::F32),
            (1, 16, 8, 5, 6, 4, true, DType::F32),
        ];
        for (i, &(n, cin, cout, h, w, groups, silu, dt)) in cases.iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let x = (tensor(&[n, cin, h, w], seed) * 3.0).unwrap();
            let gamma = tensor(&[cin], seed + 1).to_dtype(dt).unwrap();
            let beta = tensor(&[cin], seed + 2).to_dtype(dt).unwrap();
            let norm = GroupNorm::new(gamma, beta, groups, 1e-6).unwrap();
            let mean = (tensor(&[n, groups, 1], seed + 3) * 0.1).unwrap();
            let inv_std = (tensor(&[n, groups, 1], seed + 4).abs().unwrap() + 0.5).unwrap();
            let weight = tensor(&[cout, cin, 3, 3], seed + 5).to_dtype(dt).unwrap();
            let bias = tensor(&[cout], seed + 6).to_dtype(dt).unwrap();
            let c = Conv2d::new(weight, Some(bias), 1, 1);
            let s = conv::ConvShape::same3x3(n, cin, h, w, cout);
            let winograd = conv::choose(&s, dt == DType::F32) == conv::ConvAlgo::Winograd;
            assert_eq!(winograd, i < 3, "case {i}: algorithm");
            let normalised = norm.forward_with_stats(&x, &mean, &inv_std, silu).unwrap();
            let want = bits(&c.forward(&normalised).unwrap());
            let got = bits(&c.forward_normed(&x, &norm, &mean, &inv_std, silu).unwrap());
            assert_eq!(got.len(), want.len(), "case {i}");
            for held in [DType::BF16, DType::F16] {
                let xh = x.to_dtype(held).unwrap();
                let wide = xh.to_dtype(DType::F32).unwrap();
                assert_eq!(
                    bits(&c.forward_normed(&xh, &norm, &mean, &inv_std, silu).unwrap()),
                    bits(
                        &c.forward_normed(&wide, &norm, &mean, &inv_std, silu)
                            .unwrap()
                    ),
                    "case {i}: map held in {held:?}"
                );
            }
            let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing,
                0,
                "case {i}: {differing} of {} differ",
                got.len()
            );
        }
    }
}
