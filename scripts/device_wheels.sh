#!/usr/bin/env bash
# Wheels for scripts/device_check.py on a GPU machine that has Python 3.12 and PyTorch but not this project's
# pinned transformers, and reaches no package registry: downloaded HERE into .whl/ (ignored by git, about 27 MB)
# and carried THERE with the working tree (the device tool's carry: [".whl"]).
#
#   scripts/device_wheels.sh                 # CPython 3.12, x86_64 and aarch64 Linux
#   PYTHON=python3 DEVICE_PYTHON_VERSION=3.11 scripts/device_wheels.sh
#
# What: transformers and what it imports on the way to Qwen2-Audio's forward and generate (huggingface_hub and its
# HTTP client, tokenizers, safetensors, regex, PyYAML, packaging, filelock, tqdm), each at the version installed in
# the project's environment (.venv: the versions the tests ran with). Not numpy, torch or anything torch imports:
# the GPU machine's own are used. device_check.py unpacks these into a temporary folder placed first on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PYVER=${DEVICE_PYTHON_VERSION:-3.12}
DEST=.whl
PACKAGES="transformers huggingface-hub httpx2 httpcore2 h11 anyio idna truststore tokenizers safetensors regex
pyyaml packaging filelock tqdm"

pins=$("$PY" - $PACKAGES <<'EOF'
import importlib.metadata as md, sys
print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
for arch in x86_64 aarch64; do
  echo "device_wheels: $pins (CPython $PYVER, $arch Linux)"
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary :all: --python-version "$PYVER" --implementation cp \
    --platform "manylinux2014_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux_2_28_$arch" \
    -d "$DEST" $pins
done
du -sh "$DEST"
ls "$DEST"
