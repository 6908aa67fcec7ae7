//! The `kandinsky.v1.Movq` gRPC service: each RPC is one [`Stage::unary`] call whose model work
//! goes through one [`MicroBatcher`]: concurrent decodes of one latent size share a decoder
//! call; an encode runs alone. With batching off every call runs alone on the blocking pool.

use crate::model::Movq;
use crate::{decode, encode};
use kd_proto::v1::{self, movq_server::MovqServer};
use kd_runtime::microbatch::{Class, Item, Policy};
use kd_runtime::{Call, Cancel, MicroBatcher, ServiceError, Stage};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Model work of one call.
pub(crate) enum Job {
    Decode(Arc<Movq>, decode::Checked),
    Encode(Arc<Movq>, encode::Checked),
}

/// Its answer.
pub(crate) enum Reply {
    Decode(v1::DecodeLatentsResponse),
    Encode(v1::EncodeImagesResponse),
}

/// The gRPC service.
#[derive(Clone)]
pub struct MovqService {
    stage: Stage<Movq>,
    batcher: MicroBatcher<Job, Reply>,
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

/// One batch: an encode (always alone), or decodes of one class in one decoder call.
fn run_batch(items: Vec<Item<Job>>, stop: &dyn Fn() -> bool) -> Vec<Result<Reply, ServiceError>> {
    let mut model = None;
    let mut decodes = Vec::with_capacity(items.len());
    for item in items {
        match item.job {
            Job::Encode(m, checked) => {
                let reply = encode::encode(&m, checked, &item.cancel).map(Reply::Encode);
                return vec![reply];
            }
            Job::Decode(m, checked) => {
                model = Some(m);
                decodes.push((checked, item.cancel));
            }
        }
    }
    let Some(m) = model else {
        return Vec::new();
    };
    decode::decode_batch(&m, decodes, stop)
        .into_iter()
        .map(|r| r.map(Reply::Decode))
        .collect()
}

/// The reply of the other kind of job (the service never sends one).
fn mismatched<T>() -> Result<T, ServiceError> {
    Err(ServiceError::Internal(
        "a call got the reply of another kind of call".into(),
    ))
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
            let (class, rows) = (Class::Shared(checked.class()), checked.rows());
            match batcher
                .submit(Job::Decode(m, checked), class, rows, &cancel)
                .await?
            {
                Reply::Decode(r) => Ok(r),
                Reply::Encode(_) => mismatched(),
            }
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
            match batcher
                .submit(Job::Encode(m, checked), Class::Alone, 1, &cancel)
                .await?
            {
                Reply::Encode(r) => Ok(r),
                Reply::Decode(_) => mismatched(),
            }
        };
        self.stage.unary("EncodeImages", call, check, run).await
    }
}
