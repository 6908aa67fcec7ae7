//! The service error type and its mapping to gRPC status — the only place that mapping lives.

#[cfg(feature = "models")]
use kd_models::ModelError;
use kd_proto::WireTensorError;
use std::sync::Arc;
use tonic::{Code, Status};

/// The cause of an internal failure, kept (not flattened to a string) and cheap to clone.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// Why a service call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// Bad input: names the field and the allowed values (an empty field means `message` is
    /// already complete, as when relaying a downstream stage's error).
    #[error("{}", invalid_message(.field, .message))]
    InvalidArgument { field: String, message: String },
    /// The admission queue is full.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A dependency (stage, model) is not available.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
    /// The caller went away or cancelled.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// Missing or wrong credentials.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The deployment does not serve this feature.
    #[error("unimplemented: {0}")]
    Unimplemented(String),
    /// A bug or an unexpected model failure.
    #[error("internal: {0}")]
    Internal(String),
    /// An unexpected failure of the compute library or the tensor codec, with its cause.
    #[error("internal: {0}")]
    Compute(#[source] Cause),
}

fn invalid_message(field: &str, message: &str) -> String {
    if field.is_empty() {
        message.to_string()
    } else {
        format!("invalid `{field}`: {message}")
    }
}

impl ServiceError {
    /// This error with an invalid field renamed by `rename` (a stage's field name to the
    /// caller's request path); other errors unchanged.
    pub fn rename_field(self, rename: impl Fn(&str) -> Option<String>) -> Self {
        match self {
            Self::InvalidArgument { field, message } => Self::InvalidArgument {
                field: rename(&field).unwrap_or(field),
                message,
            },
            e => e,
        }
    }

    /// Bad input in `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A malformed wire tensor in `field`.
    pub fn tensor(field: impl Into<String>, e: WireTensorError) -> Self {
        Self::invalid(field, e.to_string())
    }

    /// The request's deadline passed; `when` says at which point of the work (one message
    /// format for every service: `deadline exceeded: the request deadline passed <when>`).
    pub fn deadline(when: impl std::fmt::Display) -> Self {
        Self::DeadlineExceeded(format!("the request deadline passed {when}"))
    }

    /// The caller went away; `when` says at which point of the work.
    pub fn client_gone(when: impl std::fmt::Display) -> Self {
        Self::Cancelled(format!("the caller went away {when}"))
    }

    /// Which reason label this error has in the `kd_failures_total` metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument { .. } => "invalid_argument",
            Self::Overloaded(_) => "overloaded",
            Self::Unavailable(_) => "unavailable",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Cancelled(_) => "cancelled",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Unimplemented(_) => "unimplemented",
            Self::Internal(_) | Self::Compute(_) => "internal",
        }
    }
}

#[cfg(feature = "models")]
impl From<candle_core::Error> for ServiceError {
    fn from(e: candle_core::Error) -> Self {
        Self::Compute(Arc::new(e))
    }
}

/// A wire tensor the service itself failed to build (request tensors are checked with
/// [`ServiceError::tensor`], which names the field).
impl From<WireTensorError> for ServiceError {
    fn from(e: WireTensorError) -> Self {
        Self::Compute(Arc::new(e))
    }
}

#[cfg(feature = "models")]
impl From<ModelError> for ServiceError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::InvalidInput { field, message } => Self::invalid(field, message),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl ServiceError {
    /// The prefix [`ServiceError`]'s Display puts before a message of this status code.
    fn status_prefix(code: Code) -> &'static str {
        match code {
            Code::ResourceExhausted => "overloaded",
            Code::Unavailable => "unavailable",
            Code::DeadlineExceeded => "deadline exceeded",
            Code::Cancelled => "cancelled",
            Code::Unauthenticated => "unauthenticated",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            _ => "",
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = match &e {
            ServiceError::InvalidArgument { .. } => Code::InvalidArgument,
            ServiceError::Overloaded(_) => Code::ResourceExhausted,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ServiceError::Cancelled(_) => Code::Cancelled,
            ServiceError::Unauthenticated(_) => Code::Unauthenticated,
            ServiceError::Unimplemented(_) => Code::Unimplemented,
            ServiceError::Internal(_) | ServiceError::Compute(_) => Code::Internal,
        };
        // An invalid field also travels as a google.rpc.BadRequest detail, so clients read the
        // field without parsing the message.
        if let ServiceError::InvalidArgument { field, message } = &e {
            if !field.is_empty() {
                use tonic_types::{ErrorDetails, StatusExt};
                let details = ErrorDetails::with_bad_request_violation(field, message);
                return Status::with_error_details(code, e.to_string(), details);
            }
        }
        Status::new(code, e.to_string())
    }
}

/// Splits "invalid `field`: rest" into the field and the innermost explanation (a relayed
/// message may nest several "invalid `x`: " prefixes, outermost first).
fn split_invalid(msg: &str) -> Option<(String, String)> {
    let rest = msg.strip_prefix("invalid `")?;
    let (field, mut message) = rest.split_once("`: ")?;
    while let Some(inner) = message
        .strip_prefix("invalid `")
        .and_then(|r| r.split_once("`: "))
    {
        message = inner.1;
    }
    Some((field.to_string(), message.to_string()))
}

