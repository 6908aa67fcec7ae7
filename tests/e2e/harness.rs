//! Starts the whole system in one test process: the four stage services and the gateway, each a
//! real gRPC server on its own loopback port (bound to port 0), talking over real connections.

use kd_proto::v1::{self, gateway_client::GatewayClient};
use kd_runtime::Listeners;
use kd_testkit::{connect, fixtures_dir, stage_args, wait_serving, TestServer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// How long a service of the stack may take to report SERVING.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The bundled fixture model: the tiny prior and the deep (real 4-level) decoder.
pub fn prior_dir() -> PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-prior")
}

/// The bundled decoder folder.
pub fn decoder_dir() -> PathBuf {
    fixtures_dir().join("deep/kandinsky-2-2-decoder")
}

/// Which bundled checkpoints a stack serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// The tiny 2.2 prior and the deep (real 4-level) 2.2 decoder.
    Kandinsky22,
    /// The tiny multilingual Kandinsky 2.1 prior and decoder (`tests/fixtures/kd21`).
    Kandinsky21,
    /// As [`Model::Kandinsky21`] with the 9-channel inpainting decoder.
    Kandinsky21Inpaint,
    /// As [`Model::Kandinsky22`] with a few-step student decoder: the deep decoder folder whose
    /// scheduler is `LCMScheduler` (see [`student_decoder_dir`]).
    Kandinsky22Student,
    /// The tiny 2.2 prior and the tiny 9-channel inpainting decoder.
    Kandinsky22Inpaint,
    /// The tiny 2.2 prior and the tiny depth ControlNet decoder.
    Kandinsky22Controlnet,
}

impl Model {
    /// The prior folder (text encoder and prior stages).
    pub fn prior_dir(self) -> PathBuf {
        match self {
            Self::Kandinsky22
            | Self::Kandinsky22Student
            | Self::Kandinsky22Inpaint
            | Self::Kandinsky22Controlnet => prior_dir(),
            Self::Kandinsky21 | Self::Kandinsky21Inpaint => {
                fixtures_dir().join("kd21/kandinsky-2-1-prior")
            }
        }
    }

    /// The decoder folder (denoiser and MoVQ stages; the 2.1 text encoder's XLM-R).
    pub fn decoder_dir(self) -> PathBuf {
        match self {
            Self::Kandinsky22 => decoder_dir(),
            Self::Kandinsky21 => fixtures_dir().join("kd21/kandinsky-2-1"),
            Self::Kandinsky21Inpaint => fixtures_dir().join("kd21/kandinsky-2-1-inpaint"),
            Self::Kandinsky22Student => student_decoder_dir(),
            Self::Kandinsky22Inpaint => fixtures_dir().join("tiny/kandinsky-2-2-decoder-inpaint"),
            Self::Kandinsky22Controlnet => {
                fixtures_dir().join("tiny/kandinsky-2-2-controlnet-depth")
            }
        }
    }
}

/// A student decoder folder, made once per process under the temp dir: the bundled decoder
/// with `scheduler/scheduler_config.json` switched to `LCMScheduler` (what
/// `LCMScheduler.from_config(teacher_config)` saves: the teacher's β schedule and keys, the LCM
/// defaults for the rest). Its weights are the teacher's: what it proves is the serving path.
pub fn student_decoder_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir()
            .join(format!("kd-e2e-student-{}", std::process::id()))
            .join("kandinsky-2-2-decoder-lcm");
        copy_dir(&decoder_dir(), &dir).expect("copy the decoder fixture");
        let cfg = dir.join("scheduler/scheduler_config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        json["_class_name"] = "LCMScheduler".into();
        std::fs::write(&cfg, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        dir
    })
    .clone()
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Parses a stage's flags.
fn config<C: clap::Parser>(bin: &str, model_dir: &Path, extra: &[&str]) -> C {
    C::parse_from(stage_args(bin, model_dir, extra))
}

