//! The five services with mutual TLS between the gateway and every stage (certificates made in
//! the test): the images equal those of a plaintext stack, and a gateway that trusts another CA
//! is refused by the stages (UNAVAILABLE naming the stage).

use kd_e2e::{generate_request, Model, Stack};
use kd_testkit::pki::TestCa;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_and_stages_over_mutual_tls_make_the_plaintext_images() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("kd platform CA");
    let ca_pem = ca.write_cert(dir.path(), "ca").display().to_string();
    let stage = ca.issue(dir.path(), "stage", &["127.0.0.1"]);
    let gw = ca.issue(dir.path(), "gateway", &["kd-gateway"]);
    let (stage_cert, stage_key) = (
        stage.cert.display().to_string(),
        stage.key.display().to_string(),
    );
    let (gw_cert, gw_key) = (gw.cert.display().to_string(), gw.key.display().to_string());
    let stage_flags = [
        "--tls-cert",
        &stage_cert,
        "--tls-key",
        &stage_key,
        "--tls-client-ca",
        &ca_pem,
    ];
    let gateway_flags = [
        "--stage-tls-ca",
        &ca_pem,
        "--stage-tls-cert",
        &gw_cert,
        "--stage-tls-key",
        &gw_key,
    ];
    let secured = Stack::start_unprobed(Model::Kandinsky22, &stage_flags, &gateway_flags).await;
    let mut c = secured.client().await;
    let req = generate_request("a red cat", &[7]);
    // The stages load behind TLS: wait through the gateway.
    let t = Instant::now();
    let secured_resp = loop {
        match c.generate(req.clone()).await {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == Code::Unavailable && t.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("over mutual TLS: {e:?}"),
        }
    };

    let plain = Stack::start(&[]).await;
    let plain_resp = plain
        .client()
        .await
        .generate(req.clone())
        .await
        .unwrap()
        .into_inner();
    let bytes = |r: &kd_proto::v1::GenerateResponse| -> Vec<Vec<u8>> {
        r.images
            .iter()
            .map(|i| i.image.as_ref().unwrap().data.clone())
            .collect()
    };
    assert_eq!(bytes(&secured_resp), bytes(&plain_resp));

    // A gateway whose CA is not the stages' own (and whose certificate the stages do not
    // trust): the stages refuse it.
    let other = TestCa::new("another CA");
    let other_pem = other.write_cert(dir.path(), "other").display().to_string();
    let stranger = other.issue(dir.path(), "stranger", &["kd-gateway"]);
    let (s_cert, s_key) = (
        stranger.cert.display().to_string(),
        stranger.key.display().to_string(),
    );
    let stages = [
        secured.text_encoder.grpc,
        secured.prior.grpc,
        secured.denoiser.grpc,
        secured.movq.grpc,
    ];
    let flags = [
        "--stage-tls-ca",
        &other_pem,
        "--stage-tls-cert",
        &s_cert,
        "--stage-tls-key",
        &s_key,
    ];
    let wrong = Stack::start_gateway(stages, &flags).await;
    let err = kd_e2e::gateway_client(&wrong)
        .await
        .generate(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("text_encoder") || err.message().contains("text encoder"),
        "{}",
        err.message()
    );
}
