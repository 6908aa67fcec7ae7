//! The MoVQ stage serving a Kandinsky 2.0 folder (`tests/fixtures/kd20`, the official layout with
//! a tiny `vae.ckpt` + `vae.json`) over real gRPC on loopback: the KL autoencoder decodes the
//! UNet's scaled latents to the official `process_images` bytes, encodes images prepared as the
//! official `prepare_image` to the posterior sampled from each image's seed (times the scale),
//! returns inpaint / outpaint repaint masks at pixel resolution, refuses what makes no sense for
//! it by field name, and reports the Kandinsky 2.0 family and its `vae` component.

use candle_core::{DType, Device, Tensor};
use kd_models::image::resample::{resize, Filter, Pixels};
use kd_models::image::{outpaint_canvas, Margins};
use kd_models::kd20::pipeline::process_images;
use kd_models::kl::{posterior_noise, AutoencoderKl, KlConfig};
use kd_movq::{run_with_listeners, Config};
use kd_proto::v1::{self, movq_client::MovqClient};
use kd_testkit::parity::rel_l2;
use kd_testkit::{fixtures_dir, stage_args, stage_info, unwire, wait_serving, wire, TestServer};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

/// Pixels per latent of the fixture's KL autoencoder (four levels).
const SF: usize = 8;
/// Largest relative L2 distance between the served and the in-process encode.
const ENCODE_TOL: f64 = 1e-6;

fn kd20() -> PathBuf {
    fixtures_dir().join("kd20")
}

/// A MoVQ stage on the folder `dir`, SERVING, and a client of it.
async fn start_on(dir: &Path) -> (TestServer, MovqClient<Channel>) {
    let config = <Config as clap::Parser>::parse_from(stage_args("kd-movq", dir, &[]));
    let srv = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(&srv, "kandinsky.v1.Movq", Duration::from_secs(120)).await;
    let client = MovqClient::new(srv.channel().await);
    (srv, client)
}

/// The fixture's autoencoder loaded in-process, as the official folder holds it.
fn vae() -> AutoencoderKl {
    let dir = kd20();
    let cfg = KlConfig::from_file(&dir.join("vae.json")).unwrap();
    AutoencoderKl::load(&dir.join("vae.ckpt"), &cfg, DType::F32, &Device::Cpu).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Deterministic (B, 4, h, w) latents in the UNet's scaled space (about unit scale).
fn latents(b: usize, h: usize, w: usize, seed: u64) -> Tensor {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f32> = (0..b * 4 * h * w)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 3.0 - 1.5
        })
        .collect();
    Tensor::from_vec(v, (b, 4, h, w), &Device::Cpu).unwrap()
}

