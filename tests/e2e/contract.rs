//! The public contract documents itself: every limit and default the gateway enforces is
//! written in `gateway.proto`, from the same constants the server uses (this test reads them
//! from the code and checks both the proto text and the server's behaviour at each bound), and
//! the messages follow one naming rule.

use kd_denoiser::denoise::PREVIEW_MAX_SIDE;
use kd_gateway::sampling::{DEFAULT_GUIDANCE, MAX_GUIDANCE, MAX_STEPS, PRIOR_MIN_STEPS};
use kd_gateway::validate::{
    validate, Limits, DEFAULT_QUALITY, DEFAULT_SIDE, DEFAULT_STRENGTH, MAX_FUSION_ITEMS,
    OUTPAINT_MIN_INNER,
};
use kd_proto::v1::{self, generate_request::Task};
use kd_runtime::config::PixelArgs;
use std::path::PathBuf;

fn proto(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../proto/kandinsky/v1")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The comment lines of `gateway.proto`, joined into one text (so a phrase may wrap).
fn gateway_comments() -> String {
    proto("gateway.proto")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("//"))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn every_limit_and_default_is_written_in_the_proto() {
    let doc = gateway_comments();
    let l = Limits::default();
    let side = |px: u64| (px as f64).sqrt() as u64;
    let phrases = [
        format!(
            "a multiple of 64 in 64..={}; default {DEFAULT_SIDE}",
            l.max_side
        ),
        format!("--max-images, default {}", l.max_images),
        format!("0..={} characters", l.max_prompt_chars),
        format!("1 byte to {} MiB each", l.max_image_bytes >> 20),
        format!(
            "`--max-message-bytes` (default {} MiB)",
            l.max_request_bytes >> 20
        ),
        format!("{PRIOR_MIN_STEPS}..={MAX_STEPS} (the UnCLIP schedule needs two timesteps)"),
        format!("0..={MAX_GUIDANCE} and finite, default {DEFAULT_GUIDANCE:.1}"),
        format!("In (0, 1]; default {DEFAULT_STRENGTH}"),
        format!("1..={MAX_FUSION_ITEMS} items"),
        format!("(0 = default {DEFAULT_QUALITY})"),
        format!("at most {PREVIEW_MAX_SIDE} pixels on the long side"),
        format!("the inner rectangle is at least {OUTPAINT_MIN_INNER} x {OUTPAINT_MIN_INNER}"),
        format!("Each margin is 0..={} pixels", l.max_side),
        format!(
            "default {0}x{0} on a CPU, {1}x{1} on a GPU",
            side(PixelArgs::CPU_DEFAULT),
            side(PixelArgs::GPU_DEFAULT)
        ),
        format!("1..={MAX_STEPS} of them"),
    ];
    let missing: Vec<&String> = phrases
        .iter()
        .filter(|p| !doc.contains(p.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "gateway.proto does not say: {missing:#?}"
    );
}

fn text(prompt: &str) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: prompt.into(),
        ..Default::default()
    }
}

/// The field an INVALID_ARGUMENT names, or `None` when the request is valid.
fn refused(req: &v1::GenerateRequest) -> Option<String> {
    validate(req, &Limits::default(), || 7).err().map(|e| {
        let m = e.to_string();
        let field = m.split('`').nth(1).unwrap_or_default().to_string();
        assert!(
            m.contains("allowed") || m.contains("at most") || m.contains("must"),
            "{m}"
        );
        field
    })
}

#[test]
fn the_gateway_and_the_stages_share_their_bounds() {
    // The gateway (which links no model code) and the MoVQ stage check the same outpainting rule.
    assert_eq!(OUTPAINT_MIN_INNER, kd_models::image::OUTPAINT_MIN_INNER);
}

