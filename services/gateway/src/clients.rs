//! The plumbing of every stage call: message size limits, the remaining deadline, trace context
//! propagation, retries over replicas, and the mapping of a stage's failures to
//! [`ServiceError`]s naming the stage.

use crate::balance::Pool;
use kd_proto::v1::{self, GenerateEvent};
use kd_runtime::ServiceError;
use std::time::Instant;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

/// Largest message to or from a stage: text conditionings and full-resolution latents, masks
/// and previews exceed tonic's 4 MiB default.
pub(crate) const MAX_MESSAGE: usize = 512 << 20;

/// Applies [`MAX_MESSAGE`] to a generated client.
macro_rules! limits_ {
    ($client:expr) => {
        $client
            .max_decoding_message_size($crate::clients::MAX_MESSAGE)
            .max_encoding_message_size($crate::clients::MAX_MESSAGE)
    };
}
pub(crate) use limits_ as limits;

/// Where progress events go (the streaming call), if anywhere.
pub type Events = Option<mpsc::Sender<Result<GenerateEvent, Status>>>;

/// One request's context: deadline and event sink.
pub struct Ctx {
    pub deadline: Option<Instant>,
    pub events: Events,
}

impl Ctx {
    /// A request to a stage carrying the remaining deadline.
    pub(crate) fn request<T>(&self, msg: T) -> Result<Request<T>, ServiceError> {
        let mut r = Request::new(msg);
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ServiceError::deadline("before the next stage call"));
            }
            r.set_timeout(left);
        }
        kd_runtime::telemetry::inject(&mut r);
        Ok(r)
    }

    pub(crate) async fn emit(&self, event: v1::generate_event::Event) -> Result<(), ServiceError> {
        if let Some(tx) = &self.events {
            tx.send(Ok(GenerateEvent { event: Some(event) }))
                .await
                .map_err(|_| ServiceError::Cancelled("the client went away".into()))?;
        }
        Ok(())
    }

    pub(crate) async fn progress(
        &self,
        stage: v1::Stage,
        step: u32,
        total: u32,
    ) -> Result<(), ServiceError> {
        self.emit(v1::generate_event::Event::Progress(v1::Progress {
            stage: stage as i32,
            step,
            total_steps: total,
        }))
        .await
    }
}

/// One stage call on a replica of `pool` (retried once on another replica when UNAVAILABLE),
/// carrying the remaining deadline and the trace context.
pub(crate) async fn call<M, R, F, Fut>(
    pool: &Pool,
    ctx: &Ctx,
    msg: M,
    f: F,
) -> Result<R, ServiceError>
where
    M: Clone,
    F: Fn(Channel, Request<M>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
{
    pool.call(|ch| {
        let fut = ctx.request(msg.clone()).map(|r| f(ch, r));
        async move {
            match fut {
                Ok(fut) => fut.await.map(tonic::Response::into_inner),
                Err(e) => Err(Status::from(e)),
            }
        }
    })
    .await
    .map_err(stage_err(pool.stage()))
}

/// Whether `s` is the connection failing (an h2 or transport error, as when a stage dies
/// mid-stream) rather than a status the stage sent.
fn is_transport_failure(s: &Status) -> bool {
    matches!(s.code(), Code::Internal | Code::Unknown)
        && (std::error::Error::source(s).is_some()
            || s.message().starts_with("h2 protocol error")
            || s.message().starts_with("transport error"))
}

/// Maps a stage's status: transport failures (also mid-stream) become UNAVAILABLE naming the
/// stage.
pub(crate) fn stage_err(stage: &'static str) -> impl Fn(Status) -> ServiceError {
    move |s: Status| {
        let s = if is_transport_failure(&s) {
            Status::unavailable(format!("connection lost: {}", s.message()))
        } else {
            s
        };
        match ServiceError::from(s) {
            ServiceError::Unavailable(m) => {
                ServiceError::Unavailable(format!("stage {stage} is unavailable: {m}"))
            }
            ServiceError::Internal(m) => ServiceError::Internal(format!("stage {stage}: {m}")),
            other => other,
        }
    }
}

pub(crate) fn missing(stage: &'static str, field: &str) -> ServiceError {
    ServiceError::Internal(format!("stage {stage} returned no `{field}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_connection_is_unavailable_naming_the_stage_and_stage_statuses_keep_their_class() {
        let e = stage_err("denoiser")(Status::internal("h2 protocol error: stream reset"));
        assert!(matches!(e, ServiceError::Unavailable(_)), "{e}");
        assert!(
            e.to_string().contains("stage denoiser is unavailable"),
            "{e}"
        );
        let e = stage_err("denoiser")(Status::unknown("transport error"));
        assert!(matches!(e, ServiceError::Unavailable(_)), "{e}");
        let e = stage_err("movq")(Status::internal("decode failed"));
        assert!(matches!(e, ServiceError::Internal(_)), "{e}");
        assert!(e.to_string().contains("stage movq"), "{e}");
    }
}
