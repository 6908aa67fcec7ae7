//! Tensors on the wire, for test clients (CPU, default limits; failures panic with the reason).

use candle_core::{Device, Tensor};
use kd_proto::{from_wire, to_wire, v1, TensorLimits};

/// `t` as a wire tensor.
pub fn wire(t: &Tensor) -> v1::Tensor {
    to_wire(t).unwrap_or_else(|e| panic!("to_wire of a {:?} {:?} tensor: {e}", t.dtype(), t.dims()))
}

/// A wire tensor as a CPU tensor (default [`TensorLimits`]).
pub fn unwire(t: &v1::Tensor) -> Tensor {
    from_wire(t, &Device::Cpu, &TensorLimits::default()).unwrap_or_else(|e| {
        panic!(
            "from_wire of shape {:?} dtype {} ({} bytes): {e}",
            t.shape,
            t.dtype,
            t.data.len()
        )
    })
}
