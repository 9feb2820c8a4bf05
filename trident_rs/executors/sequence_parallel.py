"""Diffuse at width k: one request on k devices with xDiT's (xfuser) sequence parallelism.

`build_executor("xfuser", model, "diffuse", width=k)` with k > 1 (`trident_rs.executors.parallel`
picks it) is `SequenceParallelDiffuseExecutor`:

- k rank actors (Ray), one per device. Inside a Serve replica they land in the replica's
  placement group, rank r in bundle r. Each rank is its own process because xfuser keeps its
  parallel and runtime state per process: one model per rank group.
- One torch.distributed group per executor: NCCL on GPUs, gloo on CPU (where
  `xfuser_cpu.apply_cpu_patches()` makes xfuser run), rendezvous on a free port of rank 0.
- Each rank wraps the diffuse-only diffusers pipeline in xfuser's pipeline class (Ulysses degree
  k, or CFG parallel 2 × Ulysses k/2 for true-CFG families) and runs the family's own diffuse
  call (`trident_rs.models.families`), so inputs and outputs are those of width 1.
- Every request goes to all ranks in the same order; the last rank holds the latents and its
  payloads are returned.

Everything that can be checked is checked at construction (xfuser installed, family supported,
heads divisible, enough devices), raising `ConfigError`: never at request time.
"""
from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from trident_rs.errors import ConfigError
from trident_rs.executors.base import StageExecutor, StagePayload
from trident_rs.models.families import FAMILIES, get_family
from trident_rs.models.spec import get_spec
from trident_rs.vocab import Stage

_RANK_OPTIONS = ("source", "dtype")  # single-device executor options the ranks take over


@dataclass(frozen=True)
class ParallelLayout:
    """How a width splits: width = cfg × ulysses × ring."""

    width: int
    ulysses: int
    ring: int = 1
    cfg: int = 1

    @classmethod
    def choose(cls, family: str, width: int, heads: int, cfg_parallel: bool | None = None) -> "ParallelLayout":
        """CFG parallel (2) for true-CFG families at even widths unless `cfg_parallel` is False;
        the rest is Ulysses over as many ranks as divide the heads, ring over the remainder."""
        xfuser_pipeline = get_family(family).xfuser
        if xfuser_pipeline is None:
            have = sorted(name for name, f in FAMILIES.items() if f.xfuser is not None)
            raise ConfigError(f"no sequence-parallel pipeline for family {family!r}; have {have}")
        batches_cfg = xfuser_pipeline.batches_cfg
        if cfg_parallel and not batches_cfg:
            raise ConfigError(f"{family} has no CFG batch to split; set cfg_parallel to false")
        use_cfg = batches_cfg and width % 2 == 0 and cfg_parallel is not False
        cfg = 2 if use_cfg else 1
        sp = width // cfg
        ulysses = math.gcd(heads, sp)
        return cls(width=width, ulysses=ulysses, ring=sp // ulysses, cfg=cfg)


class _XFuserCallAdapter:
    """Presents an xfuser pipeline to the family stage code as if it were the diffusers one.

    Ranks that hold no result get an empty batch back (the family code turns it into no
    payloads). xfuser's true-CFG pipelines always run the CFG batch, so guidance <= 1 (CFG off in
    diffusers) runs with the positive prompt as the negative one: uncond == cond, and
    uncond + g · (cond − uncond) is exactly cond, as diffusers computes without CFG.
    """

    # Sequence parallelism splits the latents (and any per-step scheduler tensors) across ranks.
    shards_latents = True

    def __init__(self, pipeline: Any, batches_cfg: bool):
        self._pipeline = pipeline
        self._batches_cfg = batches_cfg

    @property
    def diffusers_pipeline(self) -> Any:
        """The wrapped diffusers pipeline (whose `scheduler` xfuser's loop reads)."""
        return self._pipeline.module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, **kwargs: Any):
        import torch

        if self._batches_cfg and kwargs.get("guidance_scale", 0) <= 1:
            kwargs["guidance_scale"] = 2.0
            for name in ("prompt_embeds", "pooled_prompt_embeds"):
                if name in kwargs:
                    kwargs["negative_" + name] = kwargs[name]
        out = self._pipeline(**kwargs)
        # Not the rank that holds the latents: None (SD3, FLUX) or a list of Nones (CogVideoX).
        if out is None or not isinstance(out[0], torch.Tensor):
            return (torch.empty(0),)
        return out