/// Starts the MoVQ stage on `listeners` and waits until it is SERVING.
pub async fn start_movq(listeners: Listeners) -> TestServer {
    start_movq_of(Model::Kandinsky22, listeners).await
}

/// Starts the MoVQ stage of `model` on `listeners` and waits until it is SERVING.
pub async fn start_movq_of(model: Model, listeners: Listeners) -> TestServer {
    let c: kd_movq::Config = config("kd-movq", &model.decoder_dir(), &[]);
    let movq = TestServer::spawn_on(listeners, |l, s| kd_movq::run_with_listeners(c, l, s));
    wait_serving(&movq, "kandinsky.v1.Movq", READY_TIMEOUT).await;
    movq
}

/// The five services of one deployment.
pub struct Stack {
    pub text_encoder: TestServer,
    pub prior: TestServer,
    pub denoiser: TestServer,
    pub movq: TestServer,
    pub gateway: TestServer,
}

impl Stack {
    /// Starts every stage, then the gateway with `gateway_args`, and waits until all are SERVING.
    pub async fn start(gateway_args: &[&str]) -> Self {
        Self::start_with(&[], gateway_args).await
    }

    /// As [`Stack::start`], with extra flags for the text encoder.
    pub async fn start_with(text_encoder_args: &[&str], gateway_args: &[&str]) -> Self {
        Self::start_model(Model::Kandinsky22, text_encoder_args, gateway_args).await
    }

    /// As [`Stack::start_with`], serving `model`.
    pub async fn start_model(
        model: Model,
        text_encoder_args: &[&str],
        gateway_args: &[&str],
    ) -> Self {
        let stack = Self::launch(model, text_encoder_args, &[]).await;
        stack.probe_stages().await;
        stack.with_gateway(gateway_args).await
    }

    /// The five services of `model` with `stage_args` on every stage (e.g. TLS flags) and the
    /// gateway with `gateway_args`. The stages are not probed (a TLS stage answers no plaintext
    /// health check): wait through the gateway.
    pub async fn start_unprobed(model: Model, stage_args: &[&str], gateway_args: &[&str]) -> Self {
        Self::launch(model, &[], stage_args)
            .await
            .with_gateway(gateway_args)
            .await
    }

    /// The four stages, not yet SERVING, and no gateway yet.
    async fn launch(model: Model, text_encoder_args: &[&str], stage_args: &[&str]) -> Stages {
        let decoder = format!("--decoder-model-dir={}", model.decoder_dir().display());
        let mut te_args = vec![decoder.as_str()];
        te_args.extend_from_slice(text_encoder_args);
        te_args.extend_from_slice(stage_args);
        let te: kd_text_encoder::Config = config("kd-text-encoder", &model.prior_dir(), &te_args);
        let text_encoder =
            TestServer::spawn(|l, s| kd_text_encoder::run_with_listeners(te, l, s)).await;
        let pr: kd_prior::Config = config("kd-prior", &model.prior_dir(), stage_args);
        let prior = TestServer::spawn(|l, s| kd_prior::run_with_listeners(pr, l, s)).await;
        let de: kd_denoiser::Config = config("kd-denoiser", &model.decoder_dir(), stage_args);
        let denoiser = TestServer::spawn(|l, s| kd_denoiser::run_with_listeners(de, l, s)).await;
        let mq: kd_movq::Config = config("kd-movq", &model.decoder_dir(), stage_args);
        let movq = TestServer::spawn(|l, s| kd_movq::run_with_listeners(mq, l, s)).await;
        Stages {
            text_encoder,
            prior,
            denoiser,
            movq,
        }
    }

