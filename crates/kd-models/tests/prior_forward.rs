//! Parity of `PriorTransformer` and `UnClipScheduler` against the diffusers reference
//! (`tests/fixtures/tiny/reference/prior/{prior_forward,scheduler}.*`).

use candle_core::{DType, Device, Tensor};
use kd_models::config::SchedulerConfig;
use kd_models::noise::ReplayNoise;
use kd_models::prior::transformer::PriorTransformer;
use kd_models::prior::unclip::UnClipScheduler;
use kd_models::{CheckpointDir, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::path::PathBuf;

fn ckpt() -> CheckpointDir {
    CheckpointDir::open(fixtures_dir().join("tiny/kandinsky-2-2-prior")).unwrap()
}
fn refdir() -> PathBuf {
    fixtures_dir().join("tiny/reference/prior")
}

fn prior(dtype: DType) -> PriorTransformer {
    let comp = ckpt().component("prior").unwrap();
    let cfg = comp.prior_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    PriorTransformer::new(&cfg, vb).unwrap()
}

fn scheduler() -> UnClipScheduler {
    match ckpt()
        .component("scheduler")
        .unwrap()
        .scheduler_config()
        .unwrap()
    {
        SchedulerConfig::UnClip(c) => UnClipScheduler::new(&c).unwrap(),
        other => panic!("unexpected scheduler {other:?}"),
    }
}

fn ts(t: &Tensor) -> Vec<f32> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

fn check_forward(dtype: DType, tol: f64) {
    let refs = load_reference(refdir().join("prior_forward.safetensors")).unwrap();
    let p = prior(dtype);
    for (case, masked) in [
        ("t999", true),
        ("t42", true),
        ("t_per_sample", true),
        ("t999_nomask", false),
    ] {
        let mask = get(&refs, "attention_mask");
        let out = p
            .forward(
                get(&refs, "hidden_states"),
                &ts(get(&refs, &format!("{case}.timestep"))),
                get(&refs, "proj_embedding"),
                get(&refs, "encoder_hidden_states"),
                masked.then_some(mask),
            )
            .unwrap();
        let expected = get(&refs, &format!("{case}.predicted_image_embedding"));
        eprintln!(
            "{dtype:?} {case}: rel L2 {:e}",
            rel_l2(&out, expected).unwrap()
        );
        assert_close(case, &out, expected, tol);
    }
    let pp = p
        .post_process_latents(get(&refs, "post_process.input"))
        .unwrap();
    assert_close("post_process", &pp, get(&refs, "post_process.output"), tol);
}

#[test]
fn prior_forward_matches_reference() {
    check_forward(DType::F32, 1e-4);
}

#[test]
fn prior_forward_f16_is_close() {
    check_forward(DType::F16, 1e-2);
}

#[test]
fn prior_forward_bf16_is_close() {
    check_forward(DType::BF16, 1e-2);
}

#[test]
fn prior_rejects_wrong_widths() {
    let refs = load_reference(refdir().join("prior_forward.safetensors")).unwrap();
    let p = prior(DType::F32);
    let bad = Tensor::zeros((2, 31), DType::F32, &Device::Cpu).unwrap();
    let err = p
        .forward(
            &bad,
            &[1.0],
            get(&refs, "proj_embedding"),
            get(&refs, "encoder_hidden_states"),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hidden_states") && err.contains("expected 32"),
        "{err}"
    );
    let err = p
        .forward(
            get(&refs, "hidden_states"),
            &[1.0, 2.0, 3.0],
            get(&refs, "proj_embedding"),
            get(&refs, "encoder_hidden_states"),
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("give 1 or 2"), "{err}");
}

#[test]
fn unclip_schedule_and_timesteps_match_reference() {
    let refs = load_reference(refdir().join("scheduler.safetensors")).unwrap();
    let s = scheduler();
    let betas = Tensor::new(s.betas(), &Device::Cpu).unwrap();
    let acp = Tensor::new(s.alphas_cumprod(), &Device::Cpu).unwrap();
    assert_eq!(
        betas.to_vec1::<f32>().unwrap(),
        get(&refs, "betas").to_vec1::<f32>().unwrap(),
        "betas bit-exact"
    );
    let e = rel_l2(&acp, get(&refs, "alphas_cumprod")).unwrap();
    eprintln!("alphas_cumprod rel L2 {e:e}");
    assert_eq!(
        acp.to_vec1::<f32>().unwrap(),
        get(&refs, "alphas_cumprod").to_vec1::<f32>().unwrap(),
        "alphas_cumprod bit-exact"
    );
    for n in [2usize, 5, 25] {
        let expected: Vec<usize> = get(&refs, &format!("timesteps_n{n}"))
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        assert_eq!(s.timesteps(n).unwrap(), expected, "timesteps n={n}");
    }
    for n in [0usize, 1, 1001] {
        let err = s.timesteps(n).unwrap_err().to_string();
        assert!(
            err.contains("num_inference_steps") && err.contains("allowed 2..=1000"),
            "{err}"
        );
    }
}

#[test]
fn unclip_steps_match_reference() {
    let refs = load_reference(refdir().join("scheduler.safetensors")).unwrap();
    let s = scheduler();
    let cases: [(usize, Option<usize>); 7] = [
        (999, Some(749)),
        (500, Some(458)),
        (250, Some(0)),
        (42, None),
        (1, Some(0)),
        (0, None),
        (749, Some(500)),
    ];
    for (i, (t, prev)) in cases.into_iter().enumerate() {
        let k = |name: &str| format!("step{i}.{name}");
        let mut noise = match refs.get(&k("noise")) {
            Some(z) => ReplayNoise::new([z.clone()]),
            None => ReplayNoise::new([]),
        };
        let out = s
            .step(
                get(&refs, &k("model_output")),
                t,
                get(&refs, &k("sample")),
                prev,
                &mut noise,
            )
            .unwrap();
        assert_eq!(noise.remaining(), 0, "step{i} draws exactly its noise");
        let expected = get(&refs, &k("prev_sample"));
        let e = rel_l2(&out, expected).unwrap();
        eprintln!("step{i}: rel L2 {e:e}");
        assert_close(&k("prev_sample"), &out, expected, 1e-5);
    }
    let noisy = s
        .add_noise(
            get(&refs, "add_noise.original"),
            get(&refs, "add_noise.noise"),
            &[999, 250, 0],
        )
        .unwrap();
    assert_close("add_noise", &noisy, get(&refs, "add_noise.noisy"), 1e-5);
}
