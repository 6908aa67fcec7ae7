//! The gateway: the public `kandinsky.v1.Gateway` API. Validates requests, resolves seeds,
//! orchestrates the stage services and streams progress. Holds no model.

pub mod auth;
pub mod balance;
pub mod models;
pub mod pipeline;
pub mod validate;

use auth::ApiKeys;
use balance::Pool;
use kd_proto::v1::{self, gateway_server::GatewayServer, GenerateEvent};
use kd_runtime::config::CommonArgs;
use kd_runtime::server::{self, Listeners};
use kd_runtime::{deadline, Admission, Metrics, ServiceError, Shutdown, Stage};
use models::Models;
use pipeline::{Ctx, Stages};
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
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
    /// Prior stage address(es), comma-separated.
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
    /// File with one accepted API key per line; authentication is off when unset.
    /// Another model's stage set, `text-encoder=URL,prior=URL,denoiser=URL,movq=URL` (repeat
    /// the flag, or separate with `;` in the env var). The stages' folders decide which model
    /// each set serves; requests name it in `model`. The `--*-url` set is the default.
    #[arg(long, env = "KD_EXTRA_STACKS", value_delimiter = ';')]
    pub extra_stack: Vec<String>,
    #[arg(long, env = "KD_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Requests generating at once (the rest wait in the admission queue).
    #[arg(long, env = "KD_MAX_CONCURRENCY", default_value_t = 4)]
    pub max_concurrency: usize,
    /// Most images per request.
    #[arg(long, env = "KD_MAX_IMAGES", default_value_t = 4)]
    pub max_images: u32,
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

type EventStream = Pin<Box<dyn futures::Stream<Item = Result<GenerateEvent, Status>> + Send>>;

impl Gateway {
    fn plan(&self, req: &v1::GenerateRequest) -> Result<validate::Plan, Status> {
        validate::validate(req, &self.limits, rand::random::<u64>).map_err(Status::from)
    }
}

#[tonic::async_trait]
impl v1::gateway_server::Gateway for Gateway {
    async fn generate(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<v1::GenerateResponse>, Status> {
        let deadline = work_deadline(request.metadata());
        let plan = self.plan(request.get_ref())?;
        self.stage
            .unary("Generate", |models| async move {
                let ctx = Ctx {
                    deadline,
                    events: None,
                };
                let (images, model) =
                    with_deadline(deadline, pipeline::generate(&models, &plan, &ctx)).await?;
                Ok(v1::GenerateResponse {
                    images,
                    model: model.into(),
                })
            })
            .await
    }

    type GenerateStreamStream = EventStream;

    async fn generate_stream(
        &self,
        request: Request<v1::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let deadline = work_deadline(request.metadata());
        let plan = self.plan(request.get_ref())?;
        let admitted = self.stage.admit("GenerateStream").await?;
        let (tx, rx) = mpsc::channel(16);
        let span = tracing::Span::current();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let ctx = Ctx {
                    deadline,
                    events: Some(tx.clone()),
                };
                let _ = tx
                    .send(Ok(GenerateEvent {
                        event: Some(v1::generate_event::Event::Progress(v1::Progress {
                            stage: v1::Stage::Queued as i32,
                            step: 0,
                            total_steps: 0,
                        })),
                    }))
                    .await;
                let result = tokio::select! {
                    r = with_deadline(deadline, pipeline::generate(&admitted.model, &plan, &ctx)) => r,
                    _ = tx.closed() => Err(ServiceError::Cancelled("the client went away".into())),
                };
                match &result {
                    Ok((images, model)) => {
                        for img in images.clone() {
                            let _ = tx
                                .send(Ok(GenerateEvent {
                                    event: Some(v1::generate_event::Event::Image(img)),
                                }))
                                .await;
                        }
                        let _ = tx
                            .send(Ok(GenerateEvent {
                                event: Some(v1::generate_event::Event::Done(v1::Done {
                                    model: model.to_string(),
                                })),
                            }))
                            .await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "stream failed");
                        let _ = tx.send(Err(Status::from(e.clone()))).await;
                    }
                }
                admitted.finish(&result);
            },
            span,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_models(
        &self,
        request: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        let models = self.stage.model()?;
        let ctx = Ctx {
            deadline: work_deadline(request.metadata()),
            events: None,
        };
        let models = with_deadline(ctx.deadline, models.list(&ctx)).await?;
        Ok(Response::new(v1::ListModelsResponse { models }))
    }
}

