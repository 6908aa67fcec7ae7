//! Helpers for parity tests against the diffusers reference fixtures (`tests/fixtures/`):
//! where the fixtures live, the relative L2 error every parity test measures, and reference
//! tensor loading.

use candle_core::{DType, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub use crate::fixtures_dir;

/// Relative L2 error `‖a − b‖ / max(‖b‖, 1e-12)`, computed in f64 on the CPU.
pub fn rel_l2(actual: &Tensor, expected: &Tensor) -> Result<f64> {
    if actual.dims() != expected.dims() {
        return Err(Error::Msg(format!(
            "rel_l2: shape {:?} vs expected {:?}",
            actual.dims(),
            expected.dims()
        )));
    }
    let a = actual
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let b = expected
        .to_dtype(DType::F64)?
        .to_device(&Device::Cpu)?
        .flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(diff / norm.max(1e-12))
}

/// Asserts `rel_l2(actual, expected) <= tol`, with a message naming `what`.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    let err = rel_l2(actual, expected).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        err.is_finite() && err <= tol,
        "{what}: relative L2 error {err:e} > {tol:e}"
    );
}

/// All tensors of a reference safetensors file, on the CPU, as stored.
pub fn load_reference(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
        Error::Msg(format!(
            "cannot read reference tensors from {}: {e}",
            path.display()
        ))
    })
}

/// Looks up `key` in a loaded reference map, with a clear panic message for tests.
pub fn get<'a>(refs: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    refs.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = refs.keys().collect();
        keys.sort();
        panic!("reference key `{key}` missing; have {keys:?}")
    })
}
