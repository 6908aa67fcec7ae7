#!/usr/bin/env python3
"""PyTorch pickle checkpoint fixtures for the safe `.bin` / `.pt` / `.ckpt` loader.

Writes `tests/fixtures/pickle/` (and nothing else; the folder is rebuilt from scratch):

* `bin/`: a diffusers-style component folder (`config.json`, `diffusion_pytorch_model.bin`) whose
  weights are the `torch.save`d `state_dict()` of a tiny made-up module (a real module state dict:
  Conv2d, GroupNorm, Linear, BatchNorm1d with its int64 `num_batches_tracked`, a ModuleList, and
  the `_metadata` attribute torch attaches). A real MoVQ is far over the 60 KB budget.
* `reference.safetensors`: the same tensors as safetensors, the reference the tests compare every
  key with, bit for bit (a test copies it next to the `.bin` to check that safetensors wins).
* `variant/`: transformers names, `pytorch_model.bin` (fp32) and `pytorch_model.fp16.bin` (fp16).
* `sharded/`: `pytorch_model.bin.index.json` over two `.bin` shards.
* `protocol4.pt`: three of those tensors saved with `pickle_protocol=4` (FRAME, SHORT_BINUNICODE,
  MEMOIZE, STACK_GLOBAL opcodes).
* `zip64.pt`: those three tensors' archive rewritten as ZIP64 (every size and offset in the zip64
  extra fields, ZIP64 end records), as torch writes checkpoints over 4 GiB; checked with torch.load.
* `lightning.ckpt`: `{"state_dict": {"model.<k>": ...}, "global_step": 3, "epoch": 1,
  "hparams": {"lr": 1e-4, "name": "vae"}, "optimizer_states": [<tensors in a list>],
  "ema": {"decay": 0.999, "shadow": {<k>: ...}}}`.
* `dtypes.pt` + `dtypes_expected.safetensors`: f32, f16, bf16, f64, i64, i32, i16, i8, u8, bool,
  a 0-d tensor, an empty tensor and views: a transposed (non-contiguous) matrix, a row slice at a
  storage offset, a strided column slice, two views of one storage, an expanded (stride 0) row;
  the sidecar holds contiguous copies of every value (what the loader must produce).
* `expanded_huge.pt`: one element expanded to 2^40 (a legitimate torch view the loader refuses).
* `whole_module.pt`: `torch.save(nn.Linear)`: a pickle naming `torch.nn.modules.linear.Linear`.
* `legacy.pt`: the pre-1.6 (non-zip) `torch.save` format.
* `big_endian.pt`: a valid archive whose `byteorder` record says `big`.
* `truncated.bin`: the first half of a small archive.
* `no_data_pkl.pt`: a zip with storages but no `data.pkl`.
* `evil/*.pt`: hand-built malicious archives (raw pickle bytes, never produced by pickling a real
  callable): `os_system` (GLOBAL os.system + REDUCE running `touch /tmp/kd-pickle-fixture-pwned`),
  `builtins_eval` (STACK_GLOBAL builtins.eval + REDUCE), `load_from_bytes` (a nested pickle through
  torch.storage._load_from_bytes), `inst_popen` (INST subprocess.Popen), `call_storage` (REDUCE on
  torch.FloatStorage, an allowed name that is not a callable), `build_global` (BUILD on
  collections.OrderedDict itself). DO NOT `torch.load(..., weights_only=False)` or `pickle.load`
  these in Python: they would run their payload.

Deterministic and idempotent: seeded tensors, fixed zip timestamps, torch's own zip writer for
everything torch writes. Run through `make fixtures` (needs tools/reference/.venv); CI never runs it.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import zlib
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from common import FIXTURES, perturb, seed_all, write_json  # noqa: E402

OUT = FIXTURES / "pickle"
PWNED = "/tmp/kd-pickle-fixture-pwned"


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_in = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.GroupNorm(1, 3)
        self.proj = torch.nn.Linear(3, 4)
        self.bn = torch.nn.BatchNorm1d(2)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False)])


def tiny_state_dict() -> "OrderedDict[str, torch.Tensor]":
    seed_all(0)
    m = Tiny()
    perturb(m, seed=1)
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.tensor([0.25, -0.5]))
        m.bn.running_var.copy_(torch.tensor([1.5, 0.75]))
        m.bn.num_batches_tracked.fill_(7)
    return m.state_dict()


# --- hand-built archives -------------------------------------------------------------------------


def write_zip(path: Path, entries: list[tuple[str, bytes]]) -> None:
    """A stored (uncompressed) zip with fixed timestamps, like torch's own writer."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def archive(path: Path, pkl: bytes, extra: list[tuple[str, bytes]] = ()) -> None:
    write_zip(path, [("archive/data.pkl", pkl), ("archive/byteorder", b"little"), *extra, ("archive/version", b"3\n")])


