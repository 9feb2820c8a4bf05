#!/usr/bin/env bash
# Download the wheels a bare GPU machine lacks for benchmarks/gpu_check.sh into .whl/ (git-ignored
# through .git/info/exclude). Run here, where pip can reach a registry; the device tool carries
# .whl/ with the working tree (`carry: [".whl"]`). The GPU image has torch, transformers,
# accelerate, peft, safetensors, huggingface_hub, tokenizers, sentencepiece, einops, numpy,
# filelock, regex and requests already (see /work/.library/device/KINDS.md); it runs Python 3.12.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${PY:-.venv/bin/python}
EXCLUDE=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCLUDE")" "$DEST"
grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >>"$EXCLUDE"

# Pinned to what the CPU build is tested with; --no-deps, so every missing dependency is named.
PACKAGES=(
  diffusers==0.42.1 importlib_metadata==10.2.0          # the pipelines
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5  # profile format
  xfuser==0.7.0 yunchang==0.6.4 distvae==0.1.0          # widths > 1 (multi-GPU machines only)
)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"
ls -la "$DEST"
du -sh "$DEST"
