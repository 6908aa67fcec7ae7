//! The `kandinsky.v1.TextEncoder` gRPC service: `Encode` is one [`Stage::unary`] call —
//! checked before admission, answered from the cache when the same prompts were encoded before
//! (the encoder is deterministic), else computed on the blocking pool and cached.

use crate::encode;
use crate::model::TextModel;
use kd_proto::v1;
use kd_proto::v1::text_encoder_server::{TextEncoder, TextEncoderServer};
use kd_runtime::cache::EmbeddingCache;
use kd_runtime::{Call, Cancel, Stage};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The service: the shared stage plus request limits.
#[derive(Clone)]
pub struct TextEncoderService {
    stage: Stage<TextModel>,
    cache: Arc<EmbeddingCache>,
    max_batch: usize,
}

impl TextEncoderService {
    /// A service over `stage`, accepting at most `max_batch` prompts per call; outputs are cached
    /// in `cache`.
    pub fn new(
        stage: Stage<TextModel>,
        cache: Arc<EmbeddingCache>,
        max_batch: usize,
    ) -> TextEncoderServer<Self> {
        TextEncoderServer::new(Self {
            stage,
            cache,
            max_batch,
        })
    }
}

#[tonic::async_trait]
impl TextEncoder for TextEncoderService {
    async fn encode_text(
        &self,
        request: Request<v1::EncodeTextRequest>,
    ) -> Result<Response<v1::EncodeTextResponse>, Status> {
        let call = Call::of(&request);
        let prompts = request.into_inner().prompts;
        let (cache, metrics) = (self.cache.clone(), self.stage.metrics.clone());
        let max_batch = self.max_batch;
        let check = move |_: &TextModel| encode::validate(&prompts, max_batch).map(|()| prompts);
        let run = |m: Arc<TextModel>, prompts: Vec<String>, cancel: Cancel| async move {
            let key = encode::cache_key(&m, &prompts);
            cache
                .get_or_compute(&key, || {
                    metrics.batch(prompts.len());
                    cancel.run_blocking(move |_| encode::compute(&m, &prompts))
                })
                .await
        };
        self.stage.unary("EncodeText", call, check, run).await
    }
}
