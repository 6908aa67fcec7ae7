//! Parity of the Kandinsky 2.1 decoder prompt encoder (XLM-R tokenizer + diffusers
//! `MultilingualCLIP`) against the transformers/diffusers reference
//! (`tests/fixtures/kd21/reference/{tokenizer,text_encoder}.*`), and its input/config errors.

use candle_core::{DType, Device, Tensor};
use kd_models::mclip::{
    MClipConfig, MultilingualTextEncoder, XlmrBatch, XlmrTokenizer, MAX_LENGTH,
};
use kd_models::{CheckpointDir, ModelError};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn ckpt() -> PathBuf {
    fixtures_dir().join("kd21/kandinsky-2-1")
}
fn refdir() -> PathBuf {
    fixtures_dir().join("kd21/reference")
}

fn sidecar(name: &str) -> serde_json::Value {
    let p = refdir().join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}")))
        .unwrap()
}

/// `(script, text)` of every reference prompt.
fn ref_prompts() -> Vec<(String, String)> {
    sidecar("tokenizer.json")["prompts"]
        .as_array()
        .expect("`prompts` list")
        .iter()
        .map(|p| {
            (
                p["script"].as_str().unwrap().to_string(),
                p["text"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

fn encoder(dtype: DType) -> MultilingualTextEncoder {
    let dir = CheckpointDir::open(ckpt()).unwrap();
    MultilingualTextEncoder::load(&dir, dtype, &Device::Cpu).unwrap()
}

fn text_encoder_refs() -> HashMap<String, Tensor> {
    load_reference(refdir().join("text_encoder.safetensors")).unwrap()
}

#[test]
fn tokenizer_matches_reference_ids_and_masks() {
    let tok = XlmrTokenizer::from_dir(ckpt().join("tokenizer")).unwrap();
    assert_eq!((tok.pad_id(), tok.max_length()), (1, MAX_LENGTH));
    let refs = load_reference(refdir().join("tokenizer.safetensors")).unwrap();
    let prompts = ref_prompts();
    let scripts: BTreeSet<&str> = prompts.iter().map(|(s, _)| s.as_str()).collect();
    assert!(
        scripts.len() >= 8,
        "only {} scripts: {scripts:?}",
        scripts.len()
    );
    let texts: Vec<&str> = prompts.iter().map(|(_, t)| t.as_str()).collect();

    let batch = tok.encode(&texts, &Device::Cpu).unwrap();
    assert_eq!(batch.input_ids.dtype(), DType::I64);
    assert_eq!(batch.input_ids.dims(), [texts.len(), MAX_LENGTH]);
    let (ids, mask) = (rows(&batch.input_ids), rows(&batch.attention_mask));
    let (ref_ids, ref_mask) = (
        rows(get(&refs, "input_ids")),
        rows(get(&refs, "attention_mask")),
    );
    for (i, (script, text)) in prompts.iter().enumerate() {
        assert_eq!(
            ids[i], ref_ids[i],
            "input_ids of prompt {i} ({script}: {text:?})"
        );
        assert_eq!(
            mask[i], ref_mask[i],
            "attention_mask of prompt {i} ({script})"
        );
        let one = tok.encode(&[text], &Device::Cpu).unwrap();
        assert_eq!(
            rows(&one.input_ids)[0],
            ids[i],
            "prompt {i} alone vs in the batch"
        );
        assert_eq!(rows(&one.attention_mask)[0], mask[i]);
    }
    // A prompt longer than 77 tokens keeps `</s>` last, with no padding.
    assert!(
        ref_ids.iter().any(|r| r[MAX_LENGTH - 1] == 2),
        "the reference has no truncated prompt"
    );
}

fn ref_batch(refs: &HashMap<String, Tensor>) -> XlmrBatch {
    XlmrBatch {
        input_ids: get(refs, "input_ids").clone(),
        attention_mask: get(refs, "attention_mask").clone(),
    }
}

fn check_text_encoder(dtype: DType, tol: f64) {
    let enc = encoder(dtype);
    let refs = text_encoder_refs();
    let out = enc.encode_tokens(&ref_batch(&refs)).unwrap();
    let te = rel_l2(&out.text_embeds, get(&refs, "text_embeds")).unwrap();
    let hs = rel_l2(&out.hidden_states, get(&refs, "hidden_states")).unwrap();
    eprintln!("{dtype:?}: text_embeds rel-L2 {te:e}, hidden_states rel-L2 {hs:e}");
    assert_close(
        "text_embeds",
        &out.text_embeds,
        get(&refs, "text_embeds"),
        tol,
    );
    assert_close(
        "hidden_states",
        &out.hidden_states,
        get(&refs, "hidden_states"),
        tol,
    );
    assert_eq!(out.mask.dtype(), DType::U32);
    assert_eq!(rows(&out.mask), rows(get(&refs, "attention_mask")));
}

#[test]
fn text_encoder_f32_matches_reference() {
    check_text_encoder(DType::F32, 1e-4);
}

#[test]
fn text_encoder_f16_weights_match_f32_reference() {
    check_text_encoder(DType::F16, 1e-2);
}

#[test]
fn encode_prompts_end_to_end_matches_reference() {
    // From the prompt strings (tokenizer + model), not the stored ids.
    let enc = encoder(DType::F32);
    let refs = text_encoder_refs();
    let prompts: Vec<String> = sidecar("text_encoder.json")["prompts"]
        .as_array()
        .expect("`prompts` list")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert_eq!(prompts.len(), get(&refs, "input_ids").dim(0).unwrap());
    let tokens = enc.tokenize(&prompts).unwrap();
    assert_eq!(rows(&tokens.input_ids), rows(get(&refs, "input_ids")));
    let out = enc.encode(&prompts).unwrap();
    let te = rel_l2(&out.text_embeds, get(&refs, "text_embeds")).unwrap();
    let hs = rel_l2(&out.hidden_states, get(&refs, "hidden_states")).unwrap();
    eprintln!("end to end: text_embeds rel-L2 {te:e}, hidden_states rel-L2 {hs:e}");
    assert_close(
        "text_embeds",
        &out.text_embeds,
        get(&refs, "text_embeds"),
        1e-4,
    );
    assert_close(
        "hidden_states",
        &out.hidden_states,
        get(&refs, "hidden_states"),
        1e-4,
    );
}

#[test]
fn batch_rows_equal_one_by_one() {
    let enc = encoder(DType::F32);
    let prompts = ref_prompts();
    let texts: Vec<&str> = prompts.iter().map(|(_, t)| t.as_str()).collect();
    let all = enc.encode(&texts).unwrap();
    assert_eq!(all.rows().unwrap(), texts.len());
    let mut worst = 0f64;
    for (i, t) in texts.iter().enumerate() {
        let one = enc.encode(&[t]).unwrap();
        let row = all.row(i).unwrap();
        for (what, a, b) in [
            ("text_embeds", &one.text_embeds, &row.text_embeds),
            ("hidden_states", &one.hidden_states, &row.hidden_states),
        ] {
            let e = rel_l2(a, b).unwrap();
            worst = worst.max(e);
            assert!(e <= 1e-6, "prompt {i} {what}: alone vs batch rel-L2 {e:e}");
        }
        assert_eq!(rows(&one.mask)[0], rows(&row.mask)[0]);
    }
    eprintln!("batch vs one by one: worst rel-L2 {worst:e}");
}

#[test]
fn encoder_is_usable_from_several_threads() {
    let enc = encoder(DType::F32);
    let want = enc.encode(&["a red cat", "ein roter Hund"]).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| enc.encode(&["a red cat", "ein roter Hund"]).unwrap()))
            .collect();
        for h in hs {
            assert_close(
                "threaded",
                &h.join().unwrap().text_embeds,
                &want.text_embeds,
                0.0,
            );
        }
    });
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A copy of the 2.1 decoder folder with `text_encoder/config.json` edited by `edit`.
fn edited_checkpoint(edit: impl FnOnce(&mut serde_json::Value)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("kandinsky-2-1");
    copy_dir(&ckpt(), &root);
    let cfg_path = root.join("text_encoder/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    (tmp, root)
}

fn load_err(root: &Path) -> ModelError {
    let dir = CheckpointDir::open(root).unwrap();
    MultilingualTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn missing_tokenizer_json_is_named() {
    let (_tmp, root) = edited_checkpoint(|_| {});
    std::fs::remove_file(root.join("tokenizer/tokenizer.json")).unwrap();
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Checkpoint { .. }), "{err:?}");
    assert!(msg.contains("tokenizer/tokenizer.json"), "{msg}");
}

#[test]
fn relu_hidden_act_is_rejected_naming_file_field_and_allowed_values() {
    let (_tmp, root) = edited_checkpoint(|c| c["hidden_act"] = "relu".into());
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    for want in ["text_encoder/config.json", "hidden_act", "\"relu\"", "gelu"] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

#[test]
fn transformer_dimensions_must_equal_hidden_size() {
    let (_tmp, root) = edited_checkpoint(|c| c["transformerDimensions"] = 40.into());
    let msg = load_err(&root).to_string();
    assert!(
        msg.contains("transformerDimensions") && msg.contains("hidden_size"),
        "{msg}"
    );
}

#[test]
fn pad_token_id_must_match_the_tokenizer() {
    let (_tmp, root) = edited_checkpoint(|c| c["pad_token_id"] = 3.into());
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Config { .. }), "{err:?}");
    assert!(
        msg.contains("text_encoder/config.json") && msg.contains("pad_token_id"),
        "{msg}"
    );
}

#[test]
fn huge_model_max_length_is_ignored() {
    // transformers writes `model_max_length: 1e30` for some XLM-R folders; diffusers uses 77.
    let (_tmp, root) = edited_checkpoint(|_| {});
    let p = root.join("tokenizer/tokenizer_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "\"model_max_length\": 512",
        "\"model_max_length\": 1000000000000000019884624838656",
    );
    assert!(text.contains("1000000000000000019884624838656"));
    std::fs::write(&p, text).unwrap();
    let dir = CheckpointDir::open(&root).unwrap();
    let enc = MultilingualTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        enc.tokenize(&["a cat"]).unwrap().input_ids.dims(),
        [1, MAX_LENGTH]
    );
}

