"""The stage replica: one class, bound once per (stage, width) as `encode-w1`, `diffuse-w4`, ...

A replica builds one executor per served model in `__init__`, then runs payloads (numpy in,
numpy out). Concurrent calls are gathered by `@serve.batch` and split into same-shape groups,
each run as one executor batch in a worker thread so the replica's event loop stays free.
A width-k replica reserves k GPUs (`placement_group_bundles=[{"GPU": 1}] * k`, STRICT_PACK).
With real executors it runs each request on them with xfuser: the replica itself holds no GPU
(`num_gpus: 0`, it sits in bundle 0) and its executor starts k rank actors, rank r in bundle r.
With emulated executors the bundles are only the reservation.
When a payload is done the replica tells the controller, which frees the grant.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from trident_rs.errors import ConfigError
from trident_rs.executors.base import StageExecutor, StagePayload, build_executor
from trident_rs.serve.config import AppConfig, StageDeploymentConfig
from trident_rs.serve.routing import ROUTER_CLASS
from trident_rs.serve.scaling import autoscaling_config
from trident_rs.vocab import DeploymentKey, Stage

logger = logging.getLogger("ray.serve")


def _executor_options(cfg: AppConfig, model: str, dep: StageDeploymentConfig) -> dict[str, Any]:
    opts = dict(cfg.executor_options)
    kind = cfg.executor_kind(dep)
    if kind == "emulated":
        return {**opts, "width": dep.width, "time_scale": cfg.time_scale}
    if model in cfg.model_paths:
        opts["source"] = cfg.model_paths[model]
    if kind == "xfuser":
        opts["width"] = dep.width
        if cfg.multi_rank(dep):
            opts.pop("device", None)  # each rank uses its own GPU (or the CPU)
            # the replica's k bundles hold one GPU each; n models' rank groups share them
            opts["gpus_per_rank"] = 1.0 / len(cfg.models)
    return opts


def check_startup(cfg: AppConfig) -> None:
    """Fail the app build with `ConfigError` when a real width > 1 deployment cannot run here:
    xfuser missing, or (when Ray is up) no node with enough GPUs. Never at request time."""
    import ray

    from trident_rs.executors.xfuser_cpu import xfuser_installed

    cfg.check_multi_rank(xfuser_installed(), None)
    if not ray.is_initialized() or not any(cfg.multi_rank(d) for d in cfg.deployments):
        return
    deadline = time.monotonic() + cfg.gpu_wait_s
    while True:  # GPU nodes may still be joining (KubeRay, autoscaler): wait a little before failing
        gpus = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        try:
            return cfg.check_multi_rank(True, gpus)
        except ConfigError:
            if time.monotonic() >= deadline:
                raise
        time.sleep(2.0)


class StageReplica:
    """Runs `stage` of every configured model at `width`."""

    def __init__(self, config: dict, stage: Stage, width: int, controller: DeploymentHandle | None = None):
        self.config = AppConfig.parse(config)
        self.stage = stage
        self.width = width
        self.controller = controller
        dep = self.config.deployment(DeploymentKey(stage, width).name)
        kind = self.config.executor_kind(dep)
        self.executors: dict[str, StageExecutor] = {
            m: build_executor(kind, m, stage, **_executor_options(self.config, m, dep))
            for m in self.config.models
        }
        self._run_batch.set_max_batch_size(dep.max_batch)
        self._run_batch.set_batch_wait_timeout_s(dep.batch_wait_s)

    async def run(self, payload: StagePayload, grant: dict | None = None) -> StagePayload:
        """Run this stage on one payload; `grant` is the controller's dispatch decision."""
        try:
            return await self._run_batch(payload)
        finally:
            if grant is not None and grant.get("launch_id") is not None and self.controller is not None:
                await self._report_done(grant)

    async def _report_done(self, grant: dict) -> None:
        """Tell the controller before answering (so it frees the grant before the request's end
        is reported), but never wait longer than `faults.controller_timeout_s` for a controller
        that is restarting. Grants the ingress made itself (`launch_id` None) are not reported."""
        try:
            await asyncio.wait_for(self.controller.stage_done.remote(grant), self.config.faults.controller_timeout_s)
        except Exception as e:  # noqa: BLE001 - the controller is down: it has forgotten the grant anyway
            logger.warning("could not report %s of %s to the controller: %s", grant["stage"],
                           grant["request_id"], type(e).__name__)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _run_batch(self, payloads: list[StagePayload]) -> list[StagePayload | Exception]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(payloads):
            groups[(p.params.model, p.params.shape, p.params.steps)].append(i)
        out: list[Any] = [None] * len(payloads)
        for (model, _, _), idx in groups.items():
            batch = [payloads[i] for i in idx]
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.executors[model].run, batch)
            except Exception as e:  # one bad group must not fail the others in the batch
                results = [e] * len(batch)
            took = time.perf_counter() - t0
            for i, r in zip(idx, results):
                if isinstance(r, StagePayload):
                    r.meta[f"{self.stage}_wall_s"] = took
                    r.meta[f"{self.stage}_deployment"] = DeploymentKey(self.stage, self.width).name
                    r.meta[f"{self.stage}_batch"] = len(batch)
                out[i] = r
        return out

    def check_health(self) -> None:
        if not self.executors:
            raise RuntimeError("no executors")
        for executor in self.executors.values():  # a rank group broken mid-request: Serve restarts us
            check = getattr(executor, "check_health", None)
            if check is not None:
                check()


def stage_options(cfg: AppConfig, dep: StageDeploymentConfig) -> dict[str, Any]:
    """Serve deployment options of one (stage, width): name, GPUs, replica scaling."""
    opts: dict[str, Any] = {
        "name": dep.name,
        "max_ongoing_requests": max(8, 4 * dep.max_batch),
        "autoscaling_config": autoscaling_config(dep.replicas, cfg.max_replicas(dep)),
        "graceful_shutdown_timeout_s": 60,
        "request_router_config": {"request_router_class": ROUTER_CLASS},  # an idle replica, if any
    }
    actor: dict[str, Any] = {"num_cpus": cfg.replica_cpus}
    if cfg.reserves_gpus(dep):
        # a multi-rank replica holds no GPU itself: its k rank actors take the k bundles
        actor["num_gpus"] = 0 if cfg.multi_rank(dep) else 1
        if dep.width > 1:
            opts["placement_group_bundles"] = [{"GPU": 1, "CPU": cfg.replica_cpus}] + [{"GPU": 1}] * (dep.width - 1)
            opts["placement_group_strategy"] = "STRICT_PACK"
    opts["ray_actor_options"] = actor
    return opts


StageDeployment = serve.deployment(StageReplica)
