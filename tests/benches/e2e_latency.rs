//! End-to-end latency through the gateway and four stage services vs the same pipeline in one
//! process (ratio measured side by side in one run), and the bytes each request puts on the wire
//! between the gateway and the stages (counted by a TCP proxy in front of every stage).
//!
//! `cargo bench -p kd-e2e --bench e2e_latency` (or `make bench`). Settings: `E2E_SIZE` (pixels,
//! default 256), `E2E_STEPS` (prior and decoder steps, default 10), `E2E_RUNS` (default 5),
//! `E2E_MODEL` (`kandinsky-2-2`, the default, or `kandinsky-2-1`: the multilingual fixtures).

use kd_e2e::{Model, Stack};
use kd_models::pipeline::{Text2Image, Text2ImageRequest};
use kd_models::prior::SampleParams;
use kd_models::CheckpointDir;
use kd_proto::v1;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A loopback TCP proxy to `target` counting the bytes in both directions.
async fn counting_proxy(target: SocketAddr, bytes: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = l.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut ri, mut wi) = inbound.into_split();
                let (mut ro, mut wo) = outbound.into_split();
                let (b1, b2) = (bytes.clone(), bytes);
                let up = async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match tokio::io::AsyncReadExt::read(&mut ri, &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        b1.fetch_add(n as u64, Ordering::Relaxed);
                        if tokio::io::AsyncWriteExt::write_all(&mut wo, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                };
                let down = async move {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match tokio::io::AsyncReadExt::read(&mut ro, &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        b2.fetch_add(n as u64, Ordering::Relaxed);
                        if tokio::io::AsyncWriteExt::write_all(&mut wi, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                };
                tokio::join!(up, down);
            });
        }
    });
    addr
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let (size, steps, runs) = (
        env("E2E_SIZE", 256),
        env("E2E_STEPS", 10),
        env("E2E_RUNS", 5),
    );
    let model = match std::env::var("E2E_MODEL").as_deref() {
        Ok("kandinsky-2-1") => Model::Kandinsky21,
        Ok("kandinsky-2-2") | Err(_) => Model::Kandinsky22,
        Ok(other) => panic!("E2E_MODEL={other}; allowed: kandinsky-2-2, kandinsky-2-1"),
    };
    println!("model: {model:?}");
    let stack = Stack::start_model(model, &[], &[]).await;
    // A second gateway whose stage traffic goes through byte-counting proxies.
    let counters: Vec<Arc<AtomicU64>> = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut proxied = Vec::new();
    for (r, n) in [
        &stack.text_encoder,
        &stack.prior,
        &stack.denoiser,
        &stack.movq,
    ]
    .into_iter()
    .zip(&counters)
    {
        proxied.push(counting_proxy(r.grpc, n.clone()).await);
    }
    let gateway = Stack::start_gateway([proxied[0], proxied[1], proxied[2], proxied[3]], &[]).await;
    let mut client = kd_e2e::gateway_client(&gateway).await;
    let request = |seed: u64| v1::GenerateRequest {
        prompt: "a red cat, 4k photo".into(),
        width: Some(size as u32),
        height: Some(size as u32),
        seeds: vec![seed],
        prior: Some(v1::PriorParams {
            num_inference_steps: Some(steps as u32),
            guidance_scale: Some(4.0),
        }),
        decoder: Some(v1::DecoderParams {
            num_inference_steps: Some(steps as u32),
            guidance_scale: Some(4.0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pipeline = Arc::new(
        Text2Image::load(
            &CheckpointDir::open(model.prior_dir()).unwrap(),
            &CheckpointDir::open(model.decoder_dir()).unwrap(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let lib_request = move |seed: u64| Text2ImageRequest {
        prompt: "a red cat, 4k photo".into(),
        negative_prompt: None,
        height: size,
        width: size,
        seeds: vec![seed],
        prior: SampleParams {
            num_inference_steps: steps,
            guidance_scale: 4.0,
        },
        decoder_steps: steps,
        decoder_guidance: 4.0,
        decoder_timesteps: None,
        task: Default::default(),
    };
    // Warm-up of both paths.
    client.generate(request(0)).await.unwrap();
    let p = pipeline.clone();
    tokio::task::spawn_blocking(move || p.generate(&lib_request(0)).unwrap())
        .await
        .unwrap();
    for c in &counters {
        c.store(0, Ordering::Relaxed);
    }

    let (mut grpc_s, mut lib_s) = (Vec::new(), Vec::new());
    for i in 0..runs as u64 {
        // Interleaved, so both paths see the same machine load.
        let t = Instant::now();
        let r = client
            .generate(request(100 + i))
            .await
            .unwrap()
            .into_inner();
        grpc_s.push(t.elapsed().as_secs_f64());
        let png_bytes = r.images[0].image.as_ref().unwrap().data.len();
        let p = pipeline.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || p.generate(&lib_request(100 + i)).unwrap())
            .await
            .unwrap();
        lib_s.push(t.elapsed().as_secs_f64());
        if i == 0 {
            println!("image: {size}x{size} PNG of {png_bytes} bytes");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (g, l) = (median(&mut grpc_s), median(&mut lib_s));
    println!("e2e {size}x{size}, {steps}+{steps} steps, {runs} runs (median): services {:.3} s, in-process {:.3} s, ratio {:.3} (overhead {:+.1} ms)", g, l, g / l, (g - l) * 1e3);
    let names = ["text_encoder", "prior", "denoiser", "movq"];
    let mut total = 0;
    for (n, c) in names.iter().zip(&counters) {
        let b = c.load(Ordering::Relaxed) / runs as u64;
        total += b;
        println!("wire bytes per request, gateway <-> {n}: {b}");
    }
    println!("wire bytes per request, gateway <-> all stages: {total}");
}
