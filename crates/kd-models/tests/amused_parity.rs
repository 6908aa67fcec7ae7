//! aMUSEd parity with diffusers (`tools/reference/gen_amused.py`): the scheduler's steps and
//! `add_noise` with replayed uniform draws (token maps identical), the VQ-GAN's decode from
//! indices and encode to latents (≤ 1e-4 rel L2) and to indices (identical), the text tower's
//! penultimate states (≤ 1e-4), and whole text-to-image / image-to-image / inpainting runs on the
//! tiny and deep checkpoints (every step's token map identical, images ≤ 1e-3).

use candle_core::{DType, Device, Tensor};
use kd_models::amused::{AmusedPipeline, MicroConds, TokenParams, TokenTask};
use kd_models::clip::{ClipTextEncoder, TextHiddenLayer};
use kd_models::interrupt;
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::noise::ReplayNoise;
use kd_models::schedulers::amused::{AmusedScheduler, MaskingSchedule};
use kd_models::CheckpointDir;
use kd_testkit::fixtures_dir;
use kd_testkit::parity::{assert_close, get, load_reference};
use serde_json::Value;
use std::collections::HashMap;

const CHECKPOINTS: [(&str, &str); 2] = [("tiny", "amused-256"), ("deep", "amused-512")];

fn reference(group: &str, name: &str) -> (HashMap<String, Tensor>, Value) {
    let base = fixtures_dir()
        .join(group)
        .join("reference/amused")
        .join(name);
    let refs = load_reference(base.with_extension("safetensors")).unwrap();
    let meta = std::fs::read_to_string(base.with_extension("json"))
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(Value::Null);
    (refs, meta)
}

fn checkpoint(group: &str, name: &str) -> CheckpointDir {
    CheckpointDir::open(fixtures_dir().join(group).join(name)).unwrap()
}

/// The recorded uniform draws `draw_0 ..` in order.
fn draws(refs: &HashMap<String, Tensor>) -> ReplayNoise {
    let n = get(refs, "draws").to_vec1::<i64>().unwrap()[0] as usize;
    ReplayNoise::new((0..n).map(|i| get(refs, &format!("draw_{i}")).clone()))
}

fn u32s(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as u32)
        .collect()
}

fn assert_tokens(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let (a, e) = (u32s(actual), u32s(expected));
    let diff = a.iter().zip(&e).filter(|(x, y)| x != y).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} tokens differ", a.len());
}

fn temperature(meta: &Value) -> (f32, f32) {
    match &meta["temperature"] {
        Value::Null => (2.0, 0.0),
        Value::Number(t) => (t.as_f64().unwrap() as f32, 0.01),
        Value::Array(v) => (v[0].as_f64().unwrap() as f32, v[1].as_f64().unwrap() as f32),
        other => panic!("temperature {other}"),
    }
}

#[test]
fn scheduler_steps_and_add_noise_match_diffusers() {
    for name in ["cosine", "linear", "partial"] {
        let (refs, meta) = reference("tiny", &format!("scheduler_{name}"));
        let steps = meta["steps"].as_u64().unwrap() as usize;
        let schedule = MaskingSchedule::parse(meta["masking_schedule"].as_str().unwrap()).unwrap();
        let mask_id = meta["mask_token_id"].as_u64().unwrap() as u32;
        let ratio = meta["starting_mask_ratio"].as_f64().unwrap() as f32;
        let sched = AmusedScheduler::new(mask_id, schedule, steps, temperature(&meta)).unwrap();
        let want_t: Vec<f32> = meta["temperatures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(
            sched.temperatures(),
            want_t.as_slice(),
            "{name}: temperatures"
        );
        let logits = get(&refs, "logits").to_dtype(DType::F32).unwrap();
        let mut noise = draws(&refs);
        let mut sample = get(&refs, "start").clone();
        for i in 0..steps {
            let out = sched
                .step(&logits.get(i).unwrap(), i, &sample, ratio, &mut noise)
                .unwrap();
            assert_tokens(
                &format!("{name} step {i} pred_original_sample"),
                &out.pred_original_sample,
                &get(&refs, "pred_original_sample").get(i).unwrap(),
            );
            assert_tokens(
                &format!("{name} step {i} prev_sample"),
                &out.prev_sample,
                &get(&refs, "prev_sample").get(i).unwrap(),
            );
            sample = out.prev_sample;
        }
        assert_eq!(noise.remaining(), 0, "{name}: every draw consumed");
        let last = get(&refs, "prev_sample").get(steps - 1).unwrap();
        for i in 0..3 {
            let mut n = ReplayNoise::new([get(&refs, &format!("add_noise_{i}_draw")).clone()]);
            let noised = sched.add_noise(&last, i, &mut n).unwrap();
            assert_tokens(
                &format!("{name} add_noise {i}"),
                &noised,
                get(&refs, &format!("add_noise_{i}")),
            );
        }
    }
}

