//! Step-level batching across requests (`--max-batch-rows`): one loop thread owns the running
//! requests of one shape class (latent height × width) and steps them together, ONE UNet call per
//! step ([`kd_models::decoder::step_runs`]), each request with its own scheduler, step count,
//! timestep, guidance (with or without CFG), seeds and mode. Waiting requests join at every step
//! boundary while their rows fit; finished, cancelled and expired ones leave at once; the others
//! go on unchanged. Admission is FIFO: a request of another shape waits at the head of the queue
//! until the running set drains, and nothing behind it overtakes it, so no request starves.
//!
//! **Fairness bound.** A request waits for admission only behind work that arrived before it
//! (requests running or queued ahead of it); later arrivals never delay it. Once admitted, a
//! request of n steps finishes after exactly n UNet calls, each of at most `max_rows` rows. So
//! from its admission its latency is at most its solo time × t(max_rows) / t(its rows), where
//! t(r) is one UNet call on r rows (`kd_step_seconds`; on a GPU t is nearly flat in r, on a CPU
//! at most linear). Tested at the loop level (calls counted, with and without a stream of later
//! requests).

use crate::denoise::{preview_latents, send_progress};
use crate::model::DecoderModel;
use crate::request::Plan;
use candle_core::Tensor;
use kd_models::decoder::{step_runs, DecoderRun};
use kd_models::noise::{NoiseSource, SeededNoise};
use kd_models::schedulers::Scheduler;
use kd_proto::v1::DenoiseEvent;
use kd_runtime::{Metrics, ServiceError, Sink};
use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// One request handed to the loop.
struct Job {
    queued: std::time::Instant,
    plan: Plan,
    sink: Sink<DenoiseEvent>,
    done: oneshot::Sender<Result<Tensor, ServiceError>>,
}

/// A request the loop is running.
struct Running {
    run: DecoderRun,
    scheduler: Box<dyn Scheduler>,
    noise: SeededNoise,
    sink: Sink<DenoiseEvent>,
    done: oneshot::Sender<Result<Tensor, ServiceError>>,
    preview_every: usize,
    shape: (usize, usize),
}

/// The handle of the batching loop.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the loop over `model`: at most `max_rows` UNet rows per call (a request larger
    /// than that runs alone); a new request waits up to `wait` for companions when nothing runs.
    pub fn start(
        model: Arc<DecoderModel>,
        metrics: Metrics,
        max_rows: usize,
        wait: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("denoise-batcher".into())
            .spawn(move || run_loop(&model, &metrics, max_rows.max(1), wait, rx))
            .expect("spawn the batching thread");
        Self { tx }
    }

    /// Runs `plan` in the shared loop; resolves with its final latents or its error.
    pub async fn denoise(
        &self,
        plan: Plan,
        sink: Sink<DenoiseEvent>,
    ) -> Result<Tensor, ServiceError> {
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Job {
                queued: std::time::Instant::now(),
                plan,
                sink,
                done,
            })
            .map_err(|_| ServiceError::Unavailable("the denoising loop has stopped".into()))?;
        rx.await
            .map_err(|_| ServiceError::Internal("the denoising loop dropped a request".into()))?
    }
}

fn rows(plan: &Plan) -> usize {
    let images = plan.seeds.len();
    if plan.guidance_scale > 1.0 {
        2 * images
    } else {
        images
    }
}

fn run_loop(
    model: &DecoderModel,
    metrics: &Metrics,
    max_rows: usize,
    wait: Duration,
    rx: mpsc::Receiver<Job>,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut running: Vec<Running> = Vec::new();
    loop {
        // Idle: block for work, then give companions `wait` to arrive.
        if running.is_empty() && queue.is_empty() {
            match rx.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
            std::thread::sleep(wait);
        }
        queue.extend(rx.try_iter());
        admit(model, metrics, max_rows, &mut queue, &mut running);
        if running.is_empty() {
            continue;
        }
        step(model, metrics, &mut running);
    }
}

