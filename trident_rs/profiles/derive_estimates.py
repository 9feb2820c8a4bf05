"""Regenerate `l20.json`: the measured diffuse table plus documented estimates for the rest.

    .venv/bin/python -m trident_rs.profiles.derive_estimates [--measured PATH] [--out PATH]

Measured: diffuse per-step latency of SD3-medium, FLUX.1-dev, CogVideoX1.5-5B, HunyuanVideo at
Ulysses degree 1/2/4/8, from the TridentServe authors' code (Hetu-DiT, Apache-2.0; copied from
`shared/profiles/diffuse_per_step_l20.json`).

Each family's architecture figures (`FACTS`: encoder and transformer sizes, prompt tokens, CFG,
2-D or 3-D VAE) live in its family module, `trident_rs/models/families/<name>.py`.

Estimated (kind "estimated", replaceable by measured profiles via `CostModel.from_files`):
roofline on an NVIDIA L20 (48 GB GDDR6, 864 GB/s, 119.5 dense FP16/BF16 TFLOPS):
  latency = overhead + max(FLOPs / (utilisation * peak), bytes moved / bandwidth)
- encode: text encoders in bf16 over the prompt tokens (2 x params x tokens FLOPs; weights read
  once). Two sequences with classifier-free guidance (SD3, CogVideoX), one for the
  guidance-distilled FLUX.1-dev and HunyuanVideo. Utilisation 50% (short sequences).
  Memory = encoder weights + 0.5 GB activations + 1 GB CUDA context.
- diffuse memory (latency is measured): transformer weights (replicated on every rank) +
  activations of ~12 live hidden-size bf16 tensors per token (x2 with CFG), divided by the
  sequence-parallel width, + 1 GB context.
- decode: the VAE decoder's FLOPs per output pixel (SD/FLUX 2-D VAE ~9.5 MFLOP; causal 3-D
  video VAEs ~3x that, 3x3x3 kernels) at 40% (2-D) / 35% (3-D) utilisation, plus activation
  traffic over the memory bus. Peak activation memory: 1.5 KB per output pixel for 2-D VAEs
  (128-256 fp16 channels at full resolution, ~4 live tensors), 750 B per output pixel-frame for
  3-D VAEs (the figure measured for LTX-2's conv decoder, dgrauet/ltx-2-mlx PR #146). Video
  decode at width k is patch-parallel (DistVAE): activations / k, time / (k * 0.9^log2 k).
  With these, HunyuanVideo 720x1280x129 and CogVideoX 768x1360x81 decode need > 48 GB on one
  GPU, so their minimum decode width is 2.
- diffuse latency, only for a family with no measured table (its facts name `estimate_shapes`):
  per step (2 x params x tokens + 4 x layers x tokens^2 x hidden) FLOPs, x2 with CFG, at 90%
  utilisation (what the measured CogVideoX 768x1360x81 and HunyuanVideo 720x1280x129 width-1
  points imply: 0.85-0.95), at width k / (k * 0.965^log2 k) (HunyuanVideo 720x1280x129 measured:
  7.2x at 8), + overhead. kind "estimated" like the rest.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from trident_rs.models.families import FAMILIES
from trident_rs.models.family import ModelFacts
from trident_rs.models.spec import get_spec
from trident_rs.policy.profile_format import Hardware, Profile, ProfilePoint, save_profile
from trident_rs.vocab import Shape

HERE = Path(__file__).resolve().parent
DEFAULT_MEASURED = HERE.parent.parent.parent / "shared" / "profiles" / "diffuse_per_step_l20.json"

PEAK_FLOPS = 119.5e12
BANDWIDTH = 864e9
GPU_MEMORY_GB = 48.0
CONTEXT_GB = 1.0
OVERHEAD_S = 0.005
GB = 1e9


SOURCE_MEASURED = "hetu-dit"
SOURCE_ESTIMATE = "roofline-l20"


def encode_cost(f: ModelFacts) -> tuple[float, float]:
    sequences = 2 if f.cfg else 1
    flops = 2 * f.encoder_params * f.prompt_tokens * sequences
    latency = OVERHEAD_S + max(flops / (0.5 * PEAK_FLOPS), 2 * f.encoder_params / BANDWIDTH)
    return latency, 2 * f.encoder_params / GB + 0.5 + CONTEXT_GB


def diffuse_memory(f: ModelFacts, tokens: int, width: int) -> float:
    act = tokens * f.hidden * 2 * 12 * (2 if f.cfg else 1)
    return 2 * f.dit_params / GB + act / width / GB + CONTEXT_GB


def decode_cost(f: ModelFacts, shape: Shape, width: int) -> tuple[float, float]:
    px = shape.height * shape.width * (shape.frames if f.vae_3d else 1)
    flop_per_px, util, bytes_per_px = (28.5e6, 0.35, 750.0) if f.vae_3d else (9.5e6, 0.40, 1500.0)
    scaling = width * 0.9 ** math.log2(width)
    compute = px * flop_per_px / (util * PEAK_FLOPS)
    traffic = 4 * px * bytes_per_px / BANDWIDTH  # each activation byte written and read ~twice
    latency = OVERHEAD_S + (compute + traffic) / scaling
    weights_gb = 0.5 if f.vae_3d else 0.2
    return latency, weights_gb + px * bytes_per_px / width / GB + CONTEXT_GB


def diffuse_step_s(f: ModelFacts, tokens: int, width: int) -> float:
    flops = (2 * f.dit_params * tokens + 4 * f.dit_layers * tokens**2 * f.hidden) * (2 if f.cfg else 1)
    return OVERHEAD_S + flops / (0.9 * PEAK_FLOPS) / (width * 0.965 ** math.log2(width))


def _estimated_rows(family: str) -> dict[str, dict[str, float]]:
    """Per-step diffuse latency (shape key -> width -> s) for a family with no measured table."""
    facts, spec = FAMILIES[family].facts, get_spec(family)
    return {s.key: {str(w): round(diffuse_step_s(facts, spec.tokens(s.height, s.width, s.frames), w), 4)
                    for w in spec.widths["diffuse"]} for s in facts.estimate_shapes}


def build(measured_path: Path) -> Profile:
    table = json.loads(measured_path.read_text())
    points: list[ProfilePoint] = []
    measured = table["per_step_seconds"]
    estimated = {f: _estimated_rows(f) for f in FAMILIES if f not in measured and FAMILIES[f].facts.estimate_shapes}
    for family, rows in [*measured.items(), *estimated.items()]:
        facts, spec = FAMILIES[family].facts, get_spec(family)
        kind, source = ("measured", SOURCE_MEASURED) if family in measured else ("estimated", SOURCE_ESTIMATE)
        enc_latency, enc_mem = encode_cost(facts)
        for key, by_width in sorted(rows.items(), key=lambda kv: Shape.parse(kv[0]).pixels):
            shape = Shape.parse(key)
            dims = dict(model=family, height=shape.height, width=shape.width, frames=shape.frames)
            tokens = spec.tokens(shape.height, shape.width, shape.frames)
            for w, seconds in sorted(by_width.items(), key=lambda kv: int(kv[0])):
                points.append(ProfilePoint(
                    **dims, stage="diffuse", width_gpus=int(w), latency_s=float(seconds),
                    memory_gb=round(diffuse_memory(facts, tokens, int(w)), 3), kind=kind,
                    memory_kind="estimated", source=source))
            points.append(ProfilePoint(**dims, stage="encode", latency_s=round(enc_latency, 5),
                                       memory_gb=round(enc_mem, 3), kind="estimated", source=SOURCE_ESTIMATE))
            for w in spec.widths["decode"]:
                latency, memory = decode_cost(facts, shape, w)
                points.append(ProfilePoint(**dims, stage="decode", width_gpus=w, latency_s=round(latency, 5),
                                           memory_gb=round(memory, 3), kind="estimated", source=SOURCE_ESTIMATE))
    return Profile(
        hardware=Hardware(name="NVIDIA L20 48GB PCIe", memory_gb=GPU_MEMORY_GB),
        description="Diffuse per-step latency measured (Ulysses degree = width_gpus) where the source table has "
                    "the family, else estimated; encode/decode latency and all memory estimated by "
                    "trident_rs/profiles/derive_estimates.py (see its docstring). Every point says its kind.",
        sources={SOURCE_MEASURED: table["source"],
                 SOURCE_ESTIMATE: "roofline estimate, trident_rs/profiles/derive_estimates.py"},
        points=points,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measured", type=Path, default=DEFAULT_MEASURED)
    parser.add_argument("--out", type=Path, default=HERE / "l20.json")
    args = parser.parse_args(argv)
    profile = build(args.measured)
    save_profile(profile, args.out)
    print(f"wrote {len(profile.points)} points to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
