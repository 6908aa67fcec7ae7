use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = kd_denoiser::Config::parse();
    let _telemetry = kd_runtime::telemetry::init_tracing(&config.common, "kd-denoiser");
    let shutdown = kd_runtime::Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_denoiser::run(config, shutdown).await
}
