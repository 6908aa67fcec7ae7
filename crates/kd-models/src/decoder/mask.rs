//! The inpaint mask preparation of `KandinskyV22InpaintPipeline` (shared by 2.1): pixel
//! repaint-mask → latent keep-mask.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor};

/// The inpaint keep-mask at latent resolution, as `KandinskyV22InpaintPipeline` prepares it:
/// `mask` (B, H, W) or (B, 1, H, W) at pixel resolution in [0, 1] with **1 = repaint** is
/// binarised at 0.5, inverted (1 = keep), nearest-resized to (`latent_h`, `latent_w`)
/// (source index ⌊dst·in/out⌋) and eroded by [`prepare_mask`]. Returns (B, 1, latent_h, latent_w).
pub fn prepare_inpaint_mask(mask: &Tensor, latent_h: usize, latent_w: usize) -> Result<Tensor> {
    let mask = match mask.rank() {
        3 => mask.unsqueeze(1)?,
        4 if mask.dim(1)? == 1 => mask.clone(),
        _ => {
            return Err(ModelError::invalid(
                "mask",
                format!(
                    "shape {:?}; expected (B, H, W) or (B, 1, H, W)",
                    mask.dims()
                ),
            ))
        }
    };
    let (b, _, h, w) = mask.dims4()?;
    if h == 0 || w == 0 || latent_h == 0 || latent_w == 0 {
        return Err(ModelError::invalid("mask", "empty mask or latent size"));
    }
    let v = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(bad) = v.iter().find(|x| !(0.0..=1.0).contains(*x)) {
        return Err(ModelError::invalid(
            "mask",
            format!("has value {bad}; allowed: [0, 1] with 1 = repaint, 0 = keep"),
        ));
    }
    let src = |dst: usize, inp: usize, out: usize| -> usize {
        if inp == out {
            dst
        } else {
            (((dst as f32) * (inp as f32 / out as f32)).floor() as usize).min(inp - 1)
        }
    };
    let mut out = Vec::with_capacity(b * latent_h * latent_w);
    for bi in 0..b {
        for i in 0..latent_h {
            for j in 0..latent_w {
                let m = v[bi * h * w + src(i, h, latent_h) * w + src(j, w, latent_w)];
                out.push(if m >= 0.5 { 0.0f32 } else { 1.0 });
            }
        }
    }
    let keep = Tensor::from_vec(out, (b, 1, latent_h, latent_w), mask.device())?;
    prepare_mask(&keep)
}

/// diffusers' `prepare_mask` erosion of a keep-mask (B, C, h, w): for every pixel whose original
/// channel-0 value is not 1, zero all channels at (i−1,j), (i,j−1), (i−1,j−1), (i+1,j), (i,j+1),
/// (i+1,j+1) (the anti-diagonal neighbours stay).
pub fn prepare_mask(masks: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = masks.dims4()?;
    let old = masks
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut new = old.clone();
    let plane = h * w;
    for bi in 0..b {
        let base = bi * c * plane;
        for i in 0..h {
            for j in 0..w {
                if old[base + i * w + j] == 1.0 {
                    continue;
                }
                let mut zero = |ii: usize, jj: usize| {
                    for ci in 0..c {
                        new[base + ci * plane + ii * w + jj] = 0.0;
                    }
                };
                if i > 0 {
                    zero(i - 1, j);
                }
                if j > 0 {
                    zero(i, j - 1);
                }
                if i > 0 && j > 0 {
                    zero(i - 1, j - 1);
                }
                if i + 1 < h {
                    zero(i + 1, j);
                }
                if j + 1 < w {
                    zero(i, j + 1);
                }
                if i + 1 < h && j + 1 < w {
                    zero(i + 1, j + 1);
                }
            }
        }
    }
    Ok(Tensor::from_vec(new, (b, c, h, w), masks.device())?)
}