impl From<Status> for ServiceError {
    /// A status from a downstream stage, kept as the same class of error.
    fn from(s: Status) -> Self {
        // A downstream kandinsky-serve service already prefixed its message with the class
        // (e.g. "deadline exceeded: "); keep one prefix.
        let class = ServiceError::status_prefix(s.code());
        let msg = s
            .message()
            .strip_prefix(class)
            .and_then(|m| m.strip_prefix(": "))
            .unwrap_or(s.message())
            .to_string();
        match s.code() {
            // The transport's own timer (tonic answers CANCELLED "Timeout expired").
            Code::Cancelled if msg == "Timeout expired" => {
                Self::deadline("before a stage answered (its transport timed out)")
            }
            // Downstream messages read "invalid `field`: ..."; the field is kept apart so a
            // caller can rename it to its own request's path.
            Code::InvalidArgument => match split_invalid(&msg) {
                Some((field, message)) => Self::InvalidArgument { field, message },
                None => Self::InvalidArgument {
                    field: String::new(),
                    message: msg,
                },
            },
            Code::ResourceExhausted => Self::Overloaded(msg),
            Code::Unavailable => Self::Unavailable(msg),
            Code::DeadlineExceeded => Self::DeadlineExceeded(msg),
            Code::Cancelled => Self::Cancelled(msg),
            Code::Unauthenticated => Self::Unauthenticated(msg),
            Code::Unimplemented => Self::Unimplemented(msg),
            _ => Self::Internal(format!("{:?}: {msg}", s.code())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_its_code_and_keeps_the_message() {
        let cases = [
            (
                ServiceError::invalid("width", "must be 64..=2048, got 0"),
                Code::InvalidArgument,
            ),
            (
                ServiceError::Overloaded("queue full (64)".into()),
                Code::ResourceExhausted,
            ),
            (
                ServiceError::Unavailable("stage prior is down".into()),
                Code::Unavailable,
            ),
            (
                ServiceError::DeadlineExceeded("after step 3".into()),
                Code::DeadlineExceeded,
            ),
            (
                ServiceError::Cancelled("client left".into()),
                Code::Cancelled,
            ),
            (
                ServiceError::Unauthenticated("no key".into()),
                Code::Unauthenticated,
            ),
            (
                ServiceError::Unimplemented("outpaint".into()),
                Code::Unimplemented,
            ),
            (ServiceError::Internal("bug".into()), Code::Internal),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), msg);
        }
        let s = Status::from(ServiceError::invalid("width", "must be 64..=2048, got 0"));
        assert_eq!(s.message(), "invalid `width`: must be 64..=2048, got 0");
    }

    #[test]
    fn compute_errors_keep_their_cause() {
        let e: ServiceError = WireTensorError::UnknownDType(9).into();
        let source = std::error::Error::source(&e).expect("the cause is kept");
        assert_eq!(
            source.to_string(),
            WireTensorError::UnknownDType(9).to_string()
        );
        assert_eq!(Status::from(e).code(), Code::Internal);
        let d = ServiceError::deadline("after 3 of 10 steps");
        assert_eq!(
            d.to_string(),
            "deadline exceeded: the request deadline passed after 3 of 10 steps"
        );
    }

    #[cfg(feature = "models")]
    #[test]
    fn model_input_errors_become_invalid_argument() {
        let e: ServiceError = ModelError::invalid("strength", "must be in (0, 1], got 2").into();
        assert_eq!(Status::from(e).code(), Code::InvalidArgument);
    }

    #[test]
    fn downstream_status_round_trips_its_class() {
        let e: ServiceError = Status::invalid_argument("invalid `latents`: wrong shape").into();
        let s = Status::from(e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("invalid `latents`: wrong shape"),
            "{}",
            s.message()
        );
        let e: ServiceError = Status::resource_exhausted("full").into();
        assert_eq!(Status::from(e).code(), Code::ResourceExhausted);
        // One prefix, however many hops a message crossed.
        let once = Status::from(ServiceError::deadline("after step 3"));
        let relayed = Status::from(ServiceError::from(once.clone()));
        assert_eq!(relayed.message(), once.message());
        assert_eq!(relayed.code(), Code::DeadlineExceeded);
        let e: ServiceError = Status::cancelled("Timeout expired").into();
        assert!(matches!(e, ServiceError::DeadlineExceeded(_)), "{e}");
    }

    #[test]
    fn an_invalid_field_travels_as_a_bad_request_detail_and_is_split_when_relayed() {
        use tonic_types::StatusExt;
        let status = Status::from(ServiceError::invalid("width", "100; allowed: 64..=2048"));
        assert_eq!(status.message(), "invalid `width`: 100; allowed: 64..=2048");
        let details = status.get_error_details();
        let violations = &details.bad_request().unwrap().field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "width");
        assert_eq!(violations[0].description, "100; allowed: 64..=2048");
        // Relayed by the gateway: the field is kept apart and can be renamed.
        let nested =
            Status::invalid_argument("invalid `images[0]`: invalid `image`: cannot decode");
        let e = ServiceError::from(nested)
            .rename_field(|f| (f == "images[0]").then(|| "variation.image".to_string()));
        assert_eq!(e.to_string(), "invalid `variation.image`: cannot decode");
        // A message without a field stays whole, with no detail.
        let plain = ServiceError::from(Status::invalid_argument("bytes are not a message"));
        assert_eq!(plain.to_string(), "bytes are not a message");
        assert!(Status::from(plain)
            .get_error_details()
            .bad_request()
            .is_none());
    }
}
