//! Any bytes as a `kandinsky.v1.Tensor`, decoded under the default limits: an error, never a
//! panic, and never more memory than the limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = kd_proto::v1::Tensor::decode(data) else {
        return;
    };
    let limits = kd_proto::TensorLimits::default();
    if let Ok(x) = kd_proto::from_wire(&t, &candle_core::Device::Cpu, &limits) {
        // What decodes encodes back to the same shape and dtype.
        let back = kd_proto::to_wire(&x).expect("a decoded tensor encodes");
        assert_eq!(back.shape, t.shape);
    }
});
