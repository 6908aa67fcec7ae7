//! The prior pipelines against the diffusers reference cases
//! (`tests/fixtures/tiny/reference/prior/pipeline/*`), replaying the recorded noise.

use candle_core::{DType, Device, Tensor};
use kd_models::clip::decode_image;
use kd_models::noise::{ReplayNoise, SeededNoise};
use kd_models::prior::{
    Emb2EmbImage, Emb2EmbRequest, FusionItem, FusionOptions, PriorOptions, PriorOutput,
    PriorRequest, PriorStack,
};
use kd_models::CheckpointDir;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

fn refdir() -> PathBuf {
    fixtures_dir().join("tiny/reference/prior")
}

fn stack() -> &'static PriorStack {
    static STACK: OnceLock<PriorStack> = OnceLock::new();
    STACK.get_or_init(|| {
        let dir = CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-prior")).unwrap();
        PriorStack::load(&dir, DType::F32, &Device::Cpu).unwrap()
    })
}

fn case(name: &str) -> (HashMap<String, Tensor>, Value) {
    let refs = load_reference(refdir().join(format!("pipeline/{name}.safetensors"))).unwrap();
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(refdir().join(format!("pipeline/{name}.json"))).unwrap(),
    )
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

fn options(json: &Value) -> PriorOptions {
    PriorOptions {
        num_images_per_prompt: json["num_images_per_prompt"].as_u64().unwrap() as usize,
        num_inference_steps: json["num_inference_steps"].as_u64().unwrap() as usize,
        guidance_scale: json["guidance_scale"].as_f64().unwrap() as f32,
    }
}

fn replay(refs: &HashMap<String, Tensor>) -> ReplayNoise {
    ReplayNoise::from_stacked(get(refs, "noise")).unwrap()
}

fn check_output(
    name: &str,
    out: &PriorOutput,
    refs: &HashMap<String, Tensor>,
    noise: &ReplayNoise,
) {
    assert_eq!(noise.remaining(), 0, "{name}: every recorded draw consumed");
    for (key, got) in [
        ("image_embeds", &out.image_embeds),
        ("negative_image_embeds", &out.negative_image_embeds),
    ] {
        let e = rel_l2(got, get(refs, key)).unwrap();
        eprintln!("{name}.{key}: rel L2 {e:e}");
        assert_close(&format!("{name}.{key}"), got, get(refs, key), 1e-3);
    }
}

#[test]
fn text_to_image_embeds_match_every_reference_case() {
    for name in [
        "horse_s2",
        "horse_s5",
        "horse_neg_s2",
        "batch2_neg_s5",
        "horse_nocfg_s5",
        "batch2_n2_s5",
        "horse_neg_n2_s2",
    ] {
        let (refs, json) = case(name);
        let req = PriorRequest {
            prompts: strings(&json["prompt"]).unwrap(),
            negative_prompts: strings(&json["negative_prompt"]),
            options: options(&json),
            latents: Some(get(&refs, "latents").clone()),
        };
        let mut noise = replay(&refs);
        let out = stack().generate(&req, &mut noise).unwrap();
        check_output(name, &out, &refs, &noise);
    }
}

fn image_a() -> image::DynamicImage {
    decode_image(&std::fs::read(refdir().join("image_a_160x96_rgb.png")).unwrap()).unwrap()
}

#[test]
fn fusion_matches_reference() {
    for name in ["fusion_cat_img_dog_s5", "fusion_neg_s2"] {
        let (refs, json) = case(name);
        let items: Vec<FusionItem> = json["images_and_prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| match v.as_str().unwrap() {
                s if s.starts_with('<') => FusionItem::Image(image_a()),
                s => FusionItem::Text(s.to_string()),
            })
            .collect();
        let weights: Vec<f32> = json["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap() as f32)
            .collect();
        let opts = FusionOptions {
            options: options(&json),
            negative_prior_prompt: json["negative_prior_prompt"].as_str().map(str::to_string),
            negative_prompt: json["negative_prompt"].as_str().unwrap().to_string(),
            latents: Some(get(&refs, "latents").clone()),
        };
        let mut noise = replay(&refs);
        let out = stack()
            .interpolate(&items, &weights, &opts, &mut noise)
            .unwrap();
        check_output(name, &out, &refs, &noise);
    }
}

#[test]
fn emb2emb_matches_reference() {
    for name in [
        "emb2emb_emb_st05_s5",
        "emb2emb_pil_st03_s25",
        "emb2emb_pil_rgba_neg_st05_s5",
        "emb2emb_emb_n2_st03_s25",
    ] {
        let (refs, json) = case(name);
        let image = match json["image"].as_str() {
            Some(s) if s.contains("image_a") => Emb2EmbImage::Images(vec![image_a()]),
            Some(s) if s.contains("image_b") => Emb2EmbImage::Images(vec![decode_image(
                &std::fs::read(refdir().join("image_b_320x256_rgba.png")).unwrap(),
            )
            .unwrap()]),
            _ => Emb2EmbImage::Embeds(get(&refs, "image_embeds_in").clone()),
        };
        let req = Emb2EmbRequest {
            prompts: strings(&json["prompt"]).unwrap(),
            negative_prompts: strings(&json["negative_prompt"]),
            image,
            strength: json["strength"].as_f64().unwrap(),
            options: options(&json),
        };
        let mut noise = replay(&refs);
        let out = stack().emb2emb(&req, &mut noise).unwrap();
        check_output(name, &out, &refs, &noise);
    }
}

