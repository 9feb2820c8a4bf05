"""Bytes a request's tensors take between stages (and between diffuse chunks): what a runtime
moves over PCIe or the network, and what a paused request keeps in host memory; and the time
each launch and each chunk boundary add on the Serve runtime. The simulator charges these and
the policies predict with them."""
from __future__ import annotations

from trident_rs.models.spec import REGISTRY as MODEL_SPECS
from trident_rs.vocab import Shape

TEXT_EMBEDDING_BYTES = 512 * 4096 * 2.0  # T5-XXL prompt embeddings, bf16
# Measured on the Serve runtime (benchmarks/RESULTS.md, "Serve runtime overhead"): a stage call
# through a DeploymentHandle costs ~13 ms more than the stage itself, and a request pays ~30 ms
# more at the ingress (validation, admission, the controller's submit and finish) on top of its
# stage hops (69 ms for a zero-work request with three hops).
SERVE_HOP_OVERHEAD_S = 0.013
SERVE_REQUEST_OVERHEAD_S = 0.030
# A diffuse chunk that resumes a request (steps [a, b) with a > 0) restores its latents and
# solver state and re-enters the pipeline's loop. benchmarks/chunk_boundary.py measures 3-8 ms
# of CPU per boundary on the tiny models (pickling 0.2-0.3 ms of it; the rest is the pipeline
# call's fixed cost); charged at 20 ms, on top of the hop overhead every launch pays, for the
# larger latents and embeddings of real shapes (~10 MB, a few ms over PCIe).
CHUNK_BOUNDARY_S = 0.02


def latent_bytes(model: str, height: int, width: int, frames: int) -> float:
    """bf16 latent of one request: latent pixels × 16 channels × 2 bytes."""
    spec = MODEL_SPECS.get(model)
    scale, tc = (spec.vae_scale, spec.temporal_compression) if spec else (8, 4)
    lat_frames = 1 if frames <= 1 else (frames - 1) // tc + 1
    return (height // scale) * (width // scale) * lat_frames * 16 * 2.0


def chunk_state_bytes(model: str, shape: Shape) -> float:
    """What a paused diffuse holds between chunks: its latents, a multistep solver's history
    (a few latents more; counted as two) and the prompt embeddings."""
    return 3 * latent_bytes(model, shape.height, shape.width, shape.frames) + TEXT_EMBEDDING_BYTES
