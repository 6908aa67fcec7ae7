//! The MoVQ stage serving an aMUSEd folder (`tests/fixtures/tiny/amused-256`) over real gRPC on
//! loopback: its VQ-GAN decodes token maps to the in-process pipeline's PNG bytes, encodes images
//! to the in-process (and diffusers') token maps, returns inpaint / outpaint masks on the token
//! grid, refuses what is not a token map by field name, and reports the aMUSEd family.

use candle_core::{DType, Device, Tensor};
use kd_models::amused::AmusedPipeline;
use kd_models::image::resample::{resize, Filter, Pixels};
use kd_models::image::{encode_image, outpaint_canvas, Margins, OutputFormat};
use kd_models::CheckpointDir;
use kd_movq::{run_with_listeners, Config};
use kd_proto::v1::{self, movq_client::MovqClient};
use kd_testkit::parity::{assert_close, get, load_reference};
use kd_testkit::{fixtures_dir, stage_args, stage_info, unwire, wait_serving, wire, TestServer};
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// Pixels per token of the tiny VQ-GAN (two levels).
const SF: usize = 2;
/// Its codebook size.
const CODEBOOK: i64 = 32;

fn amused() -> PathBuf {
    fixtures_dir().join("tiny/amused-256")
}

/// A MoVQ stage on the tiny aMUSEd folder, SERVING, and a client of it.
async fn start() -> (TestServer, MovqClient<Channel>) {
    start_on(&amused()).await
}

/// A MoVQ stage on the aMUSEd folder `dir`, SERVING, and a client of it.
async fn start_on(dir: &std::path::Path) -> (TestServer, MovqClient<Channel>) {
    let config = <Config as clap::Parser>::parse_from(stage_args("kd-movq", dir, &[]));
    let srv = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(&srv, "kandinsky.v1.Movq", Duration::from_secs(120)).await;
    let client = MovqClient::new(srv.channel().await);
    (srv, client)
}

fn pipeline() -> AmusedPipeline {
    AmusedPipeline::load(
        &CheckpointDir::open(amused()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn ids(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// A deterministic (B, h, w) I64 token map with ids in the codebook.
fn token_map(b: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<i64> = (0..b * h * w)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % CODEBOOK as u64) as i64
        })
        .collect();
    Tensor::from_vec(v, (b, h, w), &Device::Cpu).unwrap()
}

/// A deterministic RGB test image (gradients and a checker, so every token differs).
fn test_image(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let checker = if (x / 8 + y / 8) % 2 == 0 { 60 } else { 0 };
        image::Rgb([
            (x * 255 / w.max(2)) as u8,
            (y * 255 / h.max(2)) as u8,
            ((x * 7 + y * 13) % 196) as u8 + checker,
        ])
    })
}

fn png_of<P, C>(img: &image::ImageBuffer<P, C>) -> Vec<u8>
where
    P: image::Pixel + image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

/// An 8-bit image's (1, 3, H, W) f32 `u8 / 255`, as aMUSEd's `VaeImageProcessor` makes it.
fn unit(img: &image::RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let hwc = Tensor::from_vec(img.as_raw().clone(), (h, w, 3), &Device::Cpu).unwrap();
    (hwc.permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        / 255.0)
        .unwrap()
}

/// The in-process path: `AmusedPipeline::decode` (clipped to [0, 1]), `round(x · 255)` as
/// diffusers' `numpy_to_pil`, PNG by `kd_models::image::encode_image`.
fn in_process_pngs(p: &AmusedPipeline, tokens: &Tensor) -> (Tensor, Vec<Vec<u8>>) {
    let nhwc = p
        .decode(tokens)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap()
        .contiguous()
        .unwrap();
    let (b, h, w, _) = nhwc.dims4().unwrap();
    let pngs = (0..b)
        .map(|i| {
            let bytes: Vec<u8> = floats(&nhwc.get(i).unwrap())
                .iter()
                .map(|&x| (x * 255.0).round_ties_even() as u8)
                .collect();
            let img = image::RgbImage::from_raw(w as u32, h as u32, bytes).unwrap();
            encode_image(&img, OutputFormat::Png).unwrap()
        })
        .collect();
    (nhwc, pngs)
}

