"""Local demo: one tiny-sd3 image through three separately built stage executors.

`python -m trident_rs.demo` (what `make demo` runs until the Ray Serve runtime takes over).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def run_local_demo(out: str | Path = "out/demo.png", model: str = "tiny-sd3",
                   prompt: str = "a red cube on a blue sphere", size: int = 64, steps: int = 4,
                   seed: int = 0) -> Path:
    """Generate one image, write it to `out`, print the path and per-stage times; returns the path."""
    from trident_rs.media import write_media
    from trident_rs.pipeline_runner import LocalPipeline
    from trident_rs.request import GenerationParams

    params = GenerationParams(model=model, prompt=prompt, height=size, width=size, steps=steps, seed=seed).resolved()
    start = time.perf_counter()
    runner = LocalPipeline(model)  # encode, diffuse and decode executors, each with its own modules
    loaded = time.perf_counter() - start
    (payload,) = runner.run([params])
    path = write_media(payload.tensors["frames"], out)
    print(f"wrote {path.resolve()}  ({model}, {size}x{size}, {steps} steps, seed {seed})")
    print(f"  load executors: {1000 * loaded:.0f} ms")
    for stage, seconds in payload.meta["timings_s"].items():
        print(f"  {stage:8s}: {1000 * seconds:.0f} ms")
    return path


if __name__ == "__main__":
    run_local_demo(*sys.argv[1:2])
