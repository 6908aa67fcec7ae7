"""Fixtures: real kandinsky-serve stacks (`kd up` on the bundled tiny models), started once per
session and stopped with SIGTERM at the end. No mocks.

The binaries come from $KD_BIN_DIR, else <repo>/target/debug (`cargo build --bins`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

import kandinsky_serve as ks

REPO = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("KD_BIN_DIR", REPO / "target" / "debug"))
FIXTURES = REPO / "tests" / "fixtures"
PRIOR = FIXTURES / "tiny" / "kandinsky-2-2-prior"
DECODER = FIXTURES / "deep" / "kandinsky-2-2-decoder"
INPAINT_DECODER = FIXTURES / "tiny" / "kandinsky-2-2-decoder-inpaint"
CONTROLNET_DECODER = FIXTURES / "tiny" / "kandinsky-2-2-controlnet-depth"
#: An aMUSEd folder is a whole model: `kd up` runs it without a prior.
AMUSED = FIXTURES / "tiny" / "amused-256"
READY = "kandinsky-serve is up"

#: Small and fast: what every test asks unless it tests the parameter itself.
FAST = dict(width=64, height=64, prior_steps=2, steps=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(
            f"{path} is missing: build it with `cargo build --locked --bins`", pytrace=False
        )
    return path


class Process:
    """A server process whose output goes to a log file; stopped with SIGTERM."""

    def __init__(self, name: str, args: List[str]) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"kd-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [str(a) for a in args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def failed(self, why: str) -> None:
        self.stop()
        tail = "\n".join(self.output().splitlines()[-40:])
        pytest.fail(f"{self.name}: {why}\n--- log tail ---\n{tail}", pytrace=False)

    def wait_for_line(self, text: str, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                self.failed(f"exited with {self.proc.returncode} before saying {text!r}")
            time.sleep(0.1)
        self.failed(f"did not say {text!r} within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if os.environ.get("KD_KEEP_LOGS") is None:
            os.unlink(self.log.name)


class Stack(Process):
    """`kd up`: four stages and a gateway on loopback ports."""

    def __init__(self, name: str, decoder_dir: Path) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        super().__init__(
            name,
            [
                binary("kd"),
                "up",
                "--listen",
                self.target,
                "--prior-dir",
                PRIOR,
                "--decoder-dir",
                decoder_dir,
                "--bin-dir",
                BIN,
            ],
        )
        for b in ("kd-gateway", "kd-text-encoder", "kd-prior", "kd-denoiser", "kd-movq"):
            binary(b)
        self.wait_for_line(READY, timeout=300)

    def stage_urls(self) -> Dict[str, str]:
        """The `--listen` address of each stage `kd up` started (its children, from /proc)."""
        urls: Dict[str, str] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                ppid = int(text[text.rindex(")") + 2 :].split()[1])
                if ppid != self.proc.pid:
                    continue
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            args = [a.decode() for a in argv if a]
            name = Path(args[0]).name
            if name.startswith("kd-") and name != "kd-gateway" and "--listen" in args:
                urls[name[3:]] = "http://" + args[args.index("--listen") + 1]
        return urls


def _stack(name: str, decoder: Path) -> Iterator[Stack]:
    stack = Stack(name, decoder)
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """`kd up` with the default text-to-image decoder."""
    yield from _stack("text2img", DECODER)


@pytest.fixture(scope="session")
def inpaint_stack() -> Iterator[Stack]:
    """`kd up` with the inpainting decoder (inpaint and outpaint)."""
    yield from _stack("inpaint", INPAINT_DECODER)


@pytest.fixture(scope="session")
def controlnet_stack() -> Iterator[Stack]:
    """`kd up` with the ControlNet (depth) decoder."""
    yield from _stack("controlnet", CONTROLNET_DECODER)


@pytest.fixture(scope="session")
def amused_stack() -> Iterator[Stack]:
    """`kd up` with the aMUSEd folder (text encoder, token generator, VQ-GAN; no prior)."""
    yield from _stack("amused", AMUSED)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[ks.Client]:
    with ks.Client(stack.target, timeout=60) as c:
        yield c


class Gateway(Process):
    """A `kd-gateway` of its own in front of the text-to-image stack's stages, with flags
    `kd up` does not pass (API keys, TLS, admission limits)."""

    def __init__(
        self, name: str, stack: Stack, extra: List[str], port: Optional[int] = None
    ) -> None:
        urls = stack.stage_urls()
        if set(urls) != {"text-encoder", "prior", "denoiser", "movq"}:
            pytest.skip(f"could not find the stages of `kd up` in /proc (found {sorted(urls)})")
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        super().__init__(
            name,
            [
                binary("kd-gateway"),
                "--listen",
                self.target,
                "--metrics-listen",
                f"127.0.0.1:{free_port()}",
                "--text-encoder-url",
                urls["text-encoder"],
                "--prior-url",
                urls["prior"],
                "--denoiser-url",
                urls["denoiser"],
                "--movq-url",
                urls["movq"],
                *extra,
            ],
        )

    def wait_ready(self, client: ks.Client, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                client.list_models(timeout=5, retries=0)
                return
            except ks.Unavailable as e:
                if self.proc.poll() is not None:
                    self.failed(f"exited with {self.proc.returncode}")
                if time.monotonic() > end:
                    self.failed(f"not ready within {timeout:.0f} s: {e}")
                time.sleep(0.1)


API_KEY = "test-key-0123456789"


@pytest.fixture(scope="session")
def keyed_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway that wants `API_KEY` and admits one request at a time, queueing none."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# test keys\n{API_KEY}\n")
    gw = Gateway(
        "keyed",
        stack,
        ["--api-keys-file", str(keys), "--max-concurrency", "1", "--max-queue", "0"],
    )
    try:
        with ks.Client(gw.target, api_key=API_KEY) as c:
            gw.wait_ready(c)
        yield gw
    finally:
        gw.stop()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def tls_gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A TLS-only gateway whose certificate (signed by its own CA, `ca.pem`) names `kd.test`
    only; `gw.certs` is the folder of the PEM files."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (needed to make test certificates)")
    d = tmp_path_factory.mktemp("tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=kd test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=kd.test",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        cwd=d,
    )
    (d / "ext.cnf").write_text(
        "subjectAltName=DNS:kd.test\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
        cwd=d,
    )
    keys = d / "keys.txt"
    keys.write_text(API_KEY + "\n")
    gw = Gateway(
        "tls",
        stack,
        [
            "--tls-cert",
            str(d / "server.pem"),
            "--tls-key",
            str(d / "server.key"),
            "--api-keys-file",
            str(keys),
        ],
    )
    gw.certs = d  # type: ignore[attr-defined]
    try:
        tls = ks.TlsConfig(ca=d / "ca.pem", server_name="kd.test")
        with ks.Client(gw.target, api_key=API_KEY, tls=tls) as c:
            gw.wait_ready(c)
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="session")
def default_model(client: ks.Client) -> str:
    [m] = [m for m in client.list_models() if m.is_default]
    return m.name


def pytest_report_header(config: pytest.Config) -> Optional[str]:
    return f"kandinsky-serve binaries: {BIN}; python {sys.version.split()[0]}"
