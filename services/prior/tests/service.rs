//! The prior service end to end: a real server on 127.0.0.1:0 over the committed tiny prior
//! fixture, real tonic clients; results compared with the in-process library and the diffusers
//! references.

mod common;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use common::*;
use kd_models::clip::{decode_image, TextConditioning};
use kd_models::noise::SeededNoise;
use kd_models::prior::{FusionInput, SampleParams};
use kd_proto::v1;
use kd_proto::v1::interpolate_item::Item;
use kd_proto::v1::prior_client::PriorClient;
use kd_runtime::microbatch::NoJoins;
use kd_testkit::parity::{assert_close, get, load_reference, rel_l2};
use kd_testkit::{assert_health_lifecycle, scrape, unwire, wire};
use std::time::Duration;
use tonic::Code;

fn horse() -> (TextConditioning, TextConditioning) {
    (
        text().encode(&["horse"]).unwrap(),
        text().encode(&[""]).unwrap(),
    )
}

fn sample_req(
    cond: &TextConditioning,
    uncond: Option<&TextConditioning>,
    steps: u32,
    seeds: &[u64],
) -> v1::SampleRequest {
    v1::SampleRequest {
        conditioning: Some(wire_cond(cond)),
        unconditional: uncond.map(wire_cond),
        num_inference_steps: steps,
        guidance_scale: 4.0,
        seeds: seeds.to_vec(),
        ..Default::default()
    }
}

fn params(steps: usize) -> SampleParams {
    SampleParams {
        num_inference_steps: steps,
        guidance_scale: 4.0,
    }
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let e = rel_l2(got, want).unwrap();
    eprintln!("{what}: rel L2 {e:e}");
    assert_close(what, got, want, tol);
}

#[tokio::test]
async fn health_goes_from_not_serving_to_serving() {
    assert_health_lifecycle(start_gated(&[]).await, SERVICE, |channel| async move {
        // While loading, the API answers UNAVAILABLE.
        let err = PriorClient::new(channel)
            .zero_image_embedding(v1::ZeroImageEmbeddingRequest {})
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    })
    .await;
}

