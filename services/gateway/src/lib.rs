//! The gateway: the public `kandinsky.v1.Gateway` API. Validates requests, resolves seeds,
//! orchestrates the stage services and streams progress. Holds no model.

pub mod auth;
pub mod balance;
pub mod clients;
pub mod models;
pub mod pipeline;
pub mod sampling;
pub mod validate;

use auth::ApiKeys;
use balance::Pool;
use kd_proto::v1::generate_event::Event;
use kd_proto::v1::{self, gateway_server::GatewayServer, GenerateEvent};
use kd_runtime::config::CommonArgs;
use kd_runtime::launch::MessageLimit;
use kd_runtime::stage::EventStream;
use kd_runtime::{Call, Launch, LaunchError, Listeners, ServiceError, Shutdown, Sink, Stage};
use models::Models;
use models::{StackUrls, Stages};
use pipeline::Ctx;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use validate::Limits;

/// Gateway configuration.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "kd-gateway", about = "kandinsky-serve public gRPC API")]
pub struct Config {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Text-encoder stage address(es), comma-separated.
    #[arg(
        long,
        env = "KD_TEXT_ENCODER_URL",
        default_value = "http://127.0.0.1:50052",
        value_delimiter = ','
    )]
    pub text_encoder_url: Vec<String>,
    /// Prior stage address(es), comma-separated; `none` for a default set without a prior
    /// (aMUSEd). A Kandinsky set without a prior is a deployment error naming the set.
    #[arg(
        long,
        env = "KD_PRIOR_URL",
        default_value = "http://127.0.0.1:50053",
        value_delimiter = ','
    )]
    pub prior_url: Vec<String>,
    /// Denoiser stage address(es), comma-separated.
    #[arg(
        long,
        env = "KD_DENOISER_URL",
        default_value = "http://127.0.0.1:50054",
        value_delimiter = ','
    )]
    pub denoiser_url: Vec<String>,
    /// MoVQ stage address(es), comma-separated.
    #[arg(
        long,
        env = "KD_MOVQ_URL",
        default_value = "http://127.0.0.1:50055",
        value_delimiter = ','
    )]
    pub movq_url: Vec<String>,
    /// Another model's stage set, `text-encoder=URL,prior=URL,denoiser=URL,movq=URL` (repeat
    /// the flag, or separate with `;` in the env var); leave `prior=` out (or write
    /// `prior=none`) for a model without a prior (aMUSEd). The stages' folders decide which
    /// model each set serves; requests name it in `model`. The `--*-url` set is the default.
    #[arg(long, env = "KD_EXTRA_STACKS", value_delimiter = ';')]
    pub extra_stack: Vec<String>,
    /// File with one accepted API key per line (`#` comments on lines of their own); a file
    /// without a key is a start-up error. Authentication is off when unset.
    #[arg(long, env = "KD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Seconds between re-reads of `--api-keys-file` (a rotated Secret is picked up without a
    /// restart; a bad file keeps the previous keys).
    #[arg(long, env = "KD_API_KEYS_RELOAD_SECS", default_value_t = 10.0)]
    pub api_keys_reload_secs: f64,
    /// Requests generating at once (the rest wait in the admission queue).
    #[arg(long, env = "KD_MAX_CONCURRENCY", default_value_t = 4)]
    pub max_concurrency: usize,
    /// Most images per request.
    #[arg(long, env = "KD_MAX_IMAGES", default_value_t = 4)]
    pub max_images: u32,
    /// PEM CA certificates the stages' server certificates are signed by: with it every stage
    /// call goes over TLS (https:// URLs are then allowed too).
    #[arg(long, env = "KD_STAGE_TLS_CA")]
    pub stage_tls_ca: Option<PathBuf>,
    /// PEM client certificate the gateway presents to the stages (mutual TLS; re-read when the
    /// file changes). Needs --stage-tls-ca and --stage-tls-key.
    #[arg(long, env = "KD_STAGE_TLS_CERT", requires_all = ["stage_tls_key", "stage_tls_ca"])]
    pub stage_tls_cert: Option<PathBuf>,
    /// PEM private key of --stage-tls-cert.
    #[arg(long, env = "KD_STAGE_TLS_KEY", requires = "stage_tls_cert")]
    pub stage_tls_key: Option<PathBuf>,
    /// Seconds between DNS re-resolutions of the stage addresses (replicas come and go).
    #[arg(long, env = "KD_RESOLVE_INTERVAL_SECS", default_value_t = 15.0)]
    pub resolve_interval_secs: f64,
}

/// The gateway service.
#[derive(Clone)]
pub struct Gateway {
    stage: Stage<Models>,
    limits: Limits,
}

/// A progress, image or done event.
fn event(e: v1::generate_event::Event) -> GenerateEvent {
    GenerateEvent { event: Some(e) }
}

impl Gateway {
    /// Validation before admission (counted in `kd_failures_total` like every failure).
    fn plan(&self, req: &v1::GenerateRequest) -> Result<validate::Plan, ServiceError> {
        validate::validate(req, &self.limits, rand::random::<u64>)
    }
}

