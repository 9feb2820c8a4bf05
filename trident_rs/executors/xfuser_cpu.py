"""Make xfuser (xDiT) import and run its Ulysses / CFG parallelism over gloo on a CPU-only machine.

xfuser assumes an accelerator. Without one, `import xfuser` fails (it imports `triton`
unconditionally and its `envs` module raises "No Accelerators ... available"), and its sequence
parallel attention is switched off or left without process groups. `apply_cpu_patches()` fixes
exactly those points (see ../shared/notes/diffusers-and-xfuser-on-cpu.md) and then imports xfuser.

It is a no-op where CUDA is available (xfuser runs unpatched) and idempotent otherwise. Call it
before anything imports xfuser: the patches must be in place when xfuser's modules load.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager

import torch

_applied = False


def xfuser_installed() -> bool:
    """Whether the `xfuser` package (the `gpu` extra) is installed; imports nothing."""
    return importlib.util.find_spec("xfuser") is not None


def apply_cpu_patches() -> None:
    """Import xfuser, adjusting it for CPU-only torch first when no GPU is present."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        import xfuser  # noqa: F401  (a GPU machine needs no adjustment)
    else:
        if "xfuser" in sys.modules:
            raise RuntimeError("xfuser was imported before apply_cpu_patches(); call it first")
        _import_dependencies_first()
        with _triton_stub_if_missing():
            _preload_envs_for_cpu()
            import xfuser  # noqa: F401
        _connect_sequence_parallel_groups()
    _applied = True


def _import_dependencies_first() -> None:
    """Load what xfuser imports from diffusers and peft before the triton stub exists, so they
    decide "no triton" from the real environment."""
    import diffusers
    import diffusers.loaders.peft  # noqa: F401
    from diffusers import DiffusionPipeline  # noqa: F401  (loads diffusers' pipeline machinery)

    for name in ("StableDiffusion3Pipeline", "FluxPipeline", "CogVideoXPipeline", "AutoencoderKL"):
        getattr(diffusers, name, None)


@contextmanager
def _triton_stub_if_missing():
    """While xfuser imports, stand in for `triton` when it is not installed.

    xfuser decorates a few (GPU-only) kernels with `@triton.jit` at import time; the stub only
    lets those definitions load. It is removed again so that torch and others still see no triton.
    """
    if importlib.util.find_spec("triton") is not None:
        yield
        return
    triton = types.ModuleType("triton")
    language = types.ModuleType("triton.language")

    def jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton.jit = jit
    triton.autotune = lambda *a, **k: (lambda f: f)
    triton.heuristics = lambda *a, **k: (lambda f: f)
    triton.Config = lambda *a, **k: None
    triton.cdiv = lambda a, b: -(-a // b)
    triton.language = language
    language.constexpr = type("constexpr", (), {})

    def dtype_names(name: str):  # `tl.float32` etc. in annotations
        if name.startswith("__"):
            raise AttributeError(name)
        return object

    language.__getattr__ = dtype_names
    stubbed = {"triton": triton, "triton.language": language}
    sys.modules.update(stubbed)
    try:
        yield
    finally:
        for name, module in stubbed.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def _preload_envs_for_cpu() -> None:
    """Load `xfuser.envs` alone (without the package's `__init__`) and make it CPU-friendly.

    `get_device_version` raises without an accelerator and the distributed backend would be
    unknown; and the long-context (Ulysses/ring) attention is marked absent without CUDA, which
    modules read once at import. All three are fixed before the rest of xfuser loads.
    """
    spec = importlib.util.find_spec("xfuser")
    placeholder = types.ModuleType("xfuser")
    placeholder.__path__ = list(spec.submodule_search_locations)
    placeholder.__spec__ = spec
    sys.modules["xfuser"] = placeholder
    try:
        envs = importlib.import_module("xfuser.envs")
    finally:
        del sys.modules["xfuser"]  # the real package __init__ runs on the next import
    envs.get_device_version = lambda: None
    envs.get_torch_distributed_backend = lambda: "gloo"
    envs.PACKAGES_CHECKER.packages_info["has_long_ctx_attn"] = True


def _connect_sequence_parallel_groups() -> None:
    """Point xfuser's USP modules at yunchang's process groups (they keep None without CUDA)."""
    from yunchang.globals import PROCESS_GROUP

    for name in (
        "xfuser.model_executor.layers.usp",
        "xfuser.model_executor.layers.usp_legacy",
        "xfuser.core.sparge_attention.head_balance",
        "xfuser.core.distributed.fp8_comms",
    ):
        module = sys.modules.get(name)
        if module is None:
            try:
                module = importlib.import_module(name)
            except Exception:  # optional modules (e.g. the legacy USP on new torch)
                continue
        if getattr(module, "PROCESS_GROUP", None) is None:
            module.PROCESS_GROUP = PROCESS_GROUP
