"""What a chunk boundary costs when diffuse runs a request's steps in chunks, per tiny model (CPU).

    .venv/bin/python benchmarks/chunk_boundary.py [--steps 4] [--repeats 5] [--threads N] [--cases sd3 wan ...]

For each case (every family's tiny model with its own scheduler, plus two stateful schedulers:
SD3 with DPM-Solver++ and CogVideoX with CogVideoX1.5's DPM scheduler):

- bytes: what the payload between two chunks carries (at the middle boundary, when multistep
  history is full): the prompt embeddings, the latents, the scheduler state (step index and
  history), the generator's state, and the whole payload pickled (as Ray's object store holds it);
- time: `steps` steps in one call vs `steps` calls of one step each with the payload pickled and
  unpickled between calls; the boundary cost is the difference over the `steps - 1` boundaries
  (and, of that, the pickling). Medians of `repeats` interleaved runs after a warm-up, in wall
  time and in this process's CPU time (which other processes on a shared machine disturb less;
  with --threads 1 it is the work done);
- exactness: max abs difference of the chunked latents from the one call's.

Prints a table and writes benchmarks/results/chunk_boundary.json (the committed one: --repeats 15
--threads 1, on a 2-core CPU machine shared with other jobs: one thread keeps the figures steady).
"""
from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from trident_rs.executors.base import StagePayload, build_executor
from trident_rs.models.chunking import CHUNK, LATENTS, RNG
from trident_rs.models.spec import get_spec
from trident_rs.request import GenerationParams


def _flow_dpm(scheduler):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _cogvideox_dpm(scheduler):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler.from_config(scheduler.config)


CASES = {  # name -> (model, scheduler to swap in)
    "sd3": ("tiny-sd3", None),
    "flux": ("tiny-flux", None),
    "cogvideox": ("tiny-cogvideox", None),
    "hunyuanvideo": ("tiny-hunyuanvideo", None),
    "wan": ("tiny-wan", None),
    "sd3-dpm": ("tiny-sd3", _flow_dpm),
    "cogvideox-dpm": ("tiny-cogvideox", _cogvideox_dpm),
}


def _bytes(payload: StagePayload) -> dict[str, int]:
    t = payload.tensors
    state = sum(v.nbytes for k, v in t.items() if k.startswith(CHUNK) and k not in (LATENTS, RNG))
    return {"embeddings": sum(v.nbytes for k, v in t.items() if not k.startswith(CHUNK)),
            "latents": t[LATENTS].nbytes, "scheduler_state": state, "rng_state": t[RNG].nbytes,
            "pickled_payload": len(pickle.dumps(payload))}


def _chunked(diffuse, encoded: StagePayload, steps: int) -> tuple[StagePayload, float, dict[str, int]]:
    """One step per call, pickled between calls: (final payload, seconds pickling, middle payload's bytes)."""
    payload, pickling, middle = encoded, 0.0, {}
    for a in range(steps):
        (payload,) = diffuse.run([StagePayload(payload.params, payload.tensors, step_range=(a, a + 1))])
        if a + 1 < steps:
            if a + 1 == steps // 2:
                middle = _bytes(payload)
            start = time.perf_counter()
            payload = pickle.loads(pickle.dumps(payload))
            pickling += time.perf_counter() - start
    return payload, pickling, middle


def measure(name: str, steps: int, repeats: int, encoders: dict) -> dict:
    model, swap = CASES[name]
    extra = {"num_frames": 9} if get_spec(model).is_video else {}
    params = GenerationParams(model=model, prompt="a red cube on a blue sphere", steps=steps, seed=0,
                              **extra).resolved()
    if model not in encoders:
        encoders[model] = build_executor("diffusers", model, "encode")
    (encoded,) = encoders[model].run([StagePayload(params)])
    diffuse = build_executor("diffusers", model, "diffuse")
    if swap is not None:
        diffuse.pipe.scheduler = swap(diffuse.pipe.scheduler)
    diffuse.run([encoded])  # warm-up
    _chunked(diffuse, encoded, steps)
    one, many, one_cpu, many_cpu, pickling = [], [], [], [], []
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        start, cpu = time.perf_counter(), time.process_time()
        (whole,) = diffuse.run([encoded])
        one.append(time.perf_counter() - start)
        one_cpu.append(time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        chunked, pickle_s, sizes = _chunked(diffuse, encoded, steps)
        many.append(time.perf_counter() - start)
        many_cpu.append(time.process_time() - cpu)
        pickling.append(pickle_s)
    one_s, many_s = statistics.median(one), statistics.median(many)
    cpu_s = statistics.median(one_cpu)
    boundaries = steps - 1
    return {
        "case": name, "model": model, "scheduler": type(diffuse.pipe.scheduler).__name__,
        "height": params.height, "width": params.width, "frames": params.num_frames, "steps": steps,
        "bytes": sizes,
        "one_call_ms": round(1000 * one_s, 2),
        "chunked_ms": round(1000 * many_s, 2),
        "per_step_ms": round(1000 * one_s / steps, 2),
        "boundary_ms": round(1000 * (many_s - one_s) / boundaries, 2),
        "one_call_cpu_ms": round(1000 * cpu_s, 2),
        "per_step_cpu_ms": round(1000 * cpu_s / steps, 2),
        "boundary_cpu_ms": round(1000 * (statistics.median(many_cpu) - cpu_s) / boundaries, 2),
        "boundary_pickle_ms": round(1000 * statistics.median(pickling) / boundaries, 3),
        "max_abs_diff": float(np.abs(chunked.tensors["latents"] - whole.tensors["latents"]).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cases", nargs="*", default=None, choices=sorted(CASES), help="default: all")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "chunk_boundary.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows, encoders = [], {}
    for name in args.cases or list(CASES):
        rows.append(measure(name, args.steps, args.repeats, encoders))
        print(f"measured {name}", flush=True)

    kb = lambda n: f"{n / 1024:.1f}"  # noqa: E731
    print(f"\n| case | scheduler | embeddings KiB | latents KiB | scheduler state KiB | rng KiB | pickled KiB "
          f"| one call ms ({args.steps} steps) | {args.steps} calls ms | per step ms | per boundary ms "
          f"| of it pickling ms | per step CPU ms | per boundary CPU ms | max abs diff |")
    print("|---" * 15 + "|")
    for r in rows:
        b = r["bytes"]
        print(f"| {r['case']} | {r['scheduler']} | {kb(b['embeddings'])} | {kb(b['latents'])} | "
              f"{kb(b['scheduler_state'])} | {kb(b['rng_state'])} | {kb(b['pickled_payload'])} | "
              f"{r['one_call_ms']:.1f} | {r['chunked_ms']:.1f} | {r['per_step_ms']:.1f} | {r['boundary_ms']:.1f} | "
              f"{r['boundary_pickle_ms']:.2f} | {r['per_step_cpu_ms']:.1f} | {r['boundary_cpu_ms']:.1f} | "
              f"{r['max_abs_diff']:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "steps": args.steps, "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
