//! The `kandinsky.v1.Prior` gRPC service: each RPC is one [`Stage::unary`] call — checked
//! before admission, computed in the stage's [`MicroBatcher`] (concurrent Sample calls share
//! every transformer call; the other RPCs run alone, in their turn), stopped by its deadline or
//! its caller.

use crate::model::PriorModel;
use crate::{encode_images, interpolate, sample, zero_embedding};
use kd_proto::v1;
use kd_proto::v1::prior_server::{Prior, PriorServer};
use kd_runtime::cache::{CacheKey, EmbeddingCache};
use kd_runtime::microbatch::{BatchContext, Policy};
use kd_runtime::{Call, Cancel, MicroBatcher, Stage};
use prost::Message;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The service: the shared stage plus request limits.
#[derive(Clone)]
pub struct PriorService {
    stage: Stage<PriorModel>,
    cache: Arc<EmbeddingCache>,
    max_batch: usize,
    batcher: MicroBatcher<sample::Job, v1::SampleResponse>,
}

impl PriorService {
    /// A service over `stage`, accepting at most `max_batch` rows per call; samples are cached in
    /// `cache` under keys holding every input, seeds, steps and guidance included; concurrent
    /// samples share transformer calls under `batching` (`None`: each alone).
    pub fn new(
        stage: Stage<PriorModel>,
        cache: Arc<EmbeddingCache>,
        max_batch: usize,
        batching: Option<Policy>,
    ) -> PriorServer<Self> {
        let metrics = stage.metrics.clone();
        let batcher = MicroBatcher::start(
            "prior-batcher",
            stage.metrics.clone(),
            batching,
            Arc::new(move |items, ctx: &mut dyn BatchContext<sample::Job>| {
                sample::run_batch(items, ctx, &metrics)
            }),
        );
        PriorServer::new(Self {
            stage,
            cache,
            max_batch,
            batcher,
        })
    }
}

#[tonic::async_trait]
impl Prior for PriorService {
    /// A prior output is a sample, so it is cached only under a key that holds the whole
    /// request — conditioning, seeds, steps, guidance, latents, strength — and the revision.
    async fn sample(
        &self,
        request: Request<v1::SampleRequest>,
    ) -> Result<Response<v1::SampleResponse>, Status> {
        let call = Call::of(&request);
        let req = request.into_inner();
        let (cache, batcher) = (self.cache.clone(), self.batcher.clone());
        let request_bytes = req.encode_to_vec();
        let deadline = call.deadline;
        let check = |m: &PriorModel| sample::check(m, &req, self.max_batch, deadline);
        let run = |m: Arc<PriorModel>, checked: sample::Checked, cancel: Cancel| async move {
            let key = CacheKey::new(&m.info.revision, "prior", &[&request_bytes]);
            cache
                .get_or_compute(&key, || {
                    let rows = checked.rows();
                    batcher.submit((m, checked), "sample".into(), rows, &cancel)
                })
                .await
        };
        self.stage.unary("Sample", call, check, run).await
    }

    async fn embed_images(
        &self,
        request: Request<v1::EmbedImagesRequest>,
    ) -> Result<Response<v1::EmbedImagesResponse>, Status> {
        let call = Call::of(&request);
        let req = request.into_inner();
        let (max_batch, metrics) = (self.max_batch, self.stage.metrics.clone());
        let batcher = self.batcher.clone();
        let check = move |m: &PriorModel| encode_images::check(m, req, max_batch);
        let run = |m: Arc<PriorModel>, checked, cancel: Cancel| async move {
            batcher
                .alone(&cancel, move |_| encode_images::run(&m, checked, &metrics))
                .await
        };
        self.stage.unary("EmbedImages", call, check, run).await
    }

    async fn zero_image_embedding(
        &self,
        request: Request<v1::ZeroImageEmbeddingRequest>,
    ) -> Result<Response<v1::ZeroImageEmbeddingResponse>, Status> {
        let batcher = self.batcher.clone();
        let run = |m: Arc<PriorModel>, (), cancel: Cancel| async move {
            batcher
                .alone(&cancel, move |_| zero_embedding::compute(&m))
                .await
        };
        self.stage
            .unary("ZeroImageEmbedding", Call::of(&request), |_| Ok(()), run)
            .await
    }

    async fn interpolate(
        &self,
        request: Request<v1::InterpolateRequest>,
    ) -> Result<Response<v1::InterpolateResponse>, Status> {
        let call = Call::of(&request);
        let req = request.into_inner();
        let (metrics, batcher) = (self.stage.metrics.clone(), self.batcher.clone());
        let check = |m: &PriorModel| interpolate::check(m, &req, self.max_batch);
        let run = |m: Arc<PriorModel>, checked, cancel: Cancel| async move {
            batcher
                .alone(&cancel, move |c| interpolate::run(&m, checked, &metrics, c))
                .await
        };
        self.stage.unary("Interpolate", call, check, run).await
    }
}
