//! The MoVQ stage over real gRPC on loopback, on the deep fixture checkpoint: health, decode and
//! encode parity with diffusers, image outputs, bad input, metrics.

use candle_core::{Device, Tensor};
use kd_movq::{run_with_listeners, Config};
use kd_proto::v1::{self, movq_client::MovqClient};
use kd_runtime::Listeners;
use kd_runtime::Shutdown;
use kd_testkit::parity::{assert_close, get, load_reference};
use kd_testkit::{fixtures_dir, scrape, stage_args, unwire, wait_serving, wire, TestServer};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// A MoVQ stage on the fixture folder `model`, SERVING, and a client of it.
async fn start(model: &str) -> (TestServer, MovqClient<Channel>) {
    start_with(model, &[]).await
}

/// [`start`] with extra flags.
async fn start_with(model: &str, extra: &[&str]) -> (TestServer, MovqClient<Channel>) {
    let config = <Config as clap::Parser>::parse_from(stage_args(
        "kd-movq",
        &fixtures_dir().join(model),
        extra,
    ));
    let srv = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(&srv, "kandinsky.v1.Movq", Duration::from_secs(120)).await;
    let client = MovqClient::new(srv.channel().await);
    (srv, client)
}

#[tokio::test]
async fn decode_and_encode_match_diffusers_over_grpc() {
    let (srv, mut c) = start("deep/kandinsky-2-2-decoder").await;
    let refs =
        load_reference(fixtures_dir().join("deep/reference/decoder/movq.safetensors")).unwrap();

    // Decode: pixels within 1e-4 of diffusers' pipeline output, PNG pixels equal to its u8 output.
    for (latents, nhwc, u8key) in [
        ("latents", None, "decoded_u8"),
        ("ns_latents", Some("ns_decoded_nhwc01"), "ns_decoded_u8"),
    ] {
        let resp = c
            .decode_latents(v1::DecodeLatentsRequest {
                latents: Some(wire(get(&refs, latents))),
                return_pixels: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if let Some(k) = nhwc {
            assert_close(
                k,
                &unwire(resp.pixels.as_ref().unwrap()),
                get(&refs, k),
                1e-4,
            );
        }
        let expected = get(&refs, u8key)
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::U32)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        let img = &resp.images[0];
        assert_eq!(img.format, v1::ImageFormat::Png as i32);
        let png = image::load_from_memory(&img.data).unwrap().to_rgb8();
        assert_eq!((png.width(), png.height()), (img.width, img.height));
        let got: Vec<u32> = png.into_raw().into_iter().map(u32::from).collect();
        // Float sums in another order (our CPU conv kernel against torch's) may move a value
        // across a rounding boundary: ±1 on a few values, never more.
        assert_eq!(got.len(), expected.len(), "{u8key}: pixel count");
        let off: Vec<u32> = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .filter(|&d| d > 0)
            .collect();
        let worst = off.iter().copied().max().unwrap_or(0);
        assert!(
            worst <= 1 && off.len() * 100 <= got.len(),
            "{u8key}: decoded PNG pixels differ from diffusers by up to {worst} in {} of {} values",
            off.len(),
            got.len()
        );
        assert_eq!(resp.model.unwrap().component, "movq");
    }

    // Encode raw pixels: latents within 1e-4.
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            pixels: Some(wire(get(&refs, "image"))),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_close(
        "latents",
        &unwire(resp.latents.as_ref().unwrap()),
        get(&refs, "latents"),
        1e-4,
    );
    assert!(resp.mask.is_none());

    // JPEG and WebP outputs decode to images of the right size.
    for format in [v1::ImageFormat::Jpeg, v1::ImageFormat::Webp] {
        let resp = c
            .decode_latents(v1::DecodeLatentsRequest {
                latents: Some(wire(get(&refs, "latents"))),
                format: format as i32,
                quality: 80,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let img = image::load_from_memory(&resp.images[0].data).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64), "{format:?}");
    }

    let text = scrape(srv.metrics).await;
    assert!(
        text.contains("kd_requests_total{method=\"DecodeLatents\",stage=\"movq\"} 4"),
        "{text}"
    );
    assert!(
        text.contains("kd_model_load_seconds{stage=\"movq\"}"),
        "{text}"
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn encoded_images_and_masks_are_preprocessed_as_diffusers() {
    let (srv, mut c) = start("tiny/kandinsky-2-2-decoder").await;
    let dir = fixtures_dir().join("tiny/reference/decoder");
    let refs = load_reference(dir.join("pipeline_inputs.safetensors")).unwrap();
    let image = std::fs::read(dir.join("init_image.png")).unwrap();
    let mask = std::fs::read(dir.join("inpaint_mask.png")).unwrap();

    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![image.clone()],
            width: 64,
            height: 64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_close(
        "img2img latents",
        &unwire(resp.latents.as_ref().unwrap()),
        get(&refs, "img2img_image_latents"),
        1e-4,
    );

    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![image],
            masks: vec![mask],
            width: 64,
            height: 64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_close(
        "inpaint latents",
        &unwire(resp.latents.as_ref().unwrap()),
        get(&refs, "inpaint_image_latents"),
        1e-4,
    );
    let m = unwire(resp.mask.as_ref().unwrap());
    assert_eq!(m.dims(), &[1, 1, 64, 64]);
    // The repaint mask is the inverse of diffusers' keep-mask, nearest-resized to the latent grid.
    let repaint: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
    assert!(repaint.iter().all(|v| *v == 0.0 || *v == 1.0));
    let keep_latent = get(&refs, "inpaint_mask_latent_nearest")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (h, w) = (32, 32);
    for i in 0..h {
        for j in 0..w {
            assert_eq!(
                1.0 - repaint[(i * 2) * 64 + j * 2],
                keep_latent[i * w + j],
                "latent ({i},{j})"
            );
        }
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument_naming_the_field() {
    let (srv, mut c) = start("tiny/kandinsky-2-2-decoder").await;
    let z = |shape: &[usize]| {
        Some(wire(
            &Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap(),
        ))
    };
    let decode_cases = [
        ("latents", v1::DecodeLatentsRequest::default()),
        (
            "latents",
            v1::DecodeLatentsRequest {
                latents: z(&[1, 3, 8, 8]),
                ..Default::default()
            },
        ),
        (
            "latents",
            v1::DecodeLatentsRequest {
                latents: z(&[1, 4, 0, 8]),
                ..Default::default()
            },
        ),
        (
            "latents",
            v1::DecodeLatentsRequest {
                latents: z(&[4, 8, 8]),
                ..Default::default()
            },
        ),
        (
            "latents",
            v1::DecodeLatentsRequest {
                latents: Some(v1::Tensor {
                    shape: vec![1, 4, 8, 8],
                    dtype: 1,
                    data: vec![0; 7].into(),
                }),
                ..Default::default()
            },
        ),
        (
            "format",
            v1::DecodeLatentsRequest {
                latents: z(&[1, 4, 8, 8]),
                format: 7,
                ..Default::default()
            },
        ),
        (
            "quality",
            v1::DecodeLatentsRequest {
                latents: z(&[1, 4, 8, 8]),
                format: v1::ImageFormat::Jpeg as i32,
                quality: 101,
                ..Default::default()
            },
        ),
    ];
    for (field, req) in decode_cases {
        let e = c.decode_latents(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(&format!("invalid `{field}`")),
            "{field}: {}",
            e.message()
        );
    }
    let png = std::fs::read(fixtures_dir().join("tiny/reference/decoder/init_image.png")).unwrap();
    let encode_cases = [
        ("images", v1::EncodeImagesRequest::default()),
        (
            "image",
            v1::EncodeImagesRequest {
                images: vec![b"not an image".to_vec()],
                width: 64,
                height: 64,
                ..Default::default()
            },
        ),
        (
            "image",
            v1::EncodeImagesRequest {
                images: vec![png[..png.len() / 2].to_vec()],
                width: 64,
                height: 64,
                ..Default::default()
            },
        ),
        (
            "width",
            v1::EncodeImagesRequest {
                images: vec![png.clone()],
                width: 100,
                height: 64,
                ..Default::default()
            },
        ),
        (
            "masks",
            v1::EncodeImagesRequest {
                images: vec![png.clone()],
                masks: vec![png.clone(), png.clone()],
                width: 64,
                height: 64,
                ..Default::default()
            },
        ),
        (
            "pixels",
            v1::EncodeImagesRequest {
                pixels: z(&[1, 4, 64, 64]),
                ..Default::default()
            },
        ),
    ];
    for (field, req) in encode_cases {
        let e = c.encode_images(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(
            e.message().contains(&format!("invalid `{field}`")),
            "{field}: {}",
            e.message()
        );
    }
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_checkpoint_makes_the_service_exit_with_the_reason() {
    let listeners = Listeners::loopback().await.unwrap();
    let config = <Config as clap::Parser>::parse_from(stage_args(
        "kd-movq",
        std::path::Path::new("/nonexistent/kandinsky"),
        &[],
    ));
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        run_with_listeners(config, listeners, Shutdown::new()),
    )
    .await
    .expect("the service exits")
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("/nonexistent/kandinsky/model_index.json"),
        "{err}"
    );
}

/// 2048² latents to decode and a small PNG to encode at 2048², each with `budget`.
fn large_calls(
    budget: Duration,
) -> (
    tonic::Request<v1::DecodeLatentsRequest>,
    tonic::Request<v1::EncodeImagesRequest>,
) {
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 256, 256), &Device::Cpu).unwrap();
    let mut decode = tonic::Request::new(v1::DecodeLatentsRequest {
        latents: Some(wire(&latents)),
        ..Default::default()
    });
    decode.set_timeout(budget);
    let mut png = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 60]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut encode = tonic::Request::new(v1::EncodeImagesRequest {
        images: vec![png],
        width: 2048,
        height: 2048,
        ..Default::default()
    });
    encode.set_timeout(budget);
    (decode, encode)
}

/// `Movq.DecodeLatents` / `Movq.EncodeImages` at 2048² with a deadline far below the warm-up estimate:
/// refused at once, naming the estimate.
#[tokio::test]
async fn large_calls_that_cannot_finish_in_time_are_refused_at_once() {
    let (srv, mut c) = start_with("deep/kandinsky-2-2-decoder", &["--max-pixels", "4194304"]).await;
    let (decode, encode) = large_calls(Duration::from_millis(300));
    let t = std::time::Instant::now();
    let e = c.decode_latents(decode).await.unwrap_err();
    let e2 = c.encode_images(encode).await.unwrap_err();
    for e in [e, e2] {
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        let m = e.message();
        assert!(
            m.starts_with(
                "deadline exceeded: the request deadline would pass before its work ends"
            ) && m.contains("MoVQ"),
            "{m}"
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "refused after {:?}",
        t.elapsed()
    );
    srv.shutdown().await.unwrap();
}

/// A decode admitted whatever its estimate (`--admission-safety 0`): past its deadline the
/// stage stops inside the MoVQ (between layers and attention chunks), not minutes later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_calls_past_their_deadline_stop_inside_the_movq() {
    let flags = ["--max-pixels", "4194304", "--admission-safety", "0"];
    let (srv, mut c) = start_with("deep/kandinsky-2-2-decoder", &flags).await;
    // 1 s: time for the 1 MB of latents to arrive and be checked on a busy machine.
    let (decode, _) = large_calls(Duration::from_secs(1));
    let e = c.decode_latents(decode).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let quiet = kd_testkit::cpu::until_cpu_quiet(Duration::from_secs(5)).await;
    eprintln!("decode 2048²: CPU quiet {quiet:?} after the status");
    // Encode at the CPU default limit (1024²): its longest piece is a full-resolution group
    // norm (~0.7 s here; ~2.5 s at 2048²), every convolution runs in bands.
    let mut png = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 60]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut encode = tonic::Request::new(v1::EncodeImagesRequest {
        images: vec![png],
        width: 1024,
        height: 1024,
        ..Default::default()
    });
    encode.set_timeout(Duration::from_millis(1500));
    let e = c.encode_images(encode).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    let quiet = kd_testkit::cpu::until_cpu_quiet(Duration::from_secs(5)).await;
    eprintln!("encode 1024²: CPU quiet {quiet:?} after the status");
    srv.shutdown().await.unwrap();
}

/// Over `--max-pixels` (1024² by default on a CPU), decode and encode are refused by field
/// before any work.
#[tokio::test]
async fn images_over_max_pixels_are_refused_by_name() {
    let (srv, mut c) = start("deep/kandinsky-2-2-decoder").await;
    let latents = Tensor::zeros((1, 4, 160, 128), candle_core::DType::F32, &Device::Cpu).unwrap();
    let e = c
        .decode_latents(v1::DecodeLatentsRequest {
            latents: Some(wire(&latents)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("invalid `latents`") && e.message().contains("1280×1024"),
        "{}",
        e.message()
    );
    let e = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![vec![0u8; 8]],
            width: 1088,
            height: 1024,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("invalid `height`") && e.message().contains("--max-pixels"),
        "{}",
        e.message()
    );
    srv.shutdown().await.unwrap();
}

/// Micro-batching: three concurrent decodes of one latent size (1, 1 and 2 images, their own
/// formats) fill one decoder call of 4 images; each gets its own images, equal to the same call
/// on a MoVQ stage with batching off, and the metrics show one call for three requests. A decode
/// of another size is a class of its own.
#[tokio::test]
async fn concurrent_decodes_share_one_decoder_call_and_each_gets_its_own_images() {
    let refs =
        load_reference(fixtures_dir().join("deep/reference/decoder/movq.safetensors")).unwrap();
    let a = get(&refs, "latents");
    let b = a.flip(&[3]).unwrap().affine(-0.7, 0.1).unwrap();
    let both = Tensor::cat(&[a, &b], 0).unwrap();
    let req = |z: &Tensor, format: v1::ImageFormat| v1::DecodeLatentsRequest {
        latents: Some(wire(z)),
        return_pixels: true,
        format: format as i32,
        ..Default::default()
    };
    let reqs = [
        req(a, v1::ImageFormat::Png),
        req(&b, v1::ImageFormat::Jpeg),
        req(&both, v1::ImageFormat::Png),
    ];
    let model = "deep/kandinsky-2-2-decoder";
    let (alone_srv, mut alone) = start_with(model, &["--max-batch-rows", "0"]).await;
    let mut want = Vec::new();
    for r in &reqs {
        want.push(alone.decode_latents(r.clone()).await.unwrap().into_inner());
    }
    alone_srv.shutdown().await.unwrap();

    let flags = ["--max-batch-rows", "4", "--batch-wait-ms", "5000"];
    let (srv, c) = start_with(model, &flags).await;
    let (mut c1, mut c2, mut c3) = (c.clone(), c.clone(), c.clone());
    let (r1, r2, r3) = tokio::join!(
        c1.decode_latents(reqs[0].clone()),
        c2.decode_latents(reqs[1].clone()),
        c3.decode_latents(reqs[2].clone()),
    );
    let got: Vec<_> = [r1, r2, r3]
        .into_iter()
        .map(|r| r.unwrap().into_inner())
        .collect();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.images.len(), w.images.len(), "call {i}: images");
        // The decoder's convolutions and norms work per image: batched rows are bit-identical.
        assert_eq!(g.pixels, w.pixels, "call {i}: pixels");
        assert_eq!(g.images, w.images, "call {i}: encoded images");
    }
    // The 2-image call's rows are the two 1-image calls' pixels.
    let pixels = |r: &v1::DecodeLatentsResponse| unwire(r.pixels.as_ref().unwrap());
    for (row, one) in [(0, &got[0]), (1, &got[1])] {
        let pair_row = pixels(&got[2]).narrow(0, row, 1).unwrap();
        assert_close("a row of the pair", &pair_row, &pixels(one), 0.0);
    }
    assert_eq!(got[2].images[0], got[0].images[0]);

    // Another latent size is another class, recorded under its own label; its pixels are
    // diffusers'.
    let mut c4 = c.clone();
    let ns = req(get(&refs, "ns_latents"), v1::ImageFormat::Png);
    let r = c4.decode_latents(ns).await.unwrap().into_inner();
    assert_close(
        "ns pixels",
        &pixels(&r),
        get(&refs, "ns_decoded_nhwc01"),
        1e-4,
    );

    let text = scrape(srv.metrics).await;
    let m = |name: &str| kd_testkit::metric(&text, name, &[]);
    assert_eq!(m("kd_batch_requests_count"), Some(2.0), "{text}");
    assert_eq!(m("kd_batch_requests_sum"), Some(4.0), "{text}");
    assert_eq!(m("kd_batch_size_sum"), Some(5.0), "{text}");
    let classes = text
        .lines()
        .filter(|l| l.starts_with("kd_batch_wait_seconds_count"))
        .count();
    assert_eq!(classes, 2, "{text}");
    srv.shutdown().await.unwrap();
}
