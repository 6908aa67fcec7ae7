//! The few-step students' schedulers against diffusers 0.42.1 (`tests/fixtures/tiny/reference/
//! fewstep`, made by `tools/reference/gen_fewstep.py`): LCMScheduler and TCDScheduler timesteps
//! for N = 1, 2, 3, 4, 8, 50 and for explicit lists, step sequences with the recorded noise
//! (≤ 1e-5 relative L2), add_noise, and diffusers' refusals with its messages. The whole decoder
//! loop with these schedulers is in `decoder_pipelines.rs`.

use candle_core::Tensor;
use kd_models::config::SchedulerConfig;
use kd_models::noise::ReplayNoise;
use kd_models::schedulers::{self, Scheduler};
use kd_models::ModelError;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::HashMap;
use std::path::PathBuf;

const VARIANTS: [&str; 4] = ["lcm_k22", "lcm_default", "tcd_k22", "tcd_gamma0"];

fn dir() -> PathBuf {
    fixtures_dir().join("tiny/reference/fewstep")
}

struct Variant {
    name: &'static str,
    meta: serde_json::Value,
    refs: HashMap<String, Tensor>,
}

impl Variant {
    fn load(name: &'static str) -> Self {
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir().join(format!("scheduler_{name}.json"))).unwrap(),
        )
        .unwrap();
        let refs = load_reference(dir().join(format!("scheduler_{name}.safetensors"))).unwrap();
        Self { name, meta, refs }
    }

    fn scheduler(&self) -> Box<dyn Scheduler> {
        let cfg: SchedulerConfig = serde_json::from_value(self.meta["config"].clone()).unwrap();
        assert!(cfg.is_consistency(), "{}", self.name);
        let eta = self.meta["eta"].as_f64().unwrap_or(0.0);
        schedulers::from_config(&cfg, eta).unwrap()
    }

    fn ints(&self, key: &str) -> Vec<usize> {
        get(&self.refs, key)
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as usize)
            .collect()
    }

    fn is_lcm(&self) -> bool {
        self.meta["class"] == "LCMScheduler"
    }
}

fn message(e: ModelError) -> String {
    match e {
        ModelError::InvalidInput { field, message } => format!("{field}: {message}"),
        other => panic!("expected InvalidInput, got {other}"),
    }
}

#[test]
fn timesteps_match_for_every_n_and_every_explicit_list() {
    for name in VARIANTS {
        let v = Variant::load(name);
        let mut s = v.scheduler();
        for n in v.meta["num_inference_steps_valid"].as_array().unwrap() {
            let n = n.as_u64().unwrap() as usize;
            s.set_timesteps(n).unwrap();
            assert_eq!(
                s.timesteps(),
                v.ints(&format!("timesteps_n{n}")),
                "{name} N={n}"
            );
        }
        for (list, ts) in v.meta["custom_timesteps"].as_object().unwrap() {
            let ts: Vec<usize> = serde_json::from_value(ts.clone()).unwrap();
            s.set_custom_timesteps(&ts).unwrap();
            let want = v.ints(&format!("timesteps_custom_{list}"));
            assert_eq!(s.timesteps(), want.as_slice(), "{name} {list}");
        }
    }
}

