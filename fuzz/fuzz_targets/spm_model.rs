//! Any bytes as a SentencePiece model (`spiece.model`, a protobuf) through the project's reader
//! and the mT5 tokenizer built from it, then one multilingual prompt encoded: an error naming the
//! file, never a panic or an allocation the bytes merely claim.
#![no_main]

use kd_models::kd20::{Mt5Tokenizer, SpmModel, T5SpecialTokens};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = SpmModel::parse(data) else {
        return;
    };
    let special = T5SpecialTokens {
        eos: "</s>".into(),
        unk: "<unk>".into(),
        pad: "<pad>".into(),
        extra_ids: 0,
        additional: Vec::new(),
    };
    if let Ok(tok) = Mt5Tokenizer::new(&model, &special, Path::new("fuzz/spiece.model")) {
        let _ = tok.encode_rows(&["Кот в сапогах, 一只猫 🐈 a cat"]);
    }
});
