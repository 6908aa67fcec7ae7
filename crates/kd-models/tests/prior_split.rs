//! The split prior — [`ClipTextEncoder`] and [`ImagePrior`] loaded separately, joined only by
//! explicit [`TextConditioning`] tensors (as the text-encoder and prior services are) — against
//! the diffusers reference cases, replaying the recorded noise.

use candle_core::{DType, Device, Tensor};
use kd_models::clip::{decode_image, ClipTextEncoder, TextConditioning};
use kd_models::noise::{ReplayNoise, SeededNoise};
use kd_models::prior::{FusionInput, ImagePrior, SampleParams};
use kd_models::CheckpointDir;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

fn refdir() -> PathBuf {
    fixtures_dir().join("tiny/reference/prior")
}

fn dir() -> CheckpointDir {
    CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-prior")).unwrap()
}

fn text() -> &'static ClipTextEncoder {
    static T: OnceLock<ClipTextEncoder> = OnceLock::new();
    T.get_or_init(|| ClipTextEncoder::load(&dir(), DType::F32, &Device::Cpu).unwrap())
}

fn prior() -> &'static ImagePrior {
    static P: OnceLock<ImagePrior> = OnceLock::new();
    P.get_or_init(|| ImagePrior::load(&dir(), DType::F32, &Device::Cpu).unwrap())
}

fn case(name: &str) -> HashMap<String, Tensor> {
    load_reference(refdir().join(format!("pipeline/{name}.safetensors"))).unwrap()
}

fn replay(refs: &HashMap<String, Tensor>) -> ReplayNoise {
    ReplayNoise::from_stacked(get(refs, "noise")).unwrap()
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_l2(got, want).unwrap();
    eprintln!("{what}: rel L2 {e:e}");
    assert_close(what, got, want, tol);
}

#[test]
fn sample_on_encoder_conditioning_matches_horse_s2() {
    let refs = case("horse_s2");
    let cond = text().encode(&["horse"]).unwrap();
    let uncond = text().encode(&[""]).unwrap();
    // The conditioning the split hands over is what diffusers' prior received ([uncond; cond]).
    let both = TextConditioning::cat(&uncond, &cond).unwrap();
    check(
        "horse_s2.cond.text_embeds",
        &both.text_embeds,
        get(&refs, "cond.text_embeds"),
        1e-4,
    );
    check(
        "horse_s2.cond.hidden_states",
        &both.hidden_states,
        get(&refs, "cond.hidden_states"),
        1e-4,
    );
    let mut noise = replay(&refs);
    let params = SampleParams {
        num_inference_steps: 2,
        guidance_scale: 4.0,
    };
    let out = prior()
        .sample(
            &cond,
            Some(&uncond),
            &params,
            Some(get(&refs, "latents")),
            &mut noise,
        )
        .unwrap();
    assert_eq!(noise.remaining(), 0);
    check(
        "horse_s2.image_embeds",
        &out,
        get(&refs, "image_embeds"),
        1e-3,
    );
}

#[test]
fn one_row_unconditional_is_broadcast_to_the_batch() {
    // batch2_n2_s5: rows [horse, horse, cat, cat], unconditional "" for every row.
    let refs = case("batch2_n2_s5");
    let cond = text()
        .encode(&["horse", "a photo of a cat"])
        .unwrap()
        .repeat_interleave(2)
        .unwrap();
    let uncond = text().encode(&[""]).unwrap();
    let mut noise = replay(&refs);
    let params = SampleParams {
        num_inference_steps: 5,
        guidance_scale: 4.0,
    };
    let out = prior()
        .sample(
            &cond,
            Some(&uncond),
            &params,
            Some(get(&refs, "latents")),
            &mut noise,
        )
        .unwrap();
    assert_eq!(noise.remaining(), 0);
    check(
        "batch2_n2_s5.image_embeds",
        &out,
        get(&refs, "image_embeds"),
        1e-3,
    );
}

#[test]
fn emb2emb_from_explicit_embeds_matches_reference() {
    let refs = case("emb2emb_emb_st05_s5");
    let cond = text().encode(&["horse"]).unwrap();
    let uncond = text().encode(&[""]).unwrap();
    let mut noise = replay(&refs);
    let params = SampleParams {
        num_inference_steps: 5,
        guidance_scale: 4.0,
    };
    let out = prior()
        .emb2emb(
            &cond,
            Some(&uncond),
            get(&refs, "image_embeds_in"),
            0.5,
            &params,
            &mut noise,
        )
        .unwrap();
    assert_eq!(noise.remaining(), 0);
    check(
        "emb2emb_emb_st05_s5.image_embeds",
        &out,
        get(&refs, "image_embeds"),
        1e-3,
    );
}

