#!/usr/bin/env python3
"""Kandinsky 2.1 parity fixtures: random-weight checkpoints in the official diffusers layout and
reference outputs of diffusers' `pipelines/kandinsky/` (the multilingual family).

Run:  tools/reference/.venv/bin/python tools/reference/gen_kd21.py

Never run by CI; its outputs are committed. Deterministic and idempotent: it deletes and rewrites
`tests/fixtures/kd21/` and nothing else. Every file and key is documented in tools/reference/KD21.md.

What it builds:
* an XLM-R SentencePiece (unigram) tokenizer trained here on a small multilingual text (the real
  one ships with the real checkpoint), converted to `tokenizer.json` by transformers exactly as the
  hub's `XLMRobertaTokenizerFast` files were;
* `kandinsky-2-1-prior/` (KandinskyPriorPipeline: CLIP towers with quick_gelu, PriorTransformer),
* `kandinsky-2-1/` (KandinskyPipeline: MultilingualCLIP, the tokenizer, a `text_image` UNet, DDIM,
  MoVQ) and `kandinsky-2-1-inpaint/` (KandinskyInpaintPipeline, 9-channel UNet);
* references: tokenizer ids in many scripts, MultilingualCLIP outputs, UNet forward with
  intermediates, and text-to-image, image-to-image, inpaint and prior pipeline runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from common import FIXTURES, perturb, record_noise, save_reference, seed_all, write_json  # noqa: E402

import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    KandinskyImg2ImgPipeline,
    KandinskyInpaintPipeline,
    KandinskyPipeline,
    KandinskyPriorPipeline,
    PriorTransformer,
    UNet2DConditionModel,
    UnCLIPScheduler,
    VQModel,
)
from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP  # noqa: E402

import build_tokenizer  # noqa: E402
import gen_decoder as gd  # noqa: E402
import gen_prior as gp  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

ROOT = FIXTURES / "kd21"
CK_PRIOR = ROOT / "kandinsky-2-1-prior"
CK_DEC = ROOT / "kandinsky-2-1"
CK_INPAINT = ROOT / "kandinsky-2-1-inpaint"
REF = ROOT / "reference"

EMB = 32  # CLIP image embedding = M-CLIP projection = UNet cross_attention_dim (tied in 2.1)
XLMR_HIDDEN = 48  # XLM-R hidden size = UNet encoder_hid_dim (1024 in the real model)
MAX_LEN = 77

# diffusers tests/pipelines/kandinsky/test_kandinsky.py `dummy_unet`, with the text width made
# different from the cross-attention width so that a swapped projection cannot pass.
UNET21 = {**gd.TINY_UNET, "addition_embed_type": "text_image", "encoder_hid_dim": XLMR_HIDDEN,
          "encoder_hid_dim_type": "text_image_proj"}
UNET21_INPAINT = {**UNET21, "in_channels": 9}
# The hub scheduler of kandinsky-community/kandinsky-2-1 (spec §9).
DDIM21 = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012,
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "thresholding": False, "timestep_spacing": "leading",
}

# ---------------------------------------------------------------------------------------------------
# Tokenizer

# A few sentences per script; every script the tests name has pieces in the vocabulary.
CORPUS = [
    # Latin (English, French, German, Spanish, Turkish, Vietnamese)
    "a photo of a red cat wearing a hat", "an oil painting of a horse in the snow",
    "a portrait of a woman with flowers, highly detailed", "a city at night, cinematic lighting",
    "un chat rouge avec un chapeau", "une peinture à l'huile d'un cheval", "café crème brûlée",
    "eine rote Katze mit einem Hut", "die Straße im Winter", "un gato rojo con sombrero",
    "kırmızı bir kedi şapka takıyor", "một con mèo đỏ đội mũ",
    # Cyrillic
    "кот в сапогах на фоне заката", "красная кошка в шляпе", "картина маслом: лошадь в снегу",
    "портрет женщины с цветами", "ночной город, кинематографическое освещение",
    # Arabic
    "قطة حمراء ترتدي قبعة", "لوحة زيتية لحصان في الثلج", "صورة امرأة مع الزهور",
    # Devanagari
    "टोपी पहने हुए लाल बिल्ली", "बर्फ में घोड़े की तैलचित्र", "फूलों के साथ एक महिला का चित्र",
    "रात में शहर", "नमस्ते दुनिया",
    # CJK (Chinese, Japanese, Korean)
    "一只戴着帽子的红猫", "雪中的马的油画", "一只可爱的猫", "夜晚的城市", "带花的女人的肖像",
    "帽子をかぶった赤い猫", "雪の中の馬の油絵", "모자를 쓴 빨간 고양이", "눈 속의 말",
    # Hebrew
    "חתול אדום חובש כובע", "ציור שמן של סוס בשלג", "דיוקן של אישה עם פרחים",
    # Greek
    "μια κόκκινη γάτα με καπέλο", "ελαιογραφία ενός αλόγου στο χιόνι", "πορτρέτο γυναίκας με λουλούδια",
    # Mongolian (traditional script)
    "ᠮᠣᠩᠭᠣᠯ ᠬᠡᠯᠡ", "ᠤᠯᠠᠭᠠᠨ ᠮᠢᠭᠤᠢ", "ᠮᠣᠷᠢ ᠴᠠᠰᠤᠨ ᠳᠤ", "ᠮᠣᠩᠭᠣᠯ ᠤᠯᠤᠰ",
    # Capitalised forms
    "A Red Cat", "Кот, Красная Кошка", "Μια Γάτα", "Der Hut", "Une Peinture", "Ночной Город",
    # Georgian, Armenian, Thai (extra coverage)
    "წითელი კატა ქუდით", "կարմիր կատու գլխարկով", "แมวสีแดงสวมหมวก",
]

TOKENIZER_PROMPTS = [
    {"script": "Latin", "text": "A red cat wearing a hat, oil painting"},
    {"script": "Cyrillic", "text": "Кот в сапогах на фоне заката"},
    {"script": "Arabic", "text": "قطة حمراء ترتدي قبعة"},
    {"script": "Devanagari", "text": "टोपी पहने हुए लाल बिल्ली"},
    {"script": "CJK", "text": "一只戴着帽子的红猫"},
    {"script": "Hebrew", "text": "חתול אדום חובש כובע"},
    {"script": "Greek", "text": "Μια κόκκινη γάτα με καπέλο"},
    {"script": "Mongolian", "text": "ᠮᠣᠩᠭᠣᠯ ᠬᠡᠯᠡ"},
    {"script": "Japanese+Korean", "text": "帽子をかぶった赤い猫 와 모자를 쓴 빨간 고양이"},
    {"script": "Georgian+Armenian+Thai", "text": "წითელი კატა · կարմիր կատու · แมวสีแดง"},
    {"script": "mixed+emoji", "text": "🐱 cat / кот / 猫 🚀✨ 👩‍🚀"},
    {"script": "empty", "text": ""},
    {"script": "whitespace+NFKC", "text": "  ｆｕｌｌｗｉｄｔｈ  ﬁ ligature   cafe\u0301\tand\nnewlines  "},
    {"script": "unseen characters", "text": "ᚠᚢᚦ ꦗꦮ 𓀀 Ω≈ç√"},
    {"script": "long (truncated)", "text": " ".join(["кот в сапогах на фоне заката, a red cat"] * 12)},
]

TEXT_ENCODER_PROMPTS = [0, 1, 3, 4, 7, 11, 14]  # indices into TOKENIZER_PROMPTS


def build_xlmr_tokenizer(out_dir: Path):
    """Trains a SentencePiece unigram model (nmt_nfkc, like XLM-R's) and saves an XLM-R tokenizer."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(CORPUS * 3) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "sentencepiece.bpe"
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), model_type="unigram", vocab_size=600,
            hard_vocab_limit=False, character_coverage=1.0, normalization_rule_name="nmt_nfkc",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, seed_sentencepiece_size=100000,
            shuffle_input_sentence=False, minloglevel=2,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        model_file = out_dir / "sentencepiece.bpe.model"
        shutil.copy(f"{prefix}.model", model_file)
    # transformers' own slow->fast conversion (Precompiled nmt_nfkc charsmap, Metaspace, Unigram with the
    # fairseq id offset, TemplateProcessing `<s> $A </s>`), as the hub's tokenizer.json was made.
    from transformers.convert_slow_tokenizer import XLMRobertaConverter

    special = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    spm_tok = SimpleNamespace(vocab_file=str(model_file), convert_tokens_to_ids=lambda t: special[t])
    tok = XLMRobertaTokenizer(tokenizer_object=XLMRobertaConverter(spm_tok).converted(), bos_token="<s>",
                              eos_token="</s>", sep_token="</s>", cls_token="<s>", unk_token="<unk>",
                              pad_token="<pad>", mask_token="<mask>", model_max_length=512)
    return tok, model_file


