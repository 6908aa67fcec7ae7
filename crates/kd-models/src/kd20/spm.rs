//! A reader for SentencePiece model files (`spiece.model`, `sentencepiece.bpe.model`): the
//! protobuf `sentencepiece.ModelProto` (`sentencepiece_model.proto`), decoded by hand — only the
//! fields a tokenizer needs, every other field skipped by its wire type. No dependency: the
//! protobuf wire format is varints, fixed 32/64-bit words and length-delimited bytes.
//!
//! ```text
//! ModelProto      { repeated SentencePiece pieces = 1; TrainerSpec trainer_spec = 2;
//!                   NormalizerSpec normalizer_spec = 3; ... }
//! SentencePiece   { string piece = 1; float score = 2; Type type = 3 [default NORMAL]; }
//! TrainerSpec     { ModelType model_type = 3 [default UNIGRAM]; bool byte_fallback = 35;
//!                   int32 unk_id = 40 [0]; bos_id = 41 [1]; eos_id = 42 [2]; pad_id = 43 [-1];
//!                   string unk_piece = 45 ["<unk>"]; ... }
//! NormalizerSpec  { string name = 1; bytes precompiled_charsmap = 2;
//!                   bool add_dummy_prefix = 3 [true]; bool remove_extra_whitespaces = 4 [true];
//!                   bool escape_whitespaces = 5 [true]; ... }
//! ```
//!
//! Every length is checked against the bytes left, so a truncated or corrupt file is an error
//! naming the file, never a panic or a huge allocation.

use crate::error::{ModelError, Result};
use std::path::Path;

/// `SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// An ordinary piece (1).
    Normal,
    /// The unknown piece (2).
    Unknown,
    /// A control symbol such as `<pad>`, `</s>` (3): never produced from text by the model.
    Control,
    /// A user-defined symbol (4): always one piece when it occurs in text.
    UserDefined,
    /// An unused piece (5).
    Unused,
    /// A byte-fallback piece `<0xNN>` (6).
    Byte,
}

impl PieceType {
    fn from_wire(v: u64) -> Option<Self> {
        Some(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }
}

/// One vocabulary entry; its id is its index in [`SpmModel::pieces`].
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text (`▁` stands for a space).
    pub piece: String,
    /// Log-probability (unigram) or merge rank (BPE).
    pub score: f32,
    /// Kind of piece.
    pub kind: PieceType,
}

/// `TrainerSpec.ModelType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmModelType {
    /// Unigram language model (1), the T5 / XLM-R kind.
    Unigram,
    /// BPE (2).
    Bpe,
    /// Whitespace-delimited words (3).
    Word,
    /// Characters (4).
    Char,
}

/// The fields of `TrainerSpec` a tokenizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSpec {
    /// Model kind (default unigram).
    pub model_type: SpmModelType,
    /// Whether unknown characters fall back to byte pieces.
    pub byte_fallback: bool,
    /// Id of the unknown piece (default 0).
    pub unk_id: i32,
    /// Id of `<s>` (default 1; -1 = none).
    pub bos_id: i32,
    /// Id of `</s>` (default 2; -1 = none).
    pub eos_id: i32,
    /// Id of `<pad>` (default -1 = none).
    pub pad_id: i32,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            model_type: SpmModelType::Unigram,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
        }
    }
}

/// The fields of `NormalizerSpec` a tokenizer needs.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizerSpec {
    /// Rule name (`nmt_nfkc`, `nfkc`, `identity`, `user_defined`, ...).
    pub name: String,
    /// The compiled normalisation rules (a double-array trie plus target strings); empty for
    /// `identity`.
    pub precompiled_charsmap: Vec<u8>,
    /// Prepend `▁` to the text (default true).
    pub add_dummy_prefix: bool,
    /// Strip and collapse whitespace (default true).
    pub remove_extra_whitespaces: bool,
    /// Replace spaces by `▁` (default true).
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// A parsed SentencePiece model file.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmModel {
    /// The vocabulary in id order.
    pub pieces: Vec<Piece>,
    /// Training settings (special ids, model kind).
    pub trainer_spec: TrainerSpec,
    /// Normalisation settings.
    pub normalizer_spec: NormalizerSpec,
}

