//! Parity of the CLIP tokenizer and text tower against the diffusers/transformers reference
//! (`tests/fixtures/tiny/reference/prior/{tokenizer,text_encoder}.*`).

use candle_core::{DType, Device, Tensor};
use kd_models::clip::{ClipTextEncoder, ClipTextModelWithProjection, ClipTokenizer};
use kd_models::{CheckpointDir, Variant};
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
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
    text_tower_half_is_close(DType::F16);
}

#[test]
fn text_tower_bf16_is_close() {
    text_tower_half_is_close(DType::BF16);
}

fn text_tower_half_is_close(dtype: DType) {
    let refs = load_reference(refdir().join("text_encoder.safetensors")).unwrap();
    let out = text_encoder(dtype)
        .forward(get(&refs, "input_ids"))
        .unwrap();
    let e = rel_l2(&out.text_embeds, get(&refs, "text_embeds")).unwrap();
    eprintln!("{dtype:?} text_embeds rel L2 {e:e}");
    assert_close(
        &format!("{dtype:?} text_embeds"),
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

/// A copy of the prior folder whose `tokenizer/tokenizer_config.json` stores `model_max_length`
/// as `value` (the literal JSON text).
fn prior_copy_with_model_max_length(value: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&ckpt(), tmp.path());
    let p = tmp.path().join("tokenizer/tokenizer_config.json");
    let text = std::fs::read_to_string(&p).unwrap().replace(
        "\"model_max_length\": 77",
        &format!("\"model_max_length\": {value}"),
    );
    assert!(text.contains(value), "{text}");
    std::fs::write(&p, text).unwrap();
    tmp
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
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

#[test]
fn unset_model_max_length_loads_as_77() {
    // transformers writes `VERY_LARGE_INTEGER` (int(1e30)) when a tokenizer has no length; both
    // spellings must load as CLIP's 77, giving the same ids as the unmodified folder.
    let want = ClipTextEncoder::load(
        &CheckpointDir::open(ckpt()).unwrap(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let ps = prompts("tokenizer.json");
    let want_ids = want.tokenizer().encode(&ps).unwrap();
    for value in ["1000000000000000019884624838656", "1e30"] {
        let tmp = prior_copy_with_model_max_length(value);
        let dir = CheckpointDir::open(tmp.path()).unwrap();
        let cfg = dir
            .component("tokenizer")
            .unwrap()
            .tokenizer_config()
            .unwrap();
        assert_eq!(cfg.model_max_length, 77, "{value}");
        let enc = ClipTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(enc.tokenizer().max_length(), 77);
        let got = enc.tokenizer().encode(&ps).unwrap();
        assert!(got.input_ids.iter().all(|r| r.len() == 77));
        assert_eq!(got, want_ids, "{value}");
        check_tokenizer(enc.tokenizer());
    }
}

#[test]
fn fractional_model_max_length_is_rejected_naming_the_field() {
    let tmp = prior_copy_with_model_max_length("76.5");
    let dir = CheckpointDir::open(tmp.path()).unwrap();
    let err = ClipTextEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("model_max_length"),
        "{msg}"
    );
}
