#!/usr/bin/env python3
"""Replaces identical files under tests/fixtures by relative symlinks to one canonical copy.

The fixture checkpoints share components (the tiny MoVQ in four checkpoints, the deep MoVQ in two,
the CLIP tokenizer files in both priors, ...). Stored as separate files they are copied once per
path wherever the working tree goes, so identical files become relative symlinks to the first
path, in sorted order, that has the same bytes. Only files are ever linked, never directories:
tests copy fixture folders file by file with std::fs::copy, which follows file symlinks.

    dedupe_fixtures.py                 link identical files (idempotent; run last by `make fixtures`)
    dedupe_fixtures.py --check         exit 1, listing them, if anything would change
    dedupe_fixtures.py --materialize   turn every symlink back into a regular copy of its target
                                       (run first by `make fixtures`, so that no generator writes
                                       through a link into another generator's files, or reads a
                                       link whose target it has just deleted)

Only the standard library is used; `--root` picks another folder (default: tests/fixtures).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / "tests" / "fixtures"


def walk(root: Path) -> list[Path]:
    """Every file and file symlink under root (symlinked directories are not followed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_with_symlink(path: Path, target: str) -> None:
    """Atomically makes `path` a symlink to `target` (a path relative to path's folder)."""
    tmp = path.with_name(f".{path.name}.dedupe-tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, path)


def materialize(path: Path) -> None:
    """Atomically replaces the symlink `path` by a regular copy of the file it points to."""
    tmp = path.with_name(f".{path.name}.dedupe-tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    shutil.copy2(path, tmp)  # follows the link
    os.replace(tmp, path)


def plan(root: Path) -> list[tuple[str, Path, str | None]]:
    """The changes that dedupe makes: ("materialize", canonical, None) or ("link", path, target)."""
    groups: dict[tuple[int, str], list[Path]] = defaultdict(list)
    for p in walk(root):
        if p.is_symlink() and not p.exists():
            sys.exit(f"dedupe_fixtures: dangling symlink {p} -> {os.readlink(p)}")
        if not p.is_file():
            continue  # a symlink to a directory: never created here, left alone
        size = p.stat().st_size
        if size == 0:
            continue  # empty files are not worth a link
        groups[(size, digest(p))].append(p)
    changes: list[tuple[str, Path, str | None]] = []
    for paths in groups.values():
        if len(paths) < 2:
            continue
        canonical = paths[0]  # walk() is sorted
        if canonical.is_symlink():
            changes.append(("materialize", canonical, None))
        for p in paths[1:]:
            target = os.path.relpath(canonical, p.parent)
            if not (p.is_symlink() and os.readlink(p) == target):
                changes.append(("link", p, target))
    return changes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 if dedupe would")
    mode.add_argument("--materialize", action="store_true", help="replace every symlink by a copy")
    args = ap.parse_args()
    root = args.root.resolve()
    if not root.is_dir():
        sys.exit(f"dedupe_fixtures: {root} is not a directory")

    if args.materialize:
        links = [p for p in walk(root) if p.is_symlink() and p.is_file()]
        for p in links:
            materialize(p)
        print(f"dedupe_fixtures: {len(links)} symlinks under {root} turned into regular files")
        return 0

    changes = plan(root)
    if args.check:
        for kind, p, target in changes:
            print(f"{kind}: {p.relative_to(root)}" + (f" -> {target}" if target else ""))
        return 1 if changes else 0

    saved = 0
    # Canonical copies first, so that every link made afterwards points at a regular file.
    for kind, p, _ in changes:
        if kind == "materialize":
            materialize(p)
    for kind, p, target in changes:
        if kind == "link":
            if not p.is_symlink():
                saved += p.stat().st_size
            replace_with_symlink(p, target)
            print(f"linked {p.relative_to(root)} -> {target}")
    print(f"dedupe_fixtures: {sum(k == 'link' for k, _, _ in changes)} files linked under {root}, "
          f"{saved / 1e6:.2f} MB of copies removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
