//! `Info`: what this stage has loaded.

use crate::model::PriorModel;
use kd_proto::v1;
use kd_runtime::Stage;
use tonic::{Response, Status};

/// Returns the loaded model's [`v1::ModelInfo`] (UNAVAILABLE while loading).
pub async fn handle(
    stage: &Stage<PriorModel>,
    _req: v1::PriorInfoRequest,
) -> Result<Response<v1::ModelInfo>, Status> {
    stage
        .unary("Info", |m| async move { Ok(m.info.clone()) })
        .await
}
