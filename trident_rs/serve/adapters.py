"""LoRA adapters at the ingress: which ones a request may ask for, and how they are listed.

The config declares them (`AppConfig.loras`: name -> local path or hub id); a request names
them in `lora: [{name, scale}]` (`trident_rs.request.LoraRef`, which checks the scale's range).
`check_adapters` refuses, before admission, an adapter the config does not declare
(`UnknownAdapterError`, 404 naming it) and more adapters than `limits.max_loras` (422, `lora`).
"""
from __future__ import annotations

from typing import Any

from trident_rs.errors import InvalidRequestError, UnknownAdapterError
from trident_rs.request import GenerationParams


def check_adapters(cfg: Any, params: GenerationParams) -> GenerationParams:
    """`params` if its adapters are declared and not too many, else a typed error."""
    if len(params.lora) > cfg.limits.max_loras:
        raise InvalidRequestError("lora", f"{len(params.lora)} adapters exceed the maximum {cfg.limits.max_loras} "
                                  "per request (limits.max_loras)")
    for name in params.adapters:
        if name not in cfg.loras:
            raise UnknownAdapterError(name, list(cfg.loras))
    return params


def adapter_cards(cfg: Any) -> list[dict[str, Any]]:
    """`/v1/models` entries of the declared adapters: model cards of kind "lora" (vLLM lists its
    LoRA modules as model cards too), with where each is loaded from."""
    return [{"id": name, "object": "model", "owned_by": "trident_rs", "kind": "lora", "source": source}
            for name, source in sorted(cfg.loras.items())]