class RankWorker:
    """One rank of a width-k group (a Ray actor): joins the group, builds the xfuser pipeline,
    runs each batch the executor hands to all ranks."""

    def __init__(self, rank: int):
        self.rank = rank
        self.executor = None

    def rendezvous_address(self) -> tuple[str, int]:
        """This process's node address and a free port on it (asked of rank 0)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, model: str, stage: Stage, layout: ParallelLayout, address: tuple[str, int],
              options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Join the group; build the diffuse pipeline under xfuser, or shard the VAE decoder
        over the group (DistVAE) for decode."""
        import torch

        from trident_rs.executors.diffusers_stages import DiffusersStageExecutor
        from trident_rs.models.loading import load_pipeline

        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(0)  # Ray shows each rank only its own GPU
        backend = "nccl" if on_gpu else "gloo"
        torch.distributed.init_process_group(
            backend=backend, init_method=f"tcp://{address[0]}:{address[1]}", rank=self.rank,
            world_size=layout.width, timeout=timedelta(seconds=timeout_s),
        )
        pipe = load_pipeline(model, source=options.get("source"), dtype=options.get("dtype"),
                             device="cuda:0" if on_gpu else "cpu", stage=stage)
        if stage == "diffuse":
            runner = self._xfuser_pipeline(model, pipe, layout, backend)
        else:
            from distvae.vae import parallelize_decoder

            parallelize_decoder(pipe.vae, torch.distributed.group.WORLD)
            runner = pipe
        self.executor = DiffusersStageExecutor(model, stage, pipeline=runner)
        return {"rank": self.rank, "backend": backend, "device": str(pipe.device), "pid": os.getpid()}

    def _xfuser_pipeline(self, model: str, pipe: Any, layout: ParallelLayout, backend: str) -> Any:
        from trident_rs.executors.xfuser_cpu import apply_cpu_patches

        apply_cpu_patches()  # a no-op on GPUs (plain `import xfuser`)
        import xfuser
        from xfuser.core.distributed import init_distributed_environment

        init_distributed_environment(rank=self.rank, world_size=layout.width, local_rank=0, backend=backend)
        engine_config, _ = xfuser.xFuserArgs(
            model=model, ulysses_degree=layout.ulysses, ring_degree=layout.ring,
            use_cfg_parallel=layout.cfg == 2,
        ).create_config()
        engine_config.runtime_config.dtype = pipe.transformer.dtype  # xfuser defaults to fp16
        xfuser_pipeline = get_family(get_spec(model).family).xfuser
        wrapped = getattr(xfuser, xfuser_pipeline.class_name)(pipe, engine_config)  # no prepare_run: it needs encoders
        return _XFuserCallAdapter(wrapped, xfuser_pipeline.batches_cfg)

    def run(self, batch: list[StagePayload]) -> list[StagePayload | None]:
        return self.executor.run(batch)

    def stop(self) -> None:
        import torch

        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _placement_group():
    import ray

    return ray.util.get_current_placement_group()