#[test]
fn the_server_enforces_what_the_proto_says_at_each_bound() {
    let l = Limits::default();
    // Defaults of unset optional fields.
    let plan = validate(&text("a cat"), &l, || 7).unwrap();
    assert_eq!((plan.width, plan.height), (DEFAULT_SIDE, DEFAULT_SIDE));
    assert_eq!(plan.seeds, [7]);
    assert_eq!(plan.quality, DEFAULT_QUALITY);
    assert_eq!(plan.sampling.prior_guidance, DEFAULT_GUIDANCE);
    // Sides.
    let sized = |w: u32| v1::GenerateRequest {
        width: Some(w),
        ..text("a cat")
    };
    assert_eq!(refused(&sized(l.max_side)), None);
    assert_eq!(refused(&sized(l.max_side + 64)).as_deref(), Some("width"));
    assert_eq!(refused(&sized(0)).as_deref(), Some("width"));
    // Prompt.
    assert_eq!(refused(&text(" ")).as_deref(), Some("prompt"));
    assert_eq!(refused(&text(&"x".repeat(l.max_prompt_chars))), None);
    let long = "é".repeat(l.max_prompt_chars + 1);
    assert_eq!(refused(&text(&long)).as_deref(), Some("prompt"));
    // Images per request.
    let n = |k: u32| v1::GenerateRequest {
        num_images: Some(k),
        ..text("a cat")
    };
    assert_eq!(refused(&n(l.max_images)), None);
    assert_eq!(refused(&n(l.max_images + 1)).as_deref(), Some("num_images"));
    assert_eq!(refused(&n(0)).as_deref(), Some("num_images"));
    // Prior steps and guidance.
    let prior = |steps: u32, g: f32| v1::GenerateRequest {
        prior: Some(v1::PriorParams {
            num_inference_steps: Some(steps),
            guidance_scale: Some(g),
        }),
        ..text("a cat")
    };
    assert_eq!(refused(&prior(PRIOR_MIN_STEPS, MAX_GUIDANCE)), None);
    assert_eq!(refused(&prior(MAX_STEPS, 0.0)), None);
    let f = "prior.num_inference_steps";
    assert_eq!(
        refused(&prior(PRIOR_MIN_STEPS - 1, 1.0)).as_deref(),
        Some(f)
    );
    assert_eq!(refused(&prior(MAX_STEPS + 1, 1.0)).as_deref(), Some(f));
    let g = "prior.guidance_scale";
    assert_eq!(refused(&prior(10, MAX_GUIDANCE + 1.0)).as_deref(), Some(g));
    assert_eq!(refused(&prior(10, f32::NAN)).as_deref(), Some(g));
    // Fusion items.
    let items = |k: usize| v1::GenerateRequest {
        task: Some(Task::Fusion(v1::Fusion {
            items: (0..k)
                .map(|_| v1::FusionItem {
                    item: Some(v1::fusion_item::Item::Text("a".into())),
                    weight: 1.0,
                })
                .collect(),
        })),
        ..text("")
    };
    assert_eq!(refused(&items(MAX_FUSION_ITEMS)), None);
    let over = refused(&items(MAX_FUSION_ITEMS + 1));
    assert_eq!(over.as_deref(), Some("fusion.items"));
    // Image bytes.
    let image = |len: usize| v1::GenerateRequest {
        task: Some(Task::Variation(v1::Variation {
            image: vec![0; len],
        })),
        ..text("")
    };
    assert_eq!(refused(&image(l.max_image_bytes)), None);
    let big = refused(&image(l.max_image_bytes + 1));
    assert_eq!(big.as_deref(), Some("variation.image"));
    // Outpaint margins: each within the side, the kept image at least the minimum.
    let outpaint = |left: u32, right: u32| v1::GenerateRequest {
        width: Some(256),
        task: Some(Task::Outpaint(v1::Outpaint {
            image: vec![1],
            left,
            right,
            ..Default::default()
        })),
        ..text("a cat")
    };
    let room = 256 - OUTPAINT_MIN_INNER;
    assert_eq!(refused(&outpaint(room, 0)), None);
    assert_eq!(
        refused(&outpaint(room, 1)).as_deref(),
        Some("outpaint.left")
    );
    assert_eq!(
        refused(&outpaint(u32::MAX, u32::MAX)).as_deref(),
        Some("outpaint.left")
    );
    assert_eq!(refused(&outpaint(0, 0)).as_deref(), Some("outpaint"));
    // Output quality.
    let q = |quality: u32| v1::GenerateRequest {
        output: Some(v1::OutputOptions {
            format: v1::ImageFormat::Jpeg as i32,
            quality,
        }),
        ..text("a cat")
    };
    assert_eq!(refused(&q(100)), None);
    assert_eq!(refused(&q(101)).as_deref(), Some("output.quality"));
}

/// `rpc M(X) returns (Y)` of every service: (M, X, Y), stream markers dropped.
fn rpcs(text: &str) -> Vec<(String, String, String, bool)> {
    text.lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("rpc "))
        .map(|l| {
            let name = l.split('(').next().unwrap().trim().to_string();
            let args: Vec<&str> = l
                .split(['(', ')'])
                .map(|s| s.trim().trim_start_matches("stream ").trim())
                .collect();
            let streams = l.contains("returns (stream ");
            (name, args[1].to_string(), args[3].to_string(), streams)
        })
        .collect()
}

#[test]
fn every_rpc_takes_and_returns_messages_named_after_it() {
    let mut seen = std::collections::HashSet::new();
    for file in [
        "common.proto",
        "gateway.proto",
        "text_encoder.proto",
        "prior.proto",
        "denoiser.proto",
        "movq.proto",
    ] {
        for (rpc, req, resp, streams) in rpcs(&proto(file)) {
            assert!(seen.insert(rpc.clone()), "{file}: rpc {rpc} is not unique");
            // GenerateStream is Generate streamed: it shares Generate's request.
            let base = if rpc == "GenerateStream" {
                "Generate"
            } else {
                rpc.as_str()
            };
            assert_eq!(req, format!("{base}Request"), "{file}: rpc {rpc}");
            let want = if streams { "Event" } else { "Response" };
            assert_eq!(resp, format!("{base}{want}"), "{file}: rpc {rpc}");
        }
    }
    assert!(seen.len() >= 11, "found only {seen:?}");
}
