#!/usr/bin/env python3
"""Kandinsky 2.0 text-encoder parity fixtures, computed by the OFFICIAL code
(`/work/shared/reference/kandinsky2-src`, ai-forever/Kandinsky-2 at `aeefc1c`): the two text
encoders of `CONFIG_2_0` in their original folder layout, and what `Kandinsky2.encode_text`
returns for them.

Run:  tools/reference/.venv/bin/python tools/reference/gen_kd20.py

Needs the official package in the reference venv (never edited; see
/work/shared/reference/README.md):

    tools/reference/.venv/bin/pip install --no-deps -e /work/shared/reference/kandinsky2-src
    tools/reference/.venv/bin/pip install omegaconf einops opencv-python-headless

Never run by CI; its outputs are committed. Deterministic and idempotent: it deletes and rewrites
`tests/fixtures/kd20/` and nothing else (under 600 KB).

What it writes (the hub folders `sberbank-ai/Kandinsky_2.0/text_encoder{1,2}/`, see
`kandinsky2/__init__.py: get_kandinsky2_0`, at tiny widths):

* `text_encoder1/` — `MultilingualCLIP` (`model_name: "multiclip"`): `config.json` (a plain
  `XLMRobertaConfig`, `model_type: "xlm-roberta"`, hidden 32, 2 layers, vocab = the tokenizer's),
  `pytorch_model.bin` (`torch.save` of the `MultilingualCLIP` state dict, fp16: `transformer.*` +
  `LinearTransformation.*` 32 -> 24), `sentencepiece.bpe.model`, `tokenizer.json` (transformers'
  own XLM-R slow->fast conversion, as the hub file was made), `tokenizer_config.json` and
  `special_tokens_map.json` (as transformers 4 wrote them for xlm-roberta-large).
* `text_encoder2/` — `MT5EncoderModel`: `config.json` (`model_type: "mt5"`, `gated-gelu`, untied
  embeddings, d_model 32, 2 layers, 4 heads, d_ff 48, no `relative_attention_max_distance`, as
  in the 2020 mT5 configs: default 128), `pytorch_model.bin` (`torch.save` of the encoder's state
  dict, fp16, `shared.weight` and `encoder.embed_tokens.weight` one tied storage),
  `spiece.model`, `tokenizer_config.json`, `special_tokens_map.json` — no `tokenizer.json`, like
  the official folder: transformers converts `spiece.model` when loading.
* `reference/text_encoders.{safetensors,json}` — for 15 prompts in 10 scripts (Latin, Cyrillic,
  Devanagari, Han, Arabic, Greek, Hebrew, Thai, Hangul, emoji; empty; NFKC/whitespace; unseen
  characters; longer than 77 tokens): `input_ids{1,2}` / `attention_mask{1,2}` (int64, 15x77) as
  `Kandinsky2.encode_text` tokenises (`AutoTokenizer.from_pretrained(folder)`, `max_length=77,
  padding="max_length", truncation=True, return_attention_mask=True, add_special_tokens=True`);
  `pooled1` (15x24) and `full1` (15x77x32) = `TextEncoder(model_name="multiclip")`; `full2`
  (15x77x32) = `TextEncoder(model_name="MT5EncoderModel")` (its pooled output is None);
  `mt5_relative_position_bucket` (153, int64): transformers' bidirectional bucket of the relative
  positions -76..76 (32 buckets, max distance 128) — the log-spaced buckets hit integer
  boundaries (16, 32, 64) where f32 rounding decides.

The tokenizers: two SentencePiece unigram models trained here on a small multilingual corpus
(`CORPUS`), one with XLM-R's special ids (`<unk>` 0, `<s>` 1, `</s>` 2; fairseq offset +1 in the
tokenizer) and one with mT5's (`<pad>` 0, `</s>` 1, `<unk>` 2). The real models normalise with
SentencePiece's `nmt_nfkc` rules, whose precompiled charsmap is 240 KB (over this fixture's whole
budget); the models here get the subset of those rules whose source string occurs in the corpus,
the prompts or `EXTRA_NORMALIZED` (checked: on every prompt the subset normalises exactly as the
full `nmt_nfkc` does), in a ~1 KB charsmap.

Quirks of the official code recorded here (see also the JSON sidecar):
* `MultilingualCLIP(config, in_features=1024, out_features=640)`: the projection sizes are
  hard-coded defaults (no config file holds them; `CONFIG_2_0` passes none). The fixture passes
  `in_features=32, out_features=24` through `TextEncoder(**kwargs)`; a loader must read them from
  `LinearTransformation.weight`'s shape.
* `load_state_dict(..., strict=False)`: a missing tensor would silently stay random; checked here
  that every parameter was restored from the file.
* `encode_text` tokenises `[prompt] * B + [""] * B` (the unconditional rows are the empty prompt,
  for both encoders) with a fixed 77; `model_max_length` is ignored.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import FIXTURES, REPO, dir_size_mb, perturb, save_reference, seed_all, write_json  # noqa: E402

warnings.filterwarnings("ignore")

OFFICIAL_SRC = Path("/work/shared/reference/kandinsky2-src")
ROOT = FIXTURES / "kd20"
TE1 = ROOT / "text_encoder1"
TE2 = ROOT / "text_encoder2"
REF = ROOT / "reference"
MAX_LEN = 77  # Kandinsky2.encode_text
BUDGET_BYTES = 600_000

XLMR_HIDDEN = 32
MCLIP_OUT = 24  # LinearTransformation out_features (640 in the real model)
MT5_D_MODEL = 32

# ---------------------------------------------------------------------------------------------------
# Text

CORPUS = [
    # Latin (English, French, German, Spanish, Turkish, Vietnamese)
    "a photo of a red cat wearing a hat", "an oil painting of a horse in the snow",
    "a portrait of a woman with flowers, highly detailed", "a city at night, cinematic lighting",
    "un chat rouge avec un chapeau", "une peinture à l'huile d'un cheval", "café crème brûlée",
    "eine rote Katze mit einem Hut", "die Straße im Winter, über naïve Wälder", "un gato rojo con sombrero",
    "kırmızı bir kedi şapka takıyor", "một con mèo đỏ đội mũ", "full width ligature and newlines",
    # Cyrillic
    "кот в сапогах на фоне заката", "красная кошка в шляпе", "картина маслом: лошадь в снегу",
    "портрет женщины с цветами", "ночной город, кинематографическое освещение",
    # Arabic
    "قطة حمراء ترتدي قبعة", "لوحة زيتية لحصان في الثلج", "صورة امرأة مع الزهور",
    # Devanagari
    "टोपी पहने हुए लाल बिल्ली", "बर्फ में घोड़े की तैलचित्र", "फूलों के साथ एक महिला का चित्र", "रात में शहर",
    # Han, Japanese
    "一只戴着帽子的红猫", "雪中的马的油画", "一只可爱的猫", "夜晚的城市", "带花的女人的肖像",
    "帽子をかぶった赤い猫", "雪の中の馬の油絵",
    # Hangul
    "모자를 쓴 빨간 고양이", "눈 속의 말", "꽃을 든 여자의 초상화", "밤의 도시",
    # Hebrew
    "חתול אדום חובש כובע", "ציור שמן של סוס בשלג", "דיוקן של אישה עם פרחים",
    # Greek
    "μια κόκκινη γάτα με καπέλο", "ελαιογραφία ενός αλόγου στο χιόνι", "πορτρέτο γυναίκας με λουλούδια",
    # Thai
    "แมวสีแดงสวมหมวก", "ภาพวาดสีน้ำมันของม้าในหิมะ", "เมืองในยามค่ำคืน",
    # Capitalised forms, emoji
    "A Red Cat", "Кот, Красная Кошка", "Μια Γάτα", "Der Hut", "Une Peinture", "Ночной Город",
    "🐱 cat 🚀 rocket ✨ sparkles 🌸 flowers", "🐱🐱 кот 猫",
]

PROMPTS = [
    {"script": "Latin", "text": "A red cat wearing a hat, oil painting"},
    {"script": "Cyrillic", "text": "Кот в сапогах на фоне заката"},
    {"script": "Devanagari", "text": "टोपी पहने हुए लाल बिल्ली"},
    {"script": "Han", "text": "一只戴着帽子的红猫"},
    {"script": "Arabic", "text": "قطة حمراء ترتدي قبعة"},
    {"script": "Greek", "text": "Μια κόκκινη γάτα με καπέλο"},
    {"script": "Hebrew", "text": "חתול אדום חובש כובע"},
    {"script": "Thai", "text": "แมวสีแดงสวมหมวก"},
    {"script": "Hangul", "text": "모자를 쓴 빨간 고양이"},
    {"script": "emoji+mixed", "text": "🐱 cat / кот / 猫 🚀✨ 👩‍🚀"},
    {"script": "empty", "text": ""},
    {"script": "whitespace+NFKC", "text": "  ｆｕｌｌ ｗｉｄｔｈ  ﬁ ligature   cafe\u0301\tand\nnewlines\u00a0 ① "},
    {"script": "unseen characters", "text": "ᚠᚢᚦ ꦗꦮ 𓀀 Ω≈ç√"},
    {"script": "Latin diacritics+Japanese", "text": "Straße über naïve Wälder, 帽子をかぶった赤い猫"},
    {"script": "long (truncated)", "text": " ".join(["кот в сапогах на фоне заката, a red cat 🐱"] * 10)},
]

# Characters whose nmt_nfkc rules are kept although no text above has them (so that the charsmap
# is not only what the prompts need).
EXTRA_NORMALIZED = "ＡＢＣａｂｃ０１２３ﬀﬂ²³½ⅠⅡ№™\u3000\u2002\u200b\r\x0b\x0c…‘’“”"


def texts_for_rules() -> list[str]:
    return CORPUS + [p["text"] for p in PROMPTS] + list(EXTRA_NORMALIZED)


def nmt_nfkc_subset_tsv(path: Path) -> int:
    """Writes the nmt_nfkc rules whose source occurs in the texts as a SentencePiece rule TSV."""
    import sentencepiece as spm

    full = spm.SentencePieceNormalizer(rule_name="nmt_nfkc")
    rules = dict(full.decompile())
    longest = max(len(k) for k in rules)
    subs = set()
    for t in texts_for_rules():
        for i in range(len(t)):
            for n in range(1, longest + 1):
                if i + n <= len(t):
                    subs.add(t[i:i + n])
    keep = sorted((k, v) for k, v in rules.items() if k in subs)

    def hexs(s: str) -> str:
        return " ".join(f"{ord(c):X}" for c in s)

    path.write_text("".join(f"{hexs(k)}\t{hexs(v)}\n" for k, v in keep), encoding="utf-8")
    # On every text the subset must normalise exactly as the full rule set.
    sub = spm.SentencePieceNormalizer(rule_tsv=str(path))
    for t in texts_for_rules():
        assert sub.normalize(t) == full.normalize(t), t
    return len(keep)


def train_spm(prefix: Path, rules: Path, vocab_size: int, ids: dict) -> Path:
    import sentencepiece as spm

    corpus = prefix.parent / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 3) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, normalization_rule_tsv=str(rules),
        num_threads=1, seed_sentencepiece_size=100000, shuffle_input_sentence=False, minloglevel=2,
        **ids,
    )
    # The trainer records its input and output paths (a temporary folder): keep only the names, so
    # that two runs write the same bytes.
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = Path(f"{prefix}.model")
    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.input.append(corpus.name)
    proto.trainer_spec.model_prefix = prefix.name
    proto.normalizer_spec.normalization_rule_tsv = rules.name
    model.write_bytes(proto.SerializeToString(deterministic=True))
    return model


def build_xlmr_tokenizer(tmp: Path, rules: Path):
    """XLM-R: SentencePiece ids unk 0, bos 1, eos 2 (fairseq +1 offset in the tokenizer)."""
    from transformers import XLMRobertaTokenizer
    from transformers.convert_slow_tokenizer import XLMRobertaConverter

    model = train_spm(tmp / "xlmr" / "sentencepiece.bpe", rules, 400,
                      dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    TE1.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, TE1 / "sentencepiece.bpe.model")
    special = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    spm_tok = SimpleNamespace(vocab_file=str(TE1 / "sentencepiece.bpe.model"),
                              convert_tokens_to_ids=lambda t: special[t])
    tok = XLMRobertaTokenizer(tokenizer_object=XLMRobertaConverter(spm_tok).converted(), bos_token="<s>",
                              eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                              pad_token="<pad>", mask_token="<mask>", model_max_length=512)
    tok.backend_tokenizer.save(str(TE1 / "tokenizer.json"), pretty=False)
    mask = {"content": "<mask>", "lstrip": True, "normalized": True, "rstrip": False, "single_word": False}
    # As transformers 4 wrote it for xlm-roberta-large (the real folder's era), not transformers 5.
    write_json(TE1 / "tokenizer_config.json", {
        "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": {"__type": "AddedToken", **mask},
        "model_max_length": 512, "pad_token": "<pad>", "sep_token": "</s>", "special_tokens_map_file": None,
        "tokenizer_class": "XLMRobertaTokenizer", "unk_token": "<unk>"})
    write_json(TE1 / "special_tokens_map.json", {
        "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": mask, "pad_token": "<pad>",
        "sep_token": "</s>", "unk_token": "<unk>"})
    return len(tok)


def build_mt5_tokenizer(tmp: Path, rules: Path) -> int:
    """mT5: SentencePiece ids pad 0, eos 1, unk 2, no bos; the folder has no tokenizer.json."""
    import sentencepiece as spm

    model = train_spm(tmp / "mt5" / "spiece", rules, 380, dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    TE2.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, TE2 / "spiece.model")
    # google/mt5-small's tokenizer files (extra_ids 0: no sentinel tokens in mT5's vocabulary).
    write_json(TE2 / "tokenizer_config.json", {
        "additional_special_tokens": None, "eos_token": "</s>", "extra_ids": 0, "pad_token": "<pad>",
        "special_tokens_map_file": "", "tokenizer_class": "T5Tokenizer", "tokenizer_file": None,
        "unk_token": "<unk>"})
    write_json(TE2 / "special_tokens_map.json", {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})
    return spm.SentencePieceProcessor(model_file=str(TE2 / "spiece.model")).get_piece_size()


# ---------------------------------------------------------------------------------------------------
# The official package, imported without `kandinsky2/__init__.py` (which downloads through
# `huggingface_hub.cached_download`, gone from huggingface_hub 1.x, and imports the 2.1/2.2
# modules): a stand-in package object whose `__path__` is the real one, plus a stand-in
# `pytorch_lightning` (only `LightningModule` is used, as a base class of the VAE).


def import_official():
    if "kandinsky2.kandinsky2_model" in sys.modules:
        return sys.modules["kandinsky2.kandinsky2_model"], sys.modules["kandinsky2.model.text_encoders"]
    pkg = types.ModuleType("kandinsky2")
    pkg.__path__ = [str(OFFICIAL_SRC / "kandinsky2")]
    sys.modules["kandinsky2"] = pkg
    if importlib.util.find_spec("pytorch_lightning") is None:
        pl = types.ModuleType("pytorch_lightning")
        pl.LightningModule = torch.nn.Module
        sys.modules["pytorch_lightning"] = pl
    k2 = importlib.import_module("kandinsky2.kandinsky2_model")
    te = importlib.import_module("kandinsky2.model.text_encoders")
    assert Path(k2.__file__).resolve().is_relative_to(OFFICIAL_SRC.resolve()), k2.__file__
    return k2, te


def official_configs():
    configs = importlib.import_module("kandinsky2.configs")
    c = configs.CONFIG_2_0
    assert c["text_enc_params1"]["model_name"] == "multiclip", c["text_enc_params1"]
    assert c["text_enc_params2"]["model_name"] == "MT5EncoderModel", c["text_enc_params2"]
    return c


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def xlmr_config(vocab_size: int) -> dict:
    """A transformers-4 style `XLMRobertaConfig` json (xlm-roberta-large's keys, tiny widths)."""
    return {
        "architectures": ["XLMRobertaModel"], "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
        "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": XLMR_HIDDEN,
        "initializer_range": 0.02, "intermediate_size": 37, "layer_norm_eps": 1e-05,
        "max_position_embeddings": 80, "model_type": "xlm-roberta", "num_attention_heads": 4,
        "num_hidden_layers": 2, "output_past": True, "pad_token_id": 1, "position_embedding_type": "absolute",
        "torch_dtype": "float32", "transformers_version": "4.23.1", "type_vocab_size": 1, "use_cache": True,
        "vocab_size": vocab_size,
    }


def mt5_config(vocab_size: int) -> dict:
    """google/mt5-small's config.json keys (no `relative_attention_max_distance`), tiny widths."""
    return {
        "architectures": ["MT5EncoderModel"], "d_ff": 48, "d_kv": 8, "d_model": MT5_D_MODEL,
        "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "mt5",
        "num_decoder_layers": 2, "num_heads": 4, "num_layers": 2, "pad_token_id": 0,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer",
        "torch_dtype": "float32", "transformers_version": "4.23.1", "use_cache": True, "vocab_size": vocab_size,
    }


def fp16_state_dict(module: torch.nn.Module) -> dict:
    """The state dict in fp16, keeping tied parameters one storage (as torch.save stores them)."""
    seen: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in module.state_dict(keep_vars=False).items():
        key = v.untyped_storage().data_ptr()
        if key not in seen:
            seen[key] = v.detach().to(torch.float16) if v.dtype.is_floating_point else v.detach().clone()
        out[k] = seen[key]
    return out


def build_text_encoder1(te_mod, vocab_size: int) -> list[str]:
    write_json(TE1 / "config.json", xlmr_config(vocab_size))
    torch.manual_seed(20)
    model = te_mod.MultilingualCLIP(str(TE1), in_features=XLMR_HIDDEN, out_features=MCLIP_OUT)
    perturb(model, seed=2000)
    sd = fp16_state_dict(model)
    torch.save(sd, TE1 / "pytorch_model.bin")
    return sorted(sd)


def build_text_encoder2(vocab_size: int) -> list[str]:
    from transformers import MT5Config, MT5EncoderModel

    write_json(TE2 / "config.json", mt5_config(vocab_size))
    torch.manual_seed(21)
    model = MT5EncoderModel(MT5Config.from_pretrained(str(TE2))).eval()
    perturb(model, seed=2100)
    sd = fp16_state_dict(model)
    assert sd["shared.weight"] is sd["encoder.embed_tokens.weight"]
    torch.save(sd, TE2 / "pytorch_model.bin")
    return sorted(sd)


def check_restored(encoder: torch.nn.Module, path: Path) -> None:
    """Every parameter and persistent buffer equals the file's tensor (strict=False hides misses)."""
    stored = torch.load(path, weights_only=True)
    for k, v in encoder.state_dict().items():
        assert k in stored, f"{path}: `{k}` not in the file (would stay random)"
        assert v.dtype == torch.float32 or not v.dtype.is_floating_point, (k, v.dtype)
        assert torch.equal(v, stored[k].to(v.dtype)), f"{path}: `{k}` not restored"


# ---------------------------------------------------------------------------------------------------
# References


def mt5_bucket_table(mt5_model) -> torch.Tensor:
    from transformers.models.mt5.modeling_mt5 import MT5Attention

    cfg = mt5_model.config
    rel = torch.arange(-(MAX_LEN - 1), MAX_LEN, dtype=torch.long)
    buckets = MT5Attention._relative_position_bucket(
        rel, bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    # The same as compute_bias's (77, 77) table, indexed by key - query.
    q = torch.arange(MAX_LEN)[:, None]
    k = torch.arange(MAX_LEN)[None, :]
    full = MT5Attention._relative_position_bucket(
        k - q, bidirectional=True, num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    assert torch.equal(full, buckets[(k - q) + MAX_LEN - 1])
    return buckets.to(torch.int64)


@torch.no_grad()
def references(k2, te_mod, cfg20) -> dict:
    from transformers import AutoTokenizer

    import sentencepiece as spm

    # As Kandinsky2.__init__: AutoTokenizer on the folders, TextEncoder(**text_enc_params).
    tok1 = AutoTokenizer.from_pretrained(str(TE1))
    tok2 = AutoTokenizer.from_pretrained(str(TE2))
    params1 = {**cfg20["text_enc_params1"], "model_path": str(TE1), "in_features": XLMR_HIDDEN,
               "out_features": MCLIP_OUT}
    params2 = {**cfg20["text_enc_params2"], "model_path": str(TE2)}
    enc1 = te_mod.TextEncoder(**params1).eval()
    enc2 = te_mod.TextEncoder(**params2).eval()
    check_restored(enc1.model, TE1 / "pytorch_model.bin")
    check_restored(enc2.model, TE2 / "pytorch_model.bin")
    assert enc2.model.dtype == torch.float32 and enc1.model.transformer.dtype == torch.float32

    # Kandinsky2.encode_text, unbound, with a stand-in `self` (it only reads self.device).
    this = SimpleNamespace(device="cpu")
    texts = [p["text"] for p in PROMPTS]
    rows = {k: [] for k in ("ids1", "mask1", "ids2", "mask2", "pooled1", "full1", "full2")}
    empty = {}
    orig_call = {}

    def spy(tok, name):
        # Records the token ids encode_text produced (it does not return them).
        def call(*args, **kwargs):
            out = type(tok).__call__(tok, *args, **kwargs)
            orig_call[name] = (args, kwargs, out)
            return out
        return call

    for text in texts:
        for name, tok, enc in (("1", tok1, enc1), ("2", tok2, enc2)):
            proxy = _CallProxy(tok, spy(tok, name))
            full, pooled = k2.Kandinsky2.encode_text(this, text_encoder=enc, tokenizer=proxy, prompt=text,
                                                     batch_size=1)
            args, kwargs, out = orig_call[name]
            assert args[0] == [text, ""], args
            assert kwargs == {"max_length": 77, "padding": "max_length", "truncation": True,
                              "return_attention_mask": True, "add_special_tokens": True,
                              "return_tensors": "pt"}, kwargs
            rows[f"ids{name}"].append(out["input_ids"][0])
            rows[f"mask{name}"].append(out["attention_mask"][0])
            rows[f"full{name}"].append(full[0])
            if name == "1":
                rows["pooled1"].append(pooled[0])
            else:
                assert pooled is None
            # The unconditional row is the empty prompt's.
            empty.setdefault(name, []).append((out["input_ids"][1], full[1], None if pooled is None else pooled[1]))
    t = {
        "input_ids1": torch.stack(rows["ids1"]).to(torch.int64),
        "attention_mask1": torch.stack(rows["mask1"]).to(torch.int64),
        "input_ids2": torch.stack(rows["ids2"]).to(torch.int64),
        "attention_mask2": torch.stack(rows["mask2"]).to(torch.int64),
        "pooled1": torch.stack(rows["pooled1"]).float(),
        "full1": torch.stack(rows["full1"]).float(),
        "full2": torch.stack(rows["full2"]).float(),
    }
    i_empty = next(i for i, p in enumerate(PROMPTS) if p["text"] == "")
    for name in ("1", "2"):
        for ids, full, pooled in empty[name]:
            assert torch.equal(ids, t[f"input_ids{name}"][i_empty])
            assert torch.allclose(full, t[f"full{name}"][i_empty], atol=1e-6)
            if pooled is not None:
                assert torch.allclose(pooled, t["pooled1"][i_empty], atol=1e-6)

    # The whole batch at once gives the same rows (no cross-row leakage through padding).
    b1 = tok1(texts, max_length=77, padding="max_length", truncation=True, return_attention_mask=True,
              add_special_tokens=True, return_tensors="pt")
    b2 = tok2(texts, max_length=77, padding="max_length", truncation=True, return_attention_mask=True,
              add_special_tokens=True, return_tensors="pt")
    assert torch.equal(b1.input_ids, t["input_ids1"]) and torch.equal(b2.input_ids, t["input_ids2"])
    f1, p1 = enc1(tokens=b1.input_ids, mask=b1.attention_mask)
    f2, _ = enc2(tokens=b2.input_ids, mask=b2.attention_mask)
    assert torch.allclose(f1, t["full1"], atol=1e-5) and torch.allclose(p1, t["pooled1"], atol=1e-5)
    assert torch.allclose(f2, t["full2"], atol=1e-5)

    # The raw SentencePiece models agree with the transformers tokenizers on every prompt.
    sp1 = spm.SentencePieceProcessor(model_file=str(TE1 / "sentencepiece.bpe.model"))
    sp2 = spm.SentencePieceProcessor(model_file=str(TE2 / "spiece.model"))
    for i, text in enumerate(texts):
        want1 = [0] + [3 if x == 0 else x + 1 for x in sp1.encode(text)][: MAX_LEN - 2] + [2]
        want2 = sp2.encode(text)[: MAX_LEN - 1] + [1]
        n1, n2 = int(t["attention_mask1"][i].sum()), int(t["attention_mask2"][i].sum())
        assert t["input_ids1"][i, :n1].tolist() == want1, (text, t["input_ids1"][i, :n1].tolist(), want1)
        assert t["input_ids2"][i, :n2].tolist() == want2, (text, t["input_ids2"][i, :n2].tolist(), want2)
    assert t["attention_mask1"][-1].all() and t["attention_mask2"][-1].all(), "the long prompt is not truncated"

    t["mt5_relative_position_bucket"] = mt5_bucket_table(enc2.model)
    unk1 = {p["script"]: int((t["input_ids1"][i] == 3).sum()) for i, p in enumerate(PROMPTS)}
    unk2 = {p["script"]: int((t["input_ids2"][i] == 2).sum()) for i, p in enumerate(PROMPTS)}
    meta = {
        "prompts": PROMPTS,
        "call": "Kandinsky2.encode_text(text_encoder, tokenizer, prompt, batch_size=1) per prompt: "
                "tokenizer([prompt, ''], max_length=77, padding='max_length', truncation=True, "
                "return_attention_mask=True, add_special_tokens=True, return_tensors='pt'); "
                "full, pooled = TextEncoder(tokens, mask); row 0 kept (row 1, the empty prompt, checked equal "
                "to the empty prompt's row)",
        "tokenizer1": "AutoTokenizer.from_pretrained('text_encoder1') -> " + type(tok1).__name__,
        "tokenizer2": "AutoTokenizer.from_pretrained('text_encoder2') -> " + type(tok2).__name__
                      + " (converted from spiece.model)",
        "text_encoder1": {**{k: v for k, v in params1.items() if k != "model_path"}, "model_path": "text_encoder1",
                          "note": "in/out_features passed as TextEncoder kwargs (MultilingualCLIP defaults: 1024, 640)"},
        "text_encoder2": {**{k: v for k, v in params2.items() if k != "model_path"}, "model_path": "text_encoder2"},
        "pooled1_note": "LinearTransformation(sum(h * mask, 1) / sum(mask, 1)) (B, 24)",
        "full1_note": "XLMRobertaModel last_hidden_state (B, 77, 32)",
        "full2_note": "MT5EncoderModel(input_ids, attention_mask).last_hidden_state (B, 77, 32); pooled is None",
        "mt5_relative_position_bucket_note": "bucket of relative position (key - query) = -76..76, bidirectional, "
                                             "32 buckets, max_distance 128 (transformers' _relative_position_bucket)",
        "vocab_size1": len(tok1),
        "vocab_size2": len(tok2),
        "special_ids1": {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": len(tok1) - 1},
        "special_ids2": {"<pad>": 0, "</s>": 1, "<unk>": 2},
        "unk_counts1": unk1,
        "unk_counts2": unk2,
        "backend2": json.loads(tok2.backend_tokenizer.to_str())["pre_tokenizer"],
        "versions": versions(),
    }
    return t, meta


class _CallProxy:
    """Forwards everything to a tokenizer, but calls go through `call` (to record the output)."""

    def __init__(self, tok, call):
        self._tok, self._call = tok, call

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def versions() -> dict:
    import sentencepiece
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "sentencepiece": sentencepiece.__version__, "kandinsky2": "ai-forever/Kandinsky-2@aeefc1c"}


def total_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    seed_all(0)
    k2, te_mod = import_official()
    cfg20 = official_configs()
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "xlmr").mkdir()
        (tmp / "mt5").mkdir()
        rules = tmp / "nmt_nfkc_subset.tsv"
        n_rules = nmt_nfkc_subset_tsv(rules)
        vocab1 = build_xlmr_tokenizer(tmp, rules)
        vocab2 = build_mt5_tokenizer(tmp, rules)
    keys1 = build_text_encoder1(te_mod, vocab1)
    keys2 = build_text_encoder2(vocab2)
    tensors, meta = references(k2, te_mod, cfg20)
    meta["nmt_nfkc_subset_rules"] = n_rules
    meta["state_dict_keys1"] = keys1
    meta["state_dict_keys2"] = keys2
    save_reference(REF / "text_encoders", tensors, meta)
    size = total_bytes(ROOT)
    print(f"kd20 fixtures: {size} bytes ({dir_size_mb(ROOT):.3f} MB), vocab {vocab1} / {vocab2}, "
          f"{n_rules} normalisation rules", file=sys.stderr)
    assert size <= BUDGET_BYTES, f"{ROOT} is {size} bytes, over the {BUDGET_BYTES} budget"
    assert REPO in ROOT.parents


if __name__ == "__main__":
    main()