/// A deterministic RGB test image (gradients and a checker).
fn test_image(w: u32, h: u32, shift: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let checker = if ((x + shift) / 8 + y / 8).is_multiple_of(2) {
            60
        } else {
            0
        };
        image::Rgb([
            ((x + shift) * 255 / w.max(2)).min(255) as u8,
            (y * 255 / h.max(2)) as u8,
            ((x * 7 + y * 13 + shift) % 196) as u8 + checker,
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

/// The official `prepare_image(img, w, h)`: `resize((w, h), BICUBIC, reducing_gap=1)`, then
/// `u8 / 127.5 − 1`, (1, 3, h, w) f32.
fn prepare_image(img: &image::RgbImage, w: usize, h: usize) -> Tensor {
    let src = Pixels {
        w: img.width() as usize,
        h: img.height() as usize,
        c: 3,
        data: img.as_raw().clone(),
    };
    let p = resize(&src, w, h, Filter::Bicubic, Some(1.0)).unwrap();
    let v: Vec<f32> = p.data.iter().map(|&b| f32::from(b) / 127.5 - 1.0).collect();
    Tensor::from_vec(v, (h, w, 3), &Device::Cpu)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .contiguous()
        .unwrap()
}

/// The in-process encode: `vae.encode(prepared, posterior_noise(seeds))`.
fn in_process_encode(vae: &AutoencoderKl, prepared: &Tensor, seeds: &[u64]) -> Tensor {
    vae.encode(prepared, &mut posterior_noise(seeds)).unwrap()
}

/// Asserts `got` is `want` within [`ENCODE_TOL`] (relative L2) and returns the distance.
fn assert_encode_close(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "{what}");
    let d = rel_l2(got, want).unwrap();
    eprintln!("{what}: rel L2 {d:.3e}");
    assert!(d <= ENCODE_TOL, "{what}: rel L2 {d:.3e} > {ENCODE_TOL:e}");
    d
}

#[tokio::test]
async fn decoded_latents_are_the_official_process_images_bytes() {
    let (srv, mut c) = start_on(&kd20()).await;
    let vae = vae();

    // The stage reports Kandinsky 2.0 and its `vae` component.
    let info = stage_info(srv.channel().await).await.unwrap();
    assert_eq!(info.family, v1::ModelFamily::Kandinsky20 as i32, "{info:?}");
    assert_eq!(info.component, "vae");
    assert_eq!(info.dtype, v1::DType::DtypeF32 as i32);
    assert_eq!(info.device, "cpu");
    assert_eq!(info.revision.len(), 12, "{info:?}");

    // Batch 2, 8×8 latents → 64×64 images.
    let z = latents(2, 8, 8, 3);
    let resp = c
        .decode_latents(v1::DecodeLatentsRequest {
            latents: Some(wire(&z)),
            return_pixels: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = process_images(&vae.decode(&z).unwrap()).unwrap();
    assert_eq!(want.dims(), &[2, 64, 64, 3]);
    let want_bytes: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(resp.images.len(), 2);
    let mut got_bytes = Vec::new();
    for img in &resp.images {
        assert_eq!(img.format, v1::ImageFormat::Png as i32);
        assert_eq!((img.width, img.height), (64, 64));
        let png = image::load_from_memory_with_format(&img.data, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        got_bytes.extend_from_slice(png.as_raw());
    }
    assert!(
        got_bytes == want_bytes,
        "PNG bytes differ from process_images(vae.decode(latents))"
    );
    // A meaningful comparison: the bytes vary and are not all clamped.
    let distinct: std::collections::BTreeSet<u8> = want_bytes.iter().copied().collect();
    let clamped = want_bytes.iter().filter(|&&b| b == 0 || b == 255).count();
    eprintln!(
        "decode: {} distinct byte values, {clamped} of {} clamped",
        distinct.len(),
        want_bytes.len()
    );
    assert!(distinct.len() > 16, "{} distinct bytes", distinct.len());
    assert!(clamped < want_bytes.len() / 2, "{clamped} clamped bytes");

    // return_pixels: the bytes / 255 as f32, NHWC.
    let pixels = unwire(resp.pixels.as_ref().unwrap());
    assert_eq!(pixels.dims(), &[2, 64, 64, 3]);
    let unit: Vec<f32> = want_bytes.iter().map(|&b| f32::from(b) / 255.0).collect();
    assert_eq!(floats(&pixels), unit, "pixels = u8 / 255");
    let model = resp.model.unwrap();
    assert_eq!(model.family, v1::ModelFamily::Kandinsky20 as i32);
    assert_eq!(model.component, "vae");

    // Non-square, one row, JPEG: an image of 8h × 8w.
    let resp = c
        .decode_latents(v1::DecodeLatentsRequest {
            latents: Some(wire(&latents(1, 5, 9, 4))),
            format: v1::ImageFormat::Jpeg as i32,
            quality: 80,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.images[0].format, v1::ImageFormat::Jpeg as i32);
    let img = image::load_from_memory(&resp.images[0].data).unwrap();
    assert_eq!((img.width(), img.height()), (9 * SF as u32, 5 * SF as u32));
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn encoded_images_are_the_in_process_posterior_samples_of_their_seeds() {
    let (srv, mut c) = start_on(&kd20()).await;
    let vae = vae();
    // Two images of another size than the request's: resized as `prepare_image`.
    let (a, b) = (test_image(80, 72, 0), test_image(80, 72, 37));
    let encode =
        |images: Vec<Vec<u8>>, seeds: Vec<u64>, (w, h): (u32, u32)| v1::EncodeImagesRequest {
            images,
            width: w,
            height: h,
            seeds,
            ..Default::default()
        };
    let prep = |img: &image::RgbImage, w: usize, h: usize| prepare_image(img, w, h);
    let both = Tensor::cat(&[prep(&a, 64, 64), prep(&b, 64, 64)], 0).unwrap();

    let resp = c
        .encode_images(encode(vec![png_of(&a), png_of(&b)], vec![7, 8], (64, 64)))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.mask.is_none());
    let got = resp.latents.as_ref().unwrap();
    assert_eq!(got.dtype, v1::DType::DtypeF32 as i32);
    let got = unwire(got);
    assert_eq!(got.dims(), &[2, 4, 8, 8]);
    let want = in_process_encode(&vae, &both, &[7, 8]);
    assert_encode_close("encode 2 × 64², seeds [7, 8]", &got, &want);
    let model = resp.model.unwrap();
    assert_eq!(model.family, v1::ModelFamily::Kandinsky20 as i32);
    assert_eq!(model.component, "vae");

    // The posterior is sampled: another seed, other latents; its mode is neither.
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    let resp = c
        .encode_images(encode(vec![png_of(&a), png_of(&b)], vec![7, 9], (64, 64)))
        .await
        .unwrap()
        .into_inner();
    let got2 = unwire(resp.latents.as_ref().unwrap());
    // A row depends only on its own image and seed: row 0 (seed 7) is unchanged, row 1 moved.
    assert_encode_close(
        "row 0 with seed 7 beside seed 9",
        &row(&got2, 0),
        &row(&got, 0),
    );
    let moved = rel_l2(&row(&got2, 1), &row(&got, 1)).unwrap();
    eprintln!("row 1, seed 9 vs seed 8: rel L2 {moved:.3e}");
    assert!(moved > 1e-3, "another seed, another sample: {moved:.3e}");
    // Alone, the first image with seed 7 is row 0 of the batch.
    let resp = c
        .encode_images(encode(vec![png_of(&a)], vec![7], (64, 64)))
        .await
        .unwrap()
        .into_inner();
    let alone = unwire(resp.latents.as_ref().unwrap());
    assert_encode_close("image a alone, seed 7", &alone, &row(&got, 0));
    // Swapped order: each row follows its own image and seed.
    let resp = c
        .encode_images(encode(vec![png_of(&b), png_of(&a)], vec![8, 7], (64, 64)))
        .await
        .unwrap()
        .into_inner();
    let swapped = unwire(resp.latents.as_ref().unwrap());
    assert_encode_close("swapped row 0", &row(&swapped, 0), &row(&got, 1));
    assert_encode_close("swapped row 1", &row(&swapped, 1), &row(&got, 0));

    // A size that is a multiple of 8 but not of 64 (56 × 72): latents (1, 4, 7, 9).
    let resp = c
        .encode_images(encode(vec![png_of(&a)], vec![11], (72, 56)))
        .await
        .unwrap()
        .into_inner();
    let got = unwire(resp.latents.as_ref().unwrap());
    assert_eq!(got.dims(), &[1, 4, 7, 9]);
    let want = in_process_encode(&vae, &prep(&a, 72, 56), &[11]);
    assert_encode_close("encode 72×56", &got, &want);

    // Raw pixels (B, 3, H, W) in [-1, 1] are encoded as they are.
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            pixels: Some(wire(&both)),
            seeds: vec![7, 8],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = unwire(resp.latents.as_ref().unwrap());
    assert_encode_close(
        "pixels, seeds [7, 8]",
        &got,
        &in_process_encode(&vae, &both, &[7, 8]),
    );
    srv.shutdown().await.unwrap();
}

#[tokio::test]
async fn inpaint_and_outpaint_masks_come_back_at_pixel_resolution() {
    let (srv, mut c) = start_on(&kd20()).await;
    let vae = vae();
    let img = test_image(64, 64, 5);
    let png = png_of(&img);

    // Left half white = repaint. The image part is `prepare_image`'s, as without a mask.
    let mask =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png.clone()],
            masks: vec![png_of(&mask)],
            width: 64,
            height: 64,
            seeds: vec![3],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let want = in_process_encode(&vae, &prepare_image(&img, 64, 64), &[3]);
    assert_encode_close(
        "inpaint latents",
        &unwire(resp.latents.as_ref().unwrap()),
        &want,
    );
    let m = unwire(resp.mask.as_ref().unwrap());
    assert_eq!(m.dims(), &[1, 1, 64, 64]);
    for (i, v) in floats(&m).iter().enumerate() {
        let want = if i % 64 < 32 { 1.0 } else { 0.0 };
        assert_eq!(*v, want, "inpaint mask ({}, {})", i / 64, i % 64);
    }

    // Outpaint a 128×64 canvas with a 64-pixel left margin: the margin repaints.
    let margins = Margins {
        left: 64,
        ..Default::default()
    };
    let resp = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png],
            width: 128,
            height: 64,
            outpaint: Some(v1::OutpaintMargins {
                left: 64,
                ..Default::default()
            }),
            seeds: vec![4],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (canvas, _) = outpaint_canvas(&img, 128, 64, margins).unwrap();
    let want = in_process_encode(&vae, &prepare_image(&canvas, 128, 64), &[4]);
    let got = unwire(resp.latents.as_ref().unwrap());
    assert_eq!(got.dims(), &[1, 4, 8, 16]);
    assert_encode_close("outpaint latents", &got, &want);
    let m = unwire(resp.mask.as_ref().unwrap());
    assert_eq!(m.dims(), &[1, 1, 64, 128]);
    for (i, v) in floats(&m).iter().enumerate() {
        let want = if i % 128 < 64 { 1.0 } else { 0.0 };
        assert_eq!(*v, want, "outpaint mask ({}, {})", i / 128, i % 128);
    }
    srv.shutdown().await.unwrap();
}

/// `status` is INVALID_ARGUMENT naming `field` and saying each of `says`.
fn assert_refused(what: &str, status: &tonic::Status, field: &str, says: &[&str]) {
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let m = status.message();
    eprintln!("{what}: {m}");
    assert!(
        m.contains(&format!("invalid `{field}`")),
        "{what}: {m} (expected field `{field}`)"
    );
    for s in says {
        assert!(m.contains(s), "{what}: {m} (expected {s:?})");
    }
}

#[tokio::test]
async fn what_makes_no_sense_for_the_kl_autoencoder_is_refused_by_field() {
    let (srv, mut c) = start_on(&kd20()).await;
    let png = png_of(&test_image(64, 64, 0));
    let images = |n: usize| vec![png.clone(); n];

    // Seeds: required, exactly one per image (images or pixels).
    let cases = [
        (
            "missing seeds",
            images(2),
            None,
            vec![],
            &["0 seeds for 2 images", "exactly 2"][..],
        ),
        (
            "too many seeds",
            images(2),
            None,
            vec![1, 2, 3],
            &["3 seeds for 2 images", "exactly 2"],
        ),
        (
            "too few seeds",
            images(2),
            None,
            vec![1],
            &["1 seeds for 2 images", "exactly 2"],
        ),
        (
            "pixels without seeds",
            vec![],
            Some(Tensor::zeros((3, 3, 64, 64), DType::F32, &Device::Cpu).unwrap()),
            vec![],
            &["0 seeds for 3 images", "exactly 3"],
        ),
    ];
    for (what, images, pixels, seeds, says) in cases {
        let e = c
            .encode_images(v1::EncodeImagesRequest {
                images,
                pixels: pixels.as_ref().map(wire),
                width: 64,
                height: 64,
                seeds,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_refused(what, &e, "seeds", says);
    }

    // Sizes: multiples of the autoencoder's scale factor (8), for images and pixels.
    for (what, w, h, field) in [
        ("width 100", 100, 64, "width"),
        ("height 60", 64, 60, "height"),
        ("width 0", 0, 64, "width"),
        ("width over 2048", 2056, 64, "width"),
    ] {
        let e = c
            .encode_images(v1::EncodeImagesRequest {
                images: images(1),
                width: w,
                height: h,
                seeds: vec![1],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_refused(
            what,
            &e,
            field,
            &["a multiple of 8 (the KL autoencoder's scale factor) in 8..=2048"],
        );
    }
    let e = c
        .encode_images(v1::EncodeImagesRequest {
            pixels: Some(wire(
                &Tensor::zeros((1, 3, 60, 64), DType::F32, &Device::Cpu).unwrap(),
            )),
            seeds: vec![1],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused("pixels 60×64", &e, "pixels", &["positive multiples of 8"]);

    // Decode: a token map (integer tensor) is not latents; nor are 3-channel latents.
    let ids = Tensor::zeros((1, 8, 8), DType::I64, &Device::Cpu).unwrap();
    let rank4_ids = Tensor::zeros((1, 4, 8, 8), DType::I64, &Device::Cpu).unwrap();
    let three = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    for (what, t, says) in [
        (
            "token map",
            Some(&ids),
            &["dtype I64 (a token map)", "KL autoencoder"][..],
        ),
        (
            "I64 latents",
            Some(&rank4_ids),
            &["dtype I64 (a token map)"],
        ),
        ("3 channels", Some(&three), &["allowed (B, 4, h, w)"]),
        ("missing", None, &["required: (B, 4, h, w)"]),
    ] {
        let e = c
            .decode_latents(v1::DecodeLatentsRequest {
                latents: t.map(wire),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_refused(what, &e, "latents", says);
    }
    srv.shutdown().await.unwrap();
}

/// Seeds are Kandinsky 2.0 only: a Kandinsky 2.2 folder's deterministic MoVQ encoder refuses them.
#[tokio::test]
async fn seeds_are_refused_by_other_families() {
    let (srv, mut c) = start_on(&fixtures_dir().join("tiny/kandinsky-2-2-decoder")).await;
    let info = stage_info(srv.channel().await).await.unwrap();
    assert_eq!(info.family, v1::ModelFamily::Kandinsky22 as i32);
    let png = png_of(&test_image(64, 64, 0));
    let e = c
        .encode_images(v1::EncodeImagesRequest {
            images: vec![png.clone()],
            width: 64,
            height: 64,
            seeds: vec![1],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_refused(
        "seeds on a 2.2 folder",
        &e,
        "seeds",
        &["Kandinsky 2.0 only", "MoVQ", "allowed none"],
    );
    // Without seeds the same request is served.
    c.encode_images(v1::EncodeImagesRequest {
        images: vec![png],
        width: 64,
        height: 64,
        ..Default::default()
    })
    .await
    .unwrap();
    srv.shutdown().await.unwrap();
}
