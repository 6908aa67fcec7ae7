//! The `kandinsky.v1.TextEncoder` gRPC service: `Encode` is one [`Stage::unary`] call —
//! checked before admission, answered from the cache when the same prompts were encoded before
//! (the encoder is deterministic), else computed (micro-batched with concurrent calls, see
//! [`kd_runtime::microbatch`]) and cached.

use crate::encode;
use crate::model::TextModel;
use kd_proto::v1;
use kd_proto::v1::text_encoder_server::{TextEncoder, TextEncoderServer};
use kd_runtime::cache::EmbeddingCache;
use kd_runtime::microbatch::Policy;
use kd_runtime::{Call, Cancel, MicroBatcher, Stage};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The service: the shared stage plus request limits.
#[derive(Clone)]
pub struct TextEncoderService {
    stage: Stage<TextModel>,
    cache: Arc<EmbeddingCache>,
    max_batch: usize,
    batcher: MicroBatcher<encode::Job, v1::EncodeTextResponse>,
}

impl TextEncoderService {
    /// A service over `stage`, accepting at most `max_batch` prompts per call; outputs are cached
    /// in `cache`; concurrent calls share tower calls under `batching` (`None`: each alone).
    pub fn new(
        stage: Stage<TextModel>,
        cache: Arc<EmbeddingCache>,
        max_batch: usize,
        batching: Option<Policy>,
    ) -> TextEncoderServer<Self> {
        let batcher = MicroBatcher::start(
            "text-batcher",
            stage.metrics.clone(),
            batching,
            Arc::new(encode::compute_batch),
        );
        TextEncoderServer::new(Self {
            stage,
            cache,
            max_batch,
            batcher,
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
        let (cache, batcher) = (self.cache.clone(), self.batcher.clone());
        let max_batch = self.max_batch;
        let check = move |_: &TextModel| encode::validate(&prompts, max_batch).map(|()| prompts);
        let run = |m: Arc<TextModel>, prompts: Vec<String>, cancel: Cancel| async move {
            let key = encode::cache_key(&m, &prompts);
            cache
                .get_or_compute(&key, || {
                    let rows = prompts.len();
                    batcher.submit((m, prompts), "prompts".into(), rows, &cancel)
                })
                .await
        };
        self.stage.unary("EncodeText", call, check, run).await
    }
}
