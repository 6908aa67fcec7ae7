//! The x₀ post-processing of `p_mean_variance` (`process_xstart`) and of the pipeline's
//! `denoised_fn`: NumPy's linear percentile, the dynamic threshold taken from **batch element 0
//! only** and applied to the whole batch, clamping, and the inpainting mask blend.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor};

/// `np.percentile(a, p)` (method "linear") of a 1-D f32 sample, as NumPy 2 computes it for a
/// Python-float `p`: the virtual index `(n − 1)·p/100` in f64, then NumPy's `_lerp` in f32
/// (`a + (b − a)·γ`, or `b − (b − a)·(1 − γ)` when γ ≥ 0.5). `values` is sorted in place.
pub fn np_percentile(values: &mut [f32], p: f64) -> Result<f32> {
    check_percentile(p)?;
    if values.is_empty() {
        return Err(ModelError::invalid(
            "x",
            "an empty tensor has no percentile",
        ));
    }
    values.sort_by(f32::total_cmp);
    let n = values.len();
    let vi = (n - 1) as f64 * (p / 100.0);
    if vi >= (n - 1) as f64 {
        return Ok(values[n - 1]);
    }
    let prev = vi.floor();
    let gamma = vi - prev;
    let (a, b) = (values[prev as usize], values[prev as usize + 1]);
    let d = b - a;
    Ok(if gamma >= 0.5 {
        b - d * ((1.0 - gamma) as f32)
    } else {
        a + d * (gamma as f32)
    })
}

fn check_percentile(p: f64) -> Result<()> {
    if !(0.0..=100.0).contains(&p) {
        return Err(ModelError::invalid(
            "dynamic_threshold_v",
            format!("{p}; allowed 0 ..= 100 (a percentile)"),
        ));
    }
    Ok(())
}

/// The threshold `s = max(percentile(|x[0]|, p), 1)`: the percentile of batch element 0's
/// absolute values only (the official `np.percentile(..., axis=(1, ...))[0]`).
pub fn dynamic_threshold_scale(x: &Tensor, p: f64) -> Result<f32> {
    check_percentile(p)?;
    let mut row: Vec<f32> = x
        .get(0)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .abs()?
        .to_vec1()?;
    let s = np_percentile(&mut row, p)?;
    // Python `max(s, 1.0)`: s unless 1.0 is larger
    Ok(if 1.0 > s { 1.0 } else { s })
}

/// `th.clip(x, -s, s) / s` with `s` from [`dynamic_threshold_scale`], over the whole batch.
pub fn dynamic_threshold(x: &Tensor, p: f64) -> Result<Tensor> {
    let s = dynamic_threshold_scale(x, p)?;
    let s_t = Tensor::new(s, x.device())?.to_dtype(x.dtype())?;
    Ok(x.clamp(-s, s)?.broadcast_div(&s_t)?)
}

/// The pipeline's `denoised_type` argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenoisedType {
    /// `"dynamic_threshold"`: [`dynamic_threshold`] at `dynamic_threshold_v`.
    DynamicThreshold,
    /// `"clip_denoised"`: `x.clamp(-1, 1)`.
    ClipDenoised,
    /// No processing: what the official code does for any other string (this crate names it
    /// `"none"` and refuses other strings).
    None,
}

impl std::str::FromStr for DenoisedType {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dynamic_threshold" => Ok(Self::DynamicThreshold),
            "clip_denoised" => Ok(Self::ClipDenoised),
            "none" => Ok(Self::None),
            other => Err(ModelError::invalid(
                "denoised_type",
                format!("{other:?}; allowed \"dynamic_threshold\", \"clip_denoised\", \"none\""),
            )),
        }
    }
}

/// The pipeline's `denoised_fn` (applied to x₀ before `clip_denoised`): `denoised_type` at
/// `dynamic_threshold_v`, then, for inpainting, `x0 · (1 − mask) + init · mask`.
/// `generate_img` passes one to the p-sampler for inpainting only; DDIM/PLMS never call one.
#[derive(Debug, Clone)]
pub struct DenoisedFn {
    pub denoised_type: DenoisedType,
    /// The percentile of [`DenoisedType::DynamicThreshold`] (official default 99.5).
    pub dynamic_threshold_v: f64,
    /// Inpainting: the init latents and the mask (1 = keep the init), both with the batch's
    /// rows (the pipeline repeats them for the CFG halves); the mask broadcasts over channels.
    pub inpaint: Option<(Tensor, Tensor)>,
}

impl DenoisedFn {
    /// Applies the function to an x₀ prediction.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.denoised_type {
            DenoisedType::DynamicThreshold => dynamic_threshold(x, self.dynamic_threshold_v)?,
            DenoisedType::ClipDenoised => x.clamp(-1f32, 1f32)?,
            DenoisedType::None => x.clone(),
        };
        match &self.inpaint {
            None => Ok(x),
            Some((init, mask)) => {
                let keep = mask.affine(-1.0, 1.0)?; // 1 - mask
                Ok(x.broadcast_mul(&keep)?
                    .broadcast_add(&init.broadcast_mul(mask)?)?)
            }
        }
    }

    /// Checks the percentile and the inpainting tensors against the latents' shape.
    pub fn validate(&self, latents: &[usize]) -> Result<()> {
        if self.denoised_type == DenoisedType::DynamicThreshold {
            check_percentile(self.dynamic_threshold_v)?;
        }
        if let Some((init, mask)) = &self.inpaint {
            if init.dims() != latents {
                return Err(ModelError::invalid(
                    "init_img",
                    format!("shape {:?}; expected the latents' {latents:?}", init.dims()),
                ));
            }
            let m = mask.dims();
            let ok = m.len() == latents.len()
                && m[0] == latents[0]
                && (m[1] == 1 || m[1] == latents[1])
                && m[2..] == latents[2..];
            if !ok {
                return Err(ModelError::invalid(
                    "img_mask",
                    format!("shape {m:?}; expected {:?} (or one channel)", latents),
                ));
            }
        }
        Ok(())
    }
}