def tokenize(tok, prompts):
    """The pipelines' exact tokenizer call (`_encode_prompt`)."""
    return tok(prompts, padding="max_length", truncation=True, max_length=MAX_LEN, return_attention_mask=True,
               add_special_tokens=True, return_tensors="pt")


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def build_mclip(vocab_size: int) -> MultilingualCLIP:
    torch.manual_seed(21)
    cfg = MCLIPConfig(
        transformerDimSize=XLMR_HIDDEN, imageDimSize=EMB, hidden_size=XLMR_HIDDEN, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=514,
        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        hidden_act="gelu", position_embedding_type="absolute",
    )
    model = MultilingualCLIP(cfg).eval()
    perturb(model, seed=2100)
    return model


def build_unet(cfg: dict, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).eval()
    perturb(unet, seed=seed + 1)
    return unet


def fix_model_index(path: Path, image_processor: bool = False) -> None:
    mi_path = path / "model_index.json"
    mi = json.loads(mi_path.read_text())
    if image_processor:
        mi["image_processor"] = ["transformers", "CLIPImageProcessor"]
    mi_path.write_text(json.dumps(mi, indent=2, sort_keys=True) + "\n")


def build_prior_checkpoint() -> None:
    """The 2.2 tiny prior's sizes with the 2.1 towers' quick_gelu and the 2.1 pipeline class."""
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(210)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMB, num_layers=2)
    perturb(prior, seed=2110)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2111)
        prior.clip_mean.copy_(0.1 * torch.randn(prior.clip_mean.shape, generator=g))
        prior.clip_std.copy_(1.0 + 0.1 * torch.randn(prior.clip_std.shape, generator=g))
    torch.manual_seed(211)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=EMB, projection_dim=EMB,
        intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=49408, max_position_embeddings=MAX_LEN, hidden_act="quick_gelu"))
    perturb(text_encoder, seed=2120)
    torch.manual_seed(212)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=EMB, image_size=224, patch_size=14, projection_dim=EMB, intermediate_size=37,
        num_attention_heads=4, num_channels=3, num_hidden_layers=3, hidden_act="quick_gelu"))
    perturb(image_encoder, seed=2130)
    scheduler = UnCLIPScheduler(num_train_timesteps=1000, variance_type="fixed_small_log",
                                prediction_type="sample", clip_sample=True, clip_sample_range=10.0)
    image_processor = CLIPImageProcessor(crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True,
                                         image_mean=gp.IMAGE_MEAN, image_std=gp.IMAGE_STD, resample=3, size=224)
    tok_dir = CK_PRIOR / "tokenizer"
    build_tokenizer.build(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    pipe = KandinskyPriorPipeline(prior=prior, image_encoder=image_encoder.to(torch.float16),
                                  text_encoder=text_encoder.to(torch.float16), tokenizer=tokenizer,
                                  scheduler=scheduler, image_processor=image_processor)
    pipe.save_pretrained(str(CK_PRIOR), safe_serialization=True)
    build_tokenizer.build(tok_dir)
    fix_model_index(CK_PRIOR, image_processor=True)


def build_decoder_checkpoints(tok) -> None:
    mclip = build_mclip(len(tok))
    movq = VQModel.from_pretrained(str(gd.CK_TINY / "movq")).eval()  # the 2.2 tiny MoVQ (same config)
    unet = build_unet(UNET21, 2200)
    unet_inpaint = build_unet(UNET21_INPAINT, 2300)
    for path, cls, u in ((CK_DEC, KandinskyPipeline, unet), (CK_INPAINT, KandinskyInpaintPipeline, unet_inpaint)):
        # The UNets are stored in fp16 (half the bytes; the references use the reloaded values).
        pipe = cls(text_encoder=mclip, tokenizer=tok, unet=u.to(torch.float16), scheduler=DDIMScheduler(**DDIM21),
                   movq=movq)
        pipe.save_pretrained(str(path), safe_serialization=True)
        # The hub folder ships the SentencePiece model next to tokenizer.json.
        shutil.copy(TOK_MODEL, path / "tokenizer" / "sentencepiece.bpe.model")
    # Identical components are hard links on disk (and one blob in git).
    for comp in ("text_encoder", "tokenizer", "scheduler", "movq"):
        gd.hardlink_identical(CK_DEC / comp, CK_INPAINT / comp)


def strip_local_paths() -> None:
    """save_pretrained records `_name_or_path` (a path on this machine) in reloaded components' configs."""
    for cfg in sorted(ROOT.rglob("config.json")):
        obj = json.loads(cfg.read_text())
        if obj.pop("_name_or_path", None) is not None:
            cfg.unlink()  # may be a hard link
            cfg.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def load(cls, path: Path):
    pipe = cls.from_pretrained(str(path), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------
# References

INDEX: dict[str, dict] = {}


def save_ref(name: str, tensors: dict, meta: dict) -> None:
    save_reference(REF / name, tensors, gd.json_clean(meta))
    INDEX[name] = {"keys": sorted(tensors.keys()), "kind": meta.get("kind", name)}


def tokenizer_reference(tok, tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    texts = [p["text"] for p in TOKENIZER_PROMPTS]
    enc = tokenize(tok, texts)
    # The saved folder (what the Rust side reads) must tokenise identically when reloaded.
    reloaded = AutoTokenizer.from_pretrained(str(tok_dir))
    enc2 = tokenize(reloaded, texts)
    assert torch.equal(enc.input_ids, enc2.input_ids) and torch.equal(enc.attention_mask, enc2.attention_mask)
    # And the raw SentencePiece model agrees (fairseq offset: spm id + 1, spm <unk> -> 3).
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOK_MODEL))
    for i, text in enumerate(texts):
        ids = [3 if x == 0 else x + 1 for x in sp.encode(text)][: MAX_LEN - 2]
        want = [0] + ids + [2]
        n = int(enc.attention_mask[i].sum())
        assert enc.input_ids[i, :n].tolist() == want, (text, enc.input_ids[i, :n].tolist(), want)
    unk = [(p["script"], int((enc.input_ids[i] == 3).sum())) for i, p in enumerate(TOKENIZER_PROMPTS)]
    save_ref("tokenizer", {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, {
        "prompts": TOKENIZER_PROMPTS,
        "call": "tokenizer(prompts, padding='max_length', truncation=True, max_length=77, "
                "return_attention_mask=True, add_special_tokens=True) — KandinskyPipeline._encode_prompt",
        "vocab_size": len(tok),
        "unk_counts": dict(unk),
        "special_ids": {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": len(tok) - 1},
    })


@torch.no_grad()
def text_encoder_reference(pipe) -> None:
    prompts = [TOKENIZER_PROMPTS[i]["text"] for i in TEXT_ENCODER_PROMPTS]
    enc = tokenize(pipe.tokenizer, prompts)
    embeds, hidden = pipe.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    # Row-by-row equals the batch (no cross-row leakage through padding).
    for i in range(len(prompts)):
        e1, h1 = pipe.text_encoder(input_ids=enc.input_ids[i:i + 1], attention_mask=enc.attention_mask[i:i + 1])
        assert torch.allclose(e1, embeds[i:i + 1], atol=1e-5) and torch.allclose(h1, hidden[i:i + 1], atol=1e-5)
    save_ref("text_encoder", {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask,
                              "text_embeds": embeds, "hidden_states": hidden}, {
        "prompts": prompts,
        "text_embeds_note": "LinearTransformation(sum(h * mask) / sum(mask)) (B, numDims)",
        "hidden_states_note": "XLMRobertaModel last_hidden_state (B, 77, hidden)",
    })


@torch.no_grad()
def unet_reference(name: str, unet, in_ch: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn((2, in_ch, 8, 8), generator=g)
    image_embeds = torch.randn((2, EMB), generator=g)
    text_embeds = torch.randn((2, EMB), generator=g)
    hidden = torch.randn((2, MAX_LEN, XLMR_HIDDEN), generator=g)
    timestep = torch.tensor([537.0])
    names = ["time_embedding", "add_embedding", "encoder_hid_proj", "mid_block"]
    names += [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    inter, remove = gd.capture(unet, names)
    out = unet(sample, timestep, encoder_hidden_states=hidden,
               added_cond_kwargs={"text_embeds": text_embeds, "image_embeds": image_embeds}).sample
    remove()
    tensors = {"sample": sample, "timestep": timestep, "image_embeds": image_embeds, "text_embeds": text_embeds,
               "encoder_hidden_states": hidden, "out": out}
    for k, v in inter.items():
        tensors[f"inter.{k}"] = v
    config = {k: v for k, v in dict(unet.config).items() if k != "_name_or_path"}
    save_ref(name, tensors, {"kind": "unet_forward", "config": config,
                             "note": "unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={text_embeds, "
                                     "image_embeds}).sample; inter.* = submodule outputs (first element of tuples)"})


class UnetInputs:
    """Records the keyword inputs of every UNet call of a pipeline."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self.hook = unet.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        self.calls.append({
            "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
            "text_embeds": kwargs["added_cond_kwargs"]["text_embeds"].detach().clone(),
            "image_embeds": kwargs["added_cond_kwargs"]["image_embeds"].detach().clone(),
        })

    def close(self):
        self.hook.remove()


def embeds(n: int, seed: int) -> torch.Tensor:
    return gd.floats_tensor((n, EMB), random.Random(seed))


def text_conditioning(pipe, prompts: list[str], negative: list[str], n: int, cfg: bool) -> dict:
    """What `_encode_prompt` hands to the UNet, computed independently (also checked against the hook)."""
    enc = tokenize(pipe.tokenizer, prompts)
    e, h = pipe.text_encoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    e, h, m = (x.repeat_interleave(n, dim=0) for x in (e, h, enc.attention_mask))
    if cfg:
        nenc = tokenize(pipe.tokenizer, negative)
        ne, nh = pipe.text_encoder(input_ids=nenc.input_ids, attention_mask=nenc.attention_mask)
        ne, nh, nm = (x.repeat_interleave(n, dim=0) for x in (ne, nh, nenc.attention_mask))
        e, h, m = torch.cat([ne, e]), torch.cat([nh, h]), torch.cat([nm, m])
    return {"text_embeds": e, "text_hidden_states": h, "text_attention_mask": m}


def finish_case(name: str, kind: str, pipe, t: dict, meta: dict, rec, ui: UnetInputs, drawn, images) -> None:
    ui.close()
    first = ui.calls[0]
    assert torch.allclose(first["text_embeds"], t["text_embeds"], atol=1e-6), name
    assert torch.allclose(first["encoder_hidden_states"], t["text_hidden_states"], atol=1e-6), name
    t["timesteps"] = torch.tensor([s["t"] for s in rec.steps], dtype=torch.int64)
    if drawn:
        t["noise"] = torch.stack(drawn)
    t["final_latents"] = rec.decode_in[0]
    t["image"] = torch.from_numpy(np.ascontiguousarray(images))
    t["image_u8"] = torch.from_numpy(gd.to_u8(images))
    meta.update({
        "kind": kind,
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": gd.sched_config_json(pipe.scheduler),
        "num_noise_draws": len(drawn),
        "steps_run": len(rec.steps),
        "text_note": "text_embeds / text_hidden_states / text_attention_mask: MultilingualCLIP outputs for "
                     "[negative_prompt]*B then prompt (CFG order [negative, positive], each repeat_interleave'd by "
                     "num_images_per_prompt) — what the UNet receives; without CFG the positive rows only. The "
                     "mask is not passed to the UNet by the pipeline.",
        "embeds_note": "image_embeds = floats_tensor((B,32), random.Random(seed)); negative likewise",
        "outputs_note": "image = output_type='np' (B,H,W,3) f32 in [0,1]; image_u8 = round_half_even(image*255)",
        "final_latents_note": "the movq.decode input",
    })
    save_ref(name, t, meta)


@torch.no_grad()
def text2img_case(name: str, prompts: list[str], steps: int, guidance: float = 4.0, n: int = 1,
                  height: int = 64, width: int = 64, negative: list[str] | None = None, seed: int = 0) -> None:
    pipe = load(KandinskyPipeline, CK_DEC)
    b = len(prompts)
    emb, neg = embeds(b, 100 + seed), embeds(b, 200 + seed)
    lh, lw = gd.latent_hw(height, width, pipe.movq_scale_factor)
    latents = gd.randn((b * n, 4, lh, lw), 3000 + seed)
    cfg = guidance > 1.0
    t = {"image_embeds": emb, "negative_image_embeds": neg, "latents": latents,
         **text_conditioning(pipe, prompts, negative or [""] * b, n, cfg)}
    ui = UnetInputs(pipe.unet)
    with gd.Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(prompt=prompts, image_embeds=emb, negative_image_embeds=neg, negative_prompt=negative,
                      height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                      num_images_per_prompt=n, generator=gd.gen(4000 + seed), latents=latents.clone(),
                      output_type="np").images
    meta = {"pipeline": "KandinskyPipeline", "checkpoint": gd.rel(CK_DEC), "prompt": prompts,
            "negative_prompt": negative or [""] * b, "height": height, "width": width,
            "num_inference_steps": steps, "guidance_scale": guidance, "num_images_per_prompt": n,
            "latents_note": "explicit `latents` (init_noise_sigma = 1 for DDIM)"}
    finish_case(f"pipeline_text2img_{name}", "text2img", pipe, t, meta, rec, ui, list(drawn), images)


@torch.no_grad()
def img2img_case(name: str, prompt: str, strength: float, steps: int = 10, guidance: float = 4.0) -> None:
    pipe = load(KandinskyImg2ImgPipeline, CK_DEC)
    emb, neg = embeds(1, 300), embeds(1, 301)
    pil = PIL.Image.fromarray(gd.init_image_u8())
    t = {"image_embeds": emb, "negative_image_embeds": neg,
         **text_conditioning(pipe, [prompt], [""], 1, guidance > 1.0)}
    ui = UnetInputs(pipe.unet)
    with gd.Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(prompt=prompt, image=pil, image_embeds=emb, negative_image_embeds=neg, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, strength=strength,
                      generator=gd.gen(5000), output_type="np").images
    t["image_latents"] = rec.encode_out[0]
    t["noised_latents"] = rec.steps[0]["sample"]
    meta = {"pipeline": "KandinskyImg2ImgPipeline", "checkpoint": gd.rel(CK_DEC), "prompt": [prompt],
            "negative_prompt": [""], "height": 64, "width": 64, "num_inference_steps": steps,
            "strength": strength, "guidance_scale": guidance, "num_images_per_prompt": 1,
            "latent_timestep": int(1000 * strength) - 2,
            "inputs_note": "init image = reference/init_image.png (the 2.2 fixture's), preprocessed to [-1, 1]; "
                           "image_latents = movq.encode(...).latents",
            "noise_note": "noise[0] = prepare_latents draw; noised_latents = add_noise(image_latents, noise[0], "
                          "latent_timestep) with the pipeline's own linear betas 0.0001..0.02 (not the "
                          "scheduler's); DDIM eta 0 draws nothing else",
            "timesteps_note": "scheduler.timesteps[t_start:], init = min(int(N*strength), N), t_start = N - init"}
    finish_case(f"pipeline_img2img_{name}", "img2img", pipe, t, meta, rec, ui, list(drawn), images)


@torch.no_grad()
def inpaint_case(name: str, prompt: str, steps: int, guidance: float = 4.0) -> None:
    pipe = load(KandinskyInpaintPipeline, CK_INPAINT)
    emb, neg = embeds(1, 400), embeds(1, 401)
    pil = PIL.Image.fromarray(gd.init_image_u8())
    mask = PIL.Image.fromarray(gd.inpaint_mask_u8(), mode="L")
    latents = gd.randn((1, 4, 32, 32), 6000)
    t = {"image_embeds": emb, "negative_image_embeds": neg, "latents": latents,
         **text_conditioning(pipe, [prompt], [""], 1, guidance > 1.0)}
    ui = UnetInputs(pipe.unet)
    with gd.Recorder(pipe) as rec, record_noise() as drawn:
        images = pipe(prompt=prompt, image=pil, mask_image=mask, image_embeds=emb, negative_image_embeds=neg,
                      height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                      generator=gd.gen(7000), latents=latents.clone(), output_type="np").images
    u0 = rec.unet_in[0]["sample"]
    t["image_latents"] = rec.encode_out[0]
    t["masked_image_latents"] = u0[:1, 4:8]
    t["mask_prepared"] = u0[:1, 8:9]
    meta = {"pipeline": "KandinskyInpaintPipeline", "checkpoint": gd.rel(CK_INPAINT), "prompt": [prompt],
            "negative_prompt": [""], "height": 64, "width": 64, "num_inference_steps": steps,
            "guidance_scale": guidance, "num_images_per_prompt": 1,
            "inputs_note": "image = reference/init_image.png, mask_image = reference/inpaint_mask.png (L, 255 = "
                           "repaint); mask_prepared = prepare_mask(nearest(1 - binarised mask)) (1 = keep); "
                           "masked_image_latents = image_latents * mask_prepared; UNet input = cat([latents, "
                           "masked_image_latents, mask_prepared]). Unlike 2.2 there is no per-step or final blend.",
            "latents_note": "explicit `latents`"}
    finish_case(f"pipeline_inpaint_{name}", "inpaint", pipe, t, meta, rec, ui, list(drawn), images)


@torch.no_grad()
def prior_case(name: str, prompt, steps: int, guidance: float = 4.0, negative=None, seed: int = 0) -> None:
    pipe = load(KandinskyPriorPipeline, CK_PRIOR)
    nprompts = (len(prompt) if isinstance(prompt, list) else 1) * (2 if negative is not None else 1)
    latents = torch.randn((nprompts, EMB), generator=gd.gen(8000 + seed))
    kwargs = dict(prompt=prompt, negative_prompt=negative, num_images_per_prompt=1, num_inference_steps=steps,
                  guidance_scale=guidance, latents=latents.clone(), generator=gd.gen(9000 + seed))
    out, drawn, tr = gp._run_traced(pipe, lambda: pipe(**kwargs))
    tensors = {"latents": latents, **gp.stack_noise(drawn), "image_embeds": out.image_embeds,
               "negative_image_embeds": out.negative_image_embeds, **tr.tensors()}
    meta = {"kind": "prior_pipeline", "pipeline": "KandinskyPriorPipeline.__call__", "prompt": prompt,
            "negative_prompt": negative, "num_images_per_prompt": 1, "num_inference_steps": steps,
            "guidance_scale": guidance, "latents_seed": 8000 + seed, "generator_seed": 9000 + seed,
            "negative_image_embeds_source": "zero-image embed (get_zero_embed)" if negative is None
            else "prior sample of negative_prompt (chunk)", **tr.meta()}
    save_ref(f"prior_{name}", tensors, meta)


def versions() -> dict:
    import sentencepiece
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "sentencepiece": sentencepiece.__version__, "numpy": np.__version__}


TOK_MODEL = ROOT / "tokenizer-src" / "sentencepiece.bpe.model"


def main() -> None:
    seed_all(0)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    tok, model_file = build_xlmr_tokenizer(ROOT / "tokenizer-src")
    assert model_file == TOK_MODEL
    build_prior_checkpoint()
    build_decoder_checkpoints(tok)
    shutil.rmtree(ROOT / "tokenizer-src")
    strip_local_paths()
    globals()["TOK_MODEL"] = CK_DEC / "tokenizer" / "sentencepiece.bpe.model"

    dec = load(KandinskyPipeline, CK_DEC)
    tokenizer_reference(dec.tokenizer, CK_DEC / "tokenizer")
    text_encoder_reference(dec)
    unet_reference("unet_forward", dec.unet, 4, 2201)
    unet_reference("unet_inpaint_forward", load(KandinskyInpaintPipeline, CK_INPAINT).unet, 9, 2301)

    ru, hi, zh = TOKENIZER_PROMPTS[1]["text"], TOKENIZER_PROMPTS[3]["text"], TOKENIZER_PROMPTS[4]["text"]
    text2img_case("ddim_2", [ru], 2)
    text2img_case("ddim_5_32x48", [zh], 5, height=32, width=48, seed=1)
    text2img_case("ddim_3_batch2_n2", [hi, "a red cat"], 3, n=2, negative=["blurry", "низкое качество"], seed=2)
    text2img_case("ddim_3_nocfg", [zh], 3, guidance=1.0, seed=3)
    img2img_case("ddim_s05", ru, 0.5)
    img2img_case("ddim_s03", zh, 0.3)
    inpaint_case("ddim_2", hi, 2)
    inpaint_case("ddim_4", ru, 4)
    prior_case("ru_s2", ru, 2)
    prior_case("batch2_neg_s5", [hi, zh], 5, negative=["blurry", "low quality"], seed=1)

    for png in ("init_image.png", "inpaint_mask.png"):
        shutil.copy(gd.REF_TINY / png, REF / png)
    write_json(REF / "index.json", {"files": INDEX, "versions": versions()})
    print(f"kd21 fixtures: {gd.dir_size_mb(ROOT) if hasattr(gd, 'dir_size_mb') else 0:.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
