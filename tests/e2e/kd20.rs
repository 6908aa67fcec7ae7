//! Kandinsky 2.0 through the gateway and its three stages (text encoder = M-CLIP + mT5, denoiser
//! = the UNet with the official samplers, movq = the KL autoencoder; no prior) over real gRPC,
//! on the official folder layout (`tests/fixtures/kd20`, `tests/fixtures/kd20-inpaint`):
//! Russian, Hindi and Chinese prompts equal the in-process pipeline byte for byte, the stream
//! reports the sampler steps, image-to-image and inpainting equal the in-process pipeline too,
//! options the family lacks are refused by name, and one gateway fronts 2.0, 2.1 and 2.2.

use candle_core::{DType, Device, Tensor};
use kd_e2e::{
    gateway_client, kd20_dir, kd20_inpaint_dir, list_models, pixels, Model, PriorLessStack, Stack,
};
use kd_models::kd20::{Kd20Img2Img, Kd20Pipeline, Kd20Text2Img};
use kd_models::kl::posterior_noise;
use kd_models::noise::SeededNoise;
use kd_models::schedulers::guided::SamplerKind;
use kd_proto::v1;
use tonic::Code;

const STEPS: u32 = 4;

/// (script, prompt): the three plus a Latin one.
const PROMPTS: [(&str, &str); 3] = [
    ("Russian", "рыжая лиса на снегу"),
    ("Hindi", "बर्फ में लाल लोमड़ी"),
    ("Chinese", "雪地里的红狐狸"),
];

fn request(model: &str, prompt: &str, seed: u64) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model: model.into(),
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

fn pipeline(dir: std::path::PathBuf) -> Kd20Pipeline {
    Kd20Pipeline::load(dir, DType::F32, &Device::Cpu).unwrap()
}

/// The official `generate_text2img` in one process for `seed`: guidance 7 (the family's
/// default), the DDIM sampler (its default), the seed's draws for both guidance halves.
fn in_process(prompt: &str, seed: u64, sampler: SamplerKind) -> Vec<u8> {
    let p = pipeline(kd20_dir());
    let args = Kd20Text2Img {
        num_steps: STEPS as usize,
        height: 64,
        width: 64,
        sampler,
        ..Kd20Text2Img::new(prompt)
    };
    let out = p.text2img(&args, &mut SeededNoise::new(&[seed])).unwrap();
    out.uint8.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn russian_hindi_and_chinese_prompts_equal_the_in_process_pipeline() {
    let stack = PriorLessStack::start_dir(&kd20_dir(), &[]).await;
    let models = list_models(&stack.gateway).await;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!(
        (m.name.as_str(), m.family),
        ("kandinsky-2-0", v1::ModelFamily::Kandinsky20 as i32)
    );
    use v1::TaskKind as T;
    assert_eq!(
        m.tasks,
        [T::TextToImage as i32, T::ImageToImage as i32],
        "the text-to-image checkpoint"
    );
    let mut c = stack.client().await;
    for (i, (script, prompt)) in PROMPTS.iter().enumerate() {
        let seed = 40 + i as u64;
        let r = c
            .generate(request("kandinsky-2-0", prompt, seed))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.model, "kandinsky-2-0");
        let got = pixels(&r.images[0]);
        assert_eq!(got.dimensions(), (64, 64));
        let p = prompt.to_string();
        let want = tokio::task::spawn_blocking(move || in_process(&p, seed, SamplerKind::Ddim))
            .await
            .unwrap();
        assert!(
            got.as_raw() == &want,
            "{script}: services and the in-process Kandinsky 2.0 pipeline differ"
        );
    }
    // The p-sampler (SCHEDULER_DDPM) and PLMS through the services, too.
    for (scheduler, sampler) in [
        (v1::Scheduler::Ddpm, SamplerKind::P),
        (v1::Scheduler::Plms, SamplerKind::Plms),
    ] {
        let mut req = request("kandinsky-2-0", PROMPTS[0].1, 7);
        req.decoder.as_mut().unwrap().scheduler = scheduler as i32;
        let r = c.generate(req).await.unwrap().into_inner();
        let want = tokio::task::spawn_blocking(move || in_process(PROMPTS[0].1, 7, sampler))
            .await
            .unwrap();
        assert!(pixels(&r.images[0]).as_raw() == &want, "{sampler:?}");
    }

    // The stream: one progress event per sampler step after the start; previews decode.
    let mut req = request("kandinsky-2-0", PROMPTS[2].1, 42);
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
    assert_eq!(steps, (0..=STEPS).map(|s| (s, STEPS)).collect::<Vec<_>>());
    assert_eq!(previews, 2);
    let want = tokio::task::spawn_blocking(|| in_process(PROMPTS[2].1, 42, SamplerKind::Ddim))
        .await
        .unwrap();
    assert!(
        pixels(&image.expect("the image")).as_raw() == &want,
        "streamed = in-process"
    );
}

