//! The text-encoder stage over a Kandinsky 2.0 folder (the official layout, no
//! `model_index.json`): both multilingual encoders' outputs over gRPC equal the official
//! `Kandinsky2.encode_text` (`tests/fixtures/kd20/reference/text_encoders`, made by
//! `tools/reference/gen_kd20.py`) for 15 prompts in 10+ scripts.

use clap::Parser;
use kd_proto::v1;
use kd_proto::v1::text_encoder_client::TextEncoderClient;
use kd_runtime::launch::LaunchError;
use kd_runtime::{Listeners, Shutdown};
use kd_testkit::parity::{get, load_reference, rel_l2};
use kd_testkit::{fixtures_dir, stage_args, unwire, wait_serving, TestServer};
use kd_text_encoder::{run_with_listeners, Config};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn kd20() -> PathBuf {
    fixtures_dir().join("kd20")
}

fn config(model_dir: &Path, extra: &[&str]) -> Config {
    Config::try_parse_from(stage_args("kd-text-encoder", model_dir, extra)).unwrap()
}

#[tokio::test]
async fn encode_returns_both_encoders_of_the_official_code() {
    let config = config(&kd20(), &[]);
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
    assert_eq!(info.family, v1::ModelFamily::Kandinsky20 as i32);
    assert_eq!(info.component, "text_encoder");

    let dir = kd20().join("reference");
    let r = load_reference(dir.join("text_encoders.safetensors")).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("text_encoders.json")).unwrap())
            .unwrap();
    let prompts: Vec<String> = meta["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(prompts.len(), 15);
    let resp = TextEncoderClient::new(server.channel().await)
        .encode_text(v1::EncodeTextRequest { prompts })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.prior_conditioning.is_none(), "2.0 has no prior");
    let tensor = |t: Option<v1::Tensor>| unwire(&t.expect("a tensor"));
    let c1 = resp.decoder_conditioning.expect("M-CLIP conditioning");
    let c2 = resp.decoder_conditioning_2.expect("mT5 conditioning");
    assert!(c2.text_embeds.is_none(), "mT5 has no pooled embedding");
    for (key, got) in [
        ("pooled1", tensor(c1.text_embeds)),
        ("full1", tensor(c1.hidden_states)),
        ("full2", tensor(c2.hidden_states)),
    ] {
        let e = rel_l2(&got, get(&r, key)).unwrap();
        eprintln!("Kandinsky 2.0 Encode {key} vs the official code: rel L2 {e:e}");
        assert!(e <= 1e-4, "{key}: {e}");
    }
    let ids = |t: Option<v1::Tensor>| tensor(t).to_vec2::<i64>().unwrap();
    assert_eq!(
        ids(c1.attention_mask),
        get(&r, "attention_mask1").to_vec2::<i64>().unwrap()
    );
    assert_eq!(
        ids(c2.attention_mask),
        get(&r, "attention_mask2").to_vec2::<i64>().unwrap()
    );
    assert_eq!(
        ids(resp.input_ids),
        get(&r, "input_ids1").to_vec2::<i64>().unwrap(),
        "input_ids are the XLM-R tokenizer's"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_2_0_folder_takes_no_decoder_model_dir() {
    let other = fixtures_dir().join("kd21/kandinsky-2-1");
    let flag = format!("--decoder-model-dir={}", other.display());
    let listeners = Listeners::loopback().await.unwrap();
    let err = run_with_listeners(config(&kd20(), &[&flag]), listeners, Shutdown::new())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Load(_)), "{err}");
    let err = err.to_string();
    assert!(
        err.contains("--decoder-model-dir") && err.contains("Kandinsky 2.0"),
        "{err}"
    );
}
