#!/usr/bin/env bash
# `make test-python`: the Python client's tests (clients/python) against real servers.
# Idempotent: builds the service binaries, creates clients/python/.venv once, installs the client
# with its test extra (from PyPI; the build generates the gRPC stubs from proto/) whenever the
# protos or the client's sources changed since the last install, then runs pytest.
# PYTHON picks the interpreter of a new venv (default python3); arguments go to pytest.
# Needs Rust, python3 with pip (and openssl for the TLS tests, skipped without it).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --bins -q

venv=$PWD/clients/python/.venv
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  echo "creating clients/python/.venv"
  if ! "$python" -m venv "$venv"; then
    # Debian/Ubuntu without python3-venv (no ensurepip): virtualenv brings its own pip.
    rm -rf "$venv"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$python" -m pip install -q --user --disable-pip-version-check \
      virtualenv
    "$python" -m virtualenv -q "$venv"
  fi
fi
py="$venv/bin/python"

# What the installed client was built from: the protos and the package's own files.
stamp=$("$py" - <<'PY'
import hashlib, pathlib
h = hashlib.sha256()
roots = ["proto/kandinsky/v1", "clients/python/pyproject.toml", "clients/python/setup.py",
         "clients/python/README.md", "clients/python/src/kandinsky_serve"]
for root in map(pathlib.Path, roots):
    for f in sorted([root] if root.is_file() else root.rglob("*")):
        if f.is_file() and "_pb" not in f.parts and f.suffix != ".pyc":
            h.update(str(f).encode() + b"\0" + f.read_bytes())
print(h.hexdigest())
PY
)
if [ "$(cat "$venv/.kandinsky-serve-stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "installing clients/python[test] into clients/python/.venv"
  "$py" -m pip install -q --disable-pip-version-check "./clients/python[test]"
  printf '%s\n' "$stamp" >"$venv/.kandinsky-serve-stamp"
fi

cd clients/python
exec "$py" -m pytest -q "$@"