#[test]
fn legacy_dim_size_names_are_accepted() {
    let want = MClipConfig::from_file(&ckpt().join("text_encoder/config.json")).unwrap();
    let (_tmp, root) = edited_checkpoint(|c| {
        let o = c.as_object_mut().unwrap();
        let t = o.remove("transformerDimensions").unwrap();
        let n = o.remove("numDims").unwrap();
        o.insert("transformerDimSize".into(), t);
        o.insert("imageDimSize".into(), n);
    });
    let got = MClipConfig::from_file(&root.join("text_encoder/config.json")).unwrap();
    assert_eq!(got, want);
    assert_eq!(
        (got.transformer_dimensions, got.num_dims),
        (got.hidden_size, 32)
    );
}

#[test]
fn empty_prompt_list_is_invalid_input() {
    let enc = encoder(DType::F32);
    let err = enc.encode::<&str>(&[]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidInput {
                field: "prompts",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("at least one prompt"), "{err}");
}

#[test]
fn bad_token_batches_are_invalid_input() {
    let enc = encoder(DType::F32);
    let good = enc.tokenize(&["a cat"]).unwrap();
    let no_tokens = XlmrBatch {
        input_ids: good.input_ids.clone(),
        attention_mask: good.attention_mask.zeros_like().unwrap(),
    };
    let err = enc.encode_tokens(&no_tokens).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidInput {
                field: "attention_mask",
                ..
            }
        ),
        "{err:?}"
    );
    let out_of_vocab = XlmrBatch {
        input_ids: (good.input_ids.clone() + 1e6).unwrap(),
        attention_mask: good.attention_mask.clone(),
    };
    let err = enc.encode_tokens(&out_of_vocab).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidInput {
                field: "input_ids",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}
