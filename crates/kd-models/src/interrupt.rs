//! Stopping a long computation between its pieces. A forward pass asks its [`Stop`] check
//! between layers (UNet resnets and attentions, MoVQ blocks), so a caller whose request was
//! cancelled, or whose deadline passed, gets its thread back within one layer rather than one
//! whole forward pass. Pure: the caller's closure decides why (a cancellation token, a
//! deadline); the model only asks.

use crate::error::ModelError;

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
