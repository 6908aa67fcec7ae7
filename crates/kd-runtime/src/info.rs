//! `ModelInfo` of a loaded stage, built the same way by every service.

use candle_core::{DType, Device};
use kd_models::ModelFamily;
use kd_proto::v1;

/// The wire dtype of a candle dtype (F32 for anything without a wire twin).
pub fn wire_dtype(dtype: DType) -> v1::DType {
    match dtype {
        DType::F16 => v1::DType::DtypeF16,
        DType::BF16 => v1::DType::DtypeBf16,
        DType::I64 => v1::DType::DtypeI64,
        _ => v1::DType::DtypeF32,
    }
}

/// A device as `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// What a stage reports about its loaded component.
pub fn model_info(
    family: ModelFamily,
    component: &str,
    revision: &str,
    dtype: DType,
    device: &Device,
) -> v1::ModelInfo {
    v1::ModelInfo {
        family: match family {
            ModelFamily::Kandinsky21 => v1::ModelFamily::Kandinsky21,
            ModelFamily::Kandinsky22 => v1::ModelFamily::Kandinsky22,
        } as i32,
        revision: revision.to_string(),
        component: component.to_string(),
        dtype: wire_dtype(dtype) as i32,
        device: device_name(device),
    }
}
