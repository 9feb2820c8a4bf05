"""Tensor helpers the family stage functions share. numpy at import; torch only when called,
so a family module stays importable by the policy layer (no torch)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from trident_rs.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

    from trident_rs.request import GenerationParams

# A per-step hook: on_step(step_index, total_steps), called after each denoising step.
StepCallback = Callable[[int, int], None]


def to_numpy(t: "torch.Tensor") -> np.ndarray:
    """float32 numpy on CPU (numpy has no bfloat16; bf16 -> fp32 -> bf16 is lossless)."""
    import torch

    return t.detach().to("cpu", torch.float32).numpy()


def stack(arrays: list[np.ndarray], device, dtype: "torch.dtype") -> "torch.Tensor":
    """Concatenate per-request arrays (each with batch dim 1) into one batch tensor."""
    import torch

    return torch.from_numpy(np.concatenate(arrays, axis=0)).to(device=device, dtype=dtype)


def split(t: "torch.Tensor") -> list[np.ndarray]:
    """One numpy array per request, each keeping a batch dim of 1."""
    array = to_numpy(t)
    return [array[i : i + 1] for i in range(array.shape[0])]


def gather(tensors: list[dict[str, np.ndarray]], key: str) -> list[np.ndarray]:
    try:
        return [t[key] for t in tensors]
    except KeyError:
        raise InvalidRequestError("tensors", f"payload lacks {key!r} (was the previous stage run?)") from None


def cfg_embeddings(prompt_embeds: "torch.Tensor", negative_embeds: "torch.Tensor | None", cfg: bool
                   ) -> list[dict[str, np.ndarray]]:
    """Per-request encode outputs of a prompt-embeds-only text encoder (CogVideoX, Wan), with the
    negative embeddings when classifier-free guidance is on."""
    pe = split(prompt_embeds)
    ne = split(negative_embeds) if cfg else None
    return [{"prompt_embeds": pe[i], **({"negative_prompt_embeds": ne[i]} if cfg else {})} for i in range(len(pe))]


def cfg_inputs(embeddings: list[dict[str, np.ndarray]], cfg: bool, device, dtype) -> dict[str, "torch.Tensor"]:
    """The batched prompt (and, with guidance, negative) embeddings of `cfg_embeddings` outputs."""
    names = ("prompt_embeds", "negative_prompt_embeds") if cfg else ("prompt_embeds",)
    return {n: stack(gather(embeddings, n), device, dtype) for n in names}


def generators(params: list["GenerationParams"]) -> list["torch.Generator"]:
    """One CPU generator per request, seeded as the pipeline would be: batching keeps each
    request's initial noise (diffusers draws per-sample noise from a list of generators)."""
    import torch

    return [torch.Generator("cpu").manual_seed(p.seed) for p in params]


def step_callback(on_step: StepCallback | None, total: int, offset: int = 0):
    """A diffusers `callback_on_step_end` that reports progress, or None. `offset`: the step the
    pipeline's loop started at (a chunk of steps counts its own from 0). A hook with a `latents`
    method (`trident_rs.models.preview.PreviewHook`) is also given the step's latents (read only)."""
    if on_step is None:
        return None
    take = getattr(on_step, "latents", None)

    def callback(pipe, i, t, callback_kwargs):
        on_step(offset + i + 1, total)
        if take is not None:
            take(offset + i + 1, callback_kwargs.get("latents"))
        return callback_kwargs

    return callback


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] -> uint8, rounding as diffusers' `numpy_to_pil` does."""
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
