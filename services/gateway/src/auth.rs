//! Optional API-key authentication: `authorization: Bearer <key>`.

use kd_runtime::ServiceError;
use std::collections::HashSet;
use std::sync::Arc;
use tonic::{Request, Status};

/// Accepted keys; empty = authentication off.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys(Arc<HashSet<String>>);

impl ApiKeys {
    /// Keys from a file: one per line, blank lines and `#` comments ignored.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        Ok(Self::new(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from),
        ))
    }

    /// Keys from an iterator.
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        Self(Arc::new(keys.into_iter().collect()))
    }

    /// Checks a request's credentials (a tonic interceptor).
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.0.is_empty() {
            return Ok(req);
        }
        let key = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match key {
            Some(k) if self.0.contains(k.trim()) => Ok(req),
            Some(_) => Err(ServiceError::Unauthenticated("the API key is not valid".into()).into()),
            None => Err(ServiceError::Unauthenticated(
                "missing `authorization: Bearer <api key>` metadata".into(),
            )
            .into()),
        }
    }
}
