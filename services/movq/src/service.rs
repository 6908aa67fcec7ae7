//! The `kandinsky.v1.Movq` gRPC service: each RPC is one [`Stage::unary`] call whose model work
//! goes through one [`MicroBatcher`]: concurrent decodes of one latent size share a decoder
//! call; an encode runs alone, in its turn. With batching off every call runs alone on the
//! blocking pool.

use crate::model::Movq;
use crate::{decode, encode};
use kd_proto::v1::{self, movq_server::MovqServer};
use kd_runtime::microbatch::{BatchContext, Item, Policy};
use kd_runtime::{Call, Cancel, MicroBatcher, ServiceError, Stage};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// A decode waiting to share a decoder call.
type Job = (Arc<Movq>, decode::Checked);

/// The gRPC service.
#[derive(Clone)]
pub struct MovqService {
    stage: Stage<Movq>,
    batcher: MicroBatcher<Job, v1::DecodeLatentsResponse>,
}

impl MovqService {
    /// The service over `stage`; concurrent decodes share decoder calls under `batching`
    /// (`None`: each alone).
    pub fn new(stage: Stage<Movq>, batching: Option<Policy>) -> MovqServer<Self> {
        let batcher = MicroBatcher::start(
            "movq-batcher",
            stage.metrics.clone(),
            batching,
            Arc::new(run_batch),
        );
        MovqServer::new(Self { stage, batcher })
    }
}

/// Decodes of one class in one decoder call.
fn run_batch(
    items: Vec<Item<Job>>,
    ctx: &mut dyn BatchContext<Job>,
) -> Vec<Result<v1::DecodeLatentsResponse, ServiceError>> {
    let Some(m) = items.first().map(|i| i.job.0.clone()) else {
        return Vec::new();
    };
    let decodes = items.into_iter().map(|i| (i.job.1, i.cancel)).collect();
    decode::decode_batch(&m, decodes, &|| ctx.should_stop())
}

#[tonic::async_trait]
impl v1::movq_server::Movq for MovqService {
    async fn decode_latents(
        &self,
        request: Request<v1::DecodeLatentsRequest>,
    ) -> Result<Response<v1::DecodeLatentsResponse>, Status> {
        let call = Call::of(&request);
        let req = request.into_inner();
        let deadline = call.deadline;
        let batcher = self.batcher.clone();
        let check = |m: &Movq| decode::check(m, &req, deadline);
        let run = |m: Arc<Movq>, checked: decode::Checked, cancel: Cancel| async move {
            let (class, rows) = (checked.class(), checked.rows());
            batcher.submit((m, checked), class, rows, &cancel).await
        };
        self.stage.unary("DecodeLatents", call, check, run).await
    }

    async fn encode_images(
        &self,
        request: Request<v1::EncodeImagesRequest>,
    ) -> Result<Response<v1::EncodeImagesResponse>, Status> {
        let call = Call::of(&request);
        let req = request.into_inner();
        let deadline = call.deadline;
        let batcher = self.batcher.clone();
        let check = move |m: &Movq| encode::check(m, req, deadline);
        let run = |m: Arc<Movq>, checked, cancel: Cancel| async move {
            batcher
                .alone(&cancel, move |c| encode::encode(&m, checked, c))
                .await
        };
        self.stage.unary("EncodeImages", call, check, run).await
    }
}
