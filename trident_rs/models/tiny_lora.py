"""Tiny random LoRA adapters for the tiny models, made offline with peft (tests, benchmarks, demos).

`make_random_lora("tiny-sd3", dir)` injects a rank-`rank` LoRA into the tiny transformer's attention
projections (and optionally the first text encoder's), with random non-zero `lora_B` so that it
changes the output, and saves it with the pipeline class's `save_lora_weights` (diffusers' format,
loadable with `load_lora_weights`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections
TEXT_ATTENTION = ("q_proj", "v_proj")  # CLIP's


def random_lora_layers(module: Any, targets: tuple[str, ...], seed: int, rank: int = 4) -> dict:
    """A random LoRA's weights (peft format) for `targets` of `module`, which keeps the LoRA layers."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    inject_adapter_in_model(config, module, adapter_name="random")
    return {k: v.clone() for k, v in get_peft_model_state_dict(module, adapter_name="random").items()}


def make_random_lora(model: str, out_dir: str | Path, seed: int = 1, text_encoder: bool = False,
                     rank: int = 4) -> str:
    """Save a random LoRA for `model` (transformer; optionally the first text encoder) to `out_dir`."""
    from trident_rs.models.loading import load_pipeline, pipeline_class
    from trident_rs.models.spec import get_spec

    pipe = load_pipeline(model)  # its own copy: the LoRA layers stay in it
    layers = {"transformer_lora_layers": random_lora_layers(pipe.transformer, ATTENTION, seed, rank)}
    if text_encoder:
        layers["text_encoder_lora_layers"] = random_lora_layers(pipe.text_encoder, TEXT_ATTENTION, seed + 100, rank)
    pipeline_class(get_spec(model).family).save_lora_weights(str(out_dir), **layers)
    return str(out_dir)
