//! `kd generate`: every generation option as a flag, a progress bar, images written to disk.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use kd_proto::v1::{
    self, gateway_client::GatewayClient, generate_event::Event, generate_request::Task,
};
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `kd generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
    /// Output file; with several images `-o out.png` writes out-0.png, out-1.png, …
    #[arg(short, long, default_value = "out.png")]
    pub output: PathBuf,
    /// Gateway address.
    #[arg(long, env = "KD_GATEWAY_URL", default_value = "http://127.0.0.1:50051")]
    pub gateway: String,
    /// PEM CA certificate that signed the gateway's certificate: connect over TLS.
    #[arg(long, env = "KD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the gateway's certificate holds, when the address is not it (e.g. localhost
    /// through a port-forward); default: the host of --gateway.
    #[arg(long, env = "KD_TLS_SERVER_NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// API key (sent as `authorization: Bearer <key>`).
    #[arg(long, env = "KD_API_KEY")]
    pub api_key: Option<String>,
    /// Model to use (`kandinsky-2-2`, `kandinsky-2-1`, `amused-256`, …, as `ListModels` names
    /// them); default: whatever the gateway serves.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Width in pixels (multiple of 64).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels (multiple of 64).
    #[arg(long)]
    pub height: Option<u32>,
    /// Number of images.
    #[arg(short = 'n', long)]
    pub num_images: Option<u32>,
    /// Seeds, one per image (comma-separated); random when unset.
    #[arg(long, value_delimiter = ',')]
    pub seed: Vec<u64>,
    /// Prior steps.
    #[arg(long)]
    pub prior_steps: Option<u32>,
    /// Prior guidance scale.
    #[arg(long)]
    pub prior_guidance: Option<f32>,
    /// Decoder steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Decoder guidance scale.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Decoder scheduler: default, ddpm, ddim, dpmpp, lcm, tcd, plms (Kandinsky 2.0 only; for
    /// 2.0, ddpm is the official p_sampler).
    #[arg(long, default_value = "default")]
    pub scheduler: String,
    /// An explicit decoder schedule instead of --steps, e.g. 999,749,499,249 (lcm/tcd only).
    #[arg(long, value_delimiter = ',')]
    pub timesteps: Vec<u32>,
    /// The API's `quality` preset (steps and schedulers for what is left unset): default,
    /// draft, balanced, best.
    #[arg(long, default_value = "default")]
    pub preset: String,
    /// aMUSEd: sampling temperature of the first and last token step, e.g. 2,0 (the default).
    #[arg(long, value_delimiter = ',', num_args = 2, value_names = ["START", "END"])]
    pub temperature: Vec<f32>,
    /// aMUSEd: the aesthetic score micro-conditioning (default 6).
    #[arg(long)]
    pub aesthetic_score: Option<f32>,
    /// Image-to-image: the init image file.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Image-to-image strength in (0, 1].
    #[arg(long)]
    pub strength: Option<f32>,
    /// Inpaint: mask file (white = repaint); needs --init-image.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Variation of this image (the prompt is ignored).
    #[arg(long)]
    pub variation: Option<PathBuf>,
    /// Outpaint --init-image: margins LEFT,TOP,RIGHT,BOTTOM in pixels of the output canvas
    /// (--width × --height); needs a model with an inpainting decoder.
    #[arg(long, value_delimiter = ',', num_args = 4, value_names = ["LEFT", "TOP", "RIGHT", "BOTTOM"])]
    pub outpaint: Vec<u32>,
    /// ControlNet depth hint image (text-to-image, or image-to-image with --init-image, on a
    /// `-controlnet` model).
    #[arg(long)]
    pub hint: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line on stdout (an `image` line per image,
    /// then a `done` line), no progress bar.
    #[arg(long)]
    pub json: bool,
    /// Output format: png, jpeg, webp.
    #[arg(long, default_value = "png")]
    pub format: String,
    /// JPEG/WebP quality 1..=100.
    #[arg(long, default_value_t = 0)]
    pub quality: u32,
    /// Deadline in seconds.
    #[arg(long, default_value_t = 600.0)]
    pub timeout: f64,
}

/// `decoder.masked_tokens` of `--temperature` / `--aesthetic-score` (unset when neither is given,
/// so other models take the request).
fn masked_tokens(a: &GenerateArgs) -> Option<v1::MaskedTokenParams> {
    if a.temperature.is_empty() && a.aesthetic_score.is_none() {
        return None;
    }
    Some(v1::MaskedTokenParams {
        temperature_start: a.temperature.first().copied(),
        temperature_end: a.temperature.get(1).copied(),
        aesthetic_score: a.aesthetic_score,
        ..Default::default()
    })
}

fn scheduler(s: &str) -> anyhow::Result<v1::Scheduler> {
    Ok(match s {
        "default" => v1::Scheduler::Unspecified,
        "ddpm" => v1::Scheduler::Ddpm,
        "ddim" => v1::Scheduler::Ddim,
        "dpmpp" => v1::Scheduler::DpmSolverPp,
        "lcm" => v1::Scheduler::Lcm,
        "tcd" => v1::Scheduler::Tcd,
        "plms" => v1::Scheduler::Plms,
        _ => anyhow::bail!("--scheduler {s}: allowed default, ddpm, ddim, dpmpp, lcm, tcd, plms"),
    })
}

fn quality(s: &str) -> anyhow::Result<v1::Quality> {
    Ok(match s {
        "default" => v1::Quality::Unspecified,
        "draft" => v1::Quality::Draft,
        "balanced" => v1::Quality::Balanced,
        "best" => v1::Quality::Best,
        _ => anyhow::bail!("--preset {s}: allowed default, draft, balanced, best"),
    })
}

fn format(s: &str) -> anyhow::Result<(v1::ImageFormat, &'static str)> {
    Ok(match s {
        "png" => (v1::ImageFormat::Png, "png"),
        "jpeg" | "jpg" => (v1::ImageFormat::Jpeg, "jpg"),
        "webp" => (v1::ImageFormat::Webp, "webp"),
        _ => anyhow::bail!("--format {s}: allowed png, jpeg, webp"),
    })
}

fn read(p: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// Builds the request from the flags.
pub fn request(a: &GenerateArgs) -> anyhow::Result<v1::GenerateRequest> {
    let outpaint = a.outpaint.as_slice();
    anyhow::ensure!(
        a.hint.is_none() || (a.mask.is_none() && outpaint.is_empty() && a.variation.is_none()),
        "--hint applies to text-to-image and image-to-image (not with --mask, --outpaint or \
         --variation)"
    );
    let hint = a.hint.as_ref().map(read).transpose()?.unwrap_or_default();
    let task = match (&a.init_image, &a.mask, &a.variation, outpaint) {
        (Some(img), None, None, &[left, top, right, bottom]) => {
            Some(Task::Outpaint(v1::Outpaint {
                image: read(img)?,
                left,
                top,
                right,
                bottom,
            }))
        }
        (_, _, _, [_, ..]) => anyhow::bail!("--outpaint needs --init-image (and no --mask)"),
        (Some(img), Some(mask), None, []) => Some(Task::Inpaint(v1::Inpaint {
            image: read(img)?,
            mask: read(mask)?,
        })),
        (Some(img), None, None, []) => Some(Task::ImageToImage(v1::ImageToImage {
            image: read(img)?,
            strength: a.strength,
            hint,
        })),
        (None, None, Some(img), []) => Some(Task::Variation(v1::Variation { image: read(img)? })),
        (None, None, None, []) => Some(Task::TextToImage(v1::TextToImage { hint })),
        _ => anyhow::bail!("use --init-image [--mask | --outpaint] or --variation, not both"),
    };
    Ok(v1::GenerateRequest {
        model: a.model.clone(),
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        task,
        width: a.width,
        height: a.height,
        num_images: a.num_images,
        seeds: a.seed.clone(),
        prior: Some(v1::PriorParams {
            num_inference_steps: a.prior_steps,
            guidance_scale: a.prior_guidance,
        }),
        decoder: Some(v1::DecoderParams {
            num_inference_steps: a.steps,
            guidance_scale: a.guidance,
            scheduler: scheduler(&a.scheduler)? as i32,
            timesteps: a.timesteps.clone(),
            masked_tokens: masked_tokens(a),
        }),
        quality: quality(&a.preset)? as i32,
        output: Some(v1::OutputOptions {
            format: format(&a.format)?.0 as i32,
            quality: a.quality,
        }),
        ..Default::default()
    })
}

fn output_path(base: &std::path::Path, index: u32, total: usize, ext: &str) -> PathBuf {
    if total <= 1 {
        return base.to_path_buf();
    }
    let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    let ext = base.extension().and_then(|s| s.to_str()).unwrap_or(ext);
    base.with_file_name(format!("{stem}-{index}.{ext}"))
}

/// A channel to `--gateway`: plaintext, or TLS verified with `--tls-ca`.
async fn connect(a: &GenerateArgs) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(a.gateway.clone())?;
    let Some(ca) = &a.tls_ca else {
        return Ok(endpoint.connect().await?);
    };
    let host = endpoint.uri().host().unwrap_or_default().to_string();
    let name = a.tls_server_name.clone().unwrap_or(host);
    let config =
        kd_runtime::tls::client_config(ca, None).map_err(|e| anyhow::anyhow!("--tls-ca: {e}"))?;
    let connector = kd_runtime::tls::Connector::new(config, name.trim_matches(['[', ']']))
        .map_err(|e| anyhow::anyhow!("--tls-server-name: {e}"))?;
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// How `kd generate` reports: a progress bar on a terminal, plain lines when piped, JSON lines
/// with `--json`.
enum Report {
    Bar(ProgressBar),
    Lines,
    Json,
}

impl Report {
    fn new(a: &GenerateArgs) -> Self {
        use std::io::IsTerminal;
        if a.json {
            return Report::Json;
        }
        if !std::io::stderr().is_terminal() {
            return Report::Lines;
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}")
                .expect("valid template"),
        );
        Report::Bar(bar)
    }

    fn progress(&self, p: &v1::Progress) {
        if let Report::Bar(bar) = self {
            let stage = v1::Stage::try_from(p.stage)
                .map(|s| s.as_str_name())
                .unwrap_or("?");
            bar.set_message(stage.trim_start_matches("STAGE_").to_lowercase());
            bar.set_length(p.total_steps as u64);
            bar.set_position(p.step as u64);
        }
    }

    fn image(&self, path: &std::path::Path, img: &v1::GeneratedImage) {
        let (w, h) = img.image.as_ref().map_or((0, 0), |i| (i.width, i.height));
        let line = format!("wrote {} seed={} size={w}x{h}", path.display(), img.seed);
        match self {
            Report::Bar(bar) => bar.println(line),
            Report::Lines => println!("{line}"),
            Report::Json => println!(
                "{}",
                serde_json::json!({
                    "event": "image",
                    "path": path.display().to_string(),
                    "index": img.index,
                    "seed": img.seed,
                    "width": w,
                    "height": h,
                })
            ),
        }
    }

    fn done(&self, images: usize, model: &str, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let line = format!("done: {images} image(s) from {model} in {secs:.1} s");
        match self {
            Report::Bar(bar) => {
                bar.finish_and_clear();
                eprintln!("{line}");
            }
            Report::Lines => println!("{line}"),
            Report::Json => println!(
                "{}",
                serde_json::json!({
                    "event": "done",
                    "images": images,
                    "model": model,
                    "seconds": secs,
                })
            ),
        }
    }
}

/// Runs `kd generate`.
pub async fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let req = request(&a)?;
    let total = req.num_images.unwrap_or(1).max(1) as usize;
    let ext = format(&a.format)?.1;
    let channel = connect(&a)
        .await
        .with_context(|| format!("connecting to the gateway at {}", a.gateway))?;
    // Room for the largest answer the gateway sends (its default message limit).
    let mut client = GatewayClient::new(channel).max_decoding_message_size(64 << 20);
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs_f64(a.timeout));
    if let Some(k) = &a.api_key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse()?);
    }
    let mut stream = client.generate_stream(request).await?.into_inner();
    let report = Report::new(&a);
    let mut written = 0;
    let mut model = String::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Progress(p)) => report.progress(&p),
            Some(Event::Image(img)) => {
                let path = output_path(&a.output, img.index, total, ext);
                let data = img.image.as_ref().map(|i| &i.data[..]).unwrap_or_default();
                std::fs::write(&path, data)
                    .with_context(|| format!("writing {}", path.display()))?;
                report.image(&path, &img);
                written += 1;
            }
            Some(Event::Done(d)) => model = d.model,
            Some(Event::Preview(_)) | None => {}
        }
    }
    anyhow::ensure!(
        written == total,
        "expected {total} images, received {written}"
    );
    report.done(written, &model, started.elapsed());
    Ok(())
}

/// The one line `kd` prints for a failure: a gRPC status as its code and message, anything
/// else as its chain of causes; the debug form (with a backtrace) only under RUST_BACKTRACE.
pub fn error_line(e: &anyhow::Error) -> String {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        return format!("error: {e:?}");
    }
    match e.downcast_ref::<tonic::Status>() {
        Some(s) => format!("error: {:?}: {}", s.code(), s.message()),
        None => format!("error: {e:#}"),
    }
}