#[test]
fn fuse_over_explicit_inputs_matches_interpolate_reference() {
    let refs = case("fusion_cat_img_dog_s5");
    let img =
        decode_image(&std::fs::read(refdir().join("image_a_160x96_rgb.png")).unwrap()).unwrap();
    let items = [
        FusionInput::Text(text().encode(&["a cat"]).unwrap()),
        FusionInput::Image(img),
        FusionInput::Text(text().encode(&["a dog"]).unwrap()),
    ];
    let uncond = text().encode(&[""]).unwrap();
    let mut noise = replay(&refs);
    let params = SampleParams {
        num_inference_steps: 5,
        guidance_scale: 4.0,
    };
    let out = prior()
        .fuse(
            &items,
            &[0.3, 0.3, 0.4],
            Some(&uncond),
            &params,
            Some(get(&refs, "latents")),
            &mut noise,
        )
        .unwrap();
    // diffusers' final negative call (4 draws) is not part of the fusion itself.
    assert_eq!(noise.remaining(), 4);
    check(
        "fusion_cat_img_dog_s5.image_embeds",
        &out,
        get(&refs, "image_embeds"),
        1e-3,
    );
}

#[test]
fn zero_image_embed_matches_reference() {
    let refs = load_reference(refdir().join("image_encoder.safetensors")).unwrap();
    check(
        "zero_image_embeds",
        &prior().zero_image_embed().unwrap(),
        get(&refs, "zero_image_embeds"),
        1e-4,
    );
}

#[test]
fn seeded_sampling_is_deterministic_per_row() {
    let cond = text().encode(&["horse", "a photo of a cat"]).unwrap();
    let uncond = text().encode(&[""]).unwrap();
    let params = SampleParams {
        num_inference_steps: 3,
        guidance_scale: 4.0,
    };
    let run = |seeds: &[u64], c: &TextConditioning| {
        prior()
            .sample(
                c,
                Some(&uncond),
                &params,
                None,
                &mut SeededNoise::new(seeds),
            )
            .unwrap()
    };
    let a = run(&[1, 2], &cond);
    let b = run(&[1, 2], &cond);
    assert_eq!(rel_l2(&a, &b).unwrap(), 0.0);
    // Row 1 depends only on its own seed and conditioning.
    let single = run(&[2], &cond.row(1).unwrap());
    assert!(rel_l2(&a.narrow(0, 1, 1).unwrap(), &single).unwrap() < 1e-6);
    let c = run(&[1, 3], &cond);
    assert!(rel_l2(&a.narrow(0, 1, 1).unwrap(), &c.narrow(0, 1, 1).unwrap()).unwrap() > 1e-3);
}

#[test]
fn explicit_inputs_are_validated_with_named_fields() {
    let cond = text().encode(&["horse"]).unwrap();
    let uncond = text().encode(&[""]).unwrap();
    let p = prior();
    let params = SampleParams {
        num_inference_steps: 2,
        guidance_scale: 4.0,
    };
    let mut noise = SeededNoise::new(&[1]);
    let err = |r: kd_models::Result<Tensor>| r.map(|_| ()).unwrap_err().to_string();

    let e = err(p.sample(&cond, None, &params, None, &mut noise));
    assert!(
        e.contains("unconditional") && e.contains("required when guidance_scale > 1"),
        "{e}"
    );
    let two = text().encode(&["a", "b"]).unwrap();
    let three = text().encode(&["a", "b", "c"]).unwrap();
    let e = err(p.sample(&two, Some(&three), &params, None, &mut noise));
    assert!(
        e.contains("unconditional") && e.contains("expected (2, 32)"),
        "{e}"
    );
    let mut bad = cond.clone();
    bad.hidden_states = Tensor::zeros((1, 77, 31), DType::F32, &Device::Cpu).unwrap();
    let e = err(p.sample(&bad, Some(&uncond), &params, None, &mut noise));
    assert!(
        e.contains("conditioning") && e.contains("hidden_states") && e.contains("(1, 77, 32)"),
        "{e}"
    );
    let mut bad = cond.clone();
    bad.mask = (bad.mask * 2.0).unwrap();
    let e = err(p.sample(&bad, Some(&uncond), &params, None, &mut noise));
    assert!(e.contains("mask values must be 0"), "{e}");
    let lat = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    let e = err(p.sample(&cond, Some(&uncond), &params, Some(&lat), &mut noise));
    assert!(
        e.contains("latents") && e.contains("expected (1, 32)"),
        "{e}"
    );
    let one_step = SampleParams {
        num_inference_steps: 1,
        ..params
    };
    let e = err(p.sample(&cond, Some(&uncond), &one_step, None, &mut noise));
    assert!(
        e.contains("num_inference_steps") && e.contains("allowed 2..=1000"),
        "{e}"
    );
    let init = Tensor::zeros((1, 31), DType::F32, &Device::Cpu).unwrap();
    let e = err(p.emb2emb(&cond, Some(&uncond), &init, 1.0, &params, &mut noise));
    assert!(e.contains("init_image_embeds"), "{e}");
    let init = Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap();
    let e = err(p.emb2emb(&cond, Some(&uncond), &init, 0.0, &params, &mut noise));
    assert!(
        e.contains("strength") && e.contains("allowed (0, 1]"),
        "{e}"
    );
    // Guidance ≤ 1 needs no unconditional rows.
    let no_cfg = SampleParams {
        guidance_scale: 1.0,
        ..params
    };
    assert_eq!(
        p.sample(&cond, None, &no_cfg, None, &mut noise)
            .unwrap()
            .dims(),
        [1, 32]
    );
}