def check_devices(width: int, gpus_per_rank: float, stage: Stage = "diffuse") -> None:
    """Raise `ConfigError` unless `width` ranks can each get `gpus_per_rank` GPUs (real or
    Ray's fake ones): in the replica's placement group if there is one, else in the cluster."""
    import ray

    if gpus_per_rank <= 0:
        return
    pg = _placement_group()
    if pg is not None:
        bundles = pg.bundle_specs
        free = [b.get("GPU", 0) for b in bundles[:width]]
        if free:  # a Serve replica runs in bundle 0: what it holds itself is not free for rank 0
            free[0] -= ray.get_runtime_context().get_assigned_resources().get("GPU", 0)
        have = sum(1 for g in free if g >= gpus_per_rank)
        if have < width:
            raise ConfigError(
                f"{stage} at width {width} needs {gpus_per_rank:g} GPU for each of {width} ranks in its "
                f"replica's placement group; free per bundle: {free} (deploy with "
                f"placement_group_bundles=[{{'GPU': 1}}] * {width} and a replica that holds no GPU "
                f"itself: ray_actor_options num_gpus=0)")
        return
    have = ray.cluster_resources().get("GPU", 0)
    if have < width * gpus_per_rank:
        raise ConfigError(
            f"{stage} at width {width} needs {width} GPUs; the Ray cluster has {have:g} "
            f"(for CPU tests start Ray with fake GPUs: ray.init(num_gpus={width}))")


def check_xfuser(width: int) -> None:
    from trident_rs.executors.xfuser_cpu import xfuser_installed

    if not xfuser_installed():
        raise ConfigError(
            f"diffuse at width {width} needs xfuser (xDiT), which is not installed: "
            "pip install 'trident_rs[gpu]' (or pip install xfuser)")


class RankGroupExecutor(StageExecutor):
    """One stage of one model on `width` rank actors that form one process group.

    Every batch goes to all ranks in the same order; the last rank's payloads are returned.
    Options: `source`, `dtype` (as the single-device executor), `gpus_per_rank` (GPUs each rank
    asks Ray for; default 1 where the cluster has GPUs, real or fake, else 0; 1/n when n models
    share a replica), `timeout_s` (rendezvous and collective timeout), `place_timeout_s` (how long
    rank actors may wait for their GPUs before start-up fails).
    """

    def __init__(self, model: str, stage: Stage, layout: ParallelLayout, *, gpus_per_rank: float | None = None,
                 timeout_s: float = 600.0, place_timeout_s: float = 120.0, **options: Any):
        import ray

        unknown = set(options) - set(_RANK_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown xfuser executor options {sorted(unknown)}")
        self.model, self.stage, self.layout, self.width = model, stage, layout, layout.width
        if not ray.is_initialized():  # outside Serve: start or join a local cluster, as .remote() would
            ray.init()
        if gpus_per_rank is None:
            gpus_per_rank = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        check_devices(self.width, gpus_per_rank, stage)
        self._lock = threading.Lock()
        self.ranks = self._start_ranks(options, gpus_per_rank, timeout_s, place_timeout_s)

    def _start_ranks(self, options: dict[str, Any], gpus_per_rank: float, timeout_s: float,
                     place_timeout_s: float) -> list:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = _placement_group()
        actor_class = ray.remote(RankWorker)
        ranks = []
        for r in range(self.width):
            strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r) if pg else None
            ranks.append(actor_class.options(
                num_cpus=0, num_gpus=gpus_per_rank, scheduling_strategy=strategy,
                name=None, max_concurrency=1,
            ).remote(r))
        try:
            placed = [a.rendezvous_address.remote() for a in ranks]
            ready, _ = ray.wait(placed, num_returns=len(placed), timeout=place_timeout_s)
            if len(ready) < len(placed):
                raise ConfigError(f"{self.model} {self.stage} width {self.width}: {len(placed) - len(ready)} "
                                  f"rank(s) could not be placed in {place_timeout_s:g} s (each needs "
                                  f"{gpus_per_rank:g} GPU)")
            address = ray.get(placed[0])
            pending = [a.start.remote(self.model, self.stage, self.layout, address, options, timeout_s)
                       for a in ranks]
            deadline = time.monotonic() + timeout_s
            self.rank_info = []
            while pending:  # fail fast: the first rank that fails ends the start
                done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not done:
                    raise ConfigError(f"{self.model} {self.stage} width {self.width}: ranks did not start "
                                      f"in {timeout_s:g} s")
                self.rank_info.append(ray.get(done[0]))
        except Exception:
            for a in ranks:
                ray.kill(a)
            raise
        return ranks

    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        import ray

        self.check_health()
        batch_ref = ray.put(batch)
        with self._lock:  # every rank must see the batches in the same order
            refs = [a.run.remote(batch_ref) for a in self.ranks]
        try:
            results = self._gather(refs)
        except Exception as e:
            if not isinstance(e, ray.exceptions.RayTaskError) or _is_request_error(e):
                raise
            self.broken = f"rank failed: {e}"  # its peers may be stuck in a collective
            raise
        out = results[-1]  # the last rank of the group holds the latents
        if len(out) != len(batch) or any(p is None for p in out):
            holders = [r for r, res in enumerate(results) if res and all(p is not None for p in res)]
            if not holders:
                raise RuntimeError(f"{self.model} {self.stage} width {self.width}: no rank returned a result")
            out = results[holders[-1]]
        for p in out:
            p.meta[f"{self.stage}_width"] = self.width
        return out

    @staticmethod
    def _gather(refs: list) -> list:
        """All ranks' results; raises as soon as any rank fails (not after the others time out)."""
        import ray

        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])  # raises this rank's error
        return ray.get(refs)

    def check_health(self) -> None:
        """Raise if a rank failed mid-request: the group must be rebuilt (restart the replica)."""
        if getattr(self, "broken", None):
            raise RuntimeError(f"{self.model} {self.stage} width {self.width}: {self.broken}")

    def close(self) -> None:
        import ray

        for a in getattr(self, "ranks", []):
            ray.kill(a)
        self.ranks = []


