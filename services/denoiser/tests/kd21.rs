//! The denoiser serving a Kandinsky 2.1 decoder folder: the multilingual text conditioning
//! travels over gRPC and the final latents match diffusers' `KandinskyPipeline`
//! (`tests/fixtures/kd21/reference/pipeline_text2img_*`); bad text conditioning is refused by name.

mod common;

use candle_core::Tensor;
use common::*;
use kd_proto::v1;
use kd_testkit::parity::{get, load_reference, rel_l2};
use kd_testkit::{fixtures_dir, unwire, wire};
use std::collections::HashMap;
use std::path::PathBuf;
use tonic::Code;

fn kd21() -> PathBuf {
    fixtures_dir().join("kd21/kandinsky-2-1")
}

fn reference(name: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures_dir().join("kd21/reference");
    let r = load_reference(dir.join(format!("{name}.safetensors"))).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    (r, meta)
}

/// Rows `[start, start + len)` of a reference tensor.
fn rows(r: &HashMap<String, Tensor>, key: &str, start: usize, len: usize) -> v1::Tensor {
    wire(&get(r, key).narrow(0, start, len).unwrap())
}

/// The request diffusers' run amounts to: B = prompts × images rows; the stored text tensors
/// are `[negative…, positive…]`.
fn request_of(r: &HashMap<String, Tensor>, meta: &serde_json::Value) -> v1::DenoiseRequest {
    let n = meta["num_images_per_prompt"].as_u64().unwrap() as usize;
    let per_image = |key: &str| wire(&get(r, key).repeat_interleave_rows(n).expect("repeat rows"));
    let b = get(r, "latents").dim(0).unwrap();
    let text = |start| v1::DecoderConditioning {
        text_embeds: Some(rows(r, "text_embeds", start, b)),
        text_hidden_states: Some(rows(r, "text_hidden_states", start, b)),
        text_attention_mask: Some(rows(r, "text_attention_mask", start, b)),
        ..Default::default()
    };
    v1::DenoiseRequest {
        conditioning: Some(v1::DecoderConditioning {
            image_embeds: Some(per_image("image_embeds")),
            ..text(b)
        }),
        negative_conditioning: Some(v1::DecoderConditioning {
            image_embeds: Some(per_image("negative_image_embeds")),
            ..text(0)
        }),
        height: meta["height"].as_u64().unwrap() as u32,
        width: meta["width"].as_u64().unwrap() as u32,
        num_inference_steps: meta["num_inference_steps"].as_u64().unwrap() as u32,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap() as f32,
        seeds: (0..b as u64).collect(),
        latents: Some(wire(get(r, "latents"))),
        ..Default::default()
    }
}

trait RepeatRows {
    fn repeat_interleave_rows(&self, n: usize) -> candle_core::Result<Tensor>;
}

impl RepeatRows for Tensor {
    fn repeat_interleave_rows(&self, n: usize) -> candle_core::Result<Tensor> {
        let mut rows = Vec::new();
        for i in 0..self.dim(0)? {
            let row = self.narrow(0, i, 1)?;
            rows.extend(std::iter::repeat_n(row, n));
        }
        Tensor::cat(&rows, 0)
    }
}

#[tokio::test]
async fn text2img_over_grpc_matches_diffusers_with_the_checkpoint_ddim() {
    let server = start(&kd21()).await;
    let mut c = client(&server).await;
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
    assert_eq!(info.family, v1::ModelFamily::Kandinsky21 as i32);
    for name in [
        "pipeline_text2img_ddim_2",
        "pipeline_text2img_ddim_3_batch2_n2",
    ] {
        let (r, meta) = reference(name);
        // Unspecified scheduler = the checkpoint's DDIM, the 2.1 default.
        let req = request_of(&r, &meta);
        let (progress, latents) = collect(&mut c, req).await.unwrap();
        assert_eq!(progress.len(), meta["steps_run"].as_u64().unwrap() as usize);
        let err = rel_l2(&unwire(&latents), get(&r, "final_latents")).unwrap();
        eprintln!("{name}: gRPC final latents vs diffusers rel L2 {err:e}");
        assert!(err <= 1e-3, "{name}: rel L2 {err}");
    }
}

#[tokio::test]
async fn missing_or_misshapen_text_conditioning_is_refused_by_name() {
    let server = start(&kd21()).await;
    let mut c = client(&server).await;
    let (r, meta) = reference("pipeline_text2img_ddim_2");
    let good = request_of(&r, &meta);
    let expect = |e: tonic::Status, field: &str, also: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(also),
            "{field}: {}",
            e.message()
        );
    };

    // A 2.2-style request (image embeddings only).
    let mut req = good.clone();
    let cond = req.conditioning.as_mut().unwrap();
    cond.text_embeds = None;
    cond.text_hidden_states = None;
    cond.text_attention_mask = None;
    let e = collect(&mut c, req).await.unwrap_err();
    expect(e, "conditioning.text_embeds", "Kandinsky 2.1");

    // Hidden states of the wrong width (the UNet's encoder_hid_dim is 48).
    let mut req = good.clone();
    req.conditioning.as_mut().unwrap().text_hidden_states = Some(wire(
        &Tensor::zeros(
            (1, 77, 32),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    ));
    let e = collect(&mut c, req).await.unwrap_err();
    expect(e, "conditioning.text_hidden_states", "48");

    // Text embeddings without hidden states.
    let mut req = good.clone();
    req.conditioning.as_mut().unwrap().text_hidden_states = None;
    let e = collect(&mut c, req).await.unwrap_err();
    expect(e, "conditioning.text_hidden_states", "required");

    // CFG without the negative prompt's encoding.
    let mut req = good.clone();
    let neg = req.negative_conditioning.as_mut().unwrap();
    neg.text_embeds = None;
    neg.text_hidden_states = None;
    let e = collect(&mut c, req).await.unwrap_err();
    expect(e, "negative_conditioning.text_embeds", "guidance_scale > 1");

    // A mask that does not match the hidden states.
    let mut req = good.clone();
    req.conditioning.as_mut().unwrap().text_attention_mask = Some(wire(
        &Tensor::ones((1, 76), candle_core::DType::I64, &candle_core::Device::Cpu).unwrap(),
    ));
    let e = collect(&mut c, req).await.unwrap_err();
    expect(e, "conditioning.text_attention_mask", "(1, 77)");

    // The good request still runs.
    collect(&mut c, good).await.unwrap();
}
