//! `ZeroImageEmbedding`: the decoder's default negative image embedding — the vision tower on an
//! all-zeros `pixel_values` — computed once at load and cached.

use crate::model::PriorModel;
use crate::wire::to_wire_f32;
use kd_proto::v1;
use kd_runtime::ServiceError;

/// The cached (1, D) zero-image embedding.
pub fn compute(m: &PriorModel) -> Result<v1::ZeroImageEmbeddingResponse, ServiceError> {
    Ok(v1::ZeroImageEmbeddingResponse {
        image_embeds: Some(to_wire_f32(&m.prior.zero_image_embed()?)?),
        model: Some(m.info.clone()),
    })
}