#[tokio::test]
async fn sample_with_explicit_latents_matches_the_library_and_the_reference_conditioning() {
    let server = start(&[]).await;
    let mut client = client(&server).await;

    // 1. Encoder conditioning + the horse_s2 latents: the service equals the library.
    let refs = load_reference(refdir().join("pipeline/horse_s2.safetensors")).unwrap();
    let latents = get(&refs, "latents");
    let (cond, uncond) = horse();
    let mut req = sample_req(&cond, Some(&uncond), 2, &[42]);
    req.latents = Some(wire(latents));
    let resp = client.sample(req).await.unwrap().into_inner();
    let got = unwire(&resp.image_embeds.unwrap());
    let want = library()
        .sample(
            &cond,
            Some(&uncond),
            &params(2),
            Some(latents),
            &mut SeededNoise::new(&[42]),
        )
        .unwrap();
    check("grpc vs library (horse, latents)", &got, &want, 1e-6);
    let model = resp.model.unwrap();
    assert_eq!(model.component, "prior");
    assert_eq!(model.device, "cpu");
    assert_eq!(model.revision.len(), 12);

    // 2. The diffusers conditioning recorded in the fixture ([uncond; cond] rows), sent as is.
    let both = TextConditioning {
        text_embeds: get(&refs, "cond.text_embeds").clone(),
        hidden_states: get(&refs, "cond.hidden_states").clone(),
        mask: get(&refs, "cond.mask").to_dtype(DType::U32).unwrap(),
    };
    let (fx_uncond, fx_cond) = (both.row(0).unwrap(), both.row(1).unwrap());
    let mut req = sample_req(&fx_cond, Some(&fx_uncond), 2, &[42]);
    req.latents = Some(wire(latents));
    let got_fx = unwire(
        &client
            .sample(req)
            .await
            .unwrap()
            .into_inner()
            .image_embeds
            .unwrap(),
    );
    let want_fx = library()
        .sample(
            &fx_cond,
            Some(&fx_uncond),
            &params(2),
            Some(latents),
            &mut SeededNoise::new(&[42]),
        )
        .unwrap();
    check(
        "grpc vs library (fixture conditioning)",
        &got_fx,
        &want_fx,
        1e-6,
    );
    // Same latents and seed, encoder vs diffusers conditioning: the encoder is faithful.
    check("encoder vs fixture conditioning", &got, &got_fx, 1e-4);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn seeds_decide_the_sample() {
    let server = start(&[]).await;
    let client = client(&server).await;
    let cond = text().encode(&["horse", "a photo of a cat"]).unwrap();
    let uncond = text().encode(&[""]).unwrap(); // one row, broadcast to both
    let run = |seeds: Vec<u64>| {
        let mut c = client.clone();
        let req = sample_req(&cond, Some(&uncond), 5, &seeds);
        async move {
            c.sample(req)
                .await
                .unwrap()
                .into_inner()
                .image_embeds
                .unwrap()
        }
    };
    let a = run(vec![7, 8]).await;
    let b = run(vec![7, 8]).await;
    assert_eq!(a.shape, [2, 32]);
    assert_eq!(a.data, b.data, "same seeds, same bytes");
    let c = run(vec![7, 9]).await;
    assert_ne!(a.data, c.data);
    // Row 0 keeps its seed: it is unchanged (to float rounding) when only row 1's seed changes.
    let (ta, tc) = (unwire(&a), unwire(&c));
    let row = |t: &Tensor, i| t.narrow(0, i, 1).unwrap();
    assert!(rel_l2(&row(&ta, 0), &row(&tc, 0)).unwrap() < 1e-6);
    assert!(rel_l2(&row(&ta, 1), &row(&tc, 1)).unwrap() > 1e-3);
    // The library with the same seeds agrees.
    let lib = library()
        .sample(
            &cond,
            Some(&uncond),
            &params(5),
            None,
            &mut SeededNoise::new(&[7, 8]),
        )
        .unwrap();
    check("grpc vs library (seeded, batch 2)", &ta, &lib, 1e-6);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn emb2emb_and_interpolate_match_the_library() {
    let server = start(&[]).await;
    let mut client = client(&server).await;
    let (cond, uncond) = horse();
    let init = Tensor::randn(0f32, 1.0, (1, 32), &Device::Cpu).unwrap();
    let mut req = sample_req(&cond, Some(&uncond), 5, &[3]);
    req.init_image_embeds = Some(wire(&init));
    req.strength = 0.5;
    let got = unwire(
        &client
            .sample(req)
            .await
            .unwrap()
            .into_inner()
            .image_embeds
            .unwrap(),
    );
    let want = library()
        .emb2emb(
            &cond,
            Some(&uncond),
            &init,
            0.5,
            &params(5),
            &mut SeededNoise::new(&[3]),
        )
        .unwrap();
    check("grpc vs library (emb2emb)", &got, &want, 1e-6);

    let png = std::fs::read(refdir().join("image_a_160x96_rgb.png")).unwrap();
    let cat = text().encode(&["a cat"]).unwrap();
    let dog = text().encode(&["a dog"]).unwrap();
    let req = v1::InterpolateRequest {
        items: vec![
            v1::InterpolateItem {
                item: Some(Item::Text(wire_cond(&cat))),
                weight: 0.3,
            },
            v1::InterpolateItem {
                item: Some(Item::Image(png.clone())),
                weight: 0.3,
            },
            v1::InterpolateItem {
                item: Some(Item::Text(wire_cond(&dog))),
                weight: 0.4,
            },
        ],
        unconditional: Some(wire_cond(&uncond)),
        num_inference_steps: 5,
        guidance_scale: 4.0,
        seed: 11,
        options: None,
    };
    let got = unwire(
        &client
            .interpolate(req)
            .await
            .unwrap()
            .into_inner()
            .image_embeds
            .unwrap(),
    );
    let items = [
        FusionInput::Text(cat),
        FusionInput::Image(decode_image(&png).unwrap()),
        FusionInput::Text(dog),
    ];
    let want = library()
        .fuse(
            &items,
            &[0.3, 0.3, 0.4],
            Some(&uncond),
            &params(5),
            None,
            &mut SeededNoise::new(&[11]),
        )
        .unwrap();
    assert_eq!(got.dims(), [1, 32]);
    check("grpc vs library (interpolate)", &got, &want, 1e-6);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn vision_embeddings_match_the_diffusers_reference() {
    let server = start(&[]).await;
    let mut client = client(&server).await;
    let refs = load_reference(refdir().join("image_encoder.safetensors")).unwrap();

    let zero = client
        .zero_image_embedding(v1::ZeroImageEmbeddingRequest {})
        .await
        .unwrap()
        .into_inner();
    check(
        "ZeroImageEmbedding",
        &unwire(&zero.image_embeds.unwrap()),
        get(&refs, "zero_image_embeds"),
        1e-4,
    );

    let png = std::fs::read(refdir().join("image_a_160x96_rgb.png")).unwrap();
    let resp = client
        .embed_images(v1::EmbedImagesRequest {
            images: vec![png],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    check(
        "EncodeImages(image A)",
        &unwire(&resp.image_embeds.unwrap()),
        get(&refs, "image_a_embeds"),
        1e-4,
    );

    let px = get(&refs, "pixel_values_f16");
    let resp = client
        .embed_images(v1::EmbedImagesRequest {
            pixel_values: Some(wire(px)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    check(
        "EncodeImages(pixel_values f16)",
        &unwire(&resp.image_embeds.unwrap()),
        get(&refs, "image_embeds"),
        1e-4,
    );
    server.shutdown().await.unwrap();
}

async fn invalid(
    what: &str,
    r: Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>,
    needles: &[&str],
) {
    let err = r.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    for n in needles {
        assert!(
            err.message().contains(n),
            "{what}: `{n}` not in {}",
            err.message()
        );
    }
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument_naming_the_field() {
    let server = start(&["--max-batch", "2"]).await;
    let mut c = client(&server).await;
    let (cond, uncond) = horse();
    let ok = || sample_req(&cond, Some(&uncond), 2, &[1]);

    let mut r = ok();
    r.num_inference_steps = 1;
    invalid(
        "1 step",
        c.sample(r).await,
        &["`num_inference_steps`", "allowed 2..=1000"],
    )
    .await;
    let mut r = ok();
    r.num_inference_steps = 1001;
    invalid(
        "1001 steps",
        c.sample(r).await,
        &["`num_inference_steps`", "allowed 2..=1000"],
    )
    .await;
    let mut r = ok();
    r.guidance_scale = f32::NAN;
    invalid(
        "NaN guidance",
        c.sample(r).await,
        &["`guidance_scale`", "≥ 0"],
    )
    .await;
    let mut r = ok();
    r.guidance_scale = -1.0;
    invalid(
        "negative guidance",
        c.sample(r).await,
        &["`guidance_scale`"],
    )
    .await;
    let mut r = ok();
    r.seeds = vec![1, 2];
    invalid(
        "seeds",
        c.sample(r).await,
        &["`seeds`", "2 seeds for 1 conditioning rows"],
    )
    .await;
    let mut r = ok();
    r.latents = Some(wire(
        &Tensor::zeros((1, 31), DType::F32, &Device::Cpu).unwrap(),
    ));
    invalid(
        "latents",
        c.sample(r).await,
        &["`latents`", "expected (1, 32)"],
    )
    .await;
    let mut r = ok();
    r.conditioning
        .as_mut()
        .unwrap()
        .hidden_states
        .as_mut()
        .unwrap()
        .data
        .truncate(7);
    invalid(
        "truncated tensor",
        c.sample(r).await,
        &["`conditioning.hidden_states`", "bytes of data"],
    )
    .await;
    let mut r = ok();
    r.conditioning = None;
    invalid(
        "no conditioning",
        c.sample(r).await,
        &["`conditioning`", "required"],
    )
    .await;
    let mut r = ok();
    r.unconditional = None;
    invalid(
        "no unconditional",
        c.sample(r).await,
        &["`unconditional`", "required when guidance_scale > 1"],
    )
    .await;
    let three = text().encode(&["a", "b", "c"]).unwrap();
    let r = sample_req(&three, Some(&uncond), 2, &[1, 2, 3]);
    invalid(
        "too many rows",
        c.sample(r).await,
        &["`conditioning.text_embeds`", "B in 1..=2"],
    )
    .await;
    let mut bad_mask = cond.clone();
    bad_mask.mask = (bad_mask.mask * 2.0).unwrap();
    let r = sample_req(&bad_mask, Some(&uncond), 2, &[1]);
    invalid(
        "mask values",
        c.sample(r).await,
        &["`conditioning.attention_mask`", "0 (padding) or 1"],
    )
    .await;
    let mut r = ok();
    r.init_image_embeds = Some(wire(
        &Tensor::zeros((1, 32), DType::F32, &Device::Cpu).unwrap(),
    ));
    r.strength = 1.5;
    invalid(
        "strength",
        c.sample(r).await,
        &["`strength`", "allowed (0, 1]"],
    )
    .await;
    let mut r = ok();
    r.strength = 0.5;
    invalid(
        "strength without init",
        c.sample(r).await,
        &["`strength`", "without init_image_embeds"],
    )
    .await;
    let mut r = ok();
    r.options = Some(v1::StageOptions {
        dtype: v1::DType::DtypeF16 as i32,
    });
    invalid(
        "dtype",
        c.sample(r).await,
        &["`options.dtype`", "DTYPE_F32"],
    )
    .await;

    invalid(
        "undecodable image",
        c.embed_images(v1::EmbedImagesRequest {
            images: vec![b"not an image".to_vec()],
            ..Default::default()
        })
        .await,
        &["`images[0]`", "PNG, JPEG, WebP"],
    )
    .await;
    invalid(
        "no images",
        c.embed_images(v1::EmbedImagesRequest::default()).await,
        &["`images`"],
    )
    .await;
    let item = |weight: f32, item: Option<Item>| v1::InterpolateItem { item, weight };
    let interp = |items| v1::InterpolateRequest {
        items,
        unconditional: Some(wire_cond(&uncond)),
        num_inference_steps: 2,
        guidance_scale: 4.0,
        seed: 1,
        options: None,
    };
    invalid(
        "empty item",
        c.interpolate(interp(vec![item(1.0, None)])).await,
        &["`items[0]`", "text, image or image_embeds"],
    )
    .await;
    invalid(
        "NaN weight",
        c.interpolate(interp(vec![
            item(1.0, Some(Item::Text(wire_cond(&cond)))),
            item(f32::NAN, Some(Item::Text(wire_cond(&cond)))),
        ]))
        .await,
        &["`items[1].weight`", "finite"],
    )
    .await;
    let two_rows = text().encode(&["a", "b"]).unwrap();
    invalid(
        "two-row text item",
        c.interpolate(interp(vec![item(
            1.0,
            Some(Item::Text(wire_cond(&two_rows))),
        )]))
        .await,
        &["`items[0].text.text_embeds`", "expected (1, 32)"],
    )
    .await;
    // The service still answers afterwards.
    c.sample(ok()).await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn metrics_are_scraped_over_http() {
    let server = start(&[]).await;
    let (cond, uncond) = horse();
    client(&server)
        .await
        .sample(sample_req(&cond, Some(&uncond), 3, &[1]))
        .await
        .unwrap();
    let text = scrape(server.metrics).await;
    for needle in [
        r#"kd_requests_total{method="Sample",stage="prior"} 1"#,
        r#"kd_denoise_steps_total{stage="prior"} 3"#,
        r#"kd_model_load_seconds{stage="prior"}"#,
        r#"kd_in_flight{stage="prior"} 0"#,
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_request_finish() {
    let server = start(&[]).await;
    let (cond, uncond) = horse();
    let mut client = client(&server).await;
    let call = tokio::spawn(async move {
        client
            .sample(sample_req(&cond, Some(&uncond), 1000, &[5]))
            .await
    });
    // Wait until the call is admitted and running.
    let mut running = false;
    for _ in 0..500 {
        if scrape(server.metrics)
            .await
            .contains(r#"kd_in_flight{stage="prior"} 1"#)
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(running, "the request never started");
    assert!(!call.is_finished(), "still in flight when shutdown starts");
    server.trigger_shutdown();
    let triggered = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(120), call)
        .await
        .expect("the in-flight call finishes")
        .unwrap()
        .expect("and succeeds");
    eprintln!(
        "in-flight call finished {:?} after shutdown",
        triggered.elapsed()
    );
    assert_eq!(resp.into_inner().image_embeds.unwrap().shape, [1, 32]);
    server.shutdown().await.expect("then the server exits");
}

#[tokio::test]
async fn a_passed_deadline_stops_sampling_between_steps() {
    // In process: the cancellation token stops a 1000-step sample (~5 s here) soon after its deadline.
    let config = kd_prior::Config::try_parse_from([
        "kd-prior",
        "--model-dir",
        model_dir().to_str().unwrap(),
        "--device",
        "cpu",
    ])
    .unwrap();
    let model = std::sync::Arc::new(kd_prior::PriorModel::load_and_warm(&config.stage).unwrap());
    let (cond, uncond) = horse();
    let metrics = kd_runtime::Metrics::new("prior");
    let start = std::time::Instant::now();
    let (cancel, _guard) = kd_runtime::Cancel::new(Some(start + Duration::from_millis(200)));
    let (no_deadline, _guard2) = kd_runtime::Cancel::new(None);
    // Sampled together with a 3-step request that has no deadline: that one ends as alone.
    let item = |steps, cancel: &kd_runtime::Cancel| {
        let req = sample_req(&cond, Some(&uncond), steps, &[5]);
        let checked = kd_prior::sample::check(&model, &req, 64, None).unwrap();
        kd_runtime::microbatch::Item {
            job: (model.clone(), checked),
            rows: 2,
            cancel: cancel.clone(),
        }
    };
    let items = vec![item(1000, &cancel), item(3, &no_deadline)];
    let mut results = kd_prior::sample::run_batch(items, &mut NoJoins, &metrics).into_iter();
    let err = results.next().unwrap().unwrap_err();
    assert!(
        matches!(err, kd_runtime::ServiceError::DeadlineExceeded(_)),
        "{err}"
    );
    let short = results.next().unwrap().unwrap();
    let alone = kd_prior::sample::run_batch(vec![item(3, &no_deadline)], &mut NoJoins, &metrics);
    assert_eq!(Some(short), alone.into_iter().next().unwrap().ok());
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    // Over gRPC, admitted whatever its estimate: the caller's grpc-timeout ends the call early
    // instead of after 1000 steps.
    let server = common::start(&["--admission-safety", "0"]).await;
    let mut client = client(&server).await;
    let mut request = tonic::Request::new(sample_req(&cond, Some(&uncond), 1000, &[5]));
    request.set_timeout(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let err = client.sample(request).await.unwrap_err();
    assert!(err.code() == Code::DeadlineExceeded, "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn sampling_that_cannot_finish_before_the_deadline_is_refused_at_once() {
    // 1000 steps take seconds here (calibrated at warm-up); a 100 ms deadline cannot hold them.
    let server = common::start(&[]).await;
    let mut client = client(&server).await;
    let (cond, uncond) = horse();
    let mut request = tonic::Request::new(sample_req(&cond, Some(&uncond), 1000, &[5]));
    request.set_timeout(Duration::from_millis(100));
    let err = client.sample(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let m = err.message();
    assert!(
        m.starts_with("deadline exceeded: the request deadline would pass before its work ends")
            && m.contains("prior sampling (1000 steps)"),
        "{m}"
    );
    // Enough time: the same request runs.
    let mut request = tonic::Request::new(sample_req(&cond, Some(&uncond), 20, &[5]));
    request.set_timeout(Duration::from_secs(30));
    client.sample(request).await.unwrap();
    server.shutdown().await.unwrap();
}

/// Micro-batching: three concurrent Sample calls (5 steps with CFG, 3 steps without, 4 steps at
/// guidance 7.5; their own seeds) fill one batch of 5 transformer rows and share its steps; each
/// ends with the embeddings it gets from a prior with batching off, and the metrics show one
/// batch of three requests and 5 + 3 + 4 request-steps.
#[tokio::test]
async fn concurrent_samples_share_transformer_calls_and_end_as_alone() {
    let (cond, uncond) = horse();
    let cat = text().encode(&["a photo of a cat"]).unwrap();
    let mut reqs = vec![
        sample_req(&cond, Some(&uncond), 5, &[11]),
        sample_req(&cat, None, 3, &[12]),
        sample_req(&cat, Some(&uncond), 4, &[13]),
    ];
    reqs[1].guidance_scale = 1.0;
    reqs[2].guidance_scale = 7.5;
    let alone_server = common::start(&["--max-batch-rows", "0"]).await;
    let mut alone = Vec::new();
    for r in &reqs {
        let resp = client(&alone_server).await.sample(r.clone()).await.unwrap();
        alone.push(resp.into_inner().image_embeds.unwrap());
    }
    alone_server.shutdown().await.unwrap();

    let server = common::start(&["--max-batch-rows", "5", "--batch-wait-ms", "5000"]).await;
    let (mut c1, mut c2, mut c3) = (
        client(&server).await,
        client(&server).await,
        client(&server).await,
    );
    let (r1, r2, r3) = tokio::join!(
        c1.sample(reqs[0].clone()),
        c2.sample(reqs[1].clone()),
        c3.sample(reqs[2].clone()),
    );
    for (i, (r, want)) in [r1, r2, r3].into_iter().zip(&alone).enumerate() {
        let got = r.unwrap().into_inner().image_embeds.unwrap();
        let e = rel_l2(&unwire(&got), &unwire(want)).unwrap();
        // Measured 0: the transformer's rows do not see each other.
        assert!(e <= 1e-6, "call {i}: rel L2 {e:e}");
    }
    let text = scrape(server.metrics).await;
    let m = |name: &str| kd_testkit::metric(&text, name, &[]);
    assert_eq!(m("kd_batch_requests_count"), Some(1.0), "{text}");
    assert_eq!(m("kd_batch_requests_sum"), Some(3.0), "{text}");
    assert_eq!(m("kd_batch_size_sum"), Some(5.0), "{text}");
    assert_eq!(m("kd_denoise_steps_total"), Some(12.0), "{text}");
    server.shutdown().await.unwrap();
}

/// Step-level joins: a short request arriving while a long one samples joins its batch at the
/// next step boundary (one batch, two requests), finishes while the long one still runs, with
/// the embeddings it gets alone; the long one, cancelled, leaves at a step boundary and ends the
/// batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_mid_loop_joins_and_leaves_when_done() {
    let server = common::start(&["--admission-safety", "0"]).await;
    let (cond, uncond) = horse();
    // Three rows (six with CFG) so that it outlasts the short one even on a loaded machine.
    let (cond3, uncond3) = (
        cond.repeat_interleave(3).unwrap(),
        uncond.repeat_interleave(3).unwrap(),
    );
    let long = sample_req(&cond3, Some(&uncond3), 1000, &[21, 22, 23]);
    let mut c1 = client(&server).await;
    let long_call = tokio::spawn(async move { c1.sample(long).await });
    let steps =
        || async { kd_testkit::metric_at(server.metrics, "kd_denoise_steps_total", &[]).await };
    let waited = std::time::Instant::now();
    while steps().await == 0.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the long request never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cat = text().encode(&["a photo of a cat"]).unwrap();
    let mut short = sample_req(&cat, None, 3, &[22]);
    short.guidance_scale = 1.0;
    let got = client(&server)
        .await
        .sample(short)
        .await
        .unwrap()
        .into_inner();
    // Had the long request ended before the short one arrived, there would be two batches
    // (checked below).
    let alone = library()
        .sample(
            &cat,
            None,
            &SampleParams {
                num_inference_steps: 3,
                guidance_scale: 1.0,
            },
            None,
            &mut SeededNoise::new(&[22]),
        )
        .unwrap();
    check(
        "joined mid-loop",
        &unwire(got.image_embeds.as_ref().unwrap()),
        &alone,
        1e-6,
    );
    long_call.abort();
    let batches =
        || async { kd_testkit::metric_at(server.metrics, "kd_batch_requests_count", &[]).await };
    let waited = std::time::Instant::now();
    while batches().await == 0.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the batch never ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let text = scrape(server.metrics).await;
    let m = |name: &str| kd_testkit::metric(&text, name, &[]);
    assert_eq!(m("kd_batch_requests_count"), Some(1.0), "one batch: {text}");
    assert_eq!(
        m("kd_batch_wait_seconds_count"),
        Some(2.0),
        "two requests: {text}"
    );
    server.shutdown().await.unwrap();
}
