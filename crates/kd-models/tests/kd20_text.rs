//! Parity of Kandinsky 2.0's two text encoders (XLM-R `MultilingualCLIP` + mT5 encoder, with
//! their tokenizers) against the OFFICIAL `kandinsky2` code
//! (`tests/fixtures/kd20/reference/text_encoders.*`, made by `tools/reference/gen_kd20.py`), and
//! the errors of bad folders.

use candle_core::{DType, Device, Tensor};
use kd_models::kd20::mt5::relative_position_bucket;
use kd_models::kd20::text::{load_mt5_encoder, load_multilingual_clip};
use kd_models::kd20::{Kd20TextEncoders, Kd20Tokens, Mt5Tokenizer, SpmModel};
use kd_models::mclip::{XlmrBatch, XlmrTokenizer, MAX_LENGTH};
use kd_models::ModelError;
use kd_testkit::parity::{assert_close, fixtures_dir, get, load_reference, rel_l2};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    fixtures_dir().join("kd20")
}

fn te1() -> PathBuf {
    root().join("text_encoder1")
}

fn te2() -> PathBuf {
    root().join("text_encoder2")
}

fn refs() -> HashMap<String, Tensor> {
    load_reference(root().join("reference/text_encoders.safetensors")).unwrap()
}

fn meta() -> serde_json::Value {
    let p = root().join("reference/text_encoders.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p:?}: {e}")))
        .unwrap()
}

