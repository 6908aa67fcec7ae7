//! The text-encoder stage over Kandinsky 2.1 folders: the prior's CLIP conditioning plus the
//! decoder's multilingual (XLM-R + MultilingualCLIP) conditioning, equal to diffusers'
//! (`tests/fixtures/kd21/reference/text_encoder`); the family comes from the folders. Also an
//! aMUSEd folder, whose conditioning is the CLIP tower's penultimate layer.

use clap::Parser;
use kd_proto::v1;
use kd_proto::v1::text_encoder_client::TextEncoderClient;
use kd_runtime::launch::LaunchError;
use kd_runtime::Listeners;
use kd_runtime::Shutdown;
use kd_testkit::parity::{get, load_reference, rel_l2};
use kd_testkit::{fixtures_dir, stage_args, unwire, wait_serving, TestServer};
use kd_text_encoder::{run_with_listeners, Config};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn prior21() -> PathBuf {
    fixtures_dir().join("kd21/kandinsky-2-1-prior")
}

fn decoder21() -> PathBuf {
    fixtures_dir().join("kd21/kandinsky-2-1")
}

fn config(model_dir: &Path, decoder_dir: Option<&PathBuf>) -> Config {
    let decoder = decoder_dir.map(|d| format!("--decoder-model-dir={}", d.display()));
    let extra: Vec<&str> = decoder.iter().map(String::as_str).collect();
    Config::try_parse_from(stage_args("kd-text-encoder", model_dir, &extra)).unwrap()
}

/// Runs the service until it fails to load (the error) or serves (then stops it).
async fn load_error(c: Config) -> String {
    let listeners = Listeners::loopback().await.unwrap();
    let err = run_with_listeners(c, listeners, Shutdown::new())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Load(_)), "{err}");
    err.to_string()
}

#[tokio::test]
async fn encode_returns_the_multilingual_decoder_conditioning_of_diffusers() {
    let config = config(&prior21(), Some(&decoder21()));
    let server = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(
        &server,
        "kandinsky.v1.TextEncoder",
        Duration::from_secs(120),
    )
    .await;
    let mut c = TextEncoderClient::new(server.channel().await);
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
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
        .encode_text(v1::EncodeTextRequest {
            prompts: prompts.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.prior_conditioning.is_some());
    let dc = resp.decoder_conditioning.expect("2.1 decoder conditioning");
    let tensor = |t: Option<v1::Tensor>| unwire(&t.expect("a tensor"));
    let mask = tensor(dc.attention_mask);
    assert_eq!(
        mask.to_vec2::<i64>().unwrap(),
        get(&r, "attention_mask").to_vec2::<i64>().unwrap()
    );
    for (key, got) in [
        ("text_embeds", tensor(dc.text_embeds)),
        ("hidden_states", tensor(dc.hidden_states)),
    ] {
        let e = rel_l2(&got, get(&r, key)).unwrap();
        eprintln!("Encode decoder_conditioning.{key} vs diffusers: rel L2 {e:e}");
        assert!(e <= 1e-4, "{key}: {e}");
    }
    server.shutdown().await.unwrap();
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

/// An aMUSEd folder: the CLIP conditioning with the penultimate hidden states, equal to
/// transformers' `hidden_states[-2]` (`tests/fixtures/tiny/reference/amused/text_encoder`).
#[tokio::test]
async fn an_amused_folder_returns_the_penultimate_hidden_states() {
    let config = config(&fixtures_dir().join("tiny/amused-256"), None);
    let server = TestServer::spawn(|l, s| run_with_listeners(config, l, s)).await;
    wait_serving(
        &server,
        "kandinsky.v1.TextEncoder",
        Duration::from_secs(120),
    )
    .await;
    let info = kd_testkit::stage_info(server.channel().await)
        .await
        .unwrap();
    assert_eq!(info.family, v1::ModelFamily::Amused as i32);
    let dir = fixtures_dir().join("tiny/reference/amused");
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
    let resp = TextEncoderClient::new(server.channel().await)
        .encode_text(v1::EncodeTextRequest { prompts })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.decoder_conditioning.is_none());
    let pc = resp.prior_conditioning.expect("the CLIP conditioning");
    for (key, got) in [
        ("text_embeds", pc.text_embeds),
        ("penultimate", pc.hidden_states),
    ] {
        let e = rel_l2(&unwire(&got.expect("a tensor")), get(&r, key)).unwrap();
        eprintln!("aMUSEd Encode {key} vs transformers: rel L2 {e:e}");
        assert!(e <= 1e-4, "{key}: {e}");
    }
    server.shutdown().await.unwrap();
}
