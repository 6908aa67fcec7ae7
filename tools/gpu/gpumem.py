#!/usr/bin/env python3
"""Peak memory per process, sampled in the background (stdlib only).

    python tools/gpu/gpumem.py watch --out mem.json [--source gpu|rss] [--interval 0.25]
    python tools/gpu/gpumem.py snapshot --from mem.json --to mem-phase.json

`watch` runs until SIGTERM/SIGINT and keeps FILE up to date (atomic rename) with
{"source": ..., "processes": {pid: {"name", "cmd", "peak_mib"}}, "device_peak_mib", "samples"}.

* `gpu`: per-process used GPU memory from `nvidia-smi --query-compute-apps` (what the driver
  charges the process: weights, activations, the allocator's cache and the CUDA context), and
  the device's total used memory from `--query-gpu=memory.used`.
* `rss`: on a CPU run, the peak resident set (VmHWM) of every process whose name starts with
  `kd-` or that runs a tools/gpu script — the CPU stand-in for the same rows.

`snapshot` copies the current state (to freeze the peaks of one phase while watch goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def gpu_sample() -> tuple[dict[int, tuple[str, float]], float | None]:
    procs: dict[int, tuple[str, float]] = {}
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, timeout=10,
    ).stdout
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3 and parts[0].isdigit():
            try:
                procs[int(parts[0])] = (parts[1], float(parts[2]))
            except ValueError:
                pass
    total = None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout.split()
    if out:
        try:
            total = float(out[0])
        except ValueError:
            pass
    return procs, total


def rss_sample() -> tuple[dict[int, tuple[str, float]], float | None]:
    procs: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = (d / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        name = fields.get("Name", "").strip()
        cmd = cmdline(int(d.name))
        if not (name.startswith("kd-") or name == "kd" or "tools/gpu/" in cmd):
            continue
        hwm = fields.get("VmHWM", "0 kB").split()[0]
        procs[int(d.name)] = (name, int(hwm) / 1024.0)
    return procs, None


def watch(a) -> int:
    state = {"source": a.source, "processes": {}, "device_peak_mib": None, "samples": 0}
    stop = False

    def handler(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    sample = gpu_sample if a.source == "gpu" else rss_sample
    tmp = a.out + ".tmp"
    last_write = 0.0
    while not stop:
        try:
            procs, total = sample()
        except Exception as e:  # noqa: BLE001
            state["error"] = str(e)
            procs, total = {}, None
        for pid, (name, mib) in procs.items():
            p = state["processes"].setdefault(str(pid), {"name": name, "cmd": cmdline(pid), "peak_mib": 0.0})
            if not p["cmd"]:
                p["cmd"] = cmdline(pid)
            p["peak_mib"] = max(p["peak_mib"], mib)
        if total is not None:
            state["device_peak_mib"] = max(state["device_peak_mib"] or 0.0, total)
        state["samples"] += 1
        now = time.time()
        if now - last_write > 1.0 or stop:
            Path(tmp).write_text(json.dumps(state, indent=1))
            os.replace(tmp, a.out)
            last_write = now
        time.sleep(a.interval)
    Path(tmp).write_text(json.dumps(state, indent=1))
    os.replace(tmp, a.out)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--out", required=True)
    w.add_argument("--source", choices=["gpu", "rss"], default="gpu")
    w.add_argument("--interval", type=float, default=0.25)
    s = sub.add_parser("snapshot")
    s.add_argument("--from", dest="src", required=True)
    s.add_argument("--to", required=True)
    a = ap.parse_args()
    if a.cmd == "watch":
        if a.source == "gpu" and not shutil.which("nvidia-smi"):
            print("gpumem: nvidia-smi not found", file=sys.stderr)
            return 2
        return watch(a)
    if Path(a.src).exists():
        shutil.copyfile(a.src, a.to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