/// Moves queued requests into the running set, FIFO, while their rows fit and their shape is
/// the running set's; a request that fails to start gets its error.
fn admit(
    model: &DecoderModel,
    metrics: &Metrics,
    max_rows: usize,
    queue: &mut VecDeque<Job>,
    running: &mut Vec<Running>,
) {
    while let Some(job) = queue.front() {
        let shape = (job.plan.height, job.plan.width);
        let used: usize = running.iter().map(|r| r.run.rows()).sum();
        let fits =
            running.is_empty() || (running[0].shape == shape && used + rows(&job.plan) <= max_rows);
        if !fits {
            return;
        }
        let job = queue.pop_front().expect("front exists");
        let Job {
            queued,
            mut plan,
            sink,
            done,
        } = job;
        metrics.batch_wait(&format!("{}x{}", shape.0, shape.1), queued.elapsed());
        let mut noise = SeededNoise::new(&plan.seeds);
        match DecoderRun::start(
            &model.unet,
            plan.scheduler.as_mut(),
            &plan.inputs,
            &mut noise,
        ) {
            Ok(run) => running.push(Running {
                run,
                scheduler: plan.scheduler,
                noise,
                sink,
                done,
                preview_every: plan.preview_every,
                shape,
            }),
            Err(e) => {
                let _ = done.send(Err(e.into()));
            }
        }
    }
}

/// One UNet call for every running request, then each request's progress, preview, stop check
/// and, when it finished, its latents.
fn step(model: &DecoderModel, metrics: &Metrics, running: &mut Vec<Running>) {
    // The batched call stops early only when every request in it wants to stop.
    let cancels: Vec<_> = running.iter().map(|r| r.sink.cancel().clone()).collect();
    let stop = || cancels.iter().all(|c| c.should_stop());
    metrics.batch(running.iter().map(|r| r.run.rows()).sum());
    let started = std::time::Instant::now();
    let result = {
        let mut batch: Vec<(&mut DecoderRun, &mut dyn Scheduler, &mut dyn NoiseSource)> = running
            .iter_mut()
            .map(|r| {
                (
                    &mut r.run,
                    r.scheduler.as_mut() as &mut dyn Scheduler,
                    &mut r.noise as &mut dyn NoiseSource,
                )
            })
            .collect();
        step_runs(&model.unet, &mut batch, &stop)
    };
    if let Err(e) = result {
        // The call stopped because every request in it wanted to stop (each leaves with its
        // own reason), or it failed, which fails every request in it.
        let shared = ServiceError::from(e);
        for r in running.drain(..) {
            let err = match r.sink.cancel().check_at("during a denoising step") {
                Err(reason) => reason,
                Ok(()) => shared.clone(),
            };
            let _ = r.done.send(Err(err));
        }
        return;
    }
    metrics.steps(running.len() as u64);
    metrics.batched_step(running.len(), started.elapsed());
    for r in std::mem::take(running) {
        match after_step(model, &r) {
            Ok(false) => running.push(r),
            Ok(true) => {
                let latents = r
                    .run
                    .finish()
                    .map_err(ServiceError::from)
                    .and_then(|l| Ok(l.to_dtype(candle_core::DType::F32)?));
                let _ = r.done.send(latents);
            }
            Err(e) => {
                let _ = r.done.send(Err(e));
            }
        }
    }
}

