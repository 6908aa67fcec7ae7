//! Wire-field helpers shared by the denoiser's model kinds (the aMUSEd token generator, the
//! Kandinsky 2.0 guided sampler): errors naming the field, float tensors, `1 or B` rows, sides.

use crate::request::{Limits, MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE};
use candle_core::{DType, Device, Tensor};
use kd_models::ModelError;
use kd_proto::{from_wire, v1};
use kd_runtime::ServiceError;

/// INVALID_ARGUMENT naming `field`.
pub fn invalid(field: &str, message: impl Into<String>) -> ServiceError {
    ServiceError::invalid(field, message)
}

/// A model error as the service reports it: an invalid input names its wire field (`wire` maps
/// the model's field name to it), anything else is reported as it is.
pub fn on_wire(e: ModelError, wire: impl FnOnce(&'static str) -> String) -> ServiceError {
    match e {
        ModelError::InvalidInput { field, message } => invalid(&wire(field), message),
        other => other.into(),
    }
}

/// Refuses a field that is set but means nothing to the loaded `model` (e.g. "an aMUSEd
/// (masked-token) model").
pub fn refuse_if(set: bool, field: &str, what: &str, model: &str) -> Result<(), ServiceError> {
    if set {
        return Err(invalid(
            field,
            format!("{what}; this denoiser serves {model}, which takes none"),
        ));
    }
    Ok(())
}

/// An image side in pixels: a multiple of `multiple` (at least [`SIZE_MULTIPLE`]) in
/// [`MIN_SIDE`]..=[`MAX_SIDE`].
pub fn side(name: &str, v: u32, multiple: usize) -> Result<usize, ServiceError> {
    let m = (SIZE_MULTIPLE as usize).max(multiple);
    if !(MIN_SIDE..=MAX_SIDE).contains(&v) || !(v as usize).is_multiple_of(m) {
        return Err(invalid(
            name,
            format!("{v}; allowed: a multiple of {m} in {MIN_SIDE}..={MAX_SIDE}"),
        ));
    }
    Ok(v as usize)
}

/// Decodes a float wire tensor to f32 on the CPU.
pub fn float(limits: &Limits, t: &v1::Tensor, field: &str) -> Result<Tensor, ServiceError> {
    let x =
        from_wire(t, &Device::Cpu, &limits.tensors).map_err(|e| ServiceError::tensor(field, e))?;
    if !x.dtype().is_float() {
        return Err(invalid(
            field,
            format!("dtype {:?}; allowed: f32, f16, bf16", x.dtype()),
        ));
    }
    Ok(x.to_dtype(DType::F32)?)
}

/// Repeats a one-row tensor to `rows` (a `1 or B` field).
pub fn broadcast(t: Tensor, rows: usize, field: &str) -> Result<Tensor, ServiceError> {
    match t.dim(0)? {
        r if r == rows => Ok(t),
        1 => {
            let mut reps = vec![1; t.rank()];
            reps[0] = rows;
            Ok(t.repeat(reps)?)
        }
        r => Err(invalid(
            field,
            format!("{r} rows; allowed: 1 or {rows} (one per image)"),
        )),
    }
}
