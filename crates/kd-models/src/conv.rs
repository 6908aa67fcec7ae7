//! The models' 2-D convolution: candle's `Conv2d` (same weights, same constructor), except that
//! 3×3 stride-1 f32 convolutions on the CPU run through `kd_kernels::conv3x3` (banded NCHW
//! im2col into a prepacked GEMM, bias fused), which candle's CPU conv2d spends far longer on.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

/// A convolution layer; see the module docs.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    /// The bias the fused CPU kernel starts from (zeros when the layer has none).
    fused_bias: Tensor,
}

/// `candle_nn::conv2d`: weight `(cout, cin / groups, k, k)` and bias `(cout,)` under `vb`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let inner = candle_nn::conv2d(cin, cout, kernel, cfg, vb)?;
    let fused_bias = match inner.bias() {
        Some(b) => b.clone(),
        None => Tensor::zeros(cout, inner.weight().dtype(), inner.weight().device())?,
    };
    Ok(Conv2d { inner, fused_bias })
}

impl Conv2d {
    /// The weight `(cout, cin / groups, k, k)`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The layer's configuration (padding, stride, dilation, groups).
    pub fn config(&self) -> &Conv2dConfig {
        self.inner.config()
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.inner.config();
        if kd_kernels::conv3x3_supported(x, self.inner.weight(), c.stride, c.dilation, c.groups) {
            return kd_kernels::conv3x3(x, self.inner.weight(), &self.fused_bias, c.padding);
        }
        self.inner.forward(x)
    }
}