def uni(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def short_uni(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    b = s.encode()
    return b"\x8c" + struct.pack("<B", len(b)) + b


def in_state_dict(value: bytes, proto: int = 2) -> bytes:
    """`{"weight": <value>}` as raw pickle opcodes."""
    return bytes([0x80, proto]) + b"}" + uni("weight") + value + b"s."


OS_SYSTEM = b"cos\nsystem\n" + uni(f"touch {PWNED}") + b"\x85R"


def evil() -> dict[str, bytes]:
    return {
        "os_system": in_state_dict(OS_SYSTEM),
        "builtins_eval": in_state_dict(
            short_uni("builtins") + short_uni("eval") + b"\x93"
            + short_uni(f"__import__('os').system('touch {PWNED}')") + b"\x85R",
            proto=4,
        ),
        "load_from_bytes": in_state_dict(
            b"ctorch.storage\n_load_from_bytes\n"
            + b"B" + struct.pack("<I", len(in_state_dict(OS_SYSTEM))) + in_state_dict(OS_SYSTEM)
            + b"\x85R"
        ),
        "inst_popen": in_state_dict(b"(" + uni("touch") + uni(PWNED) + b"l" + b"isubprocess\nPopen\n"),
        "call_storage": in_state_dict(b"ctorch\nFloatStorage\n" + b"K\x10\x85R"),
        "build_global": in_state_dict(b"ccollections\nOrderedDict\n" + b"}" + uni("__reduce__") + b"Ns" + b"b"),
    }


def write_zip64(path: Path, entries: list[tuple[str, bytes]]) -> None:
    """A stored zip whose sizes and offsets all live in ZIP64 extra fields and end records."""
    out, central = bytearray(), bytearray()
    for name, data in entries:
        n, off, crc = name.encode(), len(out), zlib.crc32(data)
        extra = struct.pack("<HHQQ", 1, 16, len(data), len(data))
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF, len(n), len(extra))
        out += n + extra + data
        cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), off)
        central += struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, crc, 0xFFFFFFFF, 0xFFFFFFFF,
            len(n), len(cextra), 0, 0, 0, 0o644 << 16, 0xFFFFFFFF,
        )
        central += n + cextra
    cd_offset = len(out)
    out += central
    record = len(out)
    out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, len(entries), len(entries), len(central), cd_offset)
    out += struct.pack("<IIQI", 0x07064B50, 0, record, 1)
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(bytes(out))


