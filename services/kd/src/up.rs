//! `kd up`: the whole stack as child processes on loopback ports, for development and demos.

use anyhow::Context;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Flags of `kd up`.
#[derive(clap::Args)]
pub struct UpArgs {
    /// The prior checkpoint folder (text encoder + prior).
    #[arg(
        long,
        env = "KD_PRIOR_DIR",
        default_value = "tests/fixtures/tiny/kandinsky-2-2-prior"
    )]
    pub prior_dir: PathBuf,
    /// The decoder checkpoint folder (UNet + MoVQ). An aMUSEd folder (e.g.
    /// `tests/fixtures/tiny/amused-256`) or a Kandinsky 2.0 folder in the official layout (e.g.
    /// `tests/fixtures/kd20`) is a whole model: its stack is the text encoder, the denoiser and
    /// the movq stage on that folder, without a prior, and `--prior-dir` is not used.
    #[arg(
        long,
        env = "KD_DECODER_DIR",
        default_value = "tests/fixtures/deep/kandinsky-2-2-decoder"
    )]
    pub decoder_dir: PathBuf,
    /// Gateway listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: String,
    /// Compute device for every stage.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Folder holding the service binaries (default: next to `kd`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Seconds to wait for every stage to report SERVING.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout: u64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn(bin_dir: &Path, name: &str, args: &[String]) -> anyhow::Result<Child> {
    let path = bin_dir.join(name);
    Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it with `cargo build --bins`)",
                path.display()
            )
        })
}

/// Waits until `service` at `addr` reports SERVING.
pub async fn wait_serving(addr: &str, service: &str, timeout: Duration) -> anyhow::Result<()> {
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let start = Instant::now();
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            let mut h = HealthClient::new(ch);
            if let Ok(r) = h
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
            {
                if r.into_inner().status() == ServingStatus::Serving {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "{service} at {addr} not SERVING after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Resolves when one of `children` (named by `names`) has exited: the error naming it.
async fn first_exit(children: &mut [Child], names: &[&str]) -> anyhow::Error {
    loop {
        for (c, name) in children.iter_mut().zip(names) {
            if let Ok(Some(status)) = c.try_wait() {
                return anyhow::anyhow!(
                    "{name} exited while the stack was starting ({status}); its error is above"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The UNet checkpoints of a Kandinsky 2.0 folder in the official layout (no
/// `model_index.json`; `kd_models::checkpoint::KD20_UNET_FILES`).
const KD20_UNET_FILES: [&str; 2] = ["Kandinsky-2-0.pt", "Kandinsky-2-0-inpainting.pt"];

/// Whether `dir` holds a whole model without a prior: an aMUSEd pipeline (its
/// `model_index.json` names an `Amused*Pipeline`) or a Kandinsky 2.0 folder.
fn is_prior_less(dir: &Path) -> anyhow::Result<bool> {
    let path = dir.join("model_index.json");
    if !path.exists() && KD20_UNET_FILES.iter().any(|f| dir.join(f).is_file()) {
        return Ok(true);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {} (a checkpoint folder)", path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(index["_class_name"]
        .as_str()
        .is_some_and(|c| c.starts_with("Amused")))
}

/// Runs `kd up` until Ctrl-C or SIGTERM.
pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    let bin_dir = match a.bin_dir.clone() {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("kd has no parent folder")?
            .to_path_buf(),
    };
    let prior_less = is_prior_less(&a.decoder_dir)?;
    let text_dir = if prior_less {
        &a.decoder_dir
    } else {
        &a.prior_dir
    };
    let mut stages = vec![
        ("kd-text-encoder", "kandinsky.v1.TextEncoder", text_dir),
        ("kd-prior", "kandinsky.v1.Prior", &a.prior_dir),
        ("kd-denoiser", "kandinsky.v1.Denoiser", &a.decoder_dir),
        ("kd-movq", "kandinsky.v1.Movq", &a.decoder_dir),
    ];
    if prior_less {
        stages.retain(|(bin, _, _)| *bin != "kd-prior");
    }
    let mut children = Vec::new();
    let mut names = Vec::new();
    let mut urls = Vec::new();
    let mut waits = Vec::new();
    for (bin, service, dir) in stages {
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut args = vec![
            "--listen".into(),
            addr.clone(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--model-dir".into(),
            dir.display().to_string(),
            "--device".into(),
            a.device.clone(),
        ];
        if bin == "kd-text-encoder" && !prior_less {
            // Kandinsky 2.1 encodes the prompt for the decoder too (ignored for 2.2 folders).
            args.extend([
                "--decoder-model-dir".into(),
                a.decoder_dir.display().to_string(),
            ]);
        }
        children.push(spawn(&bin_dir, bin, &args)?);
        names.push(bin);
        urls.push((bin, format!("http://{addr}")));
        waits.push((addr, service));
    }
    let url = |bin: &str| {
        urls.iter()
            .find(|(b, _)| *b == bin)
            .map_or_else(|| "none".to_string(), |(_, u)| u.clone())
    };
    let gw_args = vec![
        "--listen".into(),
        a.listen.clone(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{}", free_port()?),
        "--text-encoder-url".into(),
        url("kd-text-encoder"),
        // `none`: an aMUSEd or Kandinsky 2.0 stack has no prior.
        "--prior-url".into(),
        url("kd-prior"),
        "--denoiser-url".into(),
        url("kd-denoiser"),
        "--movq-url".into(),
        url("kd-movq"),
    ];
    children.push(spawn(&bin_dir, "kd-gateway", &gw_args)?);
    names.push("kd-gateway");
    waits.push((a.listen.clone(), "kandinsky.v1.Gateway"));
    let timeout = Duration::from_secs(a.ready_timeout);
    let ready = async {
        for (addr, service) in &waits {
            wait_serving(addr, service, timeout).await?;
        }
        anyhow::Ok(())
    };
    // A service that exits while the others start (a wrong folder, a port in use) ends `kd up`
    // at once, naming it; its own error is in the log above.
    tokio::select! {
        r = ready => r?,
        e = first_exit(&mut children, &names) => return Err(e),
    }
    println!("kandinsky-serve is up: gateway at http://{}", a.listen);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    println!("stopping");
    // Ask each child to drain (SIGTERM), then wait; kill_on_drop is the backstop.
    for c in &children {
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
    }
    Ok(())
}
