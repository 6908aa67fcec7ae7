"""Build hook of kandinsky_serve: generates the gRPC stubs from the repository's protos.

The stubs are never committed. At build time (`pip install clients/python`, a wheel, or an
editable install) grpcio-tools compiles ../../proto/kandinsky/v1/*.proto into the subpackage
`kandinsky_serve._pb`, and every generated `from kandinsky.v1 import ...` becomes a relative
import, so nothing imports a top-level `kandinsky` module (an unrelated PyPI package has that
name).

The runtime requirements follow the grpcio-tools that generated the stubs: its generated code
refuses to load under an older grpcio (GRPC_GENERATED_VERSION) or a protobuf runtime older than
its protoc, so the wheel requires grpcio >= that grpcio-tools and the protobuf range that
grpcio-tools itself requires.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PROTO_SUBDIR = Path("kandinsky") / "v1"
PB_PACKAGE = Path("kandinsky_serve") / "_pb"


def proto_root() -> Path | None:
    """The folder holding kandinsky/v1/*.proto: $KD_PROTO_DIR, the repository's proto/ (a
    checkout), or proto/ beside this file (an sdist)."""
    candidates = []
    if os.environ.get("KD_PROTO_DIR"):
        candidates.append(Path(os.environ["KD_PROTO_DIR"]))
    candidates += [HERE.parent.parent / "proto", HERE / "proto"]
    for c in candidates:
        if any((c / PROTO_SUBDIR).glob("*.proto")):
            return c.resolve()
    return None


_IMPORT = re.compile(r"^(\s*)from kandinsky\.v1 import ", re.M)


def _rewrite(text: str, name: str) -> str:
    text = _IMPORT.sub(r"\1from . import ", text)
    if re.search(r"^\s*(from|import) kandinsky(\.|\s)", text, re.M):
        raise RuntimeError(f"{name}: an import of the top-level `kandinsky` module is left")
    return text


def generate(out_dir: Path) -> None:
    """Compiles every kandinsky/v1 proto into `out_dir` (a package of flat modules)."""
    root = proto_root()
    if root is None:
        if (out_dir / "gateway_pb2.py").exists():
            return  # already generated (a build from a tree that shipped the stubs)
        raise RuntimeError(
            "kandinsky_serve: no kandinsky/v1/*.proto found (looked at $KD_PROTO_DIR, "
            f"{HERE.parent.parent / 'proto'} and {HERE / 'proto'}); build from the repository"
        )
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p) for p in (root / PROTO_SUBDIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {root / PROTO_SUBDIR}")
        generated = Path(tmp) / PROTO_SUBDIR
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*_pb2*.py*"):
            old.unlink()
        for f in sorted(generated.iterdir()):
            if f.suffix in (".py", ".pyi"):
                (out_dir / f.name).write_text(_rewrite(f.read_text(), f.name))
    (out_dir / "__init__.py").write_text(
        '"""gRPC stubs generated from proto/kandinsky/v1 at build time (not committed)."""\n'
    )


class BuildPy(build_py):
    """build_py that writes the generated stubs: into the build tree for a wheel, into the
    source tree for an editable install."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            generate(HERE / "src" / PB_PACKAGE)
        else:
            generate(Path(self.build_lib) / PB_PACKAGE)


class Sdist(sdist):
    """An sdist carries the protos, so a wheel builds from it outside the repository."""

    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        root = proto_root()
        if root is not None and root != Path(base_dir).resolve() / "proto":
            dest = Path(base_dir) / "proto" / PROTO_SUBDIR
            dest.mkdir(parents=True, exist_ok=True)
            for p in (root / PROTO_SUBDIR).glob("*.proto"):
                shutil.copy(p, dest / p.name)


def runtime_requirements() -> list[str]:
    """Pillow, plus the grpcio and protobuf that the stubs about to be generated need."""
    from importlib.metadata import PackageNotFoundError, requires, version

    reqs = ["Pillow>=8"]
    try:
        tools = version("grpcio-tools")
    except PackageNotFoundError:  # e.g. `setup.py --version` without the build requirements
        return reqs + ["grpcio", "protobuf"]
    reqs.append(f"grpcio>={tools}")
    protobuf = [
        r.split(";")[0].strip()
        for r in requires("grpcio-tools") or []
        if re.match(r"protobuf\b", r, re.I)
    ]
    return reqs + (protobuf or ["protobuf"])


setup(
    install_requires=runtime_requirements(),
    cmdclass={"build_py": BuildPy, "sdist": Sdist},
)