/// `(script, text)` of every reference prompt.
fn prompts() -> Vec<(String, String)> {
    meta()["prompts"]
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

fn texts() -> Vec<String> {
    prompts().into_iter().map(|(_, t)| t).collect()
}

fn rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

fn encoders(dtype: DType) -> Kd20TextEncoders {
    Kd20TextEncoders::load(root(), dtype, &Device::Cpu).unwrap()
}

fn check_tokens(which: &str, batch: &XlmrBatch, ids_key: &str, mask_key: &str) {
    let refs = refs();
    let prompts = prompts();
    assert_eq!(batch.input_ids.dtype(), DType::I64);
    assert_eq!(batch.input_ids.dims(), [prompts.len(), MAX_LENGTH]);
    let (ids, mask) = (rows(&batch.input_ids), rows(&batch.attention_mask));
    let (want_ids, want_mask) = (rows(get(&refs, ids_key)), rows(get(&refs, mask_key)));
    for (i, (script, text)) in prompts.iter().enumerate() {
        assert_eq!(
            ids[i], want_ids[i],
            "{which}: input_ids of prompt {i} ({script}: {text:?})"
        );
        assert_eq!(
            mask[i], want_mask[i],
            "{which}: attention_mask of prompt {i} ({script})"
        );
    }
}

#[test]
fn reference_covers_the_scripts_and_edge_cases() {
    let prompts = prompts();
    assert_eq!(prompts.len(), 15);
    let scripts: BTreeSet<&str> = prompts.iter().map(|(s, _)| s.as_str()).collect();
    for want in [
        "Latin",
        "Cyrillic",
        "Devanagari",
        "Han",
        "Arabic",
        "Greek",
        "Hebrew",
        "Thai",
        "Hangul",
        "emoji+mixed",
        "empty",
        "long (truncated)",
    ] {
        assert!(scripts.contains(want), "no {want} prompt: {scripts:?}");
    }
    let refs = refs();
    // The long prompt fills both tokenisations, `</s>` last.
    let last = prompts.len() - 1;
    assert_eq!(rows(get(&refs, "input_ids1"))[last][MAX_LENGTH - 1], 2);
    assert_eq!(rows(get(&refs, "input_ids2"))[last][MAX_LENGTH - 1], 1);
    assert!(rows(get(&refs, "attention_mask2"))[last]
        .iter()
        .all(|&m| m == 1));
}

#[test]
fn xlmr_tokenizer_matches_reference_ids_and_masks() {
    let tok = XlmrTokenizer::from_dir(te1()).unwrap();
    assert_eq!((tok.pad_id(), tok.max_length()), (1, MAX_LENGTH));
    let batch = tok.encode(&texts(), &Device::Cpu).unwrap();
    check_tokens("XLM-R", &batch, "input_ids1", "attention_mask1");
}

#[test]
fn mt5_tokenizer_from_spiece_matches_reference_ids_and_masks() {
    let tok = Mt5Tokenizer::from_dir(te2()).unwrap();
    assert_eq!((tok.pad_id(), tok.max_length()), (0, MAX_LENGTH));
    assert_eq!(
        tok.vocab_size() as u64,
        meta()["vocab_size2"].as_u64().unwrap()
    );
    let texts = texts();
    let batch = tok.encode(&texts, &Device::Cpu).unwrap();
    check_tokens("mT5", &batch, "input_ids2", "attention_mask2");
    // Rows do not depend on the batch.
    for (i, t) in texts.iter().enumerate() {
        let one = tok.encode(&[t], &Device::Cpu).unwrap();
        assert_eq!(rows(&one.input_ids)[0], rows(&batch.input_ids)[i], "{t:?}");
    }
    // The empty prompt is `</s>` alone.
    let empty = tok.encode(&[""], &Device::Cpu).unwrap();
    let (ids, mask) = (rows(&empty.input_ids), rows(&empty.attention_mask));
    assert_eq!(&ids[0][..2], &[1, 0]);
    assert_eq!(mask[0].iter().sum::<i64>(), 1);
}

#[test]
fn mt5_special_tokens_are_matched_verbatim() {
    let tok = Mt5Tokenizer::from_dir(te2()).unwrap();
    let rows_ = tok.encode_rows(&["a </s> <pad> <unk> cat"]).unwrap();
    let n = rows_.attention_mask[0].iter().filter(|&&m| m == 1).count();
    let ids = &rows_.input_ids[0][..n];
    // As transformers' T5Tokenizer: the control pieces and <unk> are special added tokens.
    assert_eq!(&ids[1..4], &[1, 0, 2], "{ids:?}");
    assert_eq!(*ids.last().unwrap(), 1);
}

#[test]
fn spiece_model_is_parsed() {
    let m = SpmModel::from_file(&te2().join("spiece.model")).unwrap();
    let t = &m.trainer_spec;
    assert_eq!((t.pad_id, t.eos_id, t.unk_id, t.bos_id), (0, 1, 2, -1));
    assert_eq!(m.pieces[0].piece, "<pad>");
    assert_eq!(m.pieces[1].piece, "</s>");
    assert_eq!(m.pieces[2].piece, "<unk>");
    assert!(!m.normalizer_spec.precompiled_charsmap.is_empty());
    assert_eq!(
        m.pieces.len() as u64,
        meta()["vocab_size2"].as_u64().unwrap()
    );
}

/// The spiece conversion on a real `nmt_nfkc` charsmap (240 KB; this fixture's models carry a
/// subset): the 2.1 fixture's XLM-R SentencePiece model, converted the T5 way, gives the pieces
/// transformers' XLM-R `tokenizer.json` gave for the 2.1 tokenizer prompts (ids there are
/// fairseq-shifted: spm 0 (`<unk>`) -> 3, spm k ≥ 3 -> k + 1; `<s> … </s>` around 75 pieces at
/// most, where T5 keeps 76 before `</s>`).
#[test]
fn spiece_conversion_matches_xlmr_pieces_on_the_real_nmt_nfkc_charsmap() {
    let kd21 = fixtures_dir().join("kd21");
    let model_path = kd21.join("kandinsky-2-1/tokenizer/sentencepiece.bpe.model");
    let model = SpmModel::from_file(&model_path).unwrap();
    assert_eq!(model.normalizer_spec.name, "nmt_nfkc");
    assert!(model.normalizer_spec.precompiled_charsmap.len() > 100_000);
    let special = kd_models::kd20::T5SpecialTokens {
        eos: "</s>".into(),
        unk: "<unk>".into(),
        pad: "<unk>".into(),
        extra_ids: 0,
        additional: vec![],
    };
    let tok = Mt5Tokenizer::new(&model, &special, &model_path).unwrap();
    let refs = load_reference(kd21.join("reference/tokenizer.safetensors")).unwrap();
    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(kd21.join("reference/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let ids = rows(get(&refs, "input_ids"));
    let masks = rows(get(&refs, "attention_mask"));
    let prompts = sidecar["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 10);
    let to_xlmr = |id: u32| -> i64 {
        match id {
            0 => 3,
            1 => 0,
            2 => 2,
            k => i64::from(k) + 1,
        }
    };
    for (i, p) in prompts.iter().enumerate() {
        let text = p["text"].as_str().unwrap();
        let got = tok.encode_rows(&[text]).unwrap();
        let n = got.attention_mask[0].iter().filter(|&&m| m == 1).count();
        let ours: Vec<i64> = got.input_ids[0][..n - 1]
            .iter()
            .map(|&id| to_xlmr(id))
            .collect();
        let m = masks[i].iter().filter(|&&m| m == 1).count();
        let theirs = &ids[i][1..m - 1];
        let k = theirs.len().min(ours.len());
        assert_eq!(&ours[..k], &theirs[..k], "kd21 prompt {i}: {text:?}");
        if theirs.len() < MAX_LENGTH - 2 {
            assert_eq!(ours.len(), theirs.len(), "kd21 prompt {i}: {text:?}");
        }
    }
}

#[test]
fn mt5_relative_position_buckets_match_transformers() {
    let refs = refs();
    let want = get(&refs, "mt5_relative_position_bucket")
        .to_vec1::<i64>()
        .unwrap();
    let l = MAX_LENGTH as i64;
    assert_eq!(want.len() as i64, 2 * l - 1);
    for (i, &w) in want.iter().enumerate() {
        let rel = i as i64 - (l - 1);
        assert_eq!(
            i64::from(relative_position_bucket(rel, 32, 128)),
            w,
            "relative position {rel}"
        );
    }
}

fn ref_tokens(refs: &HashMap<String, Tensor>) -> Kd20Tokens {
    Kd20Tokens {
        tokens1: XlmrBatch {
            input_ids: get(refs, "input_ids1").clone(),
            attention_mask: get(refs, "attention_mask1").clone(),
        },
        tokens2: XlmrBatch {
            input_ids: get(refs, "input_ids2").clone(),
            attention_mask: get(refs, "attention_mask2").clone(),
        },
    }
}

fn check_outputs(what: &str, enc: &Kd20TextEncoders, tokens: &Kd20Tokens, tol: f64) {
    let refs = refs();
    let out = enc.encode_tokens(tokens).unwrap();
    for (key, got) in [
        ("pooled1", &out.pooled1),
        ("full1", &out.full1),
        ("full2", &out.full2),
    ] {
        let e = rel_l2(got, get(&refs, key)).unwrap();
        eprintln!("{what}: {key} rel-L2 {e:e}");
        assert_close(key, got, get(&refs, key), tol);
    }
    assert_eq!(out.mask1.dtype(), DType::U32);
    assert_eq!(rows(&out.mask1), rows(get(&refs, "attention_mask1")));
    assert_eq!(rows(&out.mask2), rows(get(&refs, "attention_mask2")));
    assert_eq!(out.pooled1.dims(), [15, 24]);
    assert_eq!(out.full1.dims(), [15, MAX_LENGTH, 32]);
    assert_eq!(out.full2.dims(), [15, MAX_LENGTH, 32]);
}

#[test]
fn encoders_f32_match_reference_from_reference_tokens() {
    let enc = encoders(DType::F32);
    assert_eq!(
        (enc.config1().hidden_size, enc.config1().num_dims),
        (32, 24)
    );
    check_outputs("f32", &enc, &ref_tokens(&refs()), 1e-4);
}

#[test]
fn encode_prompts_end_to_end_matches_reference() {
    let enc = encoders(DType::F32);
    let texts = texts();
    check_outputs("end to end", &enc, &enc.tokenize(&texts).unwrap(), 1e-4);
    let out = enc.encode(&texts).unwrap();
    let refs = refs();
    assert_close("pooled1", &out.pooled1, get(&refs, "pooled1"), 1e-4);
    assert_close("full2", &out.full2, get(&refs, "full2"), 1e-4);
}

#[test]
fn encoders_f16_weights_match_f32_reference_loosely() {
    let enc = encoders(DType::F16);
    check_outputs("f16", &enc, &ref_tokens(&refs()), 5e-3);
}

#[test]
fn batch_rows_equal_one_by_one() {
    let enc = encoders(DType::F32);
    let texts = texts();
    let all = enc.encode(&texts).unwrap();
    assert_eq!(all.rows().unwrap(), texts.len());
    for (i, t) in texts.iter().enumerate() {
        let one = enc.encode(&[t]).unwrap();
        let row = all.row(i).unwrap();
        for (what, a, b) in [
            ("pooled1", &one.pooled1, &row.pooled1),
            ("full1", &one.full1, &row.full1),
            ("full2", &one.full2, &row.full2),
        ] {
            let e = rel_l2(a, b).unwrap();
            assert!(e <= 1e-6, "prompt {i} {what}: alone vs batch rel-L2 {e:e}");
        }
    }
}

#[test]
fn encoders_are_usable_from_several_threads() {
    let enc = encoders(DType::F32);
    let want = enc.encode(&["a red cat", "кот"]).unwrap();
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| enc.encode(&["a red cat", "кот"]).unwrap()))
            .collect();
        for h in hs {
            let got = h.join().unwrap();
            assert_close("threaded full2", &got.full2, &want.full2, 0.0);
            assert_close("threaded pooled1", &got.pooled1, &want.pooled1, 0.0);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Bad folders

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

/// A copy of the kd20 folder (text encoders only).
fn copied() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("kandinsky-2-0");
    copy_dir(&te1(), &root.join("text_encoder1"));
    copy_dir(&te2(), &root.join("text_encoder2"));
    (tmp, root)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

fn load_err(root: &Path) -> ModelError {
    Kd20TextEncoders::load(root, DType::F32, &Device::Cpu).unwrap_err()
}

#[test]
fn copied_folder_loads() {
    let (_tmp, root) = copied();
    let enc = Kd20TextEncoders::load(&root, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.tokenizer2().pad_id(), 0);
}

#[test]
fn missing_spiece_model_is_named() {
    let (_tmp, root) = copied();
    std::fs::remove_file(root.join("text_encoder2/spiece.model")).unwrap();
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Checkpoint { .. }), "{err:?}");
    assert!(msg.contains("text_encoder2/spiece.model"), "{msg}");
}

#[test]
fn corrupt_spiece_model_is_named() {
    let (_tmp, root) = copied();
    let p = root.join("text_encoder2/spiece.model");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_err(&root).to_string();
    assert!(
        msg.contains("text_encoder2/spiece.model") && msg.contains("SentencePiece"),
        "{msg}"
    );
}

#[test]
fn missing_tokenizer_json_of_encoder1_is_named() {
    let (_tmp, root) = copied();
    std::fs::remove_file(root.join("text_encoder1/tokenizer.json")).unwrap();
    let msg = load_err(&root).to_string();
    assert!(msg.contains("text_encoder1/tokenizer.json"), "{msg}");
}

#[test]
fn encoder1_config_that_is_not_xlmr_is_named() {
    let (_tmp, root) = copied();
    edit_json(&root.join("text_encoder1/config.json"), |c| {
        c["model_type"] = "bert".into()
    });
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    for want in [
        "text_encoder1/config.json",
        "model_type",
        "bert",
        "xlm-roberta",
    ] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

#[test]
fn encoder2_config_that_is_not_mt5_is_named() {
    let (_tmp, root) = copied();
    // The XLM-R config in the mT5 folder.
    std::fs::copy(
        root.join("text_encoder1/config.json"),
        root.join("text_encoder2/config.json"),
    )
    .unwrap();
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    for want in [
        "text_encoder2/config.json",
        "model_type",
        "xlm-roberta",
        "mt5",
    ] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

#[test]
fn unsupported_feed_forward_is_named() {
    let (_tmp, root) = copied();
    edit_json(&root.join("text_encoder2/config.json"), |c| {
        c["feed_forward_proj"] = "gated-tanh".into()
    });
    let msg = load_err(&root).to_string();
    for want in [
        "text_encoder2/config.json",
        "feed_forward_proj",
        "gated-tanh",
    ] {
        assert!(msg.contains(want), "`{want}` not in: {msg}");
    }
}

#[test]
fn projection_width_must_match_hidden_size() {
    let (_tmp, root) = copied();
    edit_json(&root.join("text_encoder1/config.json"), |c| {
        c["hidden_size"] = 40.into();
        c["num_attention_heads"] = 4.into();
    });
    let msg = load_err(&root).to_string();
    assert!(
        msg.contains("LinearTransformation.weight") && msg.contains("hidden_size"),
        "{msg}"
    );
}

#[test]
fn missing_weights_file_is_named() {
    let (_tmp, root) = copied();
    std::fs::remove_file(root.join("text_encoder2/pytorch_model.bin")).unwrap();
    let msg = load_err(&root).to_string();
    assert!(msg.contains("text_encoder2"), "{msg}");
}

#[test]
fn wrong_vocab_size_names_the_weights_file_and_key() {
    let (_tmp, root) = copied();
    edit_json(&root.join("text_encoder2/config.json"), |c| {
        c["vocab_size"] = 999.into()
    });
    let err = load_err(&root);
    let msg = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert!(
        msg.contains("text_encoder2/pytorch_model.bin") && msg.contains("shared.weight"),
        "{msg}"
    );
}

#[test]
fn parts_load_on_their_own() {
    let (cfg, _m) = load_multilingual_clip(&te1(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((cfg.transformer_dimensions, cfg.num_dims), (32, 24));
    let mt5 = load_mt5_encoder(&te2(), DType::F32, &Device::Cpu).unwrap();
    let c = mt5.config();
    assert_eq!((c.d_model, c.num_layers, c.num_heads), (32, 2, 4));
    // No `relative_attention_max_distance` in the file: transformers' default.
    assert_eq!(c.relative_attention_max_distance, 128);
    assert!(c.gated);
}

#[test]
fn out_of_vocabulary_ids_are_rejected() {
    let mt5 = load_mt5_encoder(&te2(), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5i64, 100_000]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1i64, 1]], &Device::Cpu).unwrap();
    let msg = mt5.forward(&ids, &mask).unwrap_err().to_string();
    assert!(msg.contains("input_ids") && msg.contains("100000"), "{msg}");
    let zero = Tensor::new(&[[0i64, 0]], &Device::Cpu).unwrap();
    assert!(mt5.forward(&ids.clamp(0i64, 5i64).unwrap(), &zero).is_err());
}

/// A charsmap whose header claims more trie bytes than it holds is refused before the
/// `tokenizers` parser reserves them (found by the `spm_model` fuzz target: a 2-byte claim of
/// 8 GiB).
#[test]
fn a_charsmap_claiming_more_than_it_holds_is_refused() {
    use kd_models::kd20::{Mt5Tokenizer, SpmModel, T5SpecialTokens};
    let dir = kd_testkit::fixtures_dir().join("kd20/text_encoder2");
    let path = dir.join("spiece.model");
    let mut model = SpmModel::from_file(&path).unwrap();
    let special = T5SpecialTokens::from_dir(&dir).unwrap();
    for charsmap in [
        vec![0xf0, 0xff, 0xff, 0xff, 1, 2, 3, 4],
        vec![7, 0, 0, 0],
        vec![1, 2],
    ] {
        model.normalizer_spec.precompiled_charsmap = charsmap;
        let err = Mt5Tokenizer::new(&model, &special, &path)
            .unwrap_err()
            .to_string();
        // Refused by the header check (the parser's own error would say "Cannot parse").
        assert!(
            err.contains("precompiled_charsmap")
                && err.contains("spiece.model")
                && (err.contains("claims") || err.contains("header") || err.contains("outside")),
            "{err}"
        );
    }
}
