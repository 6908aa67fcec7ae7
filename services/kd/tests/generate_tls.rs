//! `kd generate` against a gateway whose public port speaks TLS: with `--tls-ca` (and
//! `--tls-server-name` when the address is not the certificate's name) it gets through to the
//! gateway, which answers that its stages are down; without them it cannot connect.

use kd_testkit::pki::TestCa;
use kd_testkit::{http_get, TestServer};
use std::time::{Duration, Instant};

/// A gateway serving TLS with a certificate for `kd-gateway` only, over stages that are down.
async fn tls_gateway(cert: &str, key: &str) -> TestServer {
    let mut args = vec!["kd-gateway".to_string()];
    for flag in [
        "--text-encoder-url",
        "--prior-url",
        "--denoiser-url",
        "--movq-url",
    ] {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        args.extend([flag.to_string(), url]);
    }
    args.extend([
        "--tls-cert".into(),
        cert.into(),
        "--tls-key".into(),
        key.into(),
    ]);
    let config = <kd_gateway::Config as clap::Parser>::parse_from(args);
    let server = TestServer::spawn(|l, s| kd_gateway::run_with_listeners(config, l, s)).await;
    let t = Instant::now();
    while !http_get(server.metrics, "/healthz")
        .await
        .starts_with("HTTP/1.1 200")
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "gateway never SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
}

/// Runs `kd generate` with `extra` flags: its stderr.
async fn kd(gateway: &str, out: &std::path::Path, extra: &[&str]) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_kd"))
        .args([
            "generate",
            "a red cat",
            "--timeout",
            "10",
            "--gateway",
            gateway,
            "-o",
        ])
        .arg(out)
        .args(extra)
        .output()
        .await
        .unwrap();
    assert!(
        !output.status.success(),
        "the stages are down, yet it succeeded"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kd_generate_reaches_a_tls_gateway_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("kd platform CA");
    let ca_pem = ca.write_cert(dir.path(), "ca").display().to_string();
    let pair = ca.issue(dir.path(), "gateway", &["kd-gateway"]);
    let (cert, key) = (
        pair.cert.display().to_string(),
        pair.key.display().to_string(),
    );
    let gw = tls_gateway(&cert, &key).await;
    let url = format!("https://127.0.0.1:{}", gw.grpc.port());
    let out = dir.path().join("out.png");

    // Through: the gateway answers that its text encoder is down.
    let e = kd(
        &url,
        &out,
        &["--tls-ca", &ca_pem, "--tls-server-name", "kd-gateway"],
    )
    .await;
    assert!(e.contains("stage text_encoder is unavailable"), "{e}");
    // The address is not the certificate's name, plaintext, or an unknown CA: no connection.
    let other = TestCa::new("another CA")
        .write_cert(dir.path(), "other")
        .display()
        .to_string();
    for flags in [
        &["--tls-ca", &ca_pem][..],
        &[],
        &["--tls-ca", &other, "--tls-server-name", "kd-gateway"],
    ] {
        let e = kd(&url, &out, flags).await;
        assert!(!e.contains("text_encoder"), "{flags:?} got through: {e}");
    }
    gw.shutdown().await.unwrap();
}