#[tokio::test]
async fn decoded_token_maps_equal_the_in_process_pngs_byte_for_byte() {
    let (srv, mut c) = start().await;
    let p = pipeline();

    // The stage reports the aMUSEd family and its VQ-GAN component.
    let info = stage_info(srv.channel().await).await.unwrap();
    assert_eq!(info.family, v1::ModelFamily::Amused as i32);
    assert_eq!(info.component, "vqvae");

    let refs =
        load_reference(fixtures_dir().join("tiny/reference/amused/vqvae.safetensors")).unwrap();
    let cases = [
        ("diffusers indices", get(&refs, "indices").clone()),
        ("64² token map", token_map(2, 32, 32, 7)),
        ("non-square", token_map(1, 8, 24, 11)),
    ];
    for (what, tokens) in cases {
        let resp = c
            .decode_latents(v1::DecodeLatentsRequest {
                latents: Some(wire(&tokens)),
                return_pixels: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let (nhwc, pngs) = in_process_pngs(&p, &tokens);
        let (b, h, w) = tokens.dims3().unwrap();
        assert_eq!(resp.images.len(), b, "{what}");
        for (img, png) in resp.images.iter().zip(&pngs) {
            assert_eq!(img.format, v1::ImageFormat::Png as i32, "{what}");
            assert_eq!(
                (img.width, img.height),
                ((w * SF) as u32, (h * SF) as u32),
                "{what}"
            );
            assert!(
                img.data == *png,
                "{what}: PNG bytes differ from the in-process path"
            );
        }
        // The post-processed pixels are the in-process [0, 1] images, NHWC.
        let pixels = unwire(resp.pixels.as_ref().unwrap());
        assert_eq!(pixels.dims(), nhwc.dims(), "{what}");
        assert_eq!(floats(&pixels), floats(&nhwc), "{what}: pixels");
        let model = resp.model.unwrap();
        assert_eq!(model.family, v1::ModelFamily::Amused as i32);
        assert_eq!(model.component, "vqvae");
    }

    // And the in-process path is diffusers' (clipped) decode of the reference indices.
    let resp = c
        .decode_latents(v1::DecodeLatentsRequest {
            latents: Some(wire(get(&refs, "indices"))),
            return_pixels: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = get(&refs, "decoded")
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_close(
        "decoded vs diffusers",
        &unwire(resp.pixels.as_ref().unwrap()),
        &want,
        1e-4,
    );

    // JPEG and WebP outputs decode to images of the right size.
    for format in [v1::ImageFormat::Jpeg, v1::ImageFormat::Webp] {
        let resp = c
            .decode_latents(v1::DecodeLatentsRequest {
                latents: Some(wire(&token_map(1, 32, 32, 3))),
                format: format as i32,
                quality: 80,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.images[0].format, format as i32);
        let img = image::load_from_memory(&resp.images[0].data).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64), "{format:?}");
    }
    srv.shutdown().await.unwrap();
}

/// The deep fixture (three VQ-GAN levels, scale factor 4): decode and encode over gRPC match
/// diffusers' `VQModel` on its reference indices and image.
#[tokio::test]
async fn the_deep_vq_gan_matches_diffusers_over_grpc() {
    let (srv, mut c) = start_on(&fixtures_dir().join("deep/amused-512")).await;
    let refs =
        load_reference(fixtures_dir().join("deep/reference/amused/vqvae.safetensors")).unwrap();
    let resp = c
        .decode_latents(v1::DecodeLatentsRequest {
            latents: Some(wire(get(&refs, "indices"))),
            return_pixels: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.images[0].width, resp.images[0].height), (64, 64));
    let want = get(&refs, "decoded")
        .clamp(0f32, 1f32)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    assert_close(
        "deep decoded",
        &unwire(resp.pixels.as_ref().unwrap()),
        &want,
        1e-4,
    );
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            pixels: Some(wire(&get(&refs, "image").affine(2.0, -1.0).unwrap())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ids(&unwire(resp.latents.as_ref().unwrap())),
        ids(get(&refs, "encoded_indices")),
        "deep tokens vs diffusers"
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn encoded_images_are_the_in_process_token_maps() {
    let (srv, mut c) = start().await;
    let p = pipeline();

    // An image of the requested size: the preprocessed pixels are `u8 / 255`, no resize.
    let img = test_image(64, 64);
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png_of(&img)],
            width: 64,
            height: 64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.mask.is_none());
    let got = resp.latents.as_ref().unwrap();
    assert_eq!(got.dtype, v1::DType::DtypeI64 as i32);
    let got = unwire(got);
    assert_eq!(got.dims(), &[1, 32, 32]);
    let want = p.encode_image(&unit(&img)).unwrap();
    assert_eq!(ids(&got), ids(&want), "64² image tokens");
    let distinct: std::collections::BTreeSet<i64> = ids(&got).into_iter().collect();
    assert!(
        distinct.len() > 1,
        "a varied image has varied tokens: {distinct:?}"
    );
    assert_eq!(resp.model.unwrap().family, v1::ModelFamily::Amused as i32);

    // Another size: resized with Pillow LANCZOS (the `VaeImageProcessor` default), then / 255.
    let img = test_image(100, 70);
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png_of(&img)],
            width: 128,
            height: 64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let src = Pixels {
        w: 100,
        h: 70,
        c: 3,
        data: img.as_raw().clone(),
    };
    let resized = resize(&src, 128, 64, Filter::Lanczos, None).unwrap();
    let resized = image::RgbImage::from_raw(128, 64, resized.data).unwrap();
    let got = unwire(resp.latents.as_ref().unwrap());
    assert_eq!(got.dims(), &[1, 32, 64]);
    let want = p.encode_image(&unit(&resized)).unwrap();
    assert_eq!(ids(&got), ids(&want), "resized image tokens");

    // Raw pixels in [-1, 1] (the wire's convention): diffusers' token maps of the [0, 1] images.
    let refs =
        load_reference(fixtures_dir().join("tiny/reference/amused/vqvae.safetensors")).unwrap();
    let image01 = get(&refs, "image");
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            pixels: Some(wire(&image01.affine(2.0, -1.0).unwrap())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = unwire(resp.latents.as_ref().unwrap());
    assert_eq!(got.dims(), &[2, 8, 8]);
    assert_eq!(
        ids(&got),
        ids(get(&refs, "encoded_indices")),
        "pixels tokens vs diffusers"
    );
    srv.shutdown().await.unwrap();
}

/// The (h, w) values of a (1, 1, h, w) mask.
fn mask_values(t: &v1::Tensor) -> (Vec<usize>, Vec<f32>) {
    let m = unwire(t);
    (m.dims().to_vec(), floats(&m))
}

#[tokio::test]
async fn inpaint_and_outpaint_masks_come_back_on_the_token_grid() {
    let (srv, mut c) = start().await;
    let img = test_image(64, 64);
    let png = png_of(&img);
    let plain = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png.clone()],
            width: 64,
            height: 64,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let plain = ids(&unwire(plain.latents.as_ref().unwrap()));

    // Left half white (repaint): the left 16 of 32 token columns, as a grey and as an RGB mask.
    let grey =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let rgb = image::RgbImage::from_fn(64, 64, |x, _| {
        image::Rgb(if x < 32 { [255, 255, 255] } else { [0, 0, 0] })
    });
    for (what, mask) in [("grey", png_of(&grey)), ("rgb", png_of(&rgb))] {
        let resp = c
            .encode_images(v1::EncodeImagesRequest {
                images: vec![png.clone()],
                masks: vec![mask],
                width: 64,
                height: 64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The image part is the plain encode's token map.
        assert_eq!(
            ids(&unwire(resp.latents.as_ref().unwrap())),
            plain,
            "{what}"
        );
        let mt = resp.mask.as_ref().unwrap();
        assert_eq!(mt.dtype, v1::DType::DtypeF32 as i32);
        let (dims, v) = mask_values(mt);
        assert_eq!(dims, [1, 1, 32, 32], "{what}");
        for (i, m) in v.iter().enumerate() {
            let want = if i % 32 < 16 { 1.0 } else { 0.0 };
            assert_eq!(*m, want, "{what}: token ({}, {})", i / 32, i % 32);
        }
    }

    // Outpaint: a 128×64 canvas with a 64-pixel left margin: the left 32 token columns repaint.
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png.clone()],
            width: 128,
            height: 64,
            outpaint: Some(v1::OutpaintMargins {
                left: 64,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unwire(resp.latents.as_ref().unwrap()).dims(), &[1, 32, 64]);
    let (dims, v) = mask_values(resp.mask.as_ref().unwrap());
    assert_eq!(dims, [1, 1, 32, 64]);
    for (i, m) in v.iter().enumerate() {
        let want = if i % 64 < 32 { 1.0 } else { 0.0 };
        assert_eq!(*m, want, "outpaint: token ({}, {})", i / 64, i % 64);
    }
    // The token map is the in-process one of the outpaint canvas (the VQ-GAN's group norms see
    // the whole canvas, so the kept half's tokens need not equal the plain image's).
    let margins = Margins {
        left: 64,
        ..Default::default()
    };
    let (canvas, _) = outpaint_canvas(&img, 128, 64, margins).unwrap();
    let want = pipeline().encode_image(&unit(&canvas)).unwrap();
    assert_eq!(ids(&unwire(resp.latents.as_ref().unwrap())), ids(&want));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn what_is_not_a_token_map_is_refused_naming_latents() {
    let (srv, mut c) = start().await;
    let f32s = |shape: &[usize]| {
        Some(wire(
            &Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
        ))
    };
    let i64s = |shape: &[usize], v: i64| Some(wire(&Tensor::full(v, shape, &Device::Cpu).unwrap()));
    let cases = [
        ("missing", None, "required"),
        ("float token map", f32s(&[1, 8, 8]), "dtype F32"),
        ("Kandinsky latents", f32s(&[1, 8, 8, 8]), "(B, h, w)"),
        ("rank 4 ids", i64s(&[1, 1, 8, 8], 0), "(B, h, w)"),
        ("rank 2 ids", i64s(&[8, 8], 0), "(B, h, w)"),
        ("empty side", i64s(&[1, 0, 8], 0), "(B, h, w)"),
        (
            "batch over --max-batch",
            i64s(&[17, 4, 4], 0),
            "B in 1..=16",
        ),
        (
            "id = codebook size",
            i64s(&[1, 4, 4], CODEBOOK),
            "outside the codebook",
        ),
        ("negative id", i64s(&[1, 4, 4], -1), "outside the codebook"),
        ("over --max-pixels", i64s(&[1, 520, 520], 0), "--max-pixels"),
    ];
    for (what, latents, says) in cases {
        let e = c
            .decode_latents(v1::DecodeLatentsRequest {
                latents,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(
            e.message().contains("invalid `latents`") && e.message().contains(says),
            "{what}: {}",
            e.message()
        );
    }
    // One bad id in a valid map is found and named by position.
    let mut v = vec![0i64; 2 * 4 * 4];
    v[16 + 5] = 40;
    let t = Tensor::from_vec(v, (2, 4, 4), &Device::Cpu).unwrap();
    let e = c
        .decode_latents(v1::DecodeLatentsRequest {
            latents: Some(wire(&t)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("invalid `latents`")
            && e.message().contains("token 40 at (1, 1, 1)")
            && e.message().contains("0..32"),
        "{}",
        e.message()
    );

    // A mask of another size than its image.
    let png = png_of(&test_image(64, 64));
    let e = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png.clone()],
            masks: vec![png_of(&image::GrayImage::new(32, 64))],
            width: 64,
            height: 64,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("invalid `mask_image`"),
        "{}",
        e.message()
    );
    srv.shutdown().await.unwrap();
}

/// The VQ-GAN's config says `force_upcast`: it runs in f32 whatever `--dtype` asks (its fp16
/// decode overflows), as diffusers' pipelines upcast it.
#[tokio::test]
async fn force_upcast_runs_the_vq_gan_in_f32() {
    let config =
        <Config as clap::Parser>::parse_from(stage_args("kd-movq", &amused(), &["--dtype=f16"]));
    let srv = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(&srv, "kandinsky.v1.Movq", Duration::from_secs(120)).await;
    let info = stage_info(srv.channel().await).await.unwrap();
    assert_eq!(info.dtype, v1::DType::DtypeF32 as i32, "{info:?}");
}