/// A protobuf reader over one message's bytes.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A field value as the wire format gives it.
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("truncated varint at byte {}", self.pos));
            };
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {}", self.pos))
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "a field of {n} bytes at byte {} runs past the end ({} bytes)",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// The next `(field number, value)`, or `None` at the end.
    fn next(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| format!("implausible length {n}"))?;
                Wire::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported wire type {w} (field {field})")),
        };
        if field == 0 {
            return Err("field number 0".into());
        }
        Ok(Some((field, value)))
    }
}

fn expect_varint(field: &str, w: Wire) -> std::result::Result<u64, String> {
    match w {
        Wire::Varint(v) => Ok(v),
        _ => Err(format!("`{field}` is not a varint")),
    }
}

fn expect_bytes<'a>(field: &str, w: Wire<'a>) -> std::result::Result<&'a [u8], String> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(format!("`{field}` is not length-delimited")),
    }
}

fn expect_string(field: &str, w: Wire) -> std::result::Result<String, String> {
    let b = expect_bytes(field, w)?;
    String::from_utf8(b.to_vec()).map_err(|_| format!("`{field}` is not UTF-8"))
}

/// protobuf `int32`: a varint holding the value sign-extended to 64 bits.
fn int32(field: &str, v: u64) -> std::result::Result<i32, String> {
    i32::try_from(v as i64).map_err(|_| format!("`{field}` = {v} is out of the int32 range"))
}

