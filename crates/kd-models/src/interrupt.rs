//! Stopping a long computation between its pieces. A forward pass asks its [`Stop`] check
//! between layers (UNet resnets and attentions, MoVQ blocks), so a caller whose request was
//! cancelled, or whose deadline passed, gets its thread back within one layer rather than one
//! whole forward pass. Pure: the caller's closure decides why (a cancellation token, a
//! deadline); the model only asks.

use crate::error::ModelError;
use candle_core::Tensor;

/// Asked between pieces of work: `true` stops the computation with
/// [`ModelError::Interrupted`].
pub type Stop<'a> = &'a dyn Fn() -> bool;

/// A [`Stop`] that never stops.
pub fn never() -> bool {
    false
}

/// `Err(Interrupted)` (through candle's error type, recovered by `ModelError::from`) when `stop`
/// says so; `piece` names where.
pub fn check(stop: Stop, piece: &'static str) -> candle_core::Result<()> {
    if stop() {
        Err(ModelError::Interrupted { piece }.into_candle())
    } else {
        Ok(())
    }
}

/// `f(start, len)` over `0..total` in pieces of at most `size`, asking `stop` between pieces
/// (naming `piece`); the outputs concatenated along `dim`, or the one output as it is.
pub fn in_pieces(
    total: usize,
    size: usize,
    dim: usize,
    stop: Stop,
    piece: &'static str,
    mut f: impl FnMut(usize, usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let size = size.max(1);
    let mut parts = Vec::with_capacity(total.div_ceil(size));
    let mut start = 0;
    while start < total {
        if start > 0 {
            check(stop, piece)?;
        }
        let len = size.min(total - start);
        parts.push(f(start, len)?);
        start += len;
    }
    match parts.len() {
        1 => Ok(parts.pop().expect("one piece")),
        _ => Tensor::cat(&parts, dim),
    }
}
