"""Builds the real CLIP BPE tokenizer (openai/clip-vit-base-patch32 vocabulary) for the tiny prior fixture.

Never run by CI. Called by `gen_prior.py`; can also be run on its own:

    tools/reference/.venv/bin/python tools/reference/build_tokenizer.py [OUT_DIR]

Source of truth: `open_clip/bpe_simple_vocab_16e6.txt.gz` from the PyPI wheel `open-clip-torch==3.3.0`
(the BPE file OpenAI ships with CLIP; sha256 pinned below). From it this script derives, exactly like
OpenAI's `SimpleTokenizer` and the HF `CLIPTokenizer` do:

* merges = lines[1 : 49152 - 256 - 2 + 1] of the file (48,894 merges; line 0 is a header),
* vocab (49,408 ids) = the 256 byte-level unicode characters (GPT-2 `bytes_to_unicode` order), then the
  same 256 with a `</w>` suffix, then one entry per merge (concatenation of the pair), then
  `<|startoftext|>` (49406) and `<|endoftext|>` (49407).

Files written to OUT_DIR (the pipeline's `tokenizer/` sub-folder):
  vocab.json, merges.txt                  (what the hub folder of kandinsky-2-2-prior holds)
  tokenizer.json                          (fast tokenizer, compact JSON, loads with `tokenizers` 0.23)
  tokenizer_config.json                   (as transformers 5 `save_pretrained` writes it)
  special_tokens_map.json                 (hub style)

The "slow" reference used to cross-check the fast tokenizer is OpenAI's original `SimpleTokenizer`
(shipped in the same wheel as `open_clip/tokenizer.py`; needs `ftfy`, which is installed into a private
`--target` directory, never into the shared venv). transformers 5 no longer has a Python (slow)
`CLIPTokenizer`: its `CLIPTokenizer` *is* the tokenizers-backed implementation.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_VERSION = "3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CACHE = Path(tempfile.gettempdir()) / "kandinsky-serve-ref-cache"
FTFY_TARGET = CACHE / "ftfy-lib"

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
MAX_LEN = 77


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def open_clip_wheel() -> Path:
    """Downloads (once, cached) the open-clip-torch wheel with pip's ordinary client."""
    CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(CACHE.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            _pip() + ["download", "--no-deps", f"open-clip-torch=={OPEN_CLIP_VERSION}", "-d", str(CACHE)],
            check=True,
        )
        wheels = sorted(CACHE.glob(f"open_clip_torch-{OPEN_CLIP_VERSION}-*.whl"))
    return wheels[0]


def bpe_bytes() -> bytes:
    with zipfile.ZipFile(open_clip_wheel()) as z:
        data = z.read(BPE_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != BPE_SHA256:
        raise RuntimeError(f"{BPE_MEMBER}: sha256 {digest} != pinned {BPE_SHA256}")
    return data


def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(bpe_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    assert len(tokens) == 49408 and len(set(tokens)) == 49408
    vocab = {t: i for i, t in enumerate(tokens)}
    assert vocab[BOS] == BOS_ID and vocab[EOS] == EOS_ID
    return vocab, merges


def build(out_dir: Path) -> None:
    """(Re)writes the tokenizer folder."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    vocab, merges = vocab_and_merges()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )

    # transformers 5's CLIPTokenizer builds the same normalizer / pre-tokenizer / BPE / post-processor as
    # the transformers 4 CLIPConverter. save_pretrained writes tokenizer.json pretty-printed (3.6 MB);
    # it is re-saved compact below to keep the fixture small (same content).
    tok = CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LEN)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        cfg = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = MAX_LEN
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok.backend_tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)

    special = {
        "bos_token": {"content": BOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "eos_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
        "pad_token": EOS,
        "unk_token": {"content": EOS, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False},
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")

    # Sanity: the raw tokenizers library loads the file (the Rust `tokenizers` crate reads the same format).
    raw = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    ids = raw.encode("a photo of a cat").ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids


# ---------------------------------------------------------------------------------------------------
# Independent "slow" reference: OpenAI's SimpleTokenizer (open_clip/tokenizer.py, needs ftfy)


def _ensure_ftfy() -> None:
    if importlib.util.find_spec("ftfy") is not None:
        return
    if not (FTFY_TARGET / "ftfy").exists():
        subprocess.run(_pip() + ["install", "--quiet", "--target", str(FTFY_TARGET), "ftfy==6.3.1"], check=True)
    sys.path.insert(0, str(FTFY_TARGET))


def simple_tokenizer():
    """OpenAI's original CLIP tokenizer, loaded from the open-clip-torch wheel (not installed)."""
    _ensure_ftfy()
    src_dir = CACHE / f"open_clip-{OPEN_CLIP_VERSION}"
    if not (src_dir / "open_clip_tokenizer.py").exists():
        src_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(open_clip_wheel()) as z:
            (src_dir / "open_clip_tokenizer.py").write_bytes(z.read("open_clip/tokenizer.py"))
            (src_dir / "bpe_simple_vocab_16e6.txt.gz").write_bytes(z.read(BPE_MEMBER))
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", src_dir / "open_clip_tokenizer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer(str(src_dir / "bpe_simple_vocab_16e6.txt.gz"))


def simple_ids(st, text: str) -> list[int]:
    """BOS + ids + EOS truncated like CLIP's `tokenize` (keep 75 content tokens, then EOS), unpadded."""
    ids = [BOS_ID] + st.encode(text) + [EOS_ID]
    if len(ids) > MAX_LEN:
        ids = ids[:MAX_LEN]
        ids[-1] = EOS_ID
    return ids


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[2]
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else here / "tests/fixtures/tiny/kandinsky-2-2-prior/tokenizer"
    build(target)
    print(f"wrote {target}")
