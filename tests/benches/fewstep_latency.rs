//! A few-step student against its teacher through the five services, side by side in one run:
//! the teacher's default (prior 25 + decoder 50 DDPM steps, CFG) against the student's default
//! (prior 25 + its 4 LCM steps, no CFG) and its DRAFT decoder step (prior 25 + 1 step), on the
//! bundled deep decoder (the student is the same folder with an `LCMScheduler` config; its
//! weights are the teacher's, so this measures serving cost, not image quality).
//!
//! It also measures what fewer prior steps cost: the relative L2 of the prior's image
//! embeddings at 2, 5 and 10 UnCLIP steps against its 25 (same prompt and seed).
//!
//! `cargo bench -p kd-e2e --bench fewstep_latency` (or `make bench-fewstep`). Settings:
//! `E2E_SIZE` (pixels, default 512), `E2E_RUNS` (default 3). The last line is
//! machine-readable.

use candle_core::{DType, Device};
use kd_e2e::{prior_dir, Model, Stack};
use kd_models::noise::SeededNoise;
use kd_models::prior::{PriorOptions, PriorRequest, PriorStack};
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_testkit::parity::rel_l2;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(size: u32, seed: u64, decoder_steps: Option<u32>) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "a red cat, 4k photo".into(),
        width: Some(size),
        height: Some(size),
        seeds: vec![seed],
        decoder: Some(v1::DecoderParams {
            num_inference_steps: decoder_steps,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Prior steps measured against the 25-step default.
const PRIOR_STEPS: [usize; 3] = [2, 5, 10];

/// Relative L2 of the prior's image embeddings at [`PRIOR_STEPS`] against 25 steps, same
/// prompt and seed, averaged over a few prompts (the bundled random-weight prior).
fn prior_fidelity() -> Vec<f64> {
    let dir = CheckpointDir::open(prior_dir()).unwrap();
    let stack = PriorStack::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let prompts = [
        "a red cat, 4k photo",
        "a lighthouse at dusk",
        "an oil painting of a fox",
    ];
    let embeds = |prompt: &str, seed: u64, steps: usize| {
        let req = PriorRequest {
            prompts: vec![prompt.into()],
            negative_prompts: None,
            options: PriorOptions {
                num_inference_steps: steps,
                ..Default::default()
            },
            latents: None,
        };
        let mut noise = SeededNoise::new(&[seed]);
        stack.generate(&req, &mut noise).unwrap().image_embeds
    };
    PRIOR_STEPS
        .iter()
        .map(|&n| {
            let errs: Vec<f64> = prompts
                .iter()
                .zip(1u64..)
                .map(|(p, seed)| rel_l2(&embeds(p, seed, n), &embeds(p, seed, 25)).unwrap())
                .collect();
            errs.iter().sum::<f64>() / errs.len() as f64
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let (size, runs) = (env("E2E_SIZE", 512) as u32, env("E2E_RUNS", 3));
    let teacher = Stack::start_model(Model::Kandinsky22, &[], &[]).await;
    let student = Stack::start_model(Model::Kandinsky22Student, &[], &[]).await;
    let (mut tc, mut sc) = (teacher.client().await, student.client().await);
    // (label, client, decoder steps); `None` = the model's default.
    let cases: [(&str, bool, Option<u32>); 3] = [
        ("teacher 25+50", false, None),
        ("student 25+4", true, None),
        ("student 25+1", true, Some(1)),
    ];
    let mut times = vec![Vec::new(); cases.len()];
    for round in 0..=runs {
        // Interleaved, so every case sees the same machine load; round 0 warms up.
        for (k, (_, is_student, steps)) in cases.iter().enumerate() {
            let c = if *is_student { &mut sc } else { &mut tc };
            let t = Instant::now();
            c.generate(request(size, 100 + round as u64, *steps))
                .await
                .unwrap();
            if round > 0 {
                times[k].push(t.elapsed().as_secs_f64());
            }
        }
    }
    let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
    println!("{size}x{size}, deep fixture, {runs} runs, median seconds through the services:");
    for ((label, _, _), m) in cases.iter().zip(&med) {
        println!("  {label:<16} {m:8.3} s   teacher/this {:6.2}x", med[0] / m);
    }
    let fidelity = prior_fidelity();
    println!("prior image embeddings against 25 steps (same seed, mean rel L2 over 3 prompts):");
    for (n, e) in PRIOR_STEPS.iter().zip(&fidelity) {
        println!("  {n:>2} steps         {e:.4}");
    }
    println!(
        "fewstep_latency ratio_4step={:.3} ratio_1step={:.3} teacher_s={:.3} student4_s={:.3} student1_s={:.3} prior_rel_l2_2={:.4} prior_rel_l2_5={:.4} prior_rel_l2_10={:.4}",
        med[1] / med[0],
        med[2] / med[0],
        med[0],
        med[1],
        med[2],
        fidelity[0],
        fidelity[1],
        fidelity[2]
    );
}
