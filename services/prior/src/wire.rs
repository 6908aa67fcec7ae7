//! Decoding and checking request tensors: every error names the request field it came from
//! (`conditioning.hidden_states`, `items[2].text.attention_mask`, ...) and the allowed values.

use crate::model::PriorModel;
use candle_core::{DType, Device, Tensor};
use kd_models::clip::TextConditioning;
use kd_models::prior::SampleParams;
use kd_proto::{from_wire, to_wire, v1, TensorLimits};
use kd_runtime::ServiceError;

/// Encodes a response tensor as f32 on the wire.
pub fn to_wire_f32(t: &Tensor) -> Result<v1::Tensor, ServiceError> {
    Ok(to_wire(&t.to_dtype(DType::F32)?)?)
}

/// Decodes a required wire tensor onto the CPU.
pub fn tensor(field: &str, t: Option<&v1::Tensor>) -> Result<Tensor, ServiceError> {
    let t = t.ok_or_else(|| ServiceError::invalid(field, "required tensor is missing"))?;
    from_wire(t, &Device::Cpu, &TensorLimits::default()).map_err(|e| ServiceError::tensor(field, e))
}

/// Decodes an optional wire tensor onto the CPU.
pub fn optional_tensor(
    field: &str,
    t: Option<&v1::Tensor>,
) -> Result<Option<Tensor>, ServiceError> {
    t.map(|t| tensor(field, Some(t))).transpose()
}

fn expect_dims(field: &str, t: &Tensor, want: &[usize], shown: &str) -> Result<(), ServiceError> {
    if t.dims() != want {
        return Err(ServiceError::invalid(
            field,
            format!("shape {:?}, expected {shown}", t.dims()),
        ));
    }
    Ok(())
}

/// Decodes text embeddings (as the text-encoder returns them) into a conditioning of `rows` rows
/// (any 1..=`max_rows` when `None`), checking every shape against the loaded prior and the mask
/// values (0/1).
pub fn conditioning(
    field: &str,
    e: &v1::TextEmbeddings,
    model: &PriorModel,
    rows: Option<usize>,
    max_rows: usize,
) -> Result<TextConditioning, ServiceError> {
    let (p, n, d) = (
        model.prior.text_embed_dim(),
        model.prior.num_embeddings(),
        model.prior.embedding_dim(),
    );
    let te_field = format!("{field}.text_embeds");
    let text_embeds = tensor(&te_field, e.text_embeds.as_ref())?;
    let b = match (text_embeds.dims(), rows) {
        ([b, w], Some(r)) if *b == r && *w == p => *b,
        ([b, w], None) if (1..=max_rows).contains(b) && *w == p => *b,
        (dims, _) => {
            let want = rows.map_or(format!("(B, {p}) with B in 1..={max_rows}"), |r| {
                format!("({r}, {p})")
            });
            return Err(ServiceError::invalid(
                te_field,
                format!("shape {dims:?}, expected {want}"),
            ));
        }
    };
    let hs_field = format!("{field}.hidden_states");
    let hidden_states = tensor(&hs_field, e.hidden_states.as_ref())?;
    expect_dims(
        &hs_field,
        &hidden_states,
        &[b, n, d],
        &format!("({b}, {n}, {d})"),
    )?;
    let m_field = format!("{field}.attention_mask");
    let mask = tensor(&m_field, e.attention_mask.as_ref())?;
    expect_dims(&m_field, &mask, &[b, n], &format!("({b}, {n}) i64"))?;
    let mask = mask.to_dtype(DType::I64)?;
    let values: Vec<Vec<i64>> = mask.to_vec2()?;
    if values.iter().flatten().any(|&v| v != 0 && v != 1) {
        return Err(ServiceError::invalid(
            m_field,
            "values must be 0 (padding) or 1 (token)",
        ));
    }
    Ok(TextConditioning {
        text_embeds,
        hidden_states,
        mask: mask.to_dtype(DType::U32)?,
    })
}

/// Checks the guidance scale (finite, ≥ 0; CFG applies iff > 1) and pairs it with the steps
/// (2..=the scheduler's training steps, checked by the scheduler: UnCLIP's schedule divides by
/// N − 1, so it needs at least 2 steps).
pub fn sample_params(steps: u32, guidance_scale: f32) -> Result<SampleParams, ServiceError> {
    if !(guidance_scale.is_finite() && guidance_scale >= 0.0) {
        return Err(ServiceError::invalid(
            "guidance_scale",
            format!("{guidance_scale}, allowed a finite number ≥ 0 (CFG applies iff > 1)"),
        ));
    }
    Ok(SampleParams {
        num_inference_steps: steps as usize,
        guidance_scale,
    })
}
