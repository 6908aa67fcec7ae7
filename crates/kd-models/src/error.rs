//! The one error type of the model layer.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file is not valid JSON or does not match the expected schema.
    #[error("{path}: invalid config: {message}")]
    Config { path: PathBuf, message: String },
    /// A config names a value this implementation does not support.
    #[error("{path}: `{field}` = {value} is not supported (supported: {supported})")]
    Unsupported {
        path: PathBuf,
        field: String,
        value: String,
        supported: String,
    },
    /// The checkpoint folder lacks something.
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// A weight tensor is absent from the component's safetensors files.
    #[error("{files}: tensor `{key}` is missing (expected shape {expected:?})")]
    MissingTensor {
        files: String,
        key: String,
        expected: Vec<usize>,
    },
    /// A weight tensor has the wrong shape.
    #[error("{file}: tensor `{key}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        file: PathBuf,
        key: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    /// Caller input is out of range; names the field and the allowed values.
    #[error("invalid `{field}`: {message}")]
    InvalidInput {
        field: &'static str,
        message: String,
    },
    /// The caller's stop check said stop (see [`crate::interrupt`]).
    #[error("interrupted by the caller ({piece})")]
    Interrupted { piece: &'static str },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for ModelError {
    /// Recovers a [`ModelError`] that travelled through candle (weight loading errors raised by
    /// [`crate::checkpoint::Weights`] inside a `VarBuilder` call), so callers see the file and key.
    fn from(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WrappedContext { wrapped, context } => {
                match wrapped.downcast::<ModelError>() {
                    Ok(me) => *me,
                    Err(wrapped) => {
                        Self::Candle(candle_core::Error::WrappedContext { wrapped, context })
                    }
                }
            }
            candle_core::Error::WithBacktrace { inner, .. } => Self::from(*inner),
            candle_core::Error::Context { inner, .. } => Self::from(*inner),
            other => Self::Candle(other),
        }
    }
}

impl ModelError {
    /// Carries this error through a candle `Result` (see the `From<candle_core::Error>` impl).
    pub fn into_candle(self) -> candle_core::Error {
        candle_core::Error::WrappedContext {
            wrapped: Box::new(self),
            context: String::new(),
        }
    }

    /// Shorthand for [`ModelError::InvalidInput`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            message: message.into(),
        }
    }
}

/// Result alias of the model layer.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
