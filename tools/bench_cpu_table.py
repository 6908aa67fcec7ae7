#!/usr/bin/env python3
"""The `make bench-cpu` table from the per-process results that tools/bench-cpu.sh wrote.

    python tools/bench_cpu_table.py DIR [--model full] [--threads 2]

DIR holds ours-<stage>-<round>.jsonl (kd-gpucheck lines), torch-<stage>-<round>.jsonl
(bench_diffusers.py lines) and a .rss file beside each (peak RSS in KiB from /usr/bin/time).
Prints one Markdown table (workload, ours median s, PyTorch median s, ratio ours/PyTorch, peak RSS
ours/PyTorch of the stage's process, parity of ours against the fp32 PyTorch reference), then the
machine-readable last line.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from report import load_lines  # noqa: E402

# workload key in the manifest -> (row label, stage process, short name of the last line)
WORKLOADS = [
    ("unet_a", "UNet forward 2×4×64×64 (one CFG step at 512²)", "unet", "unet64"),
    ("unet_b", "UNet forward 2×4×32×32 (one CFG step at 256²)", "unet", "unet32"),
    ("movq_a", "MoVQ decode 64×64 → 512²", "movq", "movq512"),
    ("movq_b", "MoVQ decode 32×32 → 256²", "movq", "movq256"),
    ("prior_step", "prior forward (batch 2)", "prior", "prior"),
    ("text_encoder", "CLIP text tower (batch 2)", "text_encoder", "clip_text"),
    ("image_encoder", "CLIP vision tower (1 image)", "prior", "clip_vision"),
]
# stage -> (load row label, our parity module(s), diffusers' load stage name)
STAGES = {
    "unet": ("load UNet (fp16 files → f32)", ["unet"], "denoiser"),
    "movq": ("load MoVQ (fp16 files → f32)", ["movq"], "movq"),
    "prior": ("load prior + CLIP vision (fp16 files → f32)", ["image_encoder", "prior"], "prior"),
    "text_encoder": ("load CLIP text (fp16 files → f32)", ["text_encoder"], "text_encoder"),
}


def rss_mib(path: Path):
    if not path.is_file():
        return None
    m = re.findall(r"^\s*(\d+)\s*$", path.read_text(), re.M)
    return int(m[-1]) / 1024 if m else None


def med(v):
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--model", default="full")
    ap.add_argument("--threads", default="2")
    a = ap.parse_args()

    rounds = sorted({int(m.group(1)) for p in a.dir.glob("*.jsonl") if (m := re.search(r"-(\d+)\.jsonl$", p.name))})
    if not rounds:
        print(f"bench_cpu_table: no results in {a.dir}", file=sys.stderr)
        return 1

    def collect(impl: str, stage: str):
        times, loads, rss, parity = {}, [], [], {}
        for r in rounds:
            rss.append(rss_mib(a.dir / f"{impl}-{stage}-{r}.rss"))
            for x in load_lines(a.dir / f"{impl}-{stage}-{r}.jsonl"):
                if x.get("kind") == "time":
                    times.setdefault(x["workload"], []).append(x["median_s"])
                elif x.get("kind") == "parity":
                    parity.setdefault(x["module"], []).append(x.get("rel_l2"))
                    if x["module"] == STAGES[stage][1][0]:
                        loads.append(x.get("load_s"))
                elif x.get("kind") == "load" and x.get("stage") == STAGES[stage][2]:
                    loads.append(x.get("seconds"))
        return times, med(loads), med(rss), parity

    def fmt(x, unit=""):
        return "—" if x is None else f"{x:.3f}{unit}" if x < 100 else f"{x:.1f}{unit}"

    def ratio(o, t):
        return None if o is None or t in (None, 0) else o / t

    rows, last = [], []
    per_stage = {s: (collect("ours", s), collect("torch", s)) for s in STAGES}
    for key, label, stage, short in WORKLOADS:
        (ot, _, orss, opar), (tt, _, trss, _) = per_stage[stage]
        o, t = med(ot.get(key, [])), med(tt.get(key, []))
        r = ratio(o, t)
        mod = {"unet_a": "unet", "movq_a": "movq", "prior_step": "prior", "text_encoder": "text_encoder",
               "image_encoder": "image_encoder"}.get(key)
        par = opar.get(mod, []) if mod else []
        par = max((p for p in par if isinstance(p, (int, float))), default=None)
        rows.append((label, fmt(o), fmt(t), fmt(r, "×"), fmt(ratio(orss, trss), "×"),
                     "—" if par is None else f"{par:.1e}"))
        last.append(f"{short} ratio={'nan' if r is None else f'{r:.2f}'}")
    for stage, (label, _, _) in STAGES.items():
        (_, ol, orss, _), (_, tl, trss, _) = per_stage[stage]
        rows.append((label, fmt(ol), fmt(tl), fmt(ratio(ol, tl), "×"), fmt(ratio(orss, trss), "×"), "—"))
        last.append(f"load_{stage} ratio={'nan' if ratio(ol, tl) is None else f'{ratio(ol, tl):.2f}'}")
        last.append(f"rss_{stage} ratio={'nan' if ratio(orss, trss) is None else f'{ratio(orss, trss):.2f}'}")

    print(f"CPU, {a.threads} threads, f32 compute from fp16 files, model `{a.model}`, "
          f"{len(rounds)} round(s), medians over rounds (each a separate process per stage and side)\n")
    print("| workload | ours (s) | PyTorch (s) | ours/PyTorch | peak RSS ours/PyTorch | parity (rel L2) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print("| stage process | ours peak RSS (MiB) | PyTorch peak RSS (MiB) |")
    print("|---|---|---|")
    for stage in STAGES:
        (_, _, orss, _), (_, _, trss, _) = per_stage[stage]
        print(f"| {stage} | {fmt(orss)} | {fmt(trss)} |")
    print()
    # The two headline ratios first (`unet64 ratio=<x> movq512 ratio=<y>`), then the rest.
    head = [x for x in last if x.split()[0] in ("unet64", "movq512")]
    print(" ".join(head + [x for x in last if x not in head]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
