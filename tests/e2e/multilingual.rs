//! Kandinsky 2.1, the multilingual family, through the gateway and the four stage services over
//! real gRPC: prompts in Russian, Hindi and Chinese each make an image, equal to the same steps
//! run in one process; the gateway names the model it serves, routes by model name when it fronts
//! both families, and refuses stages that disagree.

use kd_e2e::{gateway_client, generate_request, list_models, pixels, Model, Stack, STEPS};
use kd_models::pipeline::{Text2Image, Text2ImageRequest};
use kd_models::prior::SampleParams;
use kd_models::CheckpointDir;
use kd_proto::v1;
use kd_proto::v1::text_encoder_client::TextEncoderClient;
use tonic::Code;

const PROMPTS: [(&str, &str); 3] = [
    ("Russian", "Кот в сапогах на фоне заката"),
    ("Hindi", "टोपी पहने हुए लाल बिल्ली"),
    ("Chinese", "一只戴着帽子的红猫"),
];

fn request(prompt: &str, seed: u64) -> v1::GenerateRequest {
    generate_request(prompt, &[seed])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn russian_hindi_and_chinese_prompts_each_make_the_in_process_image() {
    let stack = Stack::start_model(Model::Kandinsky21, &[], &[]).await;
    let mut c = stack.client().await;
    let lib = tokio::task::spawn_blocking(|| {
        Text2Image::load(
            &CheckpointDir::open(Model::Kandinsky21.prior_dir()).unwrap(),
            &CheckpointDir::open(Model::Kandinsky21.decoder_dir()).unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    })
    .await
    .unwrap();
    let mut images = vec![];
    for (language, prompt) in PROMPTS {
        let resp = c.generate(request(prompt, 7)).await.unwrap().into_inner();
        assert_eq!(resp.model, "kandinsky-2-1", "{language}");
        assert_eq!(resp.images.len(), 1, "{language}");
        let px = pixels(&resp.images[0]);
        assert_eq!(px.dimensions(), (64, 64), "{language}");
        let want = lib
            .generate(&Text2ImageRequest {
                prompt: prompt.into(),
                negative_prompt: None,
                height: 64,
                width: 64,
                seeds: vec![7],
                prior: SampleParams {
                    num_inference_steps: STEPS as usize,
                    guidance_scale: 4.0,
                },
                decoder_steps: STEPS as usize,
                decoder_guidance: 4.0,
                decoder_timesteps: None,
                task: Default::default(),
            })
            .unwrap();
        assert!(
            px.as_raw() == want.images[0].as_raw(),
            "{language}: services and the in-process 2.1 pipeline differ"
        );
        images.push(px);
    }
    // The prompt decides the image: same seed, three languages, three images.
    for i in 0..images.len() {
        for j in i + 1..images.len() {
            assert_ne!(images[i].as_raw(), images[j].as_raw(), "{i} vs {j}");
        }
    }

    // The text encoder hands the decoder its multilingual conditioning: (B, 77, 48) XLM-R
    // states of the tiny fixture, with a mask covering the real tokens.
    let ch = stack.text_encoder.channel().await;
    let enc = TextEncoderClient::new(ch)
        .encode_text(v1::EncodeTextRequest {
            prompts: vec![PROMPTS[0].1.into(), String::new()],
        })
        .await
        .unwrap()
        .into_inner();
    let dc = enc.decoder_conditioning.expect("2.1 decoder conditioning");
    assert_eq!(dc.hidden_states.unwrap().shape, [2, 77, 48]);
    assert_eq!(dc.text_embeds.unwrap().shape, [2, 32]);
    let mask = kd_proto::from_wire(
        &dc.attention_mask.unwrap(),
        &candle_core::Device::Cpu,
        &Default::default(),
    )
    .unwrap()
    .to_dtype(candle_core::DType::F32)
    .unwrap()
    .sum(1)
    .unwrap()
    .to_vec1::<f32>()
    .unwrap();
    assert!(mask[0] > 2.0 && mask[1] == 2.0, "mask sums {mask:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_names_the_served_family_and_checks_the_model_field() {
    let stack = Stack::start_model(Model::Kandinsky21, &[], &[]).await;
    let mut c = stack.client().await;
    let models = list_models(&stack.gateway).await;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].name, "kandinsky-2-1");
    assert_eq!(models[0].family, v1::ModelFamily::Kandinsky21 as i32);
    assert!(models[0].is_default);

    let mut named = request(PROMPTS[2].1, 3);
    named.model = "kandinsky-2-1".into();
    let resp = c.generate(named).await.unwrap().into_inner();
    assert_eq!(resp.model, "kandinsky-2-1");

    let mut other = request(PROMPTS[2].1, 3);
    other.model = "kandinsky-2-2".into();
    let err = c.generate(other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("model") && err.message().contains("kandinsky-2-1"),
        "{}",
        err.message()
    );
    let mut unknown = request(PROMPTS[2].1, 3);
    unknown.model = "kandinsky-3".into();
    let err = c.generate(unknown).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("kandinsky-2-1,") && err.message().contains("kandinsky-2-2,"),
        "{}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stages_of_different_families_are_refused_by_name() {
    let kd21 = Stack::start_model(Model::Kandinsky21, &[], &[]).await;
    let kd22 = Stack::start(&[]).await;
    // A 2.1 text encoder in front of 2.2 prior, denoiser and MoVQ.
    let stages = [
        kd21.text_encoder.grpc,
        kd22.prior.grpc,
        kd22.denoiser.grpc,
        kd22.movq.grpc,
    ];
    let gw = Stack::start_gateway(stages, &[]).await;
    let mut c = gateway_client(&gw).await;
    let err = c.generate(request("a red cat", 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert!(
        err.message().contains("text_encoder=kandinsky-2-1")
            && err.message().contains("denoiser=kandinsky-2-2"),
        "{}",
        err.message()
    );
    let err = c.list_models(v1::ListModelsRequest {}).await.unwrap_err();
    assert!(err.message().contains("different model families"));
}

fn fixture_png(name: &str) -> Vec<u8> {
    std::fs::read(kd_testkit::fixtures_dir().join("kd21/reference").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn image_to_image_and_inpaint_run_with_multilingual_prompts() {
    use v1::generate_request::Task;
    let init = fixture_png("init_image.png");
    let mask = fixture_png("inpaint_mask.png");

    let stack = Stack::start_model(Model::Kandinsky21, &[], &[]).await;
    let mut c = stack.client().await;
    let mut req = request(PROMPTS[0].1, 5);
    req.task = Some(Task::ImageToImage(v1::ImageToImage {
        image: init.clone(),
        strength: Some(0.5),
        hint: Vec::new(),
    }));
    let a = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.model, "kandinsky-2-1");
    assert_eq!(pixels(&a.images[0]).dimensions(), (64, 64));
    let again = c.generate(req).await.unwrap().into_inner();
    assert_eq!(
        pixels(&a.images[0]),
        pixels(&again.images[0]),
        "seeded: same bytes"
    );
    let plain = c
        .generate(request(PROMPTS[0].1, 5))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        pixels(&a.images[0]),
        pixels(&plain.images[0]),
        "the init image matters"
    );
    // Inpainting needs the 9-channel UNet: refused by the gateway, naming the model, before
    // any stage runs.
    let mut req = request(PROMPTS[1].1, 5);
    req.task = Some(Task::Inpaint(v1::Inpaint {
        image: init.clone(),
        mask: mask.clone(),
    }));
    let err = c.generate(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("\"kandinsky-2-1\" does not serve inpaint"),
        "{}",
        err.message()
    );
    drop(stack);

    let stack = Stack::start_model(Model::Kandinsky21Inpaint, &[], &[]).await;
    let mut c = stack.client().await;
    let r = c.generate(req).await.unwrap().into_inner();
    assert_eq!(r.model, "kandinsky-2-1-inpaint");
    assert_eq!(pixels(&r.images[0]).dimensions(), (64, 64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_gateway_serves_both_families_by_model_name() {
    let kd22 = Stack::start(&[]).await;
    let kd21 = Stack::start_model(Model::Kandinsky21, &[], &[]).await;
    let extra = format!(
        "--extra-stack=text-encoder=http://{},prior=http://{},denoiser=http://{},movq=http://{}",
        kd21.text_encoder.grpc, kd21.prior.grpc, kd21.denoiser.grpc, kd21.movq.grpc
    );
    let stages = [
        kd22.text_encoder.grpc,
        kd22.prior.grpc,
        kd22.denoiser.grpc,
        kd22.movq.grpc,
    ];
    let gw = Stack::start_gateway(stages, &[&extra]).await;
    let mut c = gateway_client(&gw).await;

    let models = list_models(&gw).await;
    let listed: Vec<(&str, bool)> = models
        .iter()
        .map(|m| (m.name.as_str(), m.is_default))
        .collect();
    assert_eq!(listed, [("kandinsky-2-2", true), ("kandinsky-2-1", false)]);

    // No model named: the default (2.2), as for every 2.2 client.
    let r = c
        .generate(request(PROMPTS[0].1, 9))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model, "kandinsky-2-2");
    // Named: routed to the 2.1 stages, the same bytes as the 2.1 stack's own gateway.
    let mut named = request(PROMPTS[0].1, 9);
    named.model = "kandinsky-2-1".into();
    let via_shared = c.generate(named.clone()).await.unwrap().into_inner();
    assert_eq!(via_shared.model, "kandinsky-2-1");
    let direct = kd21
        .client()
        .await
        .generate(named)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        via_shared.images[0].image.as_ref().unwrap().data,
        direct.images[0].image.as_ref().unwrap().data
    );
    assert_ne!(pixels(&via_shared.images[0]), pixels(&r.images[0]));
    let mut named = request(PROMPTS[0].1, 9);
    named.model = "kandinsky-2-2".into();
    let again = c.generate(named).await.unwrap().into_inner();
    assert_eq!(
        again.images[0].image.as_ref().unwrap().data,
        r.images[0].image.as_ref().unwrap().data
    );
}