class SequenceParallelDiffuseExecutor(RankGroupExecutor):
    """Diffuse at `width` with xfuser: Ulysses / ring / CFG parallel as `ParallelLayout.choose`
    decides (`cfg_parallel`: None = where it fits). Other options as `RankGroupExecutor`."""

    def __init__(self, model: str, width: int, *, cfg_parallel: bool | None = None, **options: Any):
        if width < 2:
            raise ConfigError(f"a sequence-parallel executor needs width >= 2, got {width}")
        unknown = set(options) - set(_RANK_OPTIONS) - {"gpus_per_rank", "timeout_s", "place_timeout_s"}
        if unknown:
            raise ConfigError(f"unknown xfuser executor options {sorted(unknown)}")
        spec = get_spec(model)
        check_xfuser(width)
        heads = _attention_heads(model, options.get("source"))
        layout = ParallelLayout.choose(spec.family, width, heads, cfg_parallel)
        super().__init__(model, "diffuse", layout, **options)

    def run(self, batch: list[StagePayload]) -> list[StagePayload]:
        from trident_rs.errors import InvalidRequestError

        if any(p.params.edit for p in batch):  # the policy never grants it (`Request.widest`)
            raise InvalidRequestError("edit", f"image edits run diffuse at width 1; this replica runs width {self.width}")
        out = super().run(batch)
        for p in out:
            p.meta["diffuse_layout"] = f"cfg{self.layout.cfg}xulysses{self.layout.ulysses}xring{self.layout.ring}"
        return out


def _is_request_error(error: Exception) -> bool:
    """A bad request fails on every rank alike before any collective: the group stays usable."""
    from trident_rs.errors import InvalidRequestError, UnknownModelError

    kinds = (InvalidRequestError, UnknownModelError)
    return isinstance(error, kinds) or isinstance(getattr(error, "cause", None), kinds)


def _attention_heads(model: str, source: str | None) -> int:
    """The transformer's attention heads, from its config file (no weights loaded)."""
    import json
    from pathlib import Path

    from trident_rs.models.loading import model_source

    path = model_source(get_spec(model), source)
    local = Path(path) / "transformer" / "config.json"
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(path, "transformer/config.json"))
    return int(json.loads(local.read_text())["num_attention_heads"])
