use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = kd_denoiser::Config::parse();
    kd_runtime::telemetry::init(config.common.log_format);
    let shutdown = kd_runtime::Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_denoiser::run(config, shutdown).await
}
