//! The text-encoder stage over Kandinsky 2.1 folders: the prior's CLIP conditioning plus the
//! decoder's multilingual (XLM-R + MultilingualCLIP) conditioning, equal to diffusers'
//! (`tests/fixtures/kd21/reference/text_encoder`); the family comes from the folders.

use clap::Parser;
use kd_proto::v1;
use kd_proto::v1::text_encoder_client::TextEncoderClient;
use kd_runtime::launch::LaunchError;
use kd_runtime::Shutdown;
use kd_testkit::parity::{fixtures_dir, get, load_reference, rel_l2};
use kd_text_encoder::Config;
use std::path::{Path, PathBuf};
use tokio::net::TcpListener;

fn prior21() -> PathBuf {
    fixtures_dir().join("kd21/kandinsky-2-1-prior")
}

fn decoder21() -> PathBuf {
    fixtures_dir().join("kd21/kandinsky-2-1")
}

fn config(model_dir: &Path, decoder_dir: Option<&PathBuf>) -> Config {
    let mut args = vec![
        "kd-text-encoder".to_string(),
        format!("--model-dir={}", model_dir.display()),
        "--device=cpu".into(),
    ];
    if let Some(d) = decoder_dir {
        args.push(format!("--decoder-model-dir={}", d.display()));
    }
    Config::try_parse_from(args).unwrap()
}

/// Runs the service until it fails to load (the error) or serves (then stops it).
async fn load_error(c: Config) -> String {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = kd_text_encoder::run_with_listeners(c, grpc, metrics, Shutdown::new())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Load(_)), "{err}");
    err.to_string()
}

#[tokio::test]
async fn encode_returns_the_multilingual_decoder_conditioning_of_diffusers() {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = grpc.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(kd_text_encoder::run_with_listeners(
        config(&prior21(), Some(&decoder21())),
        grpc,
        metrics,
        shutdown.clone(),
    ));
    let mut c = loop {
        if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut c = TextEncoderClient::new(ch);
            if c.info(v1::InfoRequest {}).await.is_ok() {
                break c;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let info = c.info(v1::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.family, v1::ModelFamily::Kandinsky21 as i32);
    assert!(
        info.revision.contains('+'),
        "covers both folders: {}",
        info.revision
    );

    let dir = fixtures_dir().join("kd21/reference");
    let r = load_reference(dir.join("text_encoder.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("text_encoder.json")).unwrap())
            .unwrap();
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let resp = c
        .encode(v1::EncodeTextRequest {
            prompts: prompts.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.prior_conditioning.is_some());
    let dc = resp.decoder_conditioning.expect("2.1 decoder conditioning");
    let unwire = |t: Option<v1::Tensor>| {
        kd_proto::from_wire(&t.unwrap(), &candle_core::Device::Cpu, &Default::default()).unwrap()
    };
    let mask = unwire(dc.attention_mask);
    assert_eq!(
        mask.to_vec2::<i64>().unwrap(),
        get(&r, "attention_mask").to_vec2::<i64>().unwrap()
    );
    for (key, got) in [
        ("text_embeds", unwire(dc.text_embeds)),
        ("hidden_states", unwire(dc.hidden_states)),
    ] {
        let e = rel_l2(&got, get(&r, key)).unwrap();
        eprintln!("Encode decoder_conditioning.{key} vs diffusers: rel L2 {e:e}");
        assert!(e <= 1e-4, "{key}: {e}");
    }
    shutdown.trigger();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_2_1_prior_needs_the_2_1_decoder_folder() {
    let err = load_error(config(&prior21(), None)).await;
    assert!(err.contains("--decoder-model-dir"), "{err}");
    let kd22 = fixtures_dir().join("tiny/kandinsky-2-2-decoder");
    let err = load_error(config(&prior21(), Some(&kd22))).await;
    assert!(
        err.contains("--decoder-model-dir") && err.contains("same Kandinsky version"),
        "{err}"
    );
}