    /// Starts a gateway over the stages at `[text encoder, prior, denoiser, movq]` and waits
    /// until it is SERVING.
    pub async fn start_gateway(stages: [SocketAddr; 4], extra: &[&str]) -> TestServer {
        let [te, prior, denoiser, movq] = stages;
        let mut args = vec![
            "kd-gateway".to_string(),
            format!("--text-encoder-url=http://{te}"),
            format!("--prior-url=http://{prior}"),
            format!("--denoiser-url=http://{denoiser}"),
            format!("--movq-url=http://{movq}"),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let c = <kd_gateway::Config as clap::Parser>::parse_from(args);
        let gateway = TestServer::spawn(|l, s| kd_gateway::run_with_listeners(c, l, s)).await;
        wait_serving(&gateway, "kandinsky.v1.Gateway", READY_TIMEOUT).await;
        gateway
    }

    /// A client of the gateway.
    pub async fn client(&self) -> GatewayClient<Channel> {
        gateway_client(&self.gateway).await
    }
}

/// The four stages of a [`Stack`] before its gateway starts.
pub struct Stages {
    text_encoder: TestServer,
    prior: TestServer,
    denoiser: TestServer,
    movq: TestServer,
}

impl Stages {
    /// Waits until every stage's health says SERVING.
    async fn probe_stages(&self) {
        for (stage, service) in [
            (&self.text_encoder, "kandinsky.v1.TextEncoder"),
            (&self.prior, "kandinsky.v1.Prior"),
            (&self.denoiser, "kandinsky.v1.Denoiser"),
            (&self.movq, "kandinsky.v1.Movq"),
        ] {
            wait_serving(stage, service, READY_TIMEOUT).await;
        }
    }

