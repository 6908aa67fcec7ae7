//! The decoder tasks besides text-to-image through the gateway: outpainting on the inpainting
//! decoders of both families, the ControlNet depth hint, and the refusals of a task a model does
//! not serve, made by the gateway before any stage runs.

use kd_e2e::{generate_request, pixels, Model, Stack};
use kd_models::image::{decode_image, Margins};
use kd_models::pipeline::{PipelineTask, Text2Image, Text2ImageRequest};
use kd_models::prior::SampleParams;
use kd_models::CheckpointDir;
use kd_proto::v1::{self, generate_request::Task};
use kd_testkit::metric_at;
use tonic::Code;

const PROMPT: &str = "a lighthouse on a cliff";

/// A small test picture: a colour gradient with a dark square.
fn picture(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let dark = (w / 4..w / 2).contains(&x) && (h / 4..h / 2).contains(&y);
        if dark {
            image::Rgb([10, 20, 30])
        } else {
            image::Rgb([(4 * x) as u8, (3 * y) as u8, 128])
        }
    })
}

fn png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The request's image made by the in-process pipeline (the same steps, seeds and task).
async fn in_process(model: Model, req: &v1::GenerateRequest, task: PipelineTask) -> Vec<u8> {
    let (w, h) = (req.width.unwrap() as usize, req.height.unwrap() as usize);
    let (prompt, seeds) = (req.prompt.clone(), req.seeds.clone());
    let images = tokio::task::spawn_blocking(move || {
        let p = Text2Image::load(
            &CheckpointDir::open(model.prior_dir()).unwrap(),
            &CheckpointDir::open(model.decoder_dir()).unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        p.generate(&Text2ImageRequest {
            prompt,
            negative_prompt: None,
            height: h,
            width: w,
            seeds,
            prior: SampleParams {
                num_inference_steps: kd_e2e::STEPS as usize,
                guidance_scale: 4.0,
            },
            decoder_steps: kd_e2e::STEPS as usize,
            decoder_guidance: 4.0,
            decoder_timesteps: None,
            task,
        })
        .unwrap()
        .images
    })
    .await
    .unwrap();
    images[0].as_raw().clone()
}

fn outpaint_request(source: &image::RgbImage, m: Margins, seed: u64) -> v1::GenerateRequest {
    let mut req = generate_request(PROMPT, &[seed]);
    (req.width, req.height) = (Some(128), Some(64));
    req.task = Some(Task::Outpaint(v1::Outpaint {
        image: png(source),
        left: m.left,
        top: m.top,
        right: m.right,
        bottom: m.bottom,
    }));
    req
}

/// Outpainting on `model` (an inpainting decoder): the services' image equals the in-process
/// pipeline's on the same canvas, and a seed decides it.
async fn outpaint_equals_the_in_process_pipeline(model: Model, name: &str) {
    let stack = Stack::start_model(model, &[], &[]).await;
    let mut c = stack.client().await;
    let source = picture(48, 40);
    // Widened on both sides (the canvas is 128×64: the image gets the inner 64×64).
    let margins = Margins {
        left: 40,
        top: 0,
        right: 24,
        bottom: 0,
    };
    let req = outpaint_request(&source, margins, 7);
    let r = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.model, name);
    let served = pixels(&r.images[0]);
    assert_eq!(served.dimensions(), (128, 64));
    let task = PipelineTask::Outpaint {
        image: decode_image(&png(&source)).unwrap(),
        margins,
    };
    let lib = in_process(model, &req, task).await;
    assert!(
        served.as_raw() == &lib,
        "{name}: outpainting through the services differs from the in-process pipeline"
    );
    let again = c.generate(req.clone()).await.unwrap().into_inner();
    assert_eq!(pixels(&again.images[0]), served, "seeded: same bytes");
    let other = c
        .generate(outpaint_request(&source, margins, 8))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        pixels(&other.images[0]),
        served,
        "another seed, another image"
    );
    // Margins that leave less than 64 pixels for the image: refused, naming the field.
    let tight = Margins {
        left: 48,
        right: 24,
        ..margins
    };
    let e = c
        .generate(outpaint_request(&source, tight, 7))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("outpaint.left") && e.message().contains("at most 64"),
        "{}",
        e.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outpainting_kandinsky_2_2_equals_the_in_process_pipeline() {
    outpaint_equals_the_in_process_pipeline(Model::Kandinsky22Inpaint, "kandinsky-2-2-inpaint")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outpainting_kandinsky_2_1_equals_the_in_process_pipeline() {
    outpaint_equals_the_in_process_pipeline(Model::Kandinsky21Inpaint, "kandinsky-2-1-inpaint")
        .await;
}

fn hint_request(hint: Vec<u8>, seed: u64) -> v1::GenerateRequest {
    let mut req = generate_request(PROMPT, &[seed]);
    req.task = Some(Task::TextToImage(v1::TextToImage { hint }));
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_depth_hint_reaches_the_controlnet_and_equals_the_in_process_pipeline() {
    let stack = Stack::start_model(Model::Kandinsky22Controlnet, &[], &[]).await;
    let mut c = stack.client().await;
    let depth = picture(64, 64);
    let r = c
        .generate(hint_request(png(&depth), 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model, "kandinsky-2-2-controlnet");
    let served = pixels(&r.images[0]);
    let lib = in_process(
        Model::Kandinsky22Controlnet,
        &hint_request(Vec::new(), 3),
        PipelineTask::Controlnet {
            hint: depth.clone(),
        },
    )
    .await;
    assert!(
        served.as_raw() == &lib,
        "ControlNet through the services differs from the in-process pipeline"
    );
    // The hint matters, and one of another size is resized to the output.
    let flat = image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    let other = c
        .generate(hint_request(png(&flat), 3))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(pixels(&other.images[0]), served, "the hint is ignored");
    let resized = c
        .generate(hint_request(png(&picture(96, 80)), 3))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pixels(&resized.images[0]).dimensions(), (64, 64));
    // Image-to-image with the hint (diffusers' KandinskyV22ControlnetImg2ImgPipeline).
    let init = picture(64, 64);
    let mut img2img = hint_request(Vec::new(), 4);
    img2img.task = Some(Task::ImageToImage(v1::ImageToImage {
        image: png(&init),
        strength: Some(0.5),
        hint: png(&depth),
    }));
    let r = c.generate(img2img.clone()).await.unwrap().into_inner();
    let lib = in_process(
        Model::Kandinsky22Controlnet,
        &img2img,
        PipelineTask::Img2Img {
            image: init,
            strength: 0.5,
            hint: Some(depth.clone()),
        },
    )
    .await;
    assert!(
        pixels(&r.images[0]).as_raw() == &lib,
        "ControlNet img2img through the services differs from the in-process pipeline"
    );
    // A ControlNet model without a hint: refused by name.
    let e = c
        .generate(generate_request(PROMPT, &[3]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("text_to_image.hint") && e.message().contains("required"),
        "{}",
        e.message()
    );
    let models = kd_e2e::list_models(&stack.gateway).await;
    assert_eq!(models.len(), 1);
    assert!(models[0].takes_hint);
    assert_eq!(
        models[0].tasks,
        [
            v1::TaskKind::TextToImage as i32,
            v1::TaskKind::ImageToImage as i32
        ]
    );
}

/// Calls the stages of `stack` have answered, any method.
async fn stage_calls(stack: &Stack) -> f64 {
    let mut n = 0.0;
    for s in [
        &stack.text_encoder,
        &stack.prior,
        &stack.denoiser,
        &stack.movq,
    ] {
        n += metric_at(s.metrics, "kd_requests_total", &[]).await;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_the_model_lacks_is_refused_by_name_before_any_stage_runs() {
    // The default model (text-to-image) and an inpainting model behind one gateway.
    let inpaint = Stack::start_model(Model::Kandinsky22Inpaint, &[], &[]).await;
    let extra = format!(
        "--extra-stack=text-encoder=http://{},prior=http://{},denoiser=http://{},movq=http://{}",
        inpaint.text_encoder.grpc, inpaint.prior.grpc, inpaint.denoiser.grpc, inpaint.movq.grpc
    );
    let stack = Stack::start_model(Model::Kandinsky22, &[], &[&extra]).await;
    let mut c = stack.client().await;
    let models = kd_e2e::list_models(&stack.gateway).await;
    let listed: Vec<(&str, Vec<i32>)> = models
        .iter()
        .map(|m| (m.name.as_str(), m.tasks.clone()))
        .collect();
    use v1::TaskKind as T;
    assert_eq!(
        listed,
        [
            (
                "kandinsky-2-2",
                vec![
                    T::TextToImage as i32,
                    T::ImageToImage as i32,
                    T::Variation as i32,
                    T::Fusion as i32
                ]
            ),
            (
                "kandinsky-2-2-inpaint",
                vec![T::Inpaint as i32, T::Outpaint as i32]
            ),
        ]
    );
    let before = stage_calls(&stack).await;
    let image = png(&picture(64, 64));
    let mut inpaint_req = generate_request(PROMPT, &[1]);
    inpaint_req.task = Some(Task::Inpaint(v1::Inpaint {
        image: image.clone(),
        mask: image.clone(),
    }));
    let e = c.generate(inpaint_req.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("invalid `model`")
            && e.message()
                .contains("\"kandinsky-2-2\" does not serve inpaint")
            && e.message()
                .contains("models that serve inpaint: kandinsky-2-2-inpaint"),
        "{}",
        e.message()
    );
    let e = c
        .generate(hint_request(image.clone(), 1))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("text_to_image.hint")
            && e.message()
                .contains("no model of this deployment serves text-to-image with a hint"),
        "{}",
        e.message()
    );
    let mut text_on_inpaint = generate_request(PROMPT, &[1]);
    text_on_inpaint.model = "kandinsky-2-2-inpaint".into();
    let e = c.generate(text_on_inpaint).await.unwrap_err();
    assert!(
        e.message()
            .contains("models that serve text-to-image: kandinsky-2-2")
            && e.message().contains("it serves inpaint, outpaint"),
        "{}",
        e.message()
    );
    // Too large for the denoiser's --max-pixels (1024² on a CPU): refused up front too.
    let mut huge = generate_request(PROMPT, &[1]);
    (huge.width, huge.height) = (Some(2048), Some(1024));
    let e = c.generate(huge).await.unwrap_err();
    assert!(
        e.message().contains("--max-pixels") && e.message().contains("1048576"),
        "{}",
        e.message()
    );
    // img2img whose strength runs no step.
    let mut weak = generate_request(PROMPT, &[1]);
    weak.task = Some(Task::ImageToImage(v1::ImageToImage {
        image: image.clone(),
        strength: Some(0.2),
        hint: Vec::new(),
    }));
    let e = c.generate(weak).await.unwrap_err();
    assert!(
        e.message().contains("image_to_image.strength") && e.message().contains("runs no step"),
        "{}",
        e.message()
    );
    assert_eq!(
        stage_calls(&stack).await,
        before,
        "a refused request reached a stage"
    );
    // Named, the inpainting model serves it.
    inpaint_req.model = "kandinsky-2-2-inpaint".into();
    let r = c.generate(inpaint_req).await.unwrap().into_inner();
    assert_eq!(r.model, "kandinsky-2-2-inpaint");

    // Images are decoded by the stages; their errors name the request's field, in the message
    // and as a google.rpc.BadRequest detail.
    use tonic_types::StatusExt;
    let junk = b"not an image".to_vec();
    let mut bad = generate_request(PROMPT, &[1]);
    bad.task = Some(Task::ImageToImage(v1::ImageToImage {
        image: junk.clone(),
        strength: Some(0.5),
        hint: Vec::new(),
    }));
    let mut variation = generate_request(PROMPT, &[1]);
    variation.task = Some(Task::Variation(v1::Variation {
        image: junk.clone(),
    }));
    for (req, field) in [
        (bad, "image_to_image.image"),
        (variation, "variation.image"),
    ] {
        let e = c.generate(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with(&format!("invalid `{field}`: ")),
            "{}",
            e.message()
        );
        let details = e.get_error_details();
        let v = &details
            .bad_request()
            .expect("a BadRequest detail")
            .field_violations;
        assert_eq!(v[0].field, field);
    }
}
