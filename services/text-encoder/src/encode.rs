//! `Encode`: prompts → CLIP text conditioning for the prior (and, for Kandinsky 2.1, the
//! multilingual conditioning of the decoder), plus the CLIP token ids. A Kandinsky 2.0 folder
//! answers with its two encoders' outputs (`decoder_conditioning`: M-CLIP,
//! `decoder_conditioning_2`: mT5) and the XLM-R ids; no prior conditioning.
//!
//! Prompts longer than 77 tokens are truncated, as diffusers' tokenizer call does; only the
//! character length is bounded ([`MAX_PROMPT_CHARS`]), to bound tokenisation work.

use crate::model::{Encoders, TextModel};
use crate::MAX_PROMPT_CHARS;
use candle_core::{DType, Device, Tensor};
use kd_models::clip::TokenizedBatch;
use kd_models::kd20::Kd20TextEncoders;
use kd_proto::tensor::{select_rows, text_embeddings_rows};
use kd_proto::{to_wire, v1};
use kd_runtime::cache::CacheKey;
use kd_runtime::microbatch::{shared_failure, BatchContext, Item};
use kd_runtime::ServiceError;
use std::sync::Arc;

/// Checks the prompt list: 1..=`max_batch` prompts of at most [`MAX_PROMPT_CHARS`] characters.
pub fn validate(prompts: &[String], max_batch: usize) -> Result<(), ServiceError> {
    if prompts.is_empty() || prompts.len() > max_batch {
        return Err(ServiceError::invalid(
            "prompts",
            format!(
                "{} prompts, allowed 1..={max_batch} per call (the empty string is the unconditional prompt)",
                prompts.len()
            ),
        ));
    }
    if let Some((i, p)) = prompts
        .iter()
        .enumerate()
        .find(|(_, p)| p.chars().count() > MAX_PROMPT_CHARS)
    {
        return Err(ServiceError::invalid(
            "prompts",
            format!(
                "prompts[{i}] has {} characters, allowed at most {MAX_PROMPT_CHARS} (CLIP keeps only the first 77 tokens)",
                p.chars().count()
            ),
        ));
    }
    Ok(())
}

/// A (B, L) i64 tensor of token rows.
fn rows_i64(rows: &[Vec<u32>]) -> Result<Tensor, ServiceError> {
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().map(|&v| i64::from(v)).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), l), &Device::Cpu)?)
}

fn wire(t: &Tensor) -> Result<v1::Tensor, ServiceError> {
    Ok(to_wire(t)?)
}

/// Runs the tokenizer and text tower; every output tensor is encoded for the wire.
pub fn compute(
    model: &TextModel,
    prompts: &[String],
) -> Result<v1::EncodeTextResponse, ServiceError> {
    let (encoder, multilingual) = match &model.encoders {
        Encoders::Clip {
            encoder,
            multilingual,
        } => (encoder, multilingual),
        Encoders::Kd20(e) => return compute_kd20(model, e, prompts),
    };
    let tokens: TokenizedBatch = encoder.tokenize(prompts)?;
    let cond = encoder.encode_tokens(&tokens)?;
    Ok(v1::EncodeTextResponse {
        prior_conditioning: Some(v1::TextEmbeddings {
            text_embeds: Some(wire(&cond.text_embeds)?),
            hidden_states: Some(wire(&cond.hidden_states)?),
            attention_mask: Some(wire(&rows_i64(&tokens.attention_mask)?)?),
        }),
        decoder_conditioning: match multilingual {
            None => None,
            Some(m) => {
                let c = m.encode(prompts)?;
                Some(v1::TextEmbeddings {
                    text_embeds: Some(wire(&c.text_embeds)?),
                    hidden_states: Some(wire(&c.hidden_states)?),
                    attention_mask: Some(wire(&c.mask.to_dtype(DType::I64)?)?),
                })
            }
        },
        input_ids: Some(wire(&rows_i64(&tokens.input_ids)?)?),
        model: Some(model.info.clone()),
        decoder_conditioning_2: None,
    })
}

