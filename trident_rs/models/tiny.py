"""The cache of tiny random-weight pipelines, built fully offline (no hub access).

Each tiny model (a spec with no `source`) is built by its family's `build_tiny`
(`trident_rs.models.families.<name>`, from the parts in `trident_rs.models.tiny_parts`): a real
diffusers pipeline with a small config ("small" shapes: VAE ×8 with 16 latent channels,
transformer patch 2, a few layers, hidden 128), seeded random weights and tokenizers built in
code. It is written once with `save_pretrained` to
`$TRIDENT_CACHE/tiny/<name>` (default `~/.cache/trident_rs/tiny/<name>`) and then loaded like a
real model, through `from_pretrained(local_dir)`.

Concurrent builders (several Ray replicas) are safe: a file lock serialises them and the
directory appears by atomic rename, so a reader never sees a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock

from trident_rs.errors import UnknownModelError
from trident_rs.models.families import get_family
from trident_rs.models.spec import REGISTRY, ModelSpec

# Bump when a tiny config changes: cached builds with another version are rebuilt.
BUILD_VERSION = 2
_MARKER = "trident_tiny.json"


def cache_root() -> Path:
    """Root of trident_rs caches: `$TRIDENT_CACHE` or `~/.cache/trident_rs`."""
    return Path(os.environ.get("TRIDENT_CACHE") or Path.home() / ".cache" / "trident_rs")


def tiny_dir(name: str) -> Path:
    return cache_root() / "tiny" / name


def tiny_models() -> list[str]:
    """Names of the tiny models (specs with no source), every family's."""
    return sorted(n for n, s in REGISTRY.items() if not s.source)


def _tiny_spec(name: str) -> ModelSpec:
    spec = REGISTRY.get(name)
    if spec is None or spec.source:
        raise UnknownModelError(str(name), tiny_models())
    return spec


def build_tiny_pipeline(name: str):
    """Construct the tiny pipeline in memory (seeded random weights). Prefer `ensure_tiny_model`."""
    spec = _tiny_spec(name)
    with torch.random.fork_rng():
        pipe = get_family(spec.family).build_tiny()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # freshly constructed modules are in training mode (T5 dropout)
    return pipe


def _is_built(path: Path) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()).get("version") == BUILD_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_model(name: str, root: Path | None = None) -> Path:
    """Directory of the saved tiny model `name`, building it first if the cache lacks it."""
    index_classes = get_family(_tiny_spec(name).family).tiny_index_classes
    target = (root / name) if root is not None else tiny_dir(name)
    if _is_built(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_built(target):  # another process built it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            build_tiny_pipeline(name).save_pretrained(staging)
            if index_classes:  # as the real model's index names them (a tokenizer built in code
                index = json.loads((staging / "model_index.json").read_text())  # saves as the generic backend)
                index.update(index_classes)
                (staging / "model_index.json").write_text(json.dumps(index, indent=2))
            (staging / _MARKER).write_text(json.dumps({"name": name, "version": BUILD_VERSION}))
            if target.exists():  # stale version
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
