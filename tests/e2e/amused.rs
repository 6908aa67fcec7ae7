//! aMUSEd, the masked-token family, through the gateway and its three stages (text encoder,
//! denoiser = token generator, movq = VQ-GAN; no prior) over real gRPC: text-to-image equals the
//! in-process pipeline byte for byte, the stream reports the token steps, image-to-image and
//! inpainting work, options the family lacks are refused by name, and one gateway fronting
//! Kandinsky 2.2 and aMUSEd routes by model name.

use candle_core::{DType, Device};
use kd_e2e::{amused_dir, gateway_client, list_models, pixels, PriorLessStack, Stack};
use kd_models::amused::{AmusedPipeline, TokenParams, TokenTask};
use kd_models::noise::SeededNoise;
use kd_models::CheckpointDir;
use kd_proto::v1;
use tonic::Code;

const STEPS: u32 = 4;

fn request(prompt: &str, seed: u64) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model: "amused-256".into(),
        prompt: prompt.into(),
        width: Some(64),
        height: Some(64),
        seeds: vec![seed],
        decoder: Some(v1::DecoderParams {
            num_inference_steps: Some(STEPS),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The image of the in-process pipeline: the same prompt, the empty negative prompt, guidance
/// 10 (the family's default), the seed's draws; 8-bit as the movq stage converts.
fn in_process(prompt: &str, seed: u64) -> image::RgbImage {
    let p = AmusedPipeline::load(
        &CheckpointDir::open(amused_dir()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let params = TokenParams {
        steps: STEPS as usize,
        ..Default::default()
    };
    let text = p.encode_text(&[prompt], &[], params.guided()).unwrap();
    let task = TokenTask::TextToImage {
        height: 64,
        width: 64,
    };
    let mut noise = SeededNoise::new(&[seed]);
    let tokens = p
        .generate_tokens(&text, &task, &params, &mut noise, &mut |_, _, _| {})
        .unwrap();
    p.images(&tokens).unwrap().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_to_image_equals_the_in_process_pipeline_and_streams_token_steps() {
    let stack = PriorLessStack::start(&[]).await;
    let models = list_models(&stack.gateway).await;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(
        (m.name.as_str(), m.family, m.default_steps),
        ("amused-256", v1::ModelFamily::Amused as i32, 12)
    );
    use v1::TaskKind as T;
    let tasks: Vec<i32> = [T::TextToImage, T::ImageToImage, T::Inpaint, T::Outpaint]
        .iter()
        .map(|&t| t as i32)
        .collect();
    assert_eq!(m.tasks, tasks);

    let mut c = stack.client().await;
    let prompt = "a lighthouse at dusk";
    let r = c.generate(request(prompt, 21)).await.unwrap().into_inner();
    assert_eq!(r.model, "amused-256");
    let got = pixels(&r.images[0]);
    assert_eq!(got.dimensions(), (64, 64));
    let want = tokio::task::spawn_blocking(move || in_process(prompt, 21))
        .await
        .unwrap();
    assert!(
        got.as_raw() == want.as_raw(),
        "services and the in-process aMUSEd pipeline differ"
    );

    // The stream: the denoiser's progress counts the token steps; previews decode.
    let mut req = request(prompt, 21);
    req.preview_every = 2;
    let mut stream = c.generate_stream(req).await.unwrap().into_inner();
    let (mut steps, mut previews, mut image) = (Vec::new(), 0, None);
    while let Some(ev) = stream.message().await.unwrap() {
        match ev.event.unwrap() {
            v1::generate_event::Event::Progress(p) if p.stage == v1::Stage::Denoiser as i32 => {
                steps.push((p.step, p.total_steps))
            }
            v1::generate_event::Event::Preview(p) => {
                previews += 1;
                assert!(!p.images.is_empty());
            }
            v1::generate_event::Event::Image(i) => image = Some(i),
            _ => {}
        }
    }
    assert_eq!(
        steps,
        (0..=STEPS).map(|s| (s, STEPS)).collect::<Vec<_>>(),
        "start, then one event per token step"
    );
    assert_eq!(previews, 2);
    assert_eq!(
        pixels(&image.expect("the image")).as_raw(),
        got.as_raw(),
        "streamed = unary"
    );
}

fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> image::Rgb<u8>) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, f);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_to_image_and_inpainting_work_and_what_the_family_lacks_is_refused() {
    let stack = PriorLessStack::start(&[]).await;
    let mut c = stack.client().await;
    let init = png(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    // Left half kept, right half regenerated.
    let mask = png(64, 64, |x, _| {
        let v = if x < 32 { 0 } else { 255 };
        image::Rgb([v, v, v])
    });
    let text = c.generate(request("a cat", 5)).await.unwrap().into_inner();

    let mut req = request("a cat", 5);
    req.task = Some(v1::generate_request::Task::ImageToImage(v1::ImageToImage {
        image: init.clone(),
        strength: Some(0.5),
        ..Default::default()
    }));
    let i2i = c.generate(req).await.unwrap().into_inner();
    assert_eq!(pixels(&i2i.images[0]).dimensions(), (64, 64));
    assert_ne!(pixels(&i2i.images[0]), pixels(&text.images[0]));

    let mut req = request("a cat", 5);
    req.task = Some(v1::generate_request::Task::Inpaint(v1::Inpaint {
        image: init.clone(),
        mask: mask.clone(),
    }));
    let inpaint = c.generate(req).await.unwrap().into_inner();
    assert_eq!(pixels(&inpaint.images[0]).dimensions(), (64, 64));
    assert_ne!(pixels(&inpaint.images[0]), pixels(&i2i.images[0]));

    let expect = |e: tonic::Status, field: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().to_lowercase().contains("amused"),
            "{field}: {}",
            e.message()
        );
    };
    // Kandinsky-only options, by name.
    let mut req = request("a cat", 5);
    req.prior = Some(v1::PriorParams {
        num_inference_steps: Some(10),
        ..Default::default()
    });
    expect(c.generate(req).await.unwrap_err(), "prior");
    let mut req = request("a cat", 5);
    req.decoder.as_mut().unwrap().scheduler = v1::Scheduler::Ddim as i32;
    expect(c.generate(req).await.unwrap_err(), "decoder.scheduler");
    // A task it does not serve, naming the model.
    let mut req = request("a cat", 5);
    req.task = Some(v1::generate_request::Task::Variation(v1::Variation {
        image: init.clone(),
    }));
    expect(c.generate(req).await.unwrap_err(), "variation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gateway_fronts_kandinsky_2_2_and_amused_by_model_name() {
    let kd22 = Stack::start(&[]).await;
    let amused = PriorLessStack::start(&[]).await;
    let stages = [
        kd22.text_encoder.grpc,
        kd22.prior.grpc,
        kd22.denoiser.grpc,
        kd22.movq.grpc,
    ];
    let gw = Stack::start_gateway(stages, &[&amused.extra_stack()]).await;
    let listed: Vec<(String, bool)> = list_models(&gw)
        .await
        .into_iter()
        .map(|m| (m.name, m.is_default))
        .collect();
    assert_eq!(
        listed,
        [
            ("kandinsky-2-2".to_string(), true),
            ("amused-256".to_string(), false)
        ]
    );
    let mut c = gateway_client(&gw).await;
    let via_shared = c.generate(request("a cat", 8)).await.unwrap().into_inner();
    assert_eq!(via_shared.model, "amused-256");
    let direct = amused
        .client()
        .await
        .generate(request("a cat", 8))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        via_shared.images[0].image.as_ref().unwrap().data,
        direct.images[0].image.as_ref().unwrap().data
    );
    // The default model is still 2.2; an aMUSEd-only option sent to it is refused by name.
    let mut req = request("a cat", 8);
    req.model = String::new();
    req.decoder.as_mut().unwrap().masked_tokens = Some(v1::MaskedTokenParams {
        aesthetic_score: Some(5.0),
        ..Default::default()
    });
    let e = c.generate(req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("decoder.masked_tokens"),
        "{}",
        e.message()
    );
    req.decoder.as_mut().unwrap().masked_tokens = None;
    let r = c.generate(req).await.unwrap().into_inner();
    assert_eq!(r.model, "kandinsky-2-2");
}
