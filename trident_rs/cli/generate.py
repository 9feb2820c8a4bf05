"""`trident generate`: one image or video through the three separate stage executors."""
from __future__ import annotations

import argparse
import time

from trident_rs.errors import InvalidRequestError


def _size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or one number for a square) -> (height, width)."""
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise InvalidRequestError("size", f"{text!r} is not WIDTHxHEIGHT, e.g. 64x64") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise InvalidRequestError("size", f"{text!r} is not WIDTHxHEIGHT, e.g. 64x64")
    width, height = parts
    return height, width


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-sd3", help="model name (see trident_rs.models.model_names())")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT in pixels (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--frames", type=int, default=None, help="frames (video models only)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--source", default=None, help="hub id or local directory to load the model from")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of a video file")
    parser.add_argument("--out", default=None, help="output file: .png for images, .mp4 or .gif for videos")


def run(args: argparse.Namespace) -> int:
    from trident_rs.models.spec import get_spec
    from trident_rs.request import GenerationParams

    spec = get_spec(args.model)
    height, width = _size(args.size) if args.size else (None, None)
    params = GenerationParams(
        model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, height=height,
        width=width, num_frames=args.frames, steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
    ).resolved()  # typed errors before anything loads
    out = args.out or ("out.mp4" if spec.is_video else "out.png")
    if not spec.is_video and not out.lower().endswith(".png"):
        raise InvalidRequestError("out", f"{spec.name} makes images; write a .png")
    if spec.is_video and not out.lower().endswith((".mp4", ".gif")):
        raise InvalidRequestError("out", f"{spec.name} makes videos; write a .mp4 or .gif")

    from trident_rs.media import write_media
    from trident_rs.pipeline_runner import generate_payload

    start = time.perf_counter()
    options = {k: v for k, v in (("source", args.source), ("device", args.device), ("dtype", args.dtype)) if v}
    payload = generate_payload(params, **options)
    path = write_media(payload.tensors["frames"], out, fps=args.fps)
    timings = ", ".join(f"{stage} {1000 * s:.0f} ms" for stage, s in payload.meta["timings_s"].items())
    print(f"wrote {path} ({params.width}x{params.height}, {params.num_frames} frame(s), {params.steps} steps) "
          f"in {time.perf_counter() - start:.1f} s; stages: {timings}")
    return 0
