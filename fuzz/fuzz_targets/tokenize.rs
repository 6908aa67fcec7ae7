//! Any text through the CLIP tokenizer (Kandinsky 2.2 and 2.1 priors) and the XLM-R tokenizer
//! (2.1 decoder), as the text encoder runs them: 77 ids per prompt, never a panic.
#![no_main]

use kd_models::clip::tokenizer::ClipTokenizer;
use kd_models::mclip::tokenizer::XlmrTokenizer;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

static CLIP: OnceLock<ClipTokenizer> = OnceLock::new();
static XLMR: OnceLock<XlmrTokenizer> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let clip = CLIP.get_or_init(|| {
        ClipTokenizer::from_dir(fixtures().join("tiny/kandinsky-2-2-prior/tokenizer"), 77)
            .expect("the fixture CLIP tokenizer")
    });
    let xlmr = XLMR.get_or_init(|| {
        XlmrTokenizer::from_dir(fixtures().join("kd21/kandinsky-2-1/tokenizer"))
            .expect("the fixture XLM-R tokenizer")
    });
    if let Ok(batch) = clip.encode(&[text.as_ref()]) {
        assert_eq!(batch.input_ids[0].len(), 77);
    }
    let _ = xlmr.encode_rows(&[text.as_ref()]);
});