#[tonic::async_trait]
impl v1::gateway_server::Gateway for Gateway {
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
        let call = call_of(&request);
        let deadline = call.deadline;
        let check = |_: &Models| self.plan(request.get_ref());
        let run = |models: Arc<Models>, plan, _| async move {
            let ctx = Ctx {
                deadline,
                events: None,
            };
            let (images, model) = pipeline::generate(&models, &plan, &ctx).await?;
            Ok(v1::GenerateResponse {
                images,
                model: model.into(),
            })
        };
        self.stage.unary("Generate", call, check, run).await
    }

    type GenerateStreamStream = EventStream<GenerateEvent>;

    async fn generate_stream(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<EventStream<GenerateEvent>>, Status> {
        let call = call_of(&request);
        let deadline = call.deadline;
        let check = |_: &Models| self.plan(request.get_ref());
        let run = move |models: Arc<Models>, plan, sink: Sink<GenerateEvent>| async move {
            sink.send(event(Event::Progress(v1::Progress {
                stage: v1::Stage::Queued as i32,
                step: 0,
                total_steps: 0,
            })))
            .await?;
            let ctx = Ctx {
                deadline,
                events: Some(sink.clone()),
            };
            let (images, model) = pipeline::generate(&models, &plan, &ctx).await?;
            for img in images {
                sink.send(event(Event::Image(img))).await?;
            }
            sink.send(event(Event::Done(v1::Done {
                model: model.to_string(),
            })))
            .await
        };
        self.stage.stream("GenerateStream", call, check, run).await
    }

    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let call = call_of(&request);
        let deadline = call.deadline;
        let run = |models: Arc<Models>, (), _| async move {
            let ctx = Ctx {
                deadline,
                events: None,
            };
            Ok(v1::ListModelsResponse {
                models: models.list(&ctx).await?,
            })
        };
        self.stage.unary("ListModels", call, |_| Ok(()), run).await
    }
}

/// Time kept back from the caller's deadline, so the gateway's DEADLINE_EXCEEDED (and the stop
/// of the stages' work) reaches the caller before its own transport timer fires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// The gateway's call of `request`: its work ends [`DEADLINE_MARGIN`] before the caller's
/// deadline.
fn call_of<T>(request: &Request<T>) -> Call {
    Call::with_margin(request, DEADLINE_MARGIN)
}

/// The replica pools of one stage set, named `label` in errors.
async fn stage_set(
    label: String,
    urls: &StackUrls,
    refresh: Duration,
    tls: &Option<Arc<rustls::ClientConfig>>,
) -> anyhow::Result<Stages> {
    let prior = match &urls.prior {
        Some(p) => Some(Pool::new(p, "prior", refresh, tls.clone()).await?),
        None => None,
    };
    Ok(Stages {
        label,
        text_encoder: Pool::new(&urls.text_encoder, "text_encoder", refresh, tls.clone()).await?,
        prior,
        denoiser: Pool::new(&urls.denoiser, "denoiser", refresh, tls.clone()).await?,
        movq: Pool::new(&urls.movq, "movq", refresh, tls.clone()).await?,
        served: Default::default(),
    })
}

/// The client side of `--stage-tls-ca` / `--stage-tls-cert` / `--stage-tls-key`: `None` for
/// plaintext stage calls.
fn stage_tls(config: &Config) -> Result<Option<Arc<rustls::ClientConfig>>, ServiceError> {
    let Some(ca) = &config.stage_tls_ca else {
        return Ok(None);
    };
    let identity = match (&config.stage_tls_cert, &config.stage_tls_key) {
        (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
        _ => None,
    };
    kd_runtime::tls::client_config(ca, identity)
        .map(Some)
        .map_err(|e| ServiceError::Unavailable(format!("--stage-tls-*: {e}")))
}

/// Default largest request (and response) message: 64 MiB, room for two 32 MiB input images
/// (`--max-message-bytes` changes it).
pub const GATEWAY_MESSAGE_LIMIT: usize = 64 << 20;

/// The stage sets the flags name: the `--*-url` set first (the default), then each
/// `--extra-stack`.
async fn stacks(config: &Config) -> Result<Vec<Stages>, ServiceError> {
    let refresh = Duration::from_secs_f64(config.resolve_interval_secs.max(0.1));
    let bad = |e: anyhow::Error| ServiceError::Unavailable(format!("{e:#}"));
    let tls = stage_tls(config)?;
    let default = StackUrls {
        text_encoder: config.text_encoder_url.clone(),
        prior: models::prior_urls(&config.prior_url)
            .map_err(|e| ServiceError::Unavailable(format!("--prior-url: {e}")))?,
        denoiser: config.denoiser_url.clone(),
        movq: config.movq_url.clone(),
    };
    let label = "the default stage set (--*-url)".to_string();
    let mut stacks = vec![stage_set(label, &default, refresh, &tls)
        .await
        .map_err(bad)?];
    for spec in &config.extra_stack {
        let urls = models::parse_stack(spec)
            .map_err(|e| ServiceError::Unavailable(format!("--extra-stack {spec:?}: {e}")))?;
        let label = format!("stage set --extra-stack {spec:?}");
        stacks.push(stage_set(label, &urls, refresh, &tls).await.map_err(bad)?);
    }
    Ok(stacks)
}

/// Serves on `listeners` until `shutdown` (tests bind port 0).
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> Result<(), LaunchError> {
    let keys = ApiKeys::from_flags(config.api_keys_file.as_deref(), config.api_keys_reload_secs)
        .map_err(LaunchError::Config)?;
    let stage = Stage::new("gateway", config.max_concurrency, config.common.max_queue);
    let launch = Launch::new(stage.clone(), &config.common, GATEWAY_MESSAGE_LIMIT);
    // Validation bounds the inputs by the same number the transport enforces.
    let gateway = Gateway {
        stage,
        limits: Limits {
            max_images: config.max_images,
            max_request_bytes: launch.limit(),
            ..Limits::default()
        },
    };
    let server = GatewayServer::new(gateway).message_limit(launch.limit());
    let reloader = keys.spawn_reloader(Duration::from_secs_f64(config.api_keys_reload_secs));
    let service = InterceptedService::new(server, move |r| keys.check(r));
    let load = async move {
        Ok(Models {
            stacks: stacks(&config).await?,
        })
    };
    let result = launch.mount(service).run(listeners, shutdown, load).await;
    if let Some(task) = reloader {
        task.abort();
    }
    result
}
