use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = kd_movq::Config::parse();
    let _telemetry = kd_runtime::telemetry::init_tracing(&config.common, "kd-movq");
    let shutdown = kd_runtime::Shutdown::new();
    tokio::spawn(shutdown.clone().trigger_on_signals());
    kd_movq::run(config, shutdown).await
}