/// Time kept back from the caller's deadline, so the gateway's DEADLINE_EXCEEDED (and the stop
/// of the stages' work) reaches the caller before its own transport timer fires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(250);

/// The instant the gateway's work must end: the caller's deadline less [`DEADLINE_MARGIN`].
fn work_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Instant> {
    deadline::deadline_of(metadata).map(|d| d.checked_sub(DEADLINE_MARGIN).unwrap_or(d))
}

/// Runs `fut` until the deadline (DEADLINE_EXCEEDED after it).
async fn with_deadline<T>(
    deadline: Option<std::time::Instant>,
    fut: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    match deadline {
        None => fut.await,
        Some(d) => tokio::time::timeout_at(d.into(), fut).await.map_err(|_| {
            ServiceError::DeadlineExceeded("the request did not finish within its deadline".into())
        })?,
    }
}

/// The replica pools of one stage set (text encoder, prior, denoiser, movq URLs).
async fn stage_set(urls: [&[String]; 4], refresh: Duration) -> anyhow::Result<Stages> {
    Ok(Stages {
        text_encoder: Pool::new(urls[0], "text_encoder", refresh).await?,
        prior: Pool::new(urls[1], "prior", refresh).await?,
        denoiser: Pool::new(urls[2], "denoiser", refresh).await?,
        movq: Pool::new(urls[3], "movq", refresh).await?,
        served: Default::default(),
    })
}

/// Binds the configured addresses and serves until `shutdown`.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config.common).await?;
    run_with_listeners(config, listeners, shutdown).await
}

/// Serves on the given listeners until `shutdown` (tests bind port 0).
pub async fn run_with_listeners(
    config: Config,
    listeners: Listeners,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let Listeners {
        grpc,
        metrics: metrics_listener,
        ..
    } = listeners;
    let keys = match &config.api_keys_file {
        Some(p) => ApiKeys::from_file(p)
            .map_err(|e| anyhow::anyhow!("--api-keys-file {}: {e}", p.display()))?,
        None => ApiKeys::default(),
    };
    let refresh = Duration::from_secs_f64(config.resolve_interval_secs.max(0.1));
    let mut stacks = vec![
        stage_set(
            [
                &config.text_encoder_url,
                &config.prior_url,
                &config.denoiser_url,
                &config.movq_url,
            ],
            refresh,
        )
        .await?,
    ];
    for spec in &config.extra_stack {
        let urls = models::parse_stack(spec)
            .map_err(|e| anyhow::anyhow!("--extra-stack {spec:?}: {e}"))?
            .map(|u| vec![u]);
        stacks.push(stage_set([&urls[0], &urls[1], &urls[2], &urls[3]], refresh).await?);
    }
    let metrics = Metrics::new("gateway");
    let stage = Stage::new(
        Admission::new(config.max_concurrency, config.common.max_queue),
        metrics.clone(),
    );
    stage.set_model(std::sync::Arc::new(Models { stacks }));
    let gateway = Gateway {
        stage,
        limits: Limits {
            max_images: config.max_images,
            ..Limits::default()
        },
    };
    let (router, readiness) = server::base_router("kandinsky.v1.Gateway").await;
    let router = router.add_service(GatewayServer::with_interceptor(gateway, move |r| {
        keys.check(r)
    }));
    readiness.serving().await;
    let metrics_task = tokio::spawn(metrics.serve(metrics_listener, shutdown.clone()));
    let drain = Duration::from_secs_f64(config.common.drain_delay_secs.max(0.0));
    server::serve(router, grpc, readiness, shutdown, drain).await?;
    metrics_task.await??;
    Ok(())
}
