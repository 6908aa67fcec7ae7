//! Readiness (grpc.health.v1 Check and Watch: NOT_SERVING while loading, then SERVING) and bad
//! inputs (INVALID_ARGUMENT naming the field, counted on /metrics).

mod common;

use common::*;
use kd_proto::v1;
use kd_testkit::{fixtures_dir, health_status, metric, scrape, watch_health, wire};
use std::time::Duration;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn health_is_not_serving_until_loaded_and_warmed_then_serving() {
    // The checkpoint's model_index.json is a FIFO: loading blocks on it until the test writes
    // it, so the NOT_SERVING window is deterministic.
    let ckpt = linked_checkpoint(&tiny(), None);
    let index = ckpt.path().join("model_index.json");
    let st = std::process::Command::new("mkfifo")
        .arg(&index)
        .status()
        .unwrap();
    assert!(st.success());
    let server = start_with(ckpt.path(), &[]).await;
    let ch = server.channel().await;
    for service in ["kandinsky.v1.Denoiser", ""] {
        assert_eq!(
            health_status(&server, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    let mut watch = watch_health(&ch, SERVICE).await;
    let first = watch.next_status(Duration::from_secs(10)).await;
    assert_eq!(first, Some(ServingStatus::NotServing));
    // While loading, the stage answers UNAVAILABLE.
    let mut c = client(&server).await;
    let err = c.denoise(request(1, 1, vec![0])).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let err = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Release the load.
    let content = std::fs::read(tiny().join("model_index.json")).unwrap();
    tokio::task::spawn_blocking(move || std::fs::write(index, content).unwrap())
        .await
        .unwrap();
    let next = watch.next_status(Duration::from_secs(120)).await;
    assert_eq!(next, Some(ServingStatus::Serving), "SERVING within 120 s");
    for service in ["kandinsky.v1.Denoiser", ""] {
        assert_eq!(
            health_status(&server, service).await,
            ServingStatus::Serving
        );
    }
    let text = scrape(server.metrics).await;
    assert!(
        text.contains("kd_model_load_seconds{stage=\"denoiser\"}"),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "kd_failures_total",
            &[("method", "Denoise"), ("reason", "unavailable")]
        )
        .unwrap_or(0.0),
        1.0
    );
    // The warm-up step is not a served step.
    assert_eq!(
        metric(&text, "kd_denoise_steps_total", &[]).unwrap_or(0.0),
        0.0
    );
    let (progress, _) = collect(&mut c, request(1, 1, vec![0])).await.unwrap();
    assert_eq!(progress.len(), 1);

    // Shutdown flips health back and stops the server.
    server.trigger_shutdown();
    if let Some(last) = watch.next_status(Duration::from_secs(10)).await {
        assert_eq!(last, ServingStatus::NotServing);
    }
}

type Edit = Box<dyn Fn(&mut v1::DenoiseRequest)>;

fn t(shape: &[usize], fill: f32) -> v1::Tensor {
    wire(
        &(candle_core::Tensor::ones(shape, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap()
            * fill as f64)
            .unwrap(),
    )
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument_naming_the_field() {
    let server = start(&tiny()).await;
    let mut c = client(&server).await;
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("height", "64..=2048", Box::new(|r| r.height = 100)),
        ("width", "64..=2048", Box::new(|r| r.width = 4096)),
        ("height", "64..=2048", Box::new(|r| r.height = 0)),
        (
            "timesteps",
            "allowed: one of them",
            Box::new(|r| r.timesteps = vec![999, 499]),
        ),
        (
            "timesteps",
            "1000",
            Box::new(|r| {
                r.num_inference_steps = 0;
                r.scheduler = v1::Scheduler::Lcm as i32;
                r.timesteps = vec![1000, 499];
            }),
        ),
        (
            "timesteps",
            "LCM and TCD schedulers only",
            Box::new(|r| {
                r.num_inference_steps = 0;
                r.timesteps = vec![999, 499];
            }),
        ),
        (
            "num_inference_steps",
            "1..=1000",
            Box::new(|r| r.num_inference_steps = 1001),
        ),
        (
            "guidance_scale",
            "finite",
            Box::new(|r| r.guidance_scale = f32::NAN),
        ),
        (
            "guidance_scale",
            "≥ 0",
            Box::new(|r| r.guidance_scale = -1.0),
        ),
        ("seeds", "one seed per", Box::new(|r| r.seeds = vec![1, 2])),
        (
            "conditioning.image_embeds",
            "required",
            Box::new(|r| r.conditioning = None),
        ),
        (
            "conditioning.image_embeds",
            "bytes",
            Box::new(|r| {
                let e = r
                    .conditioning
                    .as_mut()
                    .unwrap()
                    .image_embeds
                    .as_mut()
                    .unwrap();
                e.data = e.data.slice(0..12);
            }),
        ),
        (
            "conditioning.image_embeds",
            "(B, 32)",
            Box::new(|r| r.conditioning.as_mut().unwrap().image_embeds = Some(t(&[1, 31], 0.1))),
        ),
        (
            "conditioning.text_embeds",
            "2.1 only",
            Box::new(|r| r.conditioning.as_mut().unwrap().text_embeds = Some(t(&[1, 768], 0.1))),
        ),
        (
            "negative_conditioning.image_embeds",
            "1 or 2",
            Box::new(|r| {
                r.conditioning.as_mut().unwrap().image_embeds = Some(t(&[2, 32], 0.1));
                r.seeds = vec![1, 2];
                r.negative_conditioning.as_mut().unwrap().image_embeds = Some(t(&[3, 32], 0.1));
            }),
        ),
        (
            "negative_conditioning.image_embeds",
            "required when guidance_scale > 1",
            Box::new(|r| r.negative_conditioning = None),
        ),
        (
            "latents",
            "expected (1, 4, 32, 32)",
            Box::new(|r| r.latents = Some(t(&[1, 4, 8, 8], 0.0))),
        ),
        (
            "latents",
            "non-finite",
            Box::new(|r| r.latents = Some(t(&[1, 4, 32, 32], f32::INFINITY))),
        ),
        (
            "image_latents",
            "expected (1, 4, 32, 32)",
            Box::new(|r| {
                r.image_latents = Some(t(&[1, 4, 16, 16], 0.0));
                r.strength = 0.5;
            }),
        ),
        (
            "strength",
            "(0, 1]",
            Box::new(|r| {
                r.image_latents = Some(t(&[1, 4, 32, 32], 0.0));
                r.strength = 2.0;
            }),
        ),
        (
            "strength",
            "only with image_latents",
            Box::new(|r| r.strength = 0.5),
        ),
        (
            "mask",
            "in_channels 4",
            Box::new(|r| {
                r.image_latents = Some(t(&[1, 4, 32, 32], 0.0));
                r.mask = Some(t(&[1, 1, 64, 64], 1.0));
            }),
        ),
        (
            "hint",
            "not a ControlNet UNet",
            Box::new(|r| r.hint = Some(t(&[1, 3, 256, 256], 0.5))),
        ),
        (
            "scheduler",
            "allowed: SCHEDULER_UNSPECIFIED",
            Box::new(|r| r.scheduler = 99),
        ),
        (
            "options.dtype",
            "DTYPE_F32",
            Box::new(|r| {
                r.options = Some(v1::StageOptions {
                    dtype: v1::DType::DtypeF16 as i32,
                })
            }),
        ),
    ];
    let n = cases.len();
    assert!(n >= 6);
    for (field, hint, edit) in cases {
        let mut req = request(1, 2, vec![1]);
        edit(&mut req);
        let err = match c.denoise(req).await {
            Err(e) => e,
            Ok(_) => panic!("{field}: accepted"),
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("invalid `{field}`")),
            "{field}: {}",
            err.message()
        );
        assert!(err.message().contains(hint), "{field}: {}", err.message());
        eprintln!("{}", err.message());
    }
    let text = scrape(server.metrics).await;
    assert_eq!(
        metric(
            &text,
            "kd_failures_total",
            &[("method", "Denoise"), ("reason", "invalid_argument")]
        )
        .unwrap_or(0.0),
        n as f64,
        "{text}"
    );
    assert_eq!(
        metric(&text, "kd_requests_total", &[("method", "Denoise")]).unwrap_or(0.0),
        n as f64
    );
    assert_eq!(
        metric(&text, "kd_denoise_steps_total", &[]).unwrap_or(0.0),
        0.0
    );
}

#[tokio::test]
async fn inpaint_checkpoint_rejects_bad_masks_and_requires_one() {
    let server = start(&fixtures_dir().join("tiny/kandinsky-2-2-decoder-inpaint")).await;
    let mut c = client(&server).await;
    let cases: Vec<(&str, &str, Edit)> = vec![
        ("mask", "in_channels 9", Box::new(|_| {})),
        (
            "mask",
            "allowed: [0, 1]",
            Box::new(|r| {
                r.image_latents = Some(t(&[1, 4, 32, 32], 0.0));
                r.mask = Some(t(&[1, 1, 64, 64], 2.0));
            }),
        ),
        (
            "mask",
            "expected (1, 1, 64, 64)",
            Box::new(|r| {
                r.image_latents = Some(t(&[1, 4, 32, 32], 0.0));
                r.mask = Some(t(&[1, 1, 60, 64], 1.0));
            }),
        ),
        (
            "image_latents",
            "required with a mask",
            Box::new(|r| r.mask = Some(t(&[1, 1, 64, 64], 1.0))),
        ),
    ];
    for (field, hint, edit) in cases {
        let mut req = request(1, 2, vec![1]);
        edit(&mut req);
        let Err(err) = c.denoise(req).await else {
            panic!("{field}: accepted")
        };
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("invalid `{field}`"))
                && err.message().contains(hint),
            "{field}: {}",
            err.message()
        );
        eprintln!("{}", err.message());
    }
}

#[tokio::test]
async fn messages_beyond_tonic_default_4_mib_are_accepted() {
    let server = start(&tiny()).await;
    let mut c = client(&server).await;
    // A 1×1×1100×1100 f32 mask (4.8 MB) reaches validation instead of the transport limit.
    let mut req = request(1, 2, vec![1]);
    req.image_latents = Some(t(&[1, 4, 32, 32], 0.0));
    req.mask = Some(t(&[1, 1, 1100, 1100], 1.0));
    assert!(req.mask.as_ref().unwrap().data.len() > 4 << 20);
    let Err(err) = c.denoise(req).await else {
        panic!("accepted")
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("in_channels 4"), "{}", err.message());
}