    /// Starts the gateway over these stages.
    async fn with_gateway(self, gateway_args: &[&str]) -> Stack {
        let Self {
            text_encoder,
            prior,
            denoiser,
            movq,
        } = self;
        let stages = [text_encoder.grpc, prior.grpc, denoiser.grpc, movq.grpc];
        let gateway = Stack::start_gateway(stages, gateway_args).await;
        Stack {
            text_encoder,
            prior,
            denoiser,
            movq,
            gateway,
        }
    }
}

/// A client of `gateway` (64 MiB responses).
pub async fn gateway_client(gateway: &TestServer) -> GatewayClient<Channel> {
    GatewayClient::new(connect(gateway.grpc).await).max_decoding_message_size(64 << 20)
}

/// What `gateway` lists in `ListModels`.
pub async fn list_models(gateway: &TestServer) -> Vec<v1::ModelDescription> {
    let mut c = gateway_client(gateway).await;
    let req = v1::ListModelsRequest {};
    c.list_models(req).await.unwrap().into_inner().models
}

/// Steps of the prior and of the decoder in [`generate_request`].
pub const STEPS: u32 = 3;

/// A 64×64 request for `prompt`: one image per seed, [`STEPS`] steps of each stage at guidance 4.
pub fn generate_request(prompt: &str, seeds: &[u64]) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: prompt.into(),
        width: Some(64),
        height: Some(64),
        num_images: Some(seeds.len() as u32),
        seeds: seeds.to_vec(),
        prior: Some(v1::PriorParams {
            num_inference_steps: Some(STEPS),
            guidance_scale: Some(4.0),
        }),
        decoder: Some(v1::DecoderParams {
            num_inference_steps: Some(STEPS),
            guidance_scale: Some(4.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A 64×64 request for `prompt` with one seed, two steps of each stage and the default guidance.
pub fn quick_request(prompt: &str, seed: u64) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: prompt.into(),
        width: Some(64),
        height: Some(64),
        seeds: vec![seed],
        prior: Some(v1::PriorParams {
            num_inference_steps: Some(2),
            guidance_scale: None,
        }),
        decoder: Some(v1::DecoderParams {
            num_inference_steps: Some(2),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The RGB pixels of a generated image.
pub fn pixels(img: &v1::GeneratedImage) -> image::RgbImage {
    image::load_from_memory(&img.image.as_ref().unwrap().data)
        .unwrap()
        .to_rgb8()
}

/// The tiny aMUSEd folder (`tests/fixtures/tiny/amused-256`).
pub fn amused_dir() -> PathBuf {
    fixtures_dir().join("tiny/amused-256")
}

/// The tiny Kandinsky 2.0 folder in the official layout (`tests/fixtures/kd20`).
pub fn kd20_dir() -> PathBuf {
    fixtures_dir().join("kd20")
}

/// The tiny Kandinsky 2.0 inpainting folder (`tests/fixtures/kd20-inpaint`).
pub fn kd20_inpaint_dir() -> PathBuf {
    fixtures_dir().join("kd20-inpaint")
}

/// A deployment of a whole model without a prior (an aMUSEd folder: text encoder, denoiser =
/// token generator, movq = VQ-GAN; a Kandinsky 2.0 folder: its two text encoders, its UNet with
/// the official samplers, its KL autoencoder): three stages on one folder and a gateway started
/// with `--prior-url none`.
pub struct PriorLessStack {
    pub text_encoder: TestServer,
    pub denoiser: TestServer,
    pub movq: TestServer,
    pub gateway: TestServer,
}

impl PriorLessStack {
    /// The three stages on `dir`, SERVING.
    pub async fn stages(dir: &Path) -> [TestServer; 3] {
        let te: kd_text_encoder::Config = config("kd-text-encoder", dir, &[]);
        let text_encoder =
            TestServer::spawn(|l, s| kd_text_encoder::run_with_listeners(te, l, s)).await;
        let de: kd_denoiser::Config = config("kd-denoiser", dir, &[]);
        let denoiser = TestServer::spawn(|l, s| kd_denoiser::run_with_listeners(de, l, s)).await;
        let mq: kd_movq::Config = config("kd-movq", dir, &[]);
        let movq = TestServer::spawn(|l, s| kd_movq::run_with_listeners(mq, l, s)).await;
        for (stage, service) in [
            (&text_encoder, "kandinsky.v1.TextEncoder"),
            (&denoiser, "kandinsky.v1.Denoiser"),
            (&movq, "kandinsky.v1.Movq"),
        ] {
            wait_serving(stage, service, READY_TIMEOUT).await;
        }
        [text_encoder, denoiser, movq]
    }

    /// The stages on the tiny folder and a gateway fronting only them, with `gateway_args`.
    pub async fn start(gateway_args: &[&str]) -> Self {
        Self::start_dir(&amused_dir(), gateway_args).await
    }

    /// The stages on the prior-less folder `dir` and a gateway fronting only them.
    pub async fn start_dir(dir: &Path, gateway_args: &[&str]) -> Self {
        let [text_encoder, denoiser, movq] = Self::stages(dir).await;
        let mut args = vec![
            "kd-gateway".to_string(),
            format!("--text-encoder-url=http://{}", text_encoder.grpc),
            "--prior-url=none".to_string(),
            format!("--denoiser-url=http://{}", denoiser.grpc),
            format!("--movq-url=http://{}", movq.grpc),
        ];
        args.extend(gateway_args.iter().map(|s| s.to_string()));
        let c = <kd_gateway::Config as clap::Parser>::parse_from(args);
        let gateway = TestServer::spawn(|l, s| kd_gateway::run_with_listeners(c, l, s)).await;
        wait_serving(&gateway, "kandinsky.v1.Gateway", READY_TIMEOUT).await;
        Self {
            text_encoder,
            denoiser,
            movq,
            gateway,
        }
    }

    /// The `--extra-stack` spec of these stages (no prior).
    pub fn extra_stack(&self) -> String {
        format!(
            "--extra-stack=text-encoder=http://{},denoiser=http://{},movq=http://{}",
            self.text_encoder.grpc, self.denoiser.grpc, self.movq.grpc
        )
    }

    /// A client of the gateway.
    pub async fn client(&self) -> GatewayClient<Channel> {
        gateway_client(&self.gateway).await
    }
}
