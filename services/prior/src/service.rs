//! The `kandinsky.v1.Prior` gRPC service: hands each RPC to its module.

use crate::model::PriorModel;
use crate::{encode_images, info, interpolate, sample, zero_embedding, MAX_MESSAGE_BYTES};
use kd_proto::v1;
use kd_proto::v1::prior_server::{Prior, PriorServer};
use kd_runtime::cache::EmbeddingCache;
use kd_runtime::deadline::deadline_of;
use kd_runtime::Stage;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The fully qualified service name (also its health service name).
pub const SERVICE_NAME: &str = v1::prior_server::SERVICE_NAME;

/// The service: the shared stage plus request limits.
#[derive(Clone)]
pub struct PriorService {
    stage: Stage<PriorModel>,
    cache: Arc<EmbeddingCache>,
    max_batch: usize,
}

impl PriorService {
    /// A service over `stage`, accepting at most `max_batch` rows per call; samples are cached in
    /// `cache` under keys holding every input, seeds, steps and guidance included.
    pub fn new(stage: Stage<PriorModel>, cache: Arc<EmbeddingCache>, max_batch: usize) -> Self {
        Self {
            stage,
            cache,
            max_batch,
        }
    }

    /// The tonic server, with message limits sized for batches of conditioning.
    pub fn into_server(self) -> PriorServer<Self> {
        PriorServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl Prior for PriorService {
    async fn sample(
        &self,
        request: Request<v1::PriorSampleRequest>,
    ) -> Result<Response<v1::PriorSampleResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        sample::handle(
            &self.stage,
            &self.cache,
            request.into_inner(),
            self.max_batch,
            deadline,
        )
        .await
    }

    async fn encode_images(
        &self,
        request: Request<v1::EncodeImagesRequest>,
    ) -> Result<Response<v1::EncodeImagesResponse>, Status> {
        encode_images::handle(&self.stage, request.into_inner(), self.max_batch).await
    }

    async fn zero_image_embedding(
        &self,
        request: Request<v1::ZeroImageEmbeddingRequest>,
    ) -> Result<Response<v1::ZeroImageEmbeddingResponse>, Status> {
        zero_embedding::handle(&self.stage, request.into_inner()).await
    }

    async fn interpolate(
        &self,
        request: Request<v1::InterpolateRequest>,
    ) -> Result<Response<v1::PriorSampleResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        interpolate::handle(&self.stage, request.into_inner(), self.max_batch, deadline).await
    }

    async fn info(
        &self,
        request: Request<v1::PriorInfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        info::handle(&self.stage, request.into_inner()).await
    }
}
