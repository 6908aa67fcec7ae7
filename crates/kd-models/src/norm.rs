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
    /// γ and β stacked `(2, C)`, the groups and ε: what the fused SpatialNorm kernel takes.
    pub(crate) fn fused_params(&self) -> Result<(Tensor, usize, f64)> {
        Ok((
            Tensor::stack(&[&self.weight, &self.bias], 0)?,
            self.groups,
            self.eps,
        ))
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
