//! The `kandinsky.v1.Movq` gRPC service: each RPC is one [`Stage::unary`] call on the blocking
//! pool.

use crate::model::Movq;
use crate::{decode, encode};
use kd_proto::v1::{self, movq_server::MovqServer};
use kd_runtime::{Call, Cancel, Stage};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The gRPC service.
#[derive(Clone)]
pub struct MovqService {
    stage: Stage<Movq>,
}

impl MovqService {
    /// The service over `stage`.
    pub fn new(stage: Stage<Movq>) -> MovqServer<Self> {
        MovqServer::new(Self { stage })
    }
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
        let check = |m: &Movq| decode::check(m, &req, deadline);
        let run = |m: Arc<Movq>, checked, cancel: Cancel| async move {
            cancel
                .run_blocking(move |c| decode::decode(&m, checked, c))
                .await
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
        let check = move |m: &Movq| encode::check(m, req, deadline);
        let run = |m: Arc<Movq>, checked, cancel: Cancel| async move {
            cancel
                .run_blocking(move |c| encode::encode(&m, checked, c))
                .await
        };
        self.stage.unary("EncodeImages", call, check, run).await
    }
}