/// Runs of several requests stepped together ([`ImagePrior::step_runs`]): their own step counts,
/// guidance scales (with and without CFG), seeds and starts (noise, emb2emb); each ends within
/// 1e-6 of the same request sampled alone, and a run that finished leaves the later calls.
#[test]
fn runs_stepped_together_end_as_each_alone() {
    use kd_models::noise::NoiseSource;
    let p = prior();
    let cond = text().encode(&["horse", "a photo of a cat"]).unwrap();
    let one = text().encode(&["Кот в сапогах"]).unwrap();
    let uncond = text().encode(&[""]).unwrap();
    let params = |steps, g| SampleParams {
        num_inference_steps: steps,
        guidance_scale: g,
    };
    let init = p.zero_image_embed().unwrap().affine(0.5, 0.2).unwrap();
    // (conditioning, params, seeds, emb2emb strength)
    let cases: [(&TextConditioning, SampleParams, Vec<u64>, Option<f64>); 3] = [
        (&cond, params(5, 4.0), vec![1, 2], None),
        (&one, params(3, 1.0), vec![3], None),
        (&one, params(6, 7.5), vec![4], Some(0.5)),
    ];
    let start = |i: usize, noise: &mut dyn NoiseSource| {
        let (c, params, _, strength) = &cases[i];
        match strength {
            None => p.start_sample(c, Some(&uncond), params, None, noise),
            Some(s) => p.start_emb2emb(c, Some(&uncond), &init, *s, params, noise),
        }
        .unwrap()
    };
    let alone: Vec<Tensor> = (0..cases.len())
        .map(|i| {
            let (c, params, seeds, strength) = &cases[i];
            let mut noise = SeededNoise::new(seeds);
            match strength {
                None => p.sample(c, Some(&uncond), params, None, &mut noise),
                Some(s) => p.emb2emb(c, Some(&uncond), &init, *s, params, &mut noise),
            }
            .unwrap()
        })
        .collect();
    let mut noises: Vec<SeededNoise> = cases.iter().map(|c| SeededNoise::new(&c.2)).collect();
    let mut runs: Vec<_> = noises
        .iter_mut()
        .enumerate()
        .map(|(i, n)| start(i, n))
        .collect();
    assert_eq!(
        runs.iter()
            .map(|r| (r.rows(), r.total_steps()))
            .collect::<Vec<_>>(),
        [(4, 5), (1, 3), (2, 3)]
    );
    let mut calls = 0;
    while runs.iter().any(|r| !r.is_done()) {
        let mut batch: Vec<_> = runs
            .iter_mut()
            .zip(noises.iter_mut())
            .map(|(r, n)| (r, n as &mut dyn NoiseSource))
            .collect();
        p.step_runs(&mut batch).unwrap();
        calls += 1;
    }
    assert_eq!(calls, 5, "one call per step of the longest run");
    for (i, (run, want)) in runs.into_iter().zip(&alone).enumerate() {
        let got = p.finish(run).unwrap();
        check(&format!("run {i} stepped together"), &got, want, 1e-6);
    }
}
