//! The Kandinsky 2.1 prior stack (CLIP towers with quick-GELU, the same PriorTransformer and
//! UnCLIP sampler) against diffusers' `KandinskyPriorPipeline` (`tests/fixtures/kd21/reference/prior_*`).

use candle_core::{DType, Device, Tensor};
use kd_models::noise::ReplayNoise;
use kd_models::prior::{PriorOptions, PriorRequest, PriorStack};
use kd_models::CheckpointDir;
use kd_models::ModelFamily;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use serde_json::Value;
use std::collections::HashMap;

fn checkpoint() -> CheckpointDir {
    CheckpointDir::open(fixtures_dir().join("kd21/kandinsky-2-1-prior")).unwrap()
}

fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    let dir = fixtures_dir().join("kd21/reference");
    let refs = load_reference(dir.join(format!("{name}.safetensors"))).unwrap();
    let json =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    (refs, json)
}

fn strings(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => Some(a.iter().map(|s| s.as_str().unwrap().to_string()).collect()),
        other => panic!("not a prompt: {other}"),
    }
}

fn run(stack: &PriorStack, name: &str, tol: f64) {
    let (refs, json) = case(name);
    let req = PriorRequest {
        prompts: strings(&json["prompt"]).unwrap(),
        negative_prompts: strings(&json["negative_prompt"]),
        options: PriorOptions {
            num_images_per_prompt: json["num_images_per_prompt"].as_u64().unwrap() as usize,
            num_inference_steps: json["num_inference_steps"].as_u64().unwrap() as usize,
            guidance_scale: json["guidance_scale"].as_f64().unwrap() as f32,
        },
        latents: Some(get(&refs, "latents").clone()),
    };
    let mut noise = ReplayNoise::from_stacked(get(&refs, "noise")).unwrap();
    let out = stack.generate(&req, &mut noise).unwrap();
    assert_eq!(noise.remaining(), 0, "{name}: every recorded draw consumed");
    for (key, got) in [
        ("image_embeds", &out.image_embeds),
        ("negative_image_embeds", &out.negative_image_embeds),
    ] {
        let e = rel_l2(got, get(&refs, key)).unwrap();
        eprintln!("{name}.{key}: rel L2 {e:e}");
        assert_close(&format!("{name}.{key}"), got, get(&refs, key), tol);
    }
}

#[test]
fn the_folder_is_read_as_kandinsky_2_1() {
    assert_eq!(checkpoint().family(), ModelFamily::Kandinsky21);
}

#[test]
fn prior_pipeline_matches_diffusers() {
    let stack = PriorStack::load(&checkpoint(), DType::F32, &Device::Cpu).unwrap();
    for name in ["prior_ru_s2", "prior_batch2_neg_s5"] {
        run(&stack, name, 1e-3);
    }
}

#[test]
fn f16_prior_stack_runs_close_to_the_f32_reference() {
    let stack = PriorStack::load(&checkpoint(), DType::F16, &Device::Cpu).unwrap();
    run(&stack, "prior_ru_s2", 1e-2);
}