#[test]
fn step_sequences_match_with_recorded_noise() {
    for name in VARIANTS {
        let v = Variant::load(name);
        for (seq, info) in v.meta["sequences"].as_object().unwrap() {
            let mut s = v.scheduler();
            let schedule = &info["schedule"];
            match schedule.get("timesteps") {
                Some(ts) => s
                    .set_custom_timesteps(
                        &serde_json::from_value::<Vec<usize>>(ts.clone()).unwrap(),
                    )
                    .unwrap(),
                None => s
                    .set_timesteps(schedule["num_inference_steps"].as_u64().unwrap() as usize)
                    .unwrap(),
            }
            let ts = v.ints(&format!("{seq}_timesteps"));
            assert_eq!(s.timesteps(), ts.as_slice(), "{name}/{seq}");
            let drawn = v.ints(&format!("{seq}_noise_drawn"));
            let noise = get(&v.refs, &format!("{seq}_noise"));
            let draws: Vec<Tensor> = (0..ts.len())
                .filter(|&i| drawn[i] != 0)
                .map(|i| noise.get(i).unwrap())
                .collect();
            let mut replay = ReplayNoise::new(draws);
            let outs = get(&v.refs, &format!("{seq}_model_outputs"));
            let mut sample = get(&v.refs, &format!("{seq}_initial_sample")).clone();
            let mut worst = 0f64;
            for (i, &t) in ts.iter().enumerate() {
                let step = s
                    .step(&outs.get(i).unwrap(), t, &sample, &mut replay)
                    .unwrap();
                let want = get(&v.refs, &format!("{seq}_prev_samples")).get(i).unwrap();
                let err = rel_l2(&step.prev_sample, &want).unwrap();
                worst = worst.max(err);
                assert!(err <= 1e-5, "{name}/{seq} step {i}: rel L2 {err:e}");
                if v.is_lcm() {
                    // LCM's second output is the boundary-condition `denoised`, its x0.
                    let d = get(&v.refs, &format!("{seq}_denoised")).get(i).unwrap();
                    let x0 = step.pred_original_sample.as_ref().unwrap();
                    assert_close(&format!("{name}/{seq} step {i} denoised"), x0, &d, 1e-5);
                }
                sample = step.prev_sample;
            }
            assert_eq!(replay.remaining(), 0, "{name}/{seq}: unused draws");
            eprintln!("{name}/{seq}: worst step rel L2 {worst:e}");
        }
    }
}

#[test]
fn add_noise_matches() {
    for name in VARIANTS {
        let v = Variant::load(name);
        let mut s = v.scheduler();
        s.set_timesteps(4).unwrap();
        let (x0, eps) = (
            get(&v.refs, "add_noise_original"),
            get(&v.refs, "add_noise_noise"),
        );
        for (k, t) in v.ints("add_noise_timesteps").into_iter().enumerate() {
            let got = s.add_noise(x0, eps, t).unwrap();
            let want = get(&v.refs, "add_noise_out").get(k).unwrap();
            assert_close(&format!("{name} add_noise t={t}"), &got, &want, 1e-5);
        }
    }
}

#[test]
fn refused_schedules_carry_the_diffusers_messages() {
    for name in VARIANTS {
        let v = Variant::load(name);
        let errors = v.meta["errors"].as_object().unwrap();
        for (case, e) in errors {
            if case == "both" {
                // One API field or the other: checked by `DecoderInputs` and the services.
                continue;
            }
            let mut s = v.scheduler();
            let err = match e.get("timesteps") {
                Some(ts) => {
                    let ts: Vec<usize> = serde_json::from_value(ts.clone()).unwrap();
                    s.set_custom_timesteps(&ts).unwrap_err()
                }
                None => s
                    .set_timesteps(e["num_inference_steps"].as_u64().unwrap() as usize)
                    .unwrap_err(),
            };
            let m = message(err);
            let want = e["message"].as_str().unwrap();
            assert!(
                m.contains(want),
                "{name}/{case}: {m:?} lacks diffusers' {want:?}"
            );
            assert!(
                m.contains("llowed"),
                "{name}/{case}: {m:?} names no allowed values"
            );
        }
        let mut s = v.scheduler();
        let m = message(s.set_custom_timesteps(&[]).unwrap_err());
        assert!(m.starts_with("timesteps: empty"), "{m}");
    }
}

#[test]
fn only_the_consistency_schedulers_take_an_explicit_list() {
    let cfg: SchedulerConfig = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures_dir().join("tiny/kandinsky-2-2-decoder/scheduler/scheduler_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut ddpm = schedulers::from_config(&cfg, 0.0).unwrap();
    let m = message(ddpm.set_custom_timesteps(&[999, 499]).unwrap_err());
    assert!(m.contains("timesteps") && m.contains("LCM and TCD"), "{m}");
    assert_eq!(ddpm.max_inference_steps(), (1000, "num_train_timesteps"));
    let lcm = Variant::load("lcm_k22").scheduler();
    assert_eq!(lcm.max_inference_steps(), (50, "original_inference_steps"));
}

#[test]
fn tcd_gamma_outside_0_1_is_refused() {
    let v = Variant::load("tcd_k22");
    let cfg: SchedulerConfig = serde_json::from_value(v.meta["config"].clone()).unwrap();
    for gamma in [-0.1, 1.5, f64::NAN] {
        let Err(e) = schedulers::from_config(&cfg, gamma) else {
            panic!("gamma {gamma} accepted")
        };
        assert!(message(e).contains("eta"), "{gamma}");
    }
}