/// Kandinsky 2.0's `encode_text` for both encoders, as the official pipeline runs them.
fn compute_kd20(
    model: &TextModel,
    encoders: &Kd20TextEncoders,
    prompts: &[String],
) -> Result<v1::EncodeTextResponse, ServiceError> {
    let tokens = encoders.tokenize(prompts)?;
    let c = encoders.encode_tokens(&tokens)?;
    let mask = |m: &Tensor| wire(&m.to_dtype(DType::I64)?);
    Ok(v1::EncodeTextResponse {
        prior_conditioning: None,
        decoder_conditioning: Some(v1::TextEmbeddings {
            text_embeds: Some(wire(&c.pooled1)?),
            hidden_states: Some(wire(&c.full1)?),
            attention_mask: Some(mask(&c.mask1)?),
        }),
        decoder_conditioning_2: Some(v1::TextEmbeddings {
            text_embeds: None,
            hidden_states: Some(wire(&c.full2)?),
            attention_mask: Some(mask(&c.mask2)?),
        }),
        input_ids: Some(wire(&tokens.tokens1.input_ids.to_dtype(DType::I64)?)?),
        model: Some(model.info.clone()),
    })
}

/// One Encode call waiting to share a text-tower call: the model and its prompts.
pub type Job = (Arc<TextModel>, Vec<String>);

/// Encodes the prompts of several concurrent calls in one tokenizer and tower pass (every
/// encoder pads each prompt to the same 77 tokens and attends within its own row) and hands
/// each call its own rows.
pub fn compute_batch(
    items: Vec<Item<Job>>,
    ctx: &mut dyn BatchContext<Job>,
) -> Vec<Result<v1::EncodeTextResponse, ServiceError>> {
    let Some(first) = items.first() else {
        return Vec::new();
    };
    let model = first.job.0.clone();
    let outcome = if ctx.should_stop() {
        Err(ServiceError::Internal(
            "every call of the batch stopped".into(),
        ))
    } else if let [one] = items.as_slice() {
        return vec![compute(&model, &one.job.1)];
    } else {
        let prompts: Vec<String> = items.iter().flat_map(|i| i.job.1.clone()).collect();
        compute(&model, &prompts)
    };
    let when = "while the prompts were encoded";
    let mut start = 0;
    items
        .iter()
        .map(|item| {
            let n = item.job.1.len();
            let rows = outcome
                .as_ref()
                .map_err(|e| shared_failure(&item.cancel, e, when))
                .and_then(|all| response_rows(all, start, n));
            start += n;
            rows
        })
        .collect()
}

/// Rows `start..start + n` of every tensor of an Encode response.
fn response_rows(
    r: &v1::EncodeTextResponse,
    start: usize,
    n: usize,
) -> Result<v1::EncodeTextResponse, ServiceError> {
    let text = |c: &Option<v1::TextEmbeddings>| {
        c.as_ref()
            .map(|c| text_embeddings_rows(c, start, n))
            .transpose()
    };
    Ok(v1::EncodeTextResponse {
        prior_conditioning: text(&r.prior_conditioning)?,
        decoder_conditioning: text(&r.decoder_conditioning)?,
        decoder_conditioning_2: text(&r.decoder_conditioning_2)?,
        input_ids: r
            .input_ids
            .as_ref()
            .map(|t| select_rows(t, start, n))
            .transpose()?,
        model: r.model.clone(),
    })
}

/// The cache key of a prompt list: the weights' revision and every prompt.
pub fn cache_key(model: &TextModel, prompts: &[String]) -> CacheKey {
    let fields: Vec<&[u8]> = prompts.iter().map(|p| p.as_bytes()).collect();
    CacheKey::new(&model.info.revision, "text_encoder", &fields)
}
