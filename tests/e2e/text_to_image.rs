//! Text-to-image through the gateway and the four stage services over real gRPC.

use kd_e2e::{
    decoder_dir, gateway_client, generate_request, pixels, prior_dir, start_movq, Stack, STEPS,
};
use kd_models::pipeline::{Text2Image, Text2ImageRequest};
use kd_models::prior::SampleParams;
use kd_models::CheckpointDir;
use kd_proto::v1::{self, generate_event::Event};
use kd_runtime::Listeners;
use kd_testkit::metric_at;
use std::time::Duration;
use tonic::Code;

fn request(seeds: &[u64]) -> v1::GenerateRequest {
    generate_request("a red cat, 4k photo", seeds)
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_match_the_in_process_pipeline_and_seeds_decide_images() {
    let stack = Stack::start(&[]).await;
    let mut c = stack.client().await;
    let resp = c.generate(request(&[11, 22])).await.unwrap().into_inner();
    assert_eq!(resp.images.len(), 2);
    // A 2.2 client's request (no model named) is served by the 2.2 model, which it names.
    assert_eq!(resp.model, "kandinsky-2-2");
    assert_eq!(
        resp.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        [11, 22]
    );

    // The same steps in one process give the same bytes.
    let lib = tokio::task::spawn_blocking(|| {
        let p = Text2Image::load(
            &CheckpointDir::open(prior_dir()).unwrap(),
            &CheckpointDir::open(decoder_dir()).unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        p.generate(&Text2ImageRequest {
            prompt: "a red cat, 4k photo".into(),
            negative_prompt: None,
            height: 64,
            width: 64,
            seeds: vec![11, 22],
            prior: SampleParams {
                num_inference_steps: STEPS as usize,
                guidance_scale: 4.0,
            },
            decoder_steps: STEPS as usize,
            decoder_guidance: 4.0,
            decoder_timesteps: None,
            task: Default::default(),
        })
        .unwrap()
    })
    .await
    .unwrap();
    for (i, img) in resp.images.iter().enumerate() {
        let px = pixels(img);
        assert_eq!(px.dimensions(), (64, 64));
        assert!(
            px.as_raw() == lib.images[i].as_raw(),
            "image {i}: services and in-process pipeline differ"
        );
    }

    // Same seeds, same bytes; another seed, another image; each image of a batch equals that
    // image generated alone up to float re-association (±2 levels).
    let again = c.generate(request(&[11, 22])).await.unwrap().into_inner();
    assert_eq!(
        again.images[0].image.as_ref().unwrap().data,
        resp.images[0].image.as_ref().unwrap().data
    );
    let alone = c.generate(request(&[22])).await.unwrap().into_inner();
    assert!(max_diff(&pixels(&alone.images[0]), &pixels(&resp.images[1])) <= 2);
    let other = c.generate(request(&[33])).await.unwrap().into_inner();
    assert!(max_diff(&pixels(&other.images[0]), &pixels(&resp.images[0])) > 20);

    // Random seeds are resolved by the gateway and returned, so the image can be made again.
    let mut random = request(&[]);
    random.num_images = Some(1);
    let r = c.generate(random.clone()).await.unwrap().into_inner();
    random.seeds = vec![r.images[0].seed];
    let replay = c.generate(random).await.unwrap().into_inner();
    assert_eq!(
        replay.images[0].image.as_ref().unwrap().data,
        r.images[0].image.as_ref().unwrap().data
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_reports_every_stage_and_step_then_the_images() {
    let stack = Stack::start(&[]).await;
    let mut c = stack.client().await;
    let mut req = request(&[5]);
    req.output = Some(v1::OutputOptions {
        format: v1::ImageFormat::Jpeg as i32,
        quality: 80,
    });
    req.preview_every = 1;
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    let (mut stages, mut steps, mut previews, mut images, mut done) =
        (vec![], vec![], 0, vec![], false);
    while let Some(ev) = s.message().await.unwrap() {
        match ev.event.unwrap() {
            Event::Progress(p) => {
                let st = v1::Stage::try_from(p.stage).unwrap();
                if stages.last() != Some(&st) {
                    stages.push(st);
                }
                if st == v1::Stage::Denoiser && p.step > 0 {
                    steps.push((p.step, p.total_steps));
                }
            }
            Event::Preview(p) => {
                previews += 1;
                assert_eq!(p.images.len(), 1);
            }
            Event::Image(i) => images.push(i),
            Event::Done(_) => done = true,
        }
    }
    use v1::Stage::*;
    assert_eq!(stages, [Queued, TextEncoder, Prior, Denoiser, Movq]);
    assert_eq!(steps, [(1, STEPS), (2, STEPS), (3, STEPS)]);
    assert_eq!(previews, STEPS as usize);
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].seed, 5);
    let img = images[0].image.as_ref().unwrap();
    assert_eq!(img.format, v1::ImageFormat::Jpeg as i32);
    assert_eq!(image::load_from_memory(&img.data).unwrap().width(), 64);
    assert!(done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overload_is_refused_at_once_and_nothing_accepted_is_lost() {
    let stack = Stack::start(&["--max-concurrency=1", "--max-queue=1"]).await;
    let mut tasks = vec![];
    for i in 0..6 {
        let mut c = stack.client().await;
        let mut req = request(&[i]);
        req.decoder.as_mut().unwrap().num_inference_steps = Some(15);
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(300), c.generate(req)).await
        }));
    }
    let (mut ok, mut exhausted) = (0, 0);
    for t in tasks {
        match t.await.unwrap().expect("no request hangs") {
            Ok(r) => {
                assert_eq!(r.into_inner().images.len(), 1);
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                exhausted += 1;
            }
        }
    }
    assert!(ok >= 2 && exhausted >= 1, "ok {ok}, exhausted {exhausted}");
    let failures = metric_at(
        stack.gateway.metrics,
        "kd_failures_total",
        &[
            ("method", "Generate"),
            ("reason", "overloaded"),
            ("stage", "gateway"),
        ],
    )
    .await;
    assert_eq!(failures as usize, exhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deadline_shorter_than_the_work_stops_the_denoiser() {
    let stack = Stack::start(&[]).await;
    let mut c = stack.client().await;
    let mut req = request(&[1]);
    req.width = Some(256);
    req.height = Some(256);
    req.decoder.as_mut().unwrap().num_inference_steps = Some(500);
    // The deadline travels as `grpc-timeout` (what `set_timeout` sends), without a client-side
    // timer racing the server's answer.
    let mut r = tonic::Request::new(req);
    r.metadata_mut()
        .insert("grpc-timeout", "3S".parse().unwrap());
    let err = c.generate(r).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    // The denoiser stops within a step or so: its step counter stops growing and nothing is in flight.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let steps = metric_at(
        stack.denoiser.metrics,
        "kd_denoise_steps_total",
        &[("stage", "denoiser")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        metric_at(
            stack.denoiser.metrics,
            "kd_denoise_steps_total",
            &[("stage", "denoiser")]
        )
        .await,
        steps
    );
    assert!(steps < 500.0);
    assert_eq!(
        metric_at(
            stack.denoiser.metrics,
            "kd_in_flight",
            &[("stage", "denoiser")]
        )
        .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stage_that_is_down_is_named_and_the_gateway_recovers_when_it_returns() {
    let stack = Stack::start(&[]).await;
    // Replace the movq stage with nothing on a known free address, then bring it back there.
    let movq_listeners = Listeners::loopback().await.unwrap();
    let movq_addr = movq_listeners.grpc.local_addr().unwrap();
    let metrics_addr = movq_listeners.metrics.local_addr().unwrap();
    drop(movq_listeners);
    let stages = [
        stack.text_encoder.grpc,
        stack.prior.grpc,
        stack.denoiser.grpc,
        movq_addr,
    ];
    let gateway = Stack::start_gateway(stages, &[]).await;
    let mut c = gateway_client(&gateway).await;
    let err = c.generate(request(&[1])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("stage movq is unavailable"),
        "{}",
        err.message()
    );

    let grpc = tokio::net::TcpListener::bind(movq_addr).await.unwrap();
    let metrics = tokio::net::TcpListener::bind(metrics_addr).await.unwrap();
    // On the very addresses the gateway was given.
    let mut listeners = Listeners::loopback().await.unwrap();
    (listeners.grpc, listeners.metrics) = (grpc, metrics);
    let _movq = start_movq(listeners).await;
    tokio::time::sleep(Duration::from_secs(3)).await; // the replica's cooldown after failures
    let ok = c.generate(request(&[1])).await.unwrap().into_inner();
    assert_eq!(ok.images.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_drains_an_in_flight_request() {
    let stack = Stack::start(&[]).await;
    let mut c = stack.client().await;
    let mut req = request(&[7]);
    req.decoder.as_mut().unwrap().num_inference_steps = Some(40);
    let mut s = c.generate_stream(req).await.unwrap().into_inner();
    // Wait until the request is in the denoiser, then shut the gateway down.
    loop {
        let ev = s.message().await.unwrap().unwrap();
        if let Some(Event::Progress(p)) = ev.event {
            if p.stage == v1::Stage::Denoiser as i32 && p.step >= 1 {
                break;
            }
        }
    }
    stack.gateway.trigger_shutdown();
    let mut images = 0;
    while let Some(ev) = s.message().await.unwrap() {
        if let Some(Event::Image(_)) = ev.event {
            images += 1;
        }
    }
    assert_eq!(images, 1, "the in-flight request finished during the drain");
    // New connections are refused once the gateway has stopped.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tokio::net::TcpStream::connect(stack.gateway.grpc)
        .await
        .is_err());
}
