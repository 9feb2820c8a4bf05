"""One-shot check on a lent GPU machine: full-size SD3 and FLUX with random weights.

Builds the published SD3-medium and FLUX.1-dev architectures from their configs (written below;
no weights can be downloaded there) directly on the GPU in bf16, then, per model and shape:
encode, diffuse (per step) and decode latency and peak memory through trident_rs' own stage
executors; split (encode -> diffuse -> decode) vs the one-call diffusers pipeline; and the
shipped cost model's prediction for the same point. Writes under --out:

- profile_gpu.json: the measurements in the cost model's profile format (`CostModel.from_files`);
- gpu_check.json: everything (per-step times, memory, split agreement, cost model ratios).

Widths > 1 need several GPUs and xfuser; on a one-GPU machine only width 1 is measured.

    python benchmarks/gpu_check.py --out "$OUT"            # on the GPU machine (gpu_check.sh)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gc  # CPU: tiny configs, same code path
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trident_rs.executors.base import StagePayload  # noqa: E402
from trident_rs.executors.diffusers_stages import DiffusersStageExecutor  # noqa: E402
from trident_rs.policy.profile_format import Hardware, Profile, ProfilePoint, save_profile  # noqa: E402
from trident_rs.request import GenerationParams  # noqa: E402
from trident_rs.vocab import Shape  # noqa: E402

# --- published architectures (stabilityai/stable-diffusion-3-medium-diffusers, black-forest-labs/FLUX.1-dev)

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dense_act_fn="gelu_new",
              is_gated_act=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
VAE_16CH = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                use_post_quant_conv=False)

ARCHITECTURES = {
    "sd3": dict(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
        vae=dict(VAE_16CH, scaling_factor=1.5305, shift_factor=0.0609),
        scheduler=dict(shift=3.0), t5_max_length=256,
    ),
    "flux": dict(
        transformer=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=[16, 56, 56]),
        vae=dict(VAE_16CH, scaling_factor=0.3611, shift_factor=0.1159),
        scheduler=dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096),
        t5_max_length=512,
    ),
}
SHAPES = {"sd3": [512, 1024, 1536], "flux": [512, 1024, 2048]}  # square; published default 1024
DRY_SHAPES = {"tiny-sd3": [64, 128], "tiny-flux": [64, 128]}


def build_full_pipeline(family: str, device: str, dtype: torch.dtype):
    """A full-size pipeline with random weights, initialised directly on `device` in `dtype`."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from trident_rs.models.tiny_parts import build_clip_tokenizer, build_t5_tokenizer

    arch = ARCHITECTURES[family]
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer(arch["t5_max_length"])
    ids = dict(bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id)
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vae = diffusers.AutoencoderKL(**arch["vae"])
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**arch["scheduler"])
            t5 = T5EncoderModel(T5Config(**T5_XXL))
            if family == "sd3":
                pipe = diffusers.StableDiffusion3Pipeline(
                    transformer=diffusers.SD3Transformer2DModel(**arch["transformer"]), scheduler=scheduler, vae=vae,
                    text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L, **ids)), tokenizer=clip_tok,
                    text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **ids)), tokenizer_2=clip_tok,
                    text_encoder_3=t5, tokenizer_3=t5_tok)
            else:
                pipe = diffusers.FluxPipeline(
                    transformer=diffusers.FluxTransformer2DModel(**arch["transformer"]), scheduler=scheduler, vae=vae,
                    text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **ids)), tokenizer=clip_tok,
                    text_encoder_2=t5, tokenizer_2=t5_tok)
    finally:
        torch.set_default_dtype(previous)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def build_tiny(model: str, device: str):
    from trident_rs.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Clock:
    """Wall time with device synchronisation, and the peak memory since the last reset."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def timed(self, fn):
        self.sync()
        self.reset_peak()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return result, time.perf_counter() - start, self.peak_gb()


def measure_shape(model: str, pipe, size: int, steps: int, clock: Clock) -> dict:
    """Encode, diffuse (per step) and decode of one request at size x size."""
    step_times: list[float] = []
    last = [0.0]

    def on_step(i: int, total: int) -> None:
        clock.sync()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    encode = DiffusersStageExecutor(model, "encode", pipeline=pipe)
    diffuse = DiffusersStageExecutor(model, "diffuse", pipeline=pipe, on_step=on_step)
    decode = DiffusersStageExecutor(model, "decode", pipeline=pipe)
    params = GenerationParams(model=model, prompt="a red cube on a blue sphere", height=size, width=size,
                              steps=steps, seed=1)
    encode.run([StagePayload(params)])  # warm-up (kernels, allocator, autotuning)
    enc, t_enc, m_enc = clock.timed(lambda: encode.run([StagePayload(params)]))
    diffuse.run(enc)
    step_times.clear()
    clock.sync()
    last[0] = time.perf_counter()
    lat, t_diff, m_diff = clock.timed(lambda: diffuse.run(enc))
    per_step = statistics.median(step_times[1:] or step_times)
    decode.run(lat)
    _, t_dec, m_dec = clock.timed(lambda: decode.run(lat))
    return {"size": size, "steps": steps,
            "encode_s": t_enc, "encode_gb": m_enc,
            "diffuse_total_s": t_diff, "diffuse_step_s": per_step, "diffuse_steps_s": step_times, "diffuse_gb": m_diff,
            "decode_s": t_dec, "decode_gb": m_dec}


def split_vs_monolithic(model: str, pipe, size: int, steps: int) -> dict:
    """Max abs difference of the images (floats in [0, 1]) from the split stages and one call."""
    params = GenerationParams(model=model, prompt="a red cube on a blue sphere", height=size, width=size,
                              steps=steps, seed=3).resolved()
    payload = [StagePayload(params)]
    for stage in ("encode", "diffuse", "decode"):
        payload = DiffusersStageExecutor(model, stage, pipeline=pipe, keep_float=True).run(payload)
    split = payload[0].tensors["frames_float"]
    kwargs = dict(prompt=params.prompt, height=size, width=size, num_inference_steps=steps,
                  guidance_scale=params.guidance_scale, output_type="np")
    if "sd3" in model:
        kwargs["negative_prompt"] = params.negative_prompt
    def one_call() -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(pipe(**dict(kwargs, generator=torch.Generator("cpu").manual_seed(params.seed)))
                              .images).astype(np.float64)

    whole, again = one_call(), one_call()
    diff = np.abs(split.astype(np.float64) - whole)
    return {"size": size, "steps": steps, "max_abs_diff": float(np.nanmax(diff)) if diff.size else 0.0,
            # run-to-run spread of the one-call pipeline itself: the floor the split is held to
            "one_call_repeat_diff": float(np.nanmax(np.abs(whole - again))),
            "nan": bool(np.isnan(split).any() or np.isnan(whole).any()), "shape": list(split.shape)}


def cost_model_ratios(profile_model: str, results: list[dict]) -> list[dict]:
    """measured / predicted by the shipped cost model, per stage and shape."""
    try:
        from trident_rs.policy.cost_model import CostModel

        cm = CostModel.default()
    except Exception as e:  # the shipped profile may be absent in a stripped checkout
        return [{"error": f"cost model unavailable: {e}"}]
    out = []
    for r in results:
        shape = Shape(r["size"], r["size"])
        row = {"size": r["size"], "profile": cm.hardware}
        for stage, key in (("encode", "encode_s"), ("diffuse", "diffuse_step_s"), ("decode", "decode_s")):
            try:
                predicted = cm.predict(profile_model, stage, shape, 1).latency_s
                row[stage] = {"measured_s": r[key], "predicted_s": predicted, "ratio": r[key] / predicted}
            except Exception as e:
                row[stage] = {"error": str(e)}
        out.append(row)
    return out


def profile_points(profile_model: str, results: list[dict]) -> list[ProfilePoint]:
    points = []
    for r in results:
        for stage, t, m in (("encode", r["encode_s"], r["encode_gb"]), ("diffuse", r["diffuse_step_s"], r["diffuse_gb"]),
                            ("decode", r["decode_s"], r["decode_gb"])):
            points.append(ProfilePoint(model=profile_model, stage=stage, height=r["size"], width=r["size"],
                                       latency_s=max(t, 1e-9), memory_gb=m, source="gpu_check"))
    return points


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--dry-run", action="store_true", help="tiny configs on CPU: checks the code path, not a GPU")
    ap.add_argument("--models", default="sd3,flux")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps timed per shape")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip remaining shapes after this long")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        print("no CUDA device: use --dry-run for a CPU check", file=sys.stderr)
        return 2
    clock = Clock(device)
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                    "gpus": torch.cuda.device_count(), "torch": torch.__version__, "dry_run": args.dry_run,
                    "models": {}, "skipped": []}
    points: list[ProfilePoint] = []
    for family in args.models.split(","):
        model = f"tiny-{family}" if args.dry_run else family
        t0 = time.perf_counter()
        pipe = build_tiny(model, device) if args.dry_run else build_full_pipeline(family, device, torch.bfloat16)
        entry: dict = {"build_s": time.perf_counter() - t0, "results": []}
        print(f"[{model}] built in {entry['build_s']:.1f} s", flush=True)
        sizes = DRY_SHAPES[model] if args.dry_run else SHAPES[family]
        for size in sizes:
            if time.perf_counter() - started > args.budget_s:
                report["skipped"].append(f"{model} {size}")
                continue
            r = measure_shape(model, pipe, size, args.steps, clock)
            entry["results"].append(r)
            print(f"[{model}] {size}px encode {r['encode_s']*1e3:.1f} ms, diffuse {r['diffuse_step_s']*1e3:.1f} ms/step, "
                  f"decode {r['decode_s']*1e3:.1f} ms, peak {r['diffuse_gb'] or 0:.1f} GB", flush=True)
        if time.perf_counter() - started < args.budget_s:
            entry["split_vs_monolithic"] = split_vs_monolithic(model, pipe, sizes[0], 2)
            print(f"[{model}] split vs one call: {entry['split_vs_monolithic']}", flush=True)
        entry["cost_model"] = cost_model_ratios(family, entry["results"])
        points += profile_points(model if args.dry_run else family, entry["results"])
        report["models"][model] = entry
        del pipe
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 1.0
    profile = Profile(hardware=Hardware(name=report["device"], memory_gb=round(memory, 1)),
                      description=f"benchmarks/gpu_check.py, {args.steps} steps, random weights, bf16"
                                  + (" (dry run, tiny models on CPU)" if args.dry_run else ""),
                      sources={"gpu_check": "measured by benchmarks/gpu_check.py"}, points=points)
    save_profile(profile, out_dir / "profile_gpu.json")
    report["wall_s"] = time.perf_counter() - started
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir}/profile_gpu.json and gpu_check.json in {report['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