fn png(w: u32, h: u32, f: impl Fn(u32, u32) -> image::Rgb<u8>) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, f);
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A 64×64 PNG as the official `prepare_image` leaves it (no resize at this size):
/// `x / 127.5 − 1`, (1, 3, 64, 64).
fn prepared(bytes: &[u8]) -> Tensor {
    let img = image::load_from_memory(bytes).unwrap().to_rgb8();
    let v: Vec<f32> = img
        .pixels()
        .flat_map(|p| p.0)
        .map(|x| x as f32 / 127.5 - 1.0)
        .collect();
    Tensor::from_vec(v, (1, 64, 64, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_to_image_works_and_what_the_family_lacks_is_refused() {
    let stack = PriorLessStack::start_dir(&kd20_dir(), &[]).await;
    let mut c = stack.client().await;
    let init = png(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    });
    let mut req = request("kandinsky-2-0", "кот в шляпе", 5);
    req.task = Some(v1::generate_request::Task::ImageToImage(v1::ImageToImage {
        image: init.clone(),
        strength: Some(0.5),
        ..Default::default()
    }));
    let r = c.generate(req).await.unwrap().into_inner();
    let got = pixels(&r.images[0]);
    assert_eq!(got.dimensions(), (64, 64));
    // In process: the posterior drawn from the seed's posterior stream, then generate_img2img's
    // q_sample and sampler draws from the seed.
    let init2 = init.clone();
    let want = tokio::task::spawn_blocking(move || {
        let p = pipeline(kd20_dir());
        let x = prepared(&init2);
        let latents = p.vae().encode(&x, &mut posterior_noise(&[5])).unwrap();
        let args = Kd20Img2Img {
            strength: 0.5,
            num_steps: STEPS as usize,
            ..Kd20Img2Img::new("кот в шляпе")
        };
        let out = p
            .img2img_latents(&args, &latents, &mut SeededNoise::new(&[5]))
            .unwrap();
        out.uint8.flatten_all().unwrap().to_vec1::<u8>().unwrap()
    })
    .await
    .unwrap();
    let diff = got
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("image-to-image: services vs in-process, largest u8 difference {diff}");
    assert!(diff <= 1, "largest u8 difference {diff}");

    let expect = |e: tonic::Status, field: &str| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{field}: {}", e.message());
    };
    let mut req = request("kandinsky-2-0", "a cat", 5);
    req.prior = Some(v1::PriorParams {
        num_inference_steps: Some(10),
        ..Default::default()
    });
    expect(c.generate(req).await.unwrap_err(), "prior");
    let mut req = request("kandinsky-2-0", "a cat", 5);
    req.decoder.as_mut().unwrap().scheduler = v1::Scheduler::Lcm as i32;
    expect(c.generate(req).await.unwrap_err(), "decoder.scheduler");
    let mut req = request("kandinsky-2-0", "a cat", 5);
    req.width = Some(96);
    expect(c.generate(req).await.unwrap_err(), "width");
    let mut req = request("kandinsky-2-0", "a cat", 5);
    req.task = Some(v1::generate_request::Task::Variation(v1::Variation {
        image: init.clone(),
    }));
    expect(c.generate(req).await.unwrap_err(), "variation");
    let mut req = request("kandinsky-2-0", "a cat", 5);
    req.task = Some(v1::generate_request::Task::Inpaint(v1::Inpaint {
        image: init.clone(),
        mask: init,
    }));
    expect(c.generate(req).await.unwrap_err(), "inpaint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inpainting_on_the_inpainting_checkpoint() {
    let stack = PriorLessStack::start_dir(&kd20_inpaint_dir(), &[]).await;
    let models = list_models(&stack.gateway).await;
    assert_eq!(models[0].name, "kandinsky-2-0-inpaint");
    let mut c = stack.client().await;
    let init = png(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, 255 - (y * 4) as u8, 64])
    });
    // The right part regenerated (white = repaint).
    let mask = png(64, 64, |x, _| {
        let v = if x < 37 { 0 } else { 255 };
        image::Rgb([v, v, v])
    });
    let mut req = request("kandinsky-2-0-inpaint", "окно", 12);
    req.task = Some(v1::generate_request::Task::Inpaint(v1::Inpaint {
        image: init.clone(),
        mask: mask.clone(),
    }));
    let r = c.generate(req).await.unwrap().into_inner();
    let got = pixels(&r.images[0]);
    assert_eq!(got.dimensions(), (64, 64));
    let want = tokio::task::spawn_blocking(move || {
        let p = pipeline(kd20_inpaint_dir());
        let x = prepared(&init);
        let latents = p.vae().encode(&x, &mut posterior_noise(&[12])).unwrap();
        // The official mask: 1 = keep.
        let keep: Vec<f32> = (0..64 * 64)
            .map(|i| if i % 64 < 37 { 1.0 } else { 0.0 })
            .collect();
        let keep = Tensor::from_vec(keep, (1, 1, 64, 64), &Device::Cpu).unwrap();
        let args = kd_models::kd20::Kd20InpaintArgs {
            num_steps: STEPS as usize,
            ..kd_models::kd20::Kd20InpaintArgs::new("окно")
        };
        let out = p
            .inpaint_latents(&args, &latents, &keep, &mut SeededNoise::new(&[12]))
            .unwrap();
        out.uint8.flatten_all().unwrap().to_vec1::<u8>().unwrap()
    })
    .await
    .unwrap();
    let diff = got
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("inpainting: services vs in-process, largest u8 difference {diff}");
    assert!(diff <= 1, "largest u8 difference {diff}");
    // Text-to-image is the other checkpoint's.
    let e = c
        .generate(request("kandinsky-2-0-inpaint", "a cat", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gateway_fronts_kandinsky_2_0_2_1_and_2_2_by_model_name() {
    let kd22 = Stack::start(&[]).await;
    let kd21 = Stack::start_model(Model::Kandinsky21, &[], &[]).await;
    let kd20 = PriorLessStack::start_dir(&kd20_dir(), &[]).await;
    let extra21 = format!(
        "--extra-stack=text-encoder=http://{},prior=http://{},denoiser=http://{},movq=http://{}",
        kd21.text_encoder.grpc, kd21.prior.grpc, kd21.denoiser.grpc, kd21.movq.grpc
    );
    let stages = [
        kd22.text_encoder.grpc,
        kd22.prior.grpc,
        kd22.denoiser.grpc,
        kd22.movq.grpc,
    ];
    let gw = Stack::start_gateway(stages, &[&extra21, &kd20.extra_stack()]).await;
    let listed: Vec<(String, bool)> = list_models(&gw)
        .await
        .into_iter()
        .map(|m| (m.name, m.is_default))
        .collect();
    assert_eq!(
        listed,
        [
            ("kandinsky-2-2".to_string(), true),
            ("kandinsky-2-1".to_string(), false),
            ("kandinsky-2-0".to_string(), false),
        ]
    );
    let mut c = gateway_client(&gw).await;
    let mut by_model = Vec::new();
    for model in ["kandinsky-2-0", "kandinsky-2-1", "kandinsky-2-2"] {
        let r = c
            .generate(request(model, PROMPTS[0].1, 8))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.model, model);
        by_model.push(r.images[0].image.as_ref().unwrap().data.clone());
    }
    let direct = kd20
        .client()
        .await
        .generate(request("kandinsky-2-0", PROMPTS[0].1, 8))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_model[0], direct.images[0].image.as_ref().unwrap().data);
    // A 2.0-only scheduler sent to 2.2 is refused by name.
    let mut req = request("kandinsky-2-2", "a cat", 8);
    req.decoder.as_mut().unwrap().scheduler = v1::Scheduler::Plms as i32;
    let e = c.generate(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("decoder.scheduler"), "{}", e.message());
}
