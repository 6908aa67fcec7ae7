//! The models' GroupNorm: candle's (same weights, same constructor), except that f32 inputs on
//! the CPU run through `kd_kernels::group_norm` (one fused pass instead of about eight, SiLU fused
//! on request through [`GroupNorm::forward_silu`]).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A GroupNorm layer; see the module docs.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// `candle_nn::group_norm`: weight and bias `(channels,)` under `vb` (ones and zeros when a
/// variable map creates them).
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
    let inner = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        inner,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    /// MoVQ's SpatialNorm (then SiLU when `silu`) in one pass on the CPU: this norm of `f`, times
    /// `y` and plus `shift` nearest-upsampled to `f`'s size. `None` where the fused kernel does
    /// not apply (another device or dtype, a size ratio that is not whole).
    pub(crate) fn fused_spatial(
        &self,
        f: &Tensor,
        y: &Tensor,
        shift: &Tensor,
        silu: bool,
    ) -> Result<Option<Tensor>> {
        if !kd_kernels::spatial_norm_supported(f, y) {
            return Ok(None);
        }
        let gamma_beta = Tensor::stack(&[&self.weight, &self.bias], 0)?;
        let y_shift = Tensor::cat(&[y, shift], 1)?;
        kd_kernels::spatial_norm(f, &gamma_beta, &y_shift, self.groups, self.eps, silu).map(Some)
    }

    /// `silu(self.forward(x))`, in one pass on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    /// The norm, then SiLU when `silu`: fused on the CPU, candle's ops elsewhere.
    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if kd_kernels::group_norm_supported(x, &self.weight) {
            let (w, b) = (&self.weight, &self.bias);
            return kd_kernels::group_norm(x, w, b, self.groups, self.eps, silu);
        }
        let y = self.inner.forward(x)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}
