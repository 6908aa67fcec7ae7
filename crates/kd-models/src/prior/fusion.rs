//! Weighted fusion of image embeddings (the arithmetic of diffusers
//! `KandinskyV22PriorPipeline.interpolate`): `Σ wᵢ·embᵢ`, weights not normalised.
//!
//! Producing the item embeddings (prior samples of texts, vision-tower embeddings of images) is
//! the caller's job; this module only checks the weights and sums.

use crate::error::{ModelError, Result};
use candle_core::Tensor;

/// Checks a fusion's item count and weights: at least one item, one finite weight per item.
pub fn check_weights(items: usize, weights: &[f32]) -> Result<()> {
    if items == 0 {
        return Err(ModelError::invalid(
            "items",
            "must hold at least one text or image",
        ));
    }
    if items != weights.len() {
        return Err(ModelError::invalid(
            "weights",
            format!(
                "{} weights for {items} items; give exactly one weight per item",
                weights.len()
            ),
        ));
    }
    if let Some((i, w)) = weights.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(ModelError::invalid(
            "weights",
            format!("weights[{i}] = {w}; every weight must be a finite number"),
        ));
    }
    Ok(())
}

/// `Σ wᵢ·embᵢ` over item embeddings of one shape (k, D), summed in item order.
pub fn weighted_sum(embeds: &[Tensor], weights: &[f32]) -> Result<Tensor> {
    check_weights(embeds.len(), weights)?;
    let dims = embeds[0].dims();
    if let Some((i, e)) = embeds.iter().enumerate().find(|(_, e)| e.dims() != dims) {
        return Err(ModelError::invalid(
            "items",
            format!(
                "item {i} has an embedding of shape {:?}, item 0 has {dims:?}; all must match",
                e.dims()
            ),
        ));
    }
    let mut sum: Option<Tensor> = None;
    for (emb, &w) in embeds.iter().zip(weights) {
        let emb = (emb * w as f64)?;
        sum = Some(match sum {
            None => emb,
            Some(s) => (s + emb)?,
        });
    }
    Ok(sum.expect("at least one item (checked)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_with_weights_and_rejects_bad_input() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0]], &dev).unwrap();
        let b = Tensor::new(&[[10f32, 20.0]], &dev).unwrap();
        let s = weighted_sum(&[a.clone(), b.clone()], &[0.5, 2.0]).unwrap();
        assert_eq!(s.to_vec2::<f32>().unwrap(), [[20.5, 41.0]]);
        let e = weighted_sum(&[a.clone(), b], &[1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("one weight per item"), "{e}");
        let c = Tensor::new(&[[1f32, 2.0, 3.0]], &dev).unwrap();
        let e = weighted_sum(&[a, c], &[1.0, 1.0]).unwrap_err().to_string();
        assert!(e.contains("item 1") && e.contains("all must match"), "{e}");
        let e = weighted_sum(&[], &[]).unwrap_err().to_string();
        assert!(e.contains("at least one"), "{e}");
    }
}
