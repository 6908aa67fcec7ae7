//! The `kandinsky.v1.TextEncoder` gRPC service: hands each RPC to its module.

use crate::model::TextModel;
use crate::{encode, info, MAX_MESSAGE_BYTES};
use kd_proto::v1;
use kd_proto::v1::text_encoder_server::{TextEncoder, TextEncoderServer};
use kd_runtime::cache::EmbeddingCache;
use kd_runtime::Stage;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The fully qualified service name (also its health service name).
pub const SERVICE_NAME: &str = v1::text_encoder_server::SERVICE_NAME;

/// The service: the shared stage plus request limits.
#[derive(Clone)]
pub struct TextEncoderService {
    stage: Stage<TextModel>,
    cache: Arc<EmbeddingCache>,
    max_batch: usize,
}

impl TextEncoderService {
    /// A service over `stage`, accepting at most `max_batch` prompts per call; outputs are cached
    /// in `cache` (the encoder is deterministic).
    pub fn new(stage: Stage<TextModel>, cache: Arc<EmbeddingCache>, max_batch: usize) -> Self {
        Self {
            stage,
            cache,
            max_batch,
        }
    }

    /// The tonic server, with message limits sized for batches of hidden states.
    pub fn into_server(self) -> TextEncoderServer<Self> {
        TextEncoderServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl TextEncoder for TextEncoderService {
    async fn encode(
        &self,
        request: Request<v1::EncodeTextRequest>,
    ) -> Result<Response<v1::EncodeTextResponse>, Status> {
        encode::handle(
            &self.stage,
            &self.cache,
            request.into_inner(),
            self.max_batch,
        )
        .await
    }

    async fn info(
        &self,
        request: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        info::handle(&self.stage, request.into_inner()).await
    }
}
