//! Mutual TLS between the gateway and a stage, over a real MoVQ stage on loopback with
//! certificates made in the test: the gateway's client side (its stage pools) gets through with
//! a certificate of the platform CA; plaintext, no client certificate and a certificate of
//! another CA are refused; a rotated server certificate is served without a restart; a key that
//! does not match its certificate stops the start naming the flag.

use kd_gateway::balance::Pool;
use kd_proto::v1::{self, stage_info_client::StageInfoClient};
use kd_testkit::pki::{PemFiles, TestCa};
use kd_testkit::{fixtures_dir, stage_args, TestServer};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A MoVQ stage on the tiny fixture serving TLS with `server`, requiring client certificates
/// of the CA in `client_ca`.
async fn tls_stage(server: &PemFiles, client_ca: &Path) -> TestServer {
    let dir = fixtures_dir().join("tiny/kandinsky-2-2-decoder");
    let (cert, key, ca) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
        client_ca.display().to_string(),
    );
    let flags = [
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ];
    let config = <kd_movq::Config as clap::Parser>::parse_from(stage_args("kd-movq", &dir, &flags));
    TestServer::spawn(|l, s| kd_movq::run_with_listeners(config, l, s)).await
}

/// The stage's `StageInfo` component through a gateway pool with `tls` (a fresh connection).
async fn info(
    stage: &TestServer,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<String, tonic::Status> {
    let pool = Pool::new(&[stage.url()], "movq", Duration::from_secs(60), tls)
        .await
        .unwrap();
    pool.call(|ch| async move {
        let resp = StageInfoClient::new(ch).info(v1::InfoRequest {}).await?;
        Ok(resp.into_inner().model.unwrap_or_default().component)
    })
    .await
}

/// Waits until `f` answers Ok (the stage loads its model behind TLS).
async fn until_ok<F, Fut>(what: &str, f: F) -> String
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, tonic::Status>>,
{
    let t = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if t.elapsed() > Duration::from_secs(30) => panic!("{what}: {e:?}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_serve_only_callers_with_a_certificate_of_the_platform_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("kd platform CA");
    let ca_pem = ca.write_cert(dir.path(), "ca");
    let server = ca.issue(dir.path(), "movq", &["localhost", "127.0.0.1"]);
    let gateway = ca.issue(dir.path(), "gateway", &["kd-gateway"]);
    let stage = tls_stage(&server, &ca_pem).await;

    // Its gRPC health speaks TLS only; `/healthz` on the metrics port is the pod's probe.
    let t = Instant::now();
    while !kd_testkit::http_get(stage.metrics, "/healthz")
        .await
        .starts_with("HTTP/1.1 200")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "/healthz never said SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The gateway's side: the platform CA and its own client certificate.
    let mutual =
        kd_runtime::tls::client_config(&ca_pem, Some((&gateway.cert, &gateway.key))).unwrap();
    let component = until_ok("mutual TLS", || info(&stage, Some(mutual.clone()))).await;
    assert_eq!(component, "movq");

    // Plaintext, TLS without a client certificate, and a certificate of another CA: refused.
    assert!(info(&stage, None).await.is_err(), "plaintext was served");
    let anonymous = kd_runtime::tls::client_config(&ca_pem, None).unwrap();
    assert!(
        info(&stage, Some(anonymous)).await.is_err(),
        "no client certificate was served"
    );
    let rogue_ca = TestCa::new("someone else");
    let rogue = rogue_ca.issue(dir.path(), "rogue", &["kd-gateway"]);
    let forged = kd_runtime::tls::client_config(&ca_pem, Some((&rogue.cert, &rogue.key))).unwrap();
    assert!(
        info(&stage, Some(forged)).await.is_err(),
        "a foreign client certificate was served"
    );
    stage.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_server_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (TestCa::new("CA 2026"), TestCa::new("CA 2027"));
    let client_ca = old_ca.write_cert(dir.path(), "client-ca");
    let new_ca_pem = new_ca.write_cert(dir.path(), "new-ca");
    let server = old_ca.issue(dir.path(), "movq", &["127.0.0.1"]);
    let gateway = old_ca.issue(dir.path(), "gateway", &["kd-gateway"]);
    let stage = tls_stage(&server, &client_ca).await;
    let identity = Some((gateway.cert.as_path(), gateway.key.as_path()));
    let trusts_old = kd_runtime::tls::client_config(&client_ca, identity).unwrap();
    let trusts_new = kd_runtime::tls::client_config(&new_ca_pem, identity).unwrap();
    until_ok("before rotation", || info(&stage, Some(trusts_old.clone()))).await;
    assert!(info(&stage, Some(trusts_new.clone())).await.is_err());

    // The Secret rotates: a certificate of the new CA replaces the files in place.
    let rotated = new_ca.issue(dir.path(), "movq-2027", &["127.0.0.1"]);
    std::fs::copy(&rotated.key, &server.key).unwrap();
    std::fs::copy(&rotated.cert, &server.cert).unwrap();
    until_ok("after rotation", || info(&stage, Some(trusts_new.clone()))).await;
    assert!(
        info(&stage, Some(trusts_old)).await.is_err(),
        "the old certificate is still served"
    );
    stage.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_key_that_does_not_match_its_certificate_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("CA");
    let ca_pem = ca.write_cert(dir.path(), "ca");
    let a = ca.issue(dir.path(), "a", &["127.0.0.1"]);
    let b = ca.issue(dir.path(), "b", &["127.0.0.1"]);
    let mismatched = PemFiles {
        cert: a.cert,
        key: b.key,
    };
    let mut stage = tls_stage(&mismatched, &ca_pem).await;
    let err = stage.join().await.unwrap_err();
    assert!(err.contains("--tls-cert/--tls-key"), "{err}");
}