fn parse_piece(buf: &[u8]) -> std::result::Result<Piece, String> {
    let mut r = Reader::new(buf);
    let mut piece = Piece {
        piece: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    while let Some((field, w)) = r.next()? {
        match field {
            1 => piece.piece = expect_string("piece", w)?,
            2 => match w {
                Wire::Fixed32(bits) => piece.score = f32::from_bits(bits),
                _ => return Err("`score` is not a float".into()),
            },
            3 => {
                let v = expect_varint("type", w)?;
                piece.kind =
                    PieceType::from_wire(v).ok_or_else(|| format!("unknown piece type {v}"))?;
            }
            _ => {}
        }
    }
    Ok(piece)
}

fn parse_trainer(buf: &[u8]) -> std::result::Result<TrainerSpec, String> {
    let mut r = Reader::new(buf);
    let mut t = TrainerSpec::default();
    while let Some((field, w)) = r.next()? {
        match field {
            3 => {
                t.model_type = match expect_varint("model_type", w)? {
                    1 => SpmModelType::Unigram,
                    2 => SpmModelType::Bpe,
                    3 => SpmModelType::Word,
                    4 => SpmModelType::Char,
                    v => return Err(format!("unknown model_type {v}")),
                }
            }
            35 => t.byte_fallback = expect_varint("byte_fallback", w)? != 0,
            40 => t.unk_id = int32("unk_id", expect_varint("unk_id", w)?)?,
            41 => t.bos_id = int32("bos_id", expect_varint("bos_id", w)?)?,
            42 => t.eos_id = int32("eos_id", expect_varint("eos_id", w)?)?,
            43 => t.pad_id = int32("pad_id", expect_varint("pad_id", w)?)?,
            _ => {}
        }
    }
    Ok(t)
}

fn parse_normalizer(buf: &[u8]) -> std::result::Result<NormalizerSpec, String> {
    let mut r = Reader::new(buf);
    let mut n = NormalizerSpec::default();
    while let Some((field, w)) = r.next()? {
        match field {
            1 => n.name = expect_string("name", w)?,
            2 => n.precompiled_charsmap = expect_bytes("precompiled_charsmap", w)?.to_vec(),
            3 => n.add_dummy_prefix = expect_varint("add_dummy_prefix", w)? != 0,
            4 => n.remove_extra_whitespaces = expect_varint("remove_extra_whitespaces", w)? != 0,
            5 => n.escape_whitespaces = expect_varint("escape_whitespaces", w)? != 0,
            _ => {}
        }
    }
    Ok(n)
}

impl SpmModel {
    /// Parses the bytes of a model file.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let mut r = Reader::new(bytes);
        let mut pieces = Vec::new();
        let mut trainer_spec = TrainerSpec::default();
        let mut normalizer_spec = NormalizerSpec::default();
        while let Some((field, w)) = r.next()? {
            match field {
                1 => pieces.push(
                    parse_piece(expect_bytes("pieces", w)?)
                        .map_err(|e| format!("piece {}: {e}", pieces.len()))?,
                ),
                2 => trainer_spec = parse_trainer(expect_bytes("trainer_spec", w)?)?,
                3 => normalizer_spec = parse_normalizer(expect_bytes("normalizer_spec", w)?)?,
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("no pieces (not a SentencePiece model)".into());
        }
        Ok(Self {
            pieces,
            trainer_spec,
            normalizer_spec,
        })
    }

    /// Reads and parses `path`; errors name it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&bytes).map_err(|e| ModelError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not a valid SentencePiece model: {e}"),
        })
    }

    /// Id of the piece `text`, if any.
    pub fn id_of(&self, text: &str) -> Option<usize> {
        self.pieces.iter().position(|p| p.piece == text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(data.len() as u64, out);
        out.extend_from_slice(data);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        bytes_field(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        varint(3 << 3, &mut p);
        varint(kind, &mut p);
        p
    }

    #[test]
    fn parses_pieces_specs_and_negative_ids() {
        let mut m = Vec::new();
        bytes_field(1, &piece("<pad>", 0.0, 3), &mut m);
        bytes_field(1, &piece("▁a", -1.5, 1), &mut m);
        let mut t = Vec::new();
        varint(3 << 3, &mut t);
        varint(1, &mut t);
        varint(41 << 3, &mut t);
        varint(u64::MAX, &mut t); // bos_id = -1, sign-extended
        varint(40 << 3, &mut t);
        varint(2, &mut t);
        // An unknown fixed64 field is skipped.
        varint(99 << 3 | 1, &mut t);
        t.extend_from_slice(&[0; 8]);
        bytes_field(2, &t, &mut m);
        let mut n = Vec::new();
        bytes_field(1, b"nmt_nfkc", &mut n);
        bytes_field(2, &[1, 2, 3], &mut n);
        varint(3 << 3, &mut n);
        varint(0, &mut n);
        bytes_field(3, &n, &mut m);
        let model = SpmModel::parse(&m).unwrap();
        assert_eq!(model.pieces.len(), 2);
        assert_eq!(model.pieces[0].kind, PieceType::Control);
        assert_eq!(
            (model.pieces[1].piece.as_str(), model.pieces[1].score),
            ("▁a", -1.5)
        );
        assert_eq!(model.trainer_spec.bos_id, -1);
        assert_eq!(model.trainer_spec.unk_id, 2);
        assert_eq!(model.trainer_spec.eos_id, 2);
        assert_eq!(model.normalizer_spec.name, "nmt_nfkc");
        assert_eq!(model.normalizer_spec.precompiled_charsmap, vec![1, 2, 3]);
        assert!(!model.normalizer_spec.add_dummy_prefix);
        assert!(model.normalizer_spec.remove_extra_whitespaces);
        assert_eq!(model.id_of("▁a"), Some(1));
    }

    #[test]
    fn truncated_and_garbage_inputs_are_errors() {
        let mut m = Vec::new();
        bytes_field(1, &piece("abc", 0.0, 1), &mut m);
        for cut in 1..m.len() {
            assert!(SpmModel::parse(&m[..cut]).is_err(), "cut at {cut}");
        }
        assert!(SpmModel::parse(&[]).is_err());
        assert!(SpmModel::parse(&[0x0b]).is_err()); // wire type 3 (groups)
        assert!(SpmModel::parse(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(SpmModel::parse(&[0x80; 16]).is_err());
    }
}
