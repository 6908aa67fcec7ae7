//! Every decoder scheduler variant of `tests/fixtures/tiny/reference/decoder/schedulers`:
//! timesteps for every N, the 10-step sequence with the recorded noise, and `add_noise`.

use candle_core::Tensor;
use kd_models::config::SchedulerConfig;
use kd_models::noise::ReplayNoise;
use kd_models::schedulers::{self, Scheduler};
use kd_models::ModelError;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::path::PathBuf;

const VARIANTS: [&str; 12] = [
    "ddpm_hub",
    "ddpm_clip_false",
    "ddpm_trailing",
    "ddpm_linspace",
    "ddpm_offset0",
    "ddpm_scaled_linear",
    "ddpm_learned_range",
    "ddim_test",
    "ddim_offset0",
    "ddim_eta05",
    "dpmpp_2m",
    "dpmpp_2m_from_hub_ddpm",
];

fn dir() -> PathBuf {
    fixtures_dir().join("tiny/reference/decoder/schedulers")
}

fn build(variant: &str) -> (Box<dyn Scheduler>, serde_json::Value) {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join(format!("scheduler_{variant}.json"))).unwrap(),
    )
    .unwrap();
    let cfg: SchedulerConfig = serde_json::from_value(json["config"].clone()).unwrap();
    let eta = json["step_kwargs"]["eta"].as_f64().unwrap_or(0.0);
    (schedulers::from_config(&cfg, eta).unwrap(), json)
}

fn ints(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect()
}

#[test]
fn timesteps_match_for_every_n() {
    for v in VARIANTS {
        let (mut s, json) = build(v);
        let r = load_reference(dir().join(format!("scheduler_{v}.safetensors"))).unwrap();
        for n in json["num_inference_steps_valid"].as_array().unwrap() {
            let n = n.as_u64().unwrap() as usize;
            s.set_timesteps(n).unwrap();
            let want = ints(get(&r, &format!("timesteps_n{n}")));
            assert_eq!(s.timesteps(), want.as_slice(), "{v} N={n}");
        }
    }
}

#[test]
fn dpm_sigmas_and_alphas_cumprod() {
    for v in ["dpmpp_2m", "dpmpp_2m_from_hub_ddpm"] {
        let cfg: SchedulerConfig = {
            let json: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(dir().join(format!("scheduler_{v}.json"))).unwrap(),
            )
            .unwrap();
            serde_json::from_value(json["config"].clone()).unwrap()
        };
        let SchedulerConfig::DpmSolverMultistep(c) = cfg else {
            panic!("{v} is not DPM")
        };
        let r = load_reference(dir().join(format!("scheduler_{v}.safetensors"))).unwrap();
        let mut s = schedulers::DpmSolverMultistepScheduler::new(&c).unwrap();
        for n in [1usize, 2, 10, 25, 50, 100] {
            s.set_timesteps(n).unwrap();
            let got = Tensor::new(s.sigmas(), &candle_core::Device::Cpu).unwrap();
            assert_close(
                &format!("{v} sigmas N={n}"),
                &got,
                get(&r, &format!("sigmas_n{n}")),
                1e-6,
            );
        }
    }
    for v in ["ddpm_hub", "ddpm_scaled_linear"] {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir().join(format!("scheduler_{v}.json"))).unwrap(),
        )
        .unwrap();
        let SchedulerConfig::Ddpm(c) = serde_json::from_value(json["config"].clone()).unwrap()
        else {
            panic!("{v} is not DDPM")
        };
        let s = schedulers::DdpmScheduler::new(&c).unwrap();
        let r = load_reference(dir().join(format!("scheduler_{v}.safetensors"))).unwrap();
        let got = Tensor::new(s.alphas_cumprod(), &candle_core::Device::Cpu).unwrap();
        let err = rel_l2(&got, get(&r, "alphas_cumprod")).unwrap();
        eprintln!("{v} alphas_cumprod rel L2 {err:e}");
        assert!(err <= 1e-6, "{v}: {err:e}");
    }
}

#[test]
fn step_sequences_match_with_recorded_noise() {
    for v in VARIANTS {
        let (mut s, _) = build(v);
        let r = load_reference(dir().join(format!("scheduler_{v}.safetensors"))).unwrap();
        s.set_timesteps(10).unwrap();
        let drawn = get(&r, "step_noise_drawn").to_vec1::<i64>().unwrap();
        let noise = get(&r, "step_noise");
        let draws: Vec<Tensor> = (0..10)
            .filter(|&i| drawn[i] != 0)
            .map(|i| noise.get(i).unwrap())
            .collect();
        let mut replay = ReplayNoise::new(draws);
        let ts = ints(get(&r, "step_timesteps"));
        let outs = get(&r, "step_model_outputs");
        let mut sample = get(&r, "step_initial_sample").clone();
        let mut worst = 0f64;
        for (i, &t) in ts.iter().enumerate() {
            let step = s
                .step(&outs.get(i).unwrap(), t, &sample, &mut replay)
                .unwrap();
            let want = get(&r, "step_prev_samples").get(i).unwrap();
            let err = rel_l2(&step.prev_sample, &want).unwrap();
            worst = worst.max(err);
            assert!(err <= 1e-5, "{v} step {i}: prev_sample rel L2 {err:e}");
            if let Some(x0s) = r.get("step_pred_original_samples") {
                let x0 = step.pred_original_sample.as_ref().unwrap();
                assert_close(&format!("{v} step {i} x0"), x0, &x0s.get(i).unwrap(), 1e-5);
            }
            sample = step.prev_sample;
        }
        assert_eq!(
            replay.remaining(),
            0,
            "{v}: not every recorded draw was consumed"
        );
        eprintln!("{v}: worst step rel L2 {worst:e}");
    }
}

#[test]
fn add_noise_matches() {
    for v in VARIANTS {
        let (mut s, _) = build(v);
        let r = load_reference(dir().join(format!("scheduler_{v}.safetensors"))).unwrap();
        s.set_timesteps(10).unwrap();
        let x0 = get(&r, "add_noise_original");
        let eps = get(&r, "add_noise_noise");
        for (k, t) in ints(get(&r, "add_noise_timesteps")).into_iter().enumerate() {
            let got = s.add_noise(x0, eps, t).unwrap();
            let want = get(&r, "add_noise_out").get(k).unwrap();
            assert_close(&format!("{v} add_noise t={t}"), &got, &want, 1e-5);
        }
    }
}

fn invalid_message(e: ModelError) -> String {
    match e {
        ModelError::InvalidInput { field, message } => format!("{field}: {message}"),
        other => panic!("expected InvalidInput, got {other}"),
    }
}

#[test]
fn bad_step_counts_are_clear_errors() {
    for v in ["ddpm_hub", "ddim_test", "dpmpp_2m"] {
        let (mut s, _) = build(v);
        let m = invalid_message(s.set_timesteps(0).unwrap_err());
        assert!(
            m.contains("num_inference_steps") && m.contains("1 ..= 1000"),
            "{m}"
        );
        let m = invalid_message(s.set_timesteps(1001).unwrap_err());
        assert!(
            m.contains("num_inference_steps") && m.contains("1 ..= 1000"),
            "{m}"
        );
    }
    // leading spacing with steps_offset 1 and N = 1000 would step from t = 1000.
    let (mut s, _) = build("ddpm_hub");
    let m = invalid_message(s.set_timesteps(1000).unwrap_err());
    assert!(m.contains("use fewer steps"), "{m}");
}
