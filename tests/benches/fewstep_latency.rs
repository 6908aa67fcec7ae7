//! A few-step student against its teacher through the five services, side by side in one run:
//! the teacher's default (prior 25 + decoder 50 DDPM steps, CFG) against the student's default
//! (prior 25 + its 4 LCM steps, no CFG) and its DRAFT decoder step (prior 25 + 1 step), on the
//! bundled deep decoder (the student is the same folder with an `LCMScheduler` config; its
//! weights are the teacher's, so this measures serving cost, not image quality).
//!
//! `cargo bench -p kd-e2e --bench fewstep_latency` (or `make bench-fewstep`). Settings:
//! `E2E_SIZE` (pixels, default 512), `E2E_RUNS` (default 3). The last line is
//! machine-readable.

use kd_e2e::{Model, Stack};
use kd_proto::v1;
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
    println!(
        "fewstep_latency ratio_4step={:.3} ratio_1step={:.3} teacher_s={:.3} student4_s={:.3} student1_s={:.3}",
        med[1] / med[0],
        med[2] / med[0],
        med[0],
        med[1],
        med[2]
    );
}