def saved_bytes(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def rename_archive(data: bytes, prefix: str = "archive") -> list[tuple[str, bytes]]:
    """The records of a torch.save zip, under `prefix/` instead of the writer's name."""
    z = zipfile.ZipFile(io.BytesIO(data))
    return [(prefix + "/" + i.filename.split("/", 1)[1], z.read(i)) for i in z.infolist()]


def legacy_bytes(obj) -> bytes:
    """The pre-1.6 format, with the storage keys (memory addresses) replaced by fixed digits."""
    data = saved_bytes(obj, _use_new_zipfile_serialization=False)
    keys = sorted({m.group(2) for m in re.finditer(rb"X(.{4})([0-9]{8,})", data, re.S)})
    for i, k in enumerate(keys):
        data = data.replace(k, str(i).rjust(len(k), "0").encode())
    return data


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    sd = tiny_state_dict()

    config = {"_class_name": "PickleFixture", "_note": "made-up tensors for the pickle loader tests (gen_pickles.py)"}
    write_json(OUT / "bin" / "config.json", config)
    torch.save(sd, OUT / "bin" / "diffusion_pytorch_model.bin")

    save_file({k: v.contiguous() for k, v in sd.items()}, str(OUT / "reference.safetensors"))

    (OUT / "variant").mkdir()
    torch.save(sd, OUT / "variant" / "pytorch_model.bin")
    half = OrderedDict((k, v.half() if v.dtype.is_floating_point else v) for k, v in sd.items())
    torch.save(half, OUT / "variant" / "pytorch_model.fp16.bin")

    keys = list(sd.keys())
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
    weight_map = {}
    for i, ks in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        (OUT / "sharded").mkdir(exist_ok=True)
        torch.save(OrderedDict((k, sd[k]) for k in ks), OUT / "sharded" / name)
        weight_map.update({k: name for k in ks})
    write_json(OUT / "sharded" / "pytorch_model.bin.index.json", {"metadata": {"total_size": 0}, "weight_map": weight_map})

    p4 = OrderedDict((k, sd[k]) for k in ("conv_in.weight", "proj.bias", "bn.num_batches_tracked"))
    torch.save(p4, OUT / "protocol4.pt", pickle_protocol=4)
    write_zip64(OUT / "zip64.pt", rename_archive(saved_bytes(p4)))
    back = torch.load(OUT / "zip64.pt", weights_only=True)
    assert list(back) == list(p4) and all(torch.equal(back[k], p4[k]) for k in p4)

    opt_tensor = torch.arange(4, dtype=torch.float32)
    ckpt = {
        "epoch": 1,
        "global_step": 3,
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in sd.items()),
        "hparams": {"lr": 1e-4, "name": "vae", "betas": (0.9, 0.999)},
        "optimizer_states": [{"state": {0: {"exp_avg": opt_tensor}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}],
        "ema": {"decay": 0.999, "shadow": {"proj.weight": sd["proj.weight"] * 2}},
    }
    torch.save(ckpt, OUT / "lightning.ckpt")

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 8 - 1
    shared = torch.arange(10, dtype=torch.float32) * 0.5
    dt = OrderedDict(
        f32=torch.tensor([[1.5, -2.25, 3.0], [0.1, 1e-30, -7.0]], dtype=torch.float32),
        f16=torch.tensor([0.5, -65504.0, 6e-8, 1.0 / 3.0], dtype=torch.float16),
        bf16=torch.tensor([1.0 / 3.0, -3.0e38, 1e-3], dtype=torch.bfloat16),
        f64=torch.tensor([1.0 / 3.0, -2.5, 1e300], dtype=torch.float64),
        i64=torch.tensor([0, -1, 2**62, -(2**63)], dtype=torch.int64),
        i32=torch.tensor([7, -2**31], dtype=torch.int32),
        i16=torch.tensor([[-3, 300]], dtype=torch.int16),
        i8=torch.tensor([-128, 5, 127], dtype=torch.int8),
        u8=torch.tensor([0, 200, 255], dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
        transposed=base.t(),
        row_slice=base[2:4],
        col_stride=base[1:, ::2],
        shared_a=shared[:4].view(2, 2),
        shared_b=shared[5:],
        expanded=torch.tensor([1.0, 2.0, 3.0]).expand(2, 3),
    )
    assert not dt["transposed"].is_contiguous() and dt["row_slice"].storage_offset() == 12
    assert dt["col_stride"].stride() == (6, 2) and dt["col_stride"].storage_offset() == 6
    torch.save(dt, OUT / "dtypes.pt")
    save_file({k: v.contiguous() for k, v in dt.items()}, str(OUT / "dtypes_expected.safetensors"))

    torch.save({"huge": torch.ones(1).expand(2**40)}, OUT / "expanded_huge.pt")

    seed_all(0)
    torch.save(torch.nn.Linear(1, 1), OUT / "whole_module.pt")

    (OUT / "legacy.pt").write_bytes(legacy_bytes(OrderedDict(w=torch.ones(2))))

    small = saved_bytes(OrderedDict(w=torch.ones(2)))
    records = rename_archive(small)
    write_zip(OUT / "big_endian.pt", [(n, b"big" if n.endswith("/byteorder") else d) for n, d in records])
    (OUT / "truncated.bin").write_bytes(small[: len(small) // 2])
    write_zip(OUT / "no_data_pkl.pt", [(n, d) for n, d in records if not n.endswith("data.pkl")])

    for name, pkl in evil().items():
        archive(OUT / "evil" / f"{name}.pt", pkl)

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")
    assert total < 60_000, total


if __name__ == "__main__":
    main()
