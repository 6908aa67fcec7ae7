//! Parity of the CLIP tokenizer and text tower against the diffusers/transformers reference
//! (`tests/fixtures/tiny/reference/prior/{tokenizer,text_encoder}.*`).

use candle_core::{DType, Device, Tensor};
use kd_models::clip::{ClipTextModelWithProjection, ClipTokenizer};
use kd_models::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use kd_models::{CheckpointDir, Variant};
use std::path::PathBuf;

fn ckpt() -> PathBuf {
    fixtures_dir().join("tiny/kandinsky-2-2-prior")
}
fn refdir() -> PathBuf {
    fixtures_dir().join("tiny/reference/prior")
}

fn prompts(name: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(refdir().join(name)).unwrap()).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn rows_i64(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|v| v as u32).collect())
        .collect()
}

fn check_tokenizer(tok: &ClipTokenizer) {
    let refs = load_reference(refdir().join("tokenizer.safetensors")).unwrap();
    let ps = prompts("tokenizer.json");
    assert_eq!(ps.len(), 13);
    let batch = tok.encode(&ps).unwrap();
    assert_eq!(batch.input_ids, rows_i64(get(&refs, "input_ids")));
    assert_eq!(batch.attention_mask, rows_i64(get(&refs, "attention_mask")));
    for (i, p) in ps.iter().enumerate() {
        let one = tok.encode(&[p]).unwrap();
        assert_eq!(one.input_ids[0], batch.input_ids[i], "prompt {i} alone");
        assert_eq!(one.attention_mask[0], batch.attention_mask[i]);
    }
}

#[test]
fn tokenizer_json_matches_reference_ids_and_masks() {
    let tok = ClipTokenizer::from_dir(ckpt().join("tokenizer"), 77).unwrap();
    assert_eq!(
        tok.encode(&["a photo of a cat"]).unwrap().input_ids[0][..7],
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
    check_tokenizer(&tok);
}

#[test]
fn tokenizer_from_vocab_and_merges_matches_reference() {
    let dir = ckpt().join("tokenizer");
    let tok =
        ClipTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), 77)
            .unwrap();
    check_tokenizer(&tok);
}

#[test]
fn tokenizer_dir_without_tokenizer_json_uses_vocab_and_merges() {
    // The hub layout: only the slow files.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(ckpt().join("tokenizer").join(f), tmp.path().join(f)).unwrap();
    }
    check_tokenizer(&ClipTokenizer::from_dir(tmp.path(), 77).unwrap());
}

fn text_encoder(dtype: DType) -> ClipTextModelWithProjection {
    let comp = CheckpointDir::open(ckpt())
        .unwrap()
        .component("text_encoder")
        .unwrap();
    let cfg = comp.clip_text_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &Device::Cpu);
    ClipTextModelWithProjection::new(&cfg, vb).unwrap()
}

#[test]
fn text_tower_matches_reference() {
    let refs = load_reference(refdir().join("text_encoder.safetensors")).unwrap();
    let model = text_encoder(DType::F32);
    let ids = get(&refs, "input_ids");
    // The tokenizer reproduces the ids the reference fed the model.
    let tok = ClipTokenizer::from_dir(ckpt().join("tokenizer"), 77).unwrap();
    assert_eq!(
        tok.encode(&prompts("text_encoder.json")).unwrap().input_ids,
        rows_i64(ids)
    );
    let pooled: Vec<usize> = get(&refs, "pooled_index")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|v| v as usize)
        .collect();
    assert_eq!(model.pooled_indices(&rows_i64(ids)), pooled);
    let out = model.forward(ids).unwrap();
    let e1 = rel_l2(&out.text_embeds, get(&refs, "text_embeds")).unwrap();
    let e2 = rel_l2(&out.last_hidden_state, get(&refs, "last_hidden_state")).unwrap();
    eprintln!("text_embeds rel L2 {e1:e}, last_hidden_state rel L2 {e2:e}");
    assert_close(
        "text_embeds",
        &out.text_embeds,
        get(&refs, "text_embeds"),
        1e-4,
    );
    assert_close(
        "last_hidden_state",
        &out.last_hidden_state,
        get(&refs, "last_hidden_state"),
        1e-4,
    );
    // Batch-independence: row 3 alone equals row 3 in the batch.
    let one = model.forward(&ids.narrow(0, 3, 1).unwrap()).unwrap();
    assert_close(
        "row 3 alone",
        &one.text_embeds,
        &get(&refs, "text_embeds").narrow(0, 3, 1).unwrap(),
        1e-4,
    );
}

#[test]
fn text_tower_f16_is_close() {
    let refs = load_reference(refdir().join("text_encoder.safetensors")).unwrap();
    let out = text_encoder(DType::F16)
        .forward(get(&refs, "input_ids"))
        .unwrap();
    let e = rel_l2(&out.text_embeds, get(&refs, "text_embeds")).unwrap();
    eprintln!("f16 text_embeds rel L2 {e:e}");
    assert_close(
        "f16 text_embeds",
        &out.text_embeds,
        get(&refs, "text_embeds"),
        1e-2,
    );
}

#[test]
fn text_tower_rejects_bad_ids() {
    let model = text_encoder(DType::F32);
    let ids = Tensor::new(&[[49406u32, 60000, 49407]], &Device::Cpu).unwrap();
    let err = model.forward(&ids).unwrap_err().to_string();
    assert!(
        err.contains("input_ids") && err.contains("outside the vocabulary"),
        "{err}"
    );
    let long = Tensor::zeros((1, 78), DType::U32, &Device::Cpu).unwrap();
    let err = model.forward(&long).unwrap_err().to_string();
    assert!(err.contains("allowed 1..=77"), "{err}");
}