#[test]
fn zero_image_embed_is_cached_and_matches_reference() {
    let refs = load_reference(refdir().join("image_encoder.safetensors")).unwrap();
    let a = stack().zero_image_embed().unwrap();
    let b = stack().zero_image_embed().unwrap();
    assert_close(
        "zero_image_embeds",
        &a,
        get(&refs, "zero_image_embeds"),
        1e-4,
    );
    assert_eq!(rel_l2(&a, &b).unwrap(), 0.0);
}

#[test]
fn stack_is_shareable_across_threads() {
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<PriorStack>();
    let req = PriorRequest {
        prompts: vec!["horse".into()],
        negative_prompts: None,
        options: PriorOptions {
            num_inference_steps: 3,
            ..Default::default()
        },
        latents: None,
    };
    let run = |seed| {
        let mut noise = SeededNoise::new(&[seed]);
        stack().generate(&req, &mut noise).unwrap().image_embeds
    };
    let (a, b) = std::thread::scope(|s| {
        let h1 = s.spawn(|| run(7));
        let h2 = s.spawn(|| run(7));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert_eq!(rel_l2(&a, &b).unwrap(), 0.0, "same seed, same result");
    assert_eq!(a.dims(), [1, 32]);
}

fn err_of(r: kd_models::Result<PriorOutput>) -> String {
    r.map(|_| ()).unwrap_err().to_string()
}

#[test]
fn bad_input_gives_clear_errors() {
    let s = stack();
    let mut noise = SeededNoise::new(&[1]);
    let base = PriorRequest {
        prompts: vec!["horse".into()],
        negative_prompts: None,
        options: PriorOptions::default(),
        latents: None,
    };
    // Steps 0.
    let mut r = base.clone();
    r.options.num_inference_steps = 0;
    let e = err_of(s.generate(&r, &mut noise));
    assert!(
        e.contains("num_inference_steps") && e.contains("allowed 2..=1000"),
        "{e}"
    );
    // Latents of the wrong width.
    let mut r = base.clone();
    r.latents = Some(Tensor::zeros((1, 31), DType::F32, &Device::Cpu).unwrap());
    let e = err_of(s.generate(&r, &mut noise));
    assert!(
        e.contains("latents") && e.contains("expected (1, 32)"),
        "{e}"
    );
    // Negative prompts not one per prompt.
    let mut r = base.clone();
    r.negative_prompts = Some(vec!["a".into(), "b".into()]);
    let e = err_of(s.generate(&r, &mut noise));
    assert!(
        e.contains("negative_prompts") && e.contains("one per prompt"),
        "{e}"
    );
    // No prompts.
    let mut r = base.clone();
    r.prompts.clear();
    let e = err_of(s.generate(&r, &mut noise));
    assert!(e.contains("prompts") && e.contains("at least one"), "{e}");

    // Fusion: no items, length mismatch, non-finite weight.
    let opts = FusionOptions::default();
    let e = err_of(s.interpolate(&[], &[], &opts, &mut noise));
    assert!(e.contains("items") && e.contains("at least one"), "{e}");
    let items = [FusionItem::Text("a".into()), FusionItem::Text("b".into())];
    let e = err_of(s.interpolate(&items, &[1.0], &opts, &mut noise));
    assert!(
        e.contains("weights") && e.contains("one weight per item"),
        "{e}"
    );
    let e = err_of(s.interpolate(&items, &[1.0, f32::NAN], &opts, &mut noise));
    assert!(e.contains("weights[1]") && e.contains("finite"), "{e}");

    // Emb2Emb: wrong embedding width, strength out of range or too small for the steps.
    let emb = |d| Emb2EmbRequest {
        prompts: vec!["horse".into()],
        negative_prompts: None,
        image: Emb2EmbImage::Embeds(Tensor::zeros((1, d), DType::F32, &Device::Cpu).unwrap()),
        strength: 0.3,
        options: PriorOptions::default(),
    };
    let e = err_of(s.emb2emb(&emb(31), &mut noise));
    assert!(
        e.contains("image") && e.contains("expected (k ≥ 1, 32)"),
        "{e}"
    );
    let mut r = emb(32);
    r.strength = 1.5;
    let e = err_of(s.emb2emb(&r, &mut noise));
    assert!(
        e.contains("strength") && e.contains("allowed (0, 1]"),
        "{e}"
    );
    r.strength = 0.01;
    let e = err_of(s.emb2emb(&r, &mut noise));
    assert!(
        e.contains("strength") && e.contains("= 0 of 25 steps"),
        "{e}"
    );
    // An exhausted noise source is an error, not a panic.
    let mut empty = ReplayNoise::new([]);
    let e = err_of(s.generate(&base, &mut empty));
    assert!(e.contains("noise"), "{e}");
}

#[test]
fn f16_stack_runs_close_to_the_f32_reference() {
    let dir = CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-prior")).unwrap();
    let s16 = PriorStack::load(&dir, DType::F16, &Device::Cpu).unwrap();
    for name in ["horse_s5", "horse_neg_s2"] {
        let (refs, json) = case(name);
        let req = PriorRequest {
            prompts: strings(&json["prompt"]).unwrap(),
            negative_prompts: strings(&json["negative_prompt"]),
            options: options(&json),
            latents: Some(get(&refs, "latents").clone()),
        };
        let mut noise = replay(&refs);
        let out = s16.generate(&req, &mut noise).unwrap();
        assert_eq!(out.image_embeds.dtype(), DType::F32);
        for (key, got) in [
            ("image_embeds", &out.image_embeds),
            ("negative_image_embeds", &out.negative_image_embeds),
        ] {
            let e = rel_l2(got, get(&refs, key)).unwrap();
            eprintln!("f16 {name}.{key}: rel L2 {e:e}");
            assert_close(&format!("f16 {name}.{key}"), got, get(&refs, key), 1e-2);
        }
    }
}