#[test]
fn vq_gan_decodes_indices_and_encodes_to_indices_as_diffusers() {
    for (group, name) in CHECKPOINTS {
        let dir = checkpoint(group, name);
        let vq = VqModel::load(
            &dir.component("vqvae").unwrap(),
            MovqOptions::default(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let (refs, _) = reference(group, "vqvae");
        let decoded = vq
            .decode_indices(get(&refs, "indices"), &interrupt::never)
            .unwrap();
        let err = kd_testkit::parity::rel_l2(&decoded, get(&refs, "decoded")).unwrap();
        eprintln!("{group} VQ decode from indices: rel L2 {err:e}");
        assert_close(
            &format!("{group} decode"),
            &decoded,
            get(&refs, "decoded"),
            1e-4,
        );
        let image = get(&refs, "image");
        let latents = vq.encode(image).unwrap();
        assert_close(
            &format!("{group} encode"),
            &latents,
            get(&refs, "latents"),
            1e-4,
        );
        let indices = vq.encode_indices(image, &interrupt::never).unwrap();
        assert_tokens(
            &format!("{group} encode indices"),
            &indices,
            get(&refs, "encoded_indices"),
        );
    }
}

#[test]
fn vq_gan_refuses_out_of_codebook_indices() {
    let dir = checkpoint("tiny", "amused-256");
    let vq = VqModel::load(
        &dir.component("vqvae").unwrap(),
        MovqOptions::default(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let n = vq.config().num_vq_embeddings as u32;
    let bad = Tensor::full(n, (1, 4, 4), &Device::Cpu).unwrap();
    let err = vq
        .decode_indices(&bad, &interrupt::never)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("indices") && err.contains(&format!("0..{n}")),
        "{err}"
    );
    let flat = Tensor::zeros((4, 4), DType::U32, &Device::Cpu).unwrap();
    let err = vq
        .decode_indices(&flat, &interrupt::never)
        .unwrap_err()
        .to_string();
    assert!(err.contains("(B, h, w)"), "{err}");
}

#[test]
fn text_tower_penultimate_states_match_transformers() {
    let dir = checkpoint("tiny", "amused-256");
    let enc = ClipTextEncoder::load(&dir, DType::F32, &Device::Cpu)
        .unwrap()
        .with_hidden_layer(TextHiddenLayer::Penultimate);
    let (refs, meta) = reference("tiny", "text_encoder");
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let tokens = enc.tokenize(&prompts).unwrap();
    assert_tokens(
        "input_ids",
        &tokens.ids_tensor(&Device::Cpu).unwrap(),
        get(&refs, "input_ids"),
    );
    let out = enc.encode_tokens(&tokens).unwrap();
    assert_close(
        "text_embeds",
        &out.text_embeds,
        get(&refs, "text_embeds"),
        1e-4,
    );
    assert_close(
        "penultimate",
        &out.hidden_states,
        get(&refs, "penultimate"),
        1e-4,
    );
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        Value::Null => Vec::new(),
        other => panic!("prompt {other}"),
    }
}

fn params(meta: &Value) -> TokenParams {
    let f = |k: &str, d: f64| meta[k].as_f64().unwrap_or(d) as f32;
    let crop = &meta["micro_conditioning_crop_coord"];
    TokenParams {
        steps: meta["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: f("guidance_scale", 10.0),
        temperature: temperature(meta),
        micro: MicroConds {
            aesthetic_score: f("micro_conditioning_aesthetic_score", 6.0),
            crop_coord: if crop.is_null() {
                (0.0, 0.0)
            } else {
                (
                    crop[0].as_f64().unwrap() as f32,
                    crop[1].as_f64().unwrap() as f32,
                )
            },
        },
    }
}

fn run_pipeline(group: &str, ckpt: &str, case: &str) {
    let dir = checkpoint(group, ckpt);
    let pipe = AmusedPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let (refs, meta) = reference(group, &format!("pipeline_{case}"));
    let params = params(&meta);
    let prompts = strings(&meta["prompt"]);
    let negative = strings(&meta["negative_prompt"]);
    let text = pipe
        .encode_text(&prompts, &negative, params.guided())
        .unwrap();
    let g = pipe.generator();
    let native = g.native_size();
    let task = match meta["kind"].as_str().unwrap() {
        "text2img" => TokenTask::TextToImage {
            height: native,
            width: native,
        },
        "img2img" => TokenTask::ImageToImage {
            tokens: pipe.encode_image(get(&refs, "init_image")).unwrap(),
            strength: meta["strength"].as_f64().unwrap() as f32,
        },
        "inpaint" => TokenTask::Inpaint {
            tokens: pipe.encode_image(get(&refs, "init_image")).unwrap(),
            mask: get(&refs, "mask").clone(),
            strength: meta["strength"].as_f64().unwrap() as f32,
        },
        other => panic!("kind {other}"),
    };
    let mut noise = draws(&refs);
    let want_steps = get(&refs, "step_tokens");
    let mut seen = Vec::new();
    let tokens = pipe
        .generate_tokens(&text, &task, &params, &mut noise, &mut |done, total, t| {
            seen.push((done, total, t.clone()))
        })
        .unwrap();
    assert_eq!(noise.remaining(), 0, "{group} {case}: every draw consumed");
    assert_eq!(
        seen.len(),
        want_steps.dim(0).unwrap(),
        "{group} {case}: steps"
    );
    for (i, (done, total, t)) in seen.iter().enumerate() {
        assert_eq!((*done, *total), (i + 1, seen.len()));
        assert_tokens(
            &format!("{group} {case} step {i}"),
            t,
            &want_steps.get(i).unwrap(),
        );
    }
    assert_tokens(
        &format!("{group} {case} tokens"),
        &tokens,
        get(&refs, "tokens"),
    );
    let image = pipe.decode(&tokens).unwrap().permute((0, 2, 3, 1)).unwrap();
    let err = kd_testkit::parity::rel_l2(&image, get(&refs, "image")).unwrap();
    eprintln!("{group} {case}: tokens identical, image rel L2 {err:e}");
    assert_close(
        &format!("{group} {case} image"),
        &image,
        get(&refs, "image"),
        1e-3,
    );
}

#[test]
fn tiny_pipelines_match_diffusers() {
    for case in [
        "text2img",
        "text2img_batch",
        "text2img_nocfg",
        "img2img",
        "inpaint",
    ] {
        run_pipeline("tiny", "amused-256", case);
    }
}

#[test]
fn deep_pipelines_match_diffusers() {
    for case in ["text2img", "img2img", "inpaint"] {
        run_pipeline("deep", "amused-512", case);
    }
}

#[test]
fn bad_requests_are_refused_by_field() {
    let dir = checkpoint("tiny", "amused-256");
    let pipe = AmusedPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let text = pipe.encode_text(&["a cat"], &[], true).unwrap();
    let g = pipe.generator();
    let mut noise = kd_models::noise::SeededNoise::new(&[1]);
    let m = g.size_multiple();
    let cases: Vec<(TokenTask, TokenParams, &str)> = vec![
        (
            TokenTask::TextToImage {
                height: m + 1,
                width: m,
            },
            TokenParams::default(),
            "height",
        ),
        (
            TokenTask::TextToImage {
                height: m,
                width: m,
            },
            TokenParams {
                steps: 0,
                ..Default::default()
            },
            "num_inference_steps",
        ),
        (
            TokenTask::TextToImage {
                height: m,
                width: m,
            },
            TokenParams {
                guidance_scale: f32::NAN,
                ..Default::default()
            },
            "guidance_scale",
        ),
        (
            TokenTask::ImageToImage {
                tokens: Tensor::zeros((1, 8, 8), DType::U32, &Device::Cpu).unwrap(),
                strength: 0.05,
            },
            TokenParams::default(),
            "strength",
        ),
        (
            TokenTask::ImageToImage {
                tokens: Tensor::full(10_000u32, (1, 8, 8), &Device::Cpu).unwrap(),
                strength: 0.5,
            },
            TokenParams::default(),
            "tokens",
        ),
        (
            TokenTask::Inpaint {
                tokens: Tensor::zeros((1, 8, 8), DType::U32, &Device::Cpu).unwrap(),
                mask: Tensor::zeros((1, 8, 8), DType::F32, &Device::Cpu).unwrap(),
                strength: 1.0,
            },
            TokenParams::default(),
            "mask",
        ),
    ];
    for (task, params, field) in cases {
        let err = g
            .prepare(&text, &task, &params, &mut noise)
            .unwrap_err()
            .to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let unguided = pipe.encode_text(&["a cat"], &[], false).unwrap();
    let err = g
        .prepare(
            &unguided,
            &TokenTask::TextToImage {
                height: m,
                width: m,
            },
            &TokenParams::default(),
            &mut noise,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("negative_prompt"), "{err}");
}

#[test]
fn seeded_runs_are_deterministic_and_depend_on_the_seed() {
    let dir = checkpoint("tiny", "amused-256");
    let pipe = AmusedPipeline::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let text = pipe.encode_text(&["a cat"], &[], true).unwrap();
    let n = pipe.generator().native_size();
    let task = TokenTask::TextToImage {
        height: n,
        width: n,
    };
    let run = |seed| {
        let mut noise = kd_models::noise::SeededNoise::new(&[seed]);
        u32s(
            &pipe
                .generate_tokens(
                    &text,
                    &task,
                    &TokenParams::default(),
                    &mut noise,
                    &mut |_, _, _| {},
                )
                .unwrap(),
        )
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
    let mask = pipe.generator().mask_token_id();
    assert!(a.iter().all(|&t| t != mask), "no mask token left");
}
