//! The plumbing of every stage call: message size limits, the remaining deadline, trace context
//! propagation, retries over replicas, and the mapping of a stage's failures to
//! [`ServiceError`]s naming the stage.

use crate::balance::Pool;
use crate::models::{check_family, ServedModel};
use kd_proto::v1::{
    self, denoiser_client::DenoiserClient, movq_client::MovqClient, prior_client::PriorClient,
    stage_info_client::StageInfoClient, text_encoder_client::TextEncoderClient, GenerateEvent,
};
use kd_runtime::{ServiceError, Sink};
use std::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};
use tracing::Instrument;

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
pub type Events = Option<Sink<GenerateEvent>>;

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
        if let Some(sink) = &self.events {
            sink.send(GenerateEvent { event: Some(event) }).await?;
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

/// One stage call of `method` on a replica of `pool` (retried once on another replica when
/// UNAVAILABLE), in a client span, carrying the remaining deadline and the trace context.
async fn call<M, R, F, Fut>(
    pool: &Pool,
    method: &'static str,
    ctx: &Ctx,
    msg: M,
    f: F,
) -> Result<R, ServiceError>
where
    M: Clone,
    F: Fn(Channel, Request<M>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
{
    let span = tracing::info_span!(
        "grpc.client",
        otel.name = %format_args!("{}.{method}", pool.stage()),
        otel.kind = "client",
        rpc.service = pool.stage(),
        rpc.method = method,
    );
    pool.call(|ch| {
        // Inside the client span: the stage's server span becomes its child.
        let fut = ctx.request(msg.clone()).map(|r| f(ch, r));
        async move {
            match fut {
                Ok(fut) => fut.await.map(tonic::Response::into_inner),
                Err(e) => Err(Status::from(e)),
            }
        }
    })
    .instrument(span)
    .await
    .map_err(stage_err(pool.stage()))
}

/// Typed calls to one stage set: each applies the message limits, the remaining deadline, the
/// trace context (one client span per call), the error mapping naming the stage and the check
/// of the fields the gateway needs from the answer, once.
pub struct StageClients<'a> {
    /// The replica pools of the set's stages.
    pub text_encoder: &'a Pool,
    /// `None` for a set without a prior (aMUSEd, Kandinsky 2.0).
    pub prior: Option<&'a Pool>,
    pub denoiser: &'a Pool,
    pub movq: &'a Pool,
    /// The request's deadline and event sink.
    pub ctx: &'a Ctx,
}

impl StageClients<'_> {
    fn text_encoder(&self) -> &Pool {
        self.text_encoder
    }
    /// The prior: a set without one has a family whose stage graph calls none (checked when
    /// the served model is learned), so asking for it is the gateway's own error.
    fn prior(&self) -> Result<&Pool, ServiceError> {
        self.prior.ok_or_else(|| {
            ServiceError::Internal("this stage set has no prior stage to call".into())
        })
    }
    fn denoiser(&self) -> &Pool {
        self.denoiser
    }
    fn movq(&self) -> &Pool {
        self.movq
    }

    /// The pools of the stages the set has, in pipeline order.
    fn pools(&self) -> impl Iterator<Item = &Pool> {
        [
            Some(self.text_encoder),
            self.prior,
            Some(self.denoiser),
            Some(self.movq),
        ]
        .into_iter()
        .flatten()
    }

    /// `TextEncoder.EncodeText`, from a text encoder of `served`'s family, with the
    /// conditionings that family's pipeline needs: the CLIP `prior_conditioning` (Kandinsky 2.1
    /// and 2.2, aMUSEd), or Kandinsky 2.0's two encoders' (`decoder_conditioning`'s
    /// `text_embeds` and `hidden_states`, `decoder_conditioning_2`'s `hidden_states`).
    pub async fn encode_text(
        &self,
        req: v1::EncodeTextRequest,
        served: &ServedModel,
    ) -> Result<v1::EncodeTextResponse, ServiceError> {
        let r = call(
            self.text_encoder(),
            "EncodeText",
            self.ctx,
            req,
            |ch, r| async move { limits!(TextEncoderClient::new(ch)).encode_text(r).await },
        )
        .await?;
        check_family("text_encoder", r.model.as_ref(), served)?;
        if served.family != v1::ModelFamily::Kandinsky20 {
            return match r.prior_conditioning {
                Some(_) => Ok(r),
                None => Err(missing("text_encoder", "prior_conditioning")),
            };
        }
        let first = r.decoder_conditioning.as_ref();
        let second = r.decoder_conditioning_2.as_ref();
        let needed = [
            (
                "decoder_conditioning.text_embeds",
                first.and_then(|c| c.text_embeds.as_ref()),
            ),
            (
                "decoder_conditioning.hidden_states",
                first.and_then(|c| c.hidden_states.as_ref()),
            ),
            (
                "decoder_conditioning_2.hidden_states",
                second.and_then(|c| c.hidden_states.as_ref()),
            ),
        ];
        match needed.iter().find(|(_, t)| t.is_none()) {
            Some((field, _)) => Err(missing("text_encoder", field)),
            None => Ok(r),
        }
    }

    /// `Prior.Sample`: the image embeddings.
    pub async fn sample(&self, req: v1::SampleRequest) -> Result<v1::Tensor, ServiceError> {
        call(self.prior()?, "Sample", self.ctx, req, |ch, r| async move {
            limits!(PriorClient::new(ch)).sample(r).await
        })
        .await?
        .image_embeds
        .ok_or_else(|| missing("prior", "image_embeds"))
    }

    /// `Prior.Interpolate`: the fused image embedding.
    pub async fn interpolate(
        &self,
        req: v1::InterpolateRequest,
    ) -> Result<v1::Tensor, ServiceError> {
        call(
            self.prior()?,
            "Interpolate",
            self.ctx,
            req,
            |ch, r| async move { limits!(PriorClient::new(ch)).interpolate(r).await },
        )
        .await?
        .image_embeds
        .ok_or_else(|| missing("prior", "image_embeds"))
    }

    /// `Prior.EmbedImages`: the images' CLIP embeddings.
    pub async fn embed_images(
        &self,
        req: v1::EmbedImagesRequest,
    ) -> Result<v1::Tensor, ServiceError> {
        call(
            self.prior()?,
            "EmbedImages",
            self.ctx,
            req,
            |ch, r| async move { limits!(PriorClient::new(ch)).embed_images(r).await },
        )
        .await?
        .image_embeds
        .ok_or_else(|| missing("prior", "image_embeds"))
    }

    /// `Prior.ZeroImageEmbedding`.
    pub async fn zero_image_embedding(&self) -> Result<v1::Tensor, ServiceError> {
        let req = v1::ZeroImageEmbeddingRequest {};
        call(
            self.prior()?,
            "ZeroImageEmbedding",
            self.ctx,
            req,
            |ch, r| async move { limits!(PriorClient::new(ch)).zero_image_embedding(r).await },
        )
        .await?
        .image_embeds
        .ok_or_else(|| missing("prior", "image_embeds"))
    }

    /// `Denoiser.Denoise`: the event stream (read it with [`StageClients::next_event`]).
    pub async fn denoise(
        &self,
        req: v1::DenoiseRequest,
    ) -> Result<Streaming<v1::DenoiseEvent>, ServiceError> {
        call(
            self.denoiser(),
            "Denoise",
            self.ctx,
            req,
            |ch, r| async move { limits!(DenoiserClient::new(ch)).denoise(r).await },
        )
        .await
    }

    /// The next event of a denoiser stream (a broken stream is the stage going away).
    pub async fn next_event(
        stream: &mut Streaming<v1::DenoiseEvent>,
    ) -> Result<Option<v1::DenoiseEvent>, ServiceError> {
        stream.message().await.map_err(stage_err("denoiser"))
    }

    /// `Movq.EncodeImages`: the init image's latents and, when masks were sent, the repaint mask.
    pub async fn encode_images(
        &self,
        req: v1::EncodeImagesRequest,
    ) -> Result<(v1::Tensor, Option<v1::Tensor>), ServiceError> {
        let want_mask = !req.masks.is_empty() || req.outpaint.is_some();
        let r = call(
            self.movq(),
            "EncodeImages",
            self.ctx,
            req,
            |ch, r| async move { limits!(MovqClient::new(ch)).encode_images(r).await },
        )
        .await?;
        let latents = r.latents.ok_or_else(|| missing("movq", "latents"))?;
        if want_mask && r.mask.is_none() {
            return Err(missing("movq", "mask"));
        }
        Ok((latents, r.mask))
    }

    /// `Movq.DecodeLatents`: the encoded images.
    pub async fn decode_latents(
        &self,
        req: v1::DecodeLatentsRequest,
    ) -> Result<Vec<v1::Image>, ServiceError> {
        Ok(call(
            self.movq(),
            "DecodeLatents",
            self.ctx,
            req,
            |ch, r| async move { limits!(MovqClient::new(ch)).decode_latents(r).await },
        )
        .await?
        .images)
    }

    /// `StageInfo.Info` of each stage of the set (three without a prior), with the stage's
    /// name.
    pub async fn infos(&self) -> Result<Vec<(&'static str, v1::ModelInfo)>, ServiceError> {
        let mut infos = Vec::with_capacity(4);
        for pool in self.pools() {
            let req = v1::InfoRequest {};
            let info = call(pool, "Info", self.ctx, req, |ch, r| async move {
                StageInfoClient::new(ch).info(r).await
            })
            .await?
            .model
            .ok_or_else(|| missing(pool.stage(), "model"))?;
            infos.push((pool.stage(), info));
        }
        Ok(infos)
    }
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