/// Streams one request's progress (and preview); `Ok(true)` when its last step ran, an error
/// when it must leave (cancelled, deadline passed, its client gone).
fn after_step(model: &DecoderModel, r: &Running) -> Result<bool, ServiceError> {
    let steps = (r.run.steps_done(), r.run.total_steps());
    send_progress(
        steps,
        r.preview_every,
        &|| preview_latents(r.run.preview(), model.movq_scale_factor),
        &r.sink,
    )?;
    Ok(r.run.is_done())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{plan, Limits};
    use clap::Parser;
    use kd_proto::v1;

    fn model_and_limits() -> (DecoderModel, Limits) {
        let dir = kd_testkit::fixtures_dir().join("tiny/kandinsky-2-2-decoder");
        let config =
            crate::Config::try_parse_from(kd_testkit::stage_args("kd-denoiser", &dir, &[]))
                .unwrap();
        let ckpt = kd_models::CheckpointDir::open(&dir).unwrap();
        let model = DecoderModel::load_and_warm(&config.stage, &ckpt, &config.schedule).unwrap();
        let limits = Limits {
            max_batch: 16,
            pixels: config.pixels,
            tensors: Default::default(),
        };
        (model, limits)
    }

    /// What a caller holds while its request runs: its event stream and its cancel guard.
    type Caller = (
        tokio::sync::mpsc::Receiver<Result<DenoiseEvent, tonic::Status>>,
        kd_runtime::cancel::CancelOnDrop,
    );

    /// One image with CFG (two UNet rows), `steps` steps.
    fn job(
        model: &DecoderModel,
        limits: &Limits,
        steps: u32,
        seed: u64,
    ) -> (Job, oneshot::Receiver<Result<Tensor, ServiceError>>, Caller) {
        let embeds = |v: f32| {
            let t = Tensor::full(v, (1, 32), &candle_core::Device::Cpu).unwrap();
            kd_testkit::wire(&t)
        };
        let req = v1::DenoiseRequest {
            conditioning: Some(v1::DecoderConditioning {
                image_embeds: Some(embeds(0.1)),
                ..Default::default()
            }),
            negative_conditioning: Some(v1::DecoderConditioning {
                image_embeds: Some(embeds(-0.2)),
                ..Default::default()
            }),
            height: 64,
            width: 64,
            num_inference_steps: steps,
            guidance_scale: 4.0,
            seeds: vec![seed],
            ..Default::default()
        };
        let (cancel, guard) = kd_runtime::Cancel::new(None);
        let (sink, events) = Sink::channel(64, cancel);
        let (done, rx) = oneshot::channel();
        let job = Job {
            queued: std::time::Instant::now(),
            plan: plan(model, limits, &req).unwrap(),
            sink,
            done,
        };
        // The caller stays: its event stream and its cancel guard live as long as the test.
        (job, rx, (events, guard))
    }

    /// Runs the loop call by call, with room for two CFG images per call: one 4-step request
    /// arrives at every step boundary from the start (a continuous stream of compatible
    /// requests) and a 3-step request A arrives at boundary 2 behind them; with `stream_after`
    /// false the stream stops when A arrives. Returns the calls A was admitted at and finished
    /// at.
    fn simulate(model: &DecoderModel, limits: &Limits, stream_after: bool) -> (usize, usize) {
        const A_ARRIVES: usize = 2;
        let metrics = Metrics::new("test");
        let (mut queue, mut running) = (VecDeque::new(), Vec::new());
        let mut callers = Vec::new();
        let mut a = None;
        let mut admitted_at = None;
        for call in 0..40 {
            if call <= A_ARRIVES || stream_after {
                let (j, done, caller) = job(model, limits, 4, call as u64);
                queue.push_back(j);
                callers.push((done, caller));
            }
            if call == A_ARRIVES {
                let (j, done, caller) = job(model, limits, 3, 999);
                queue.push_back(j);
                a = Some((done, caller));
            }
            admit(model, &metrics, 4, &mut queue, &mut running);
            let rows: usize = running.iter().map(|r| r.run.rows()).sum();
            assert!(rows <= 4, "call {call}: {rows} rows");
            // A is the only 3-step request.
            if admitted_at.is_none() && running.iter().any(|r| r.run.total_steps() == 3) {
                admitted_at = Some(call);
            }
            step(model, &metrics, &mut running);
            if let Some((done, _)) = a.as_mut() {
                if let Ok(result) = done.try_recv() {
                    result.unwrap();
                    return (admitted_at.unwrap(), call);
                }
            }
        }
        panic!("A did not finish in 40 calls");
    }

    #[test]
    fn an_earlier_request_finishes_in_its_own_steps_whatever_arrives_after_it() {
        let (model, limits) = model_and_limits();
        let with_stream = simulate(&model, &limits, true);
        let without = simulate(&model, &limits, false);
        // Later arrivals never delay A ...
        assert_eq!(with_stream, without);
        let (admitted, finished) = with_stream;
        // ... it waits only for the two requests that arrived before it to leave room (calls
        // 0-3 and 1-4 run the first two, call 4 starts the third) ...
        assert_eq!(admitted, 5);
        // ... and then runs exactly its 3 steps, one UNet call each.
        assert_eq!(finished - admitted + 1, 3);
    }
}
