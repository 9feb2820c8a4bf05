"""The stage replica: one class, bound once per (stage, width) as `encode-w1`, `diffuse-w4`, ...

A replica builds one executor per served model in `__init__`, then runs payloads (numpy in,
numpy out). Concurrent calls are gathered by `@serve.batch` and split into same-shape groups,
each run as one executor batch in a worker thread so the replica's event loop stays free.
A width-k replica reserves k GPUs (`placement_group_bundles=[{"GPU": 1}] * k`, STRICT_PACK).
With real executors it runs each request on them with xfuser: the replica itself holds no GPU
(`num_gpus: 0`, it sits in bundle 0) and its executor starts k rank actors, rank r in bundle r.
With emulated executors the bundles are only the reservation.

Calls carry the controller's `Grant`. The stage's router sends a granted call to the replica the
grant names (`trident_rs.serve.routing`); a replica that gets a call granted to another one
refuses it (`WrongReplicaError`: the ingress has it granted again), so it never runs silently
elsewhere. A launch of `batch` > 1 requests is gathered by its batch id and run as one executor
batch as soon as all its members are here (at most `batch_wait_s`, at least 50 ms, after the
first); a launch of one runs at once. Calls without a grant go through `@serve.batch`.
A diffuse grant of a chunk (`Grant.steps`) runs those steps of the payload it gets (the chunk
state the ingress kept from the last boundary, `trident_rs.models.chunking`); a grant without
steps given a payload that carries a chunk state runs the steps left (granted on the last plan).
Replicas never call the controller on a request's path: the ingress reports finished stages.
Under a shared-pool policy (`AppConfig.pool`) replicas are slots that hold no GPU in Ray and may
run several launches at once (on the GPU ids each grant names); emulated ones get a thread each.
Partial images (`partial_images`, diffuse only) wait here in a small mailbox per request id until
the ingress collects them (`previews(request_id, grant)`, routed by the grant like `run`).
They register with it when they start (replica id, Ray node, GPU ids), heartbeat every
`HEARTBEAT_S`, and deregister when Serve stops them (`trident_rs.serve.registry`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from trident_rs.errors import ConfigError
from trident_rs.executors.base import StageExecutor, StagePayload, build_executor
from trident_rs.models.chunking import STEP
from trident_rs.policy.adapters import ADAPTER_LOAD_S
from trident_rs.serve.config import AppConfig, StageDeploymentConfig
from trident_rs.serve.grant import Grant, WrongReplicaError
from trident_rs.serve.registry import FIRST_REGISTER_S, HEARTBEAT_S
from trident_rs.serve.routing import ROUTER_CLASS
from trident_rs.serve.scaling import autoscaling_config
from trident_rs.vocab import DeploymentKey, Stage

logger = logging.getLogger("ray.serve")


def _executor_options(cfg: AppConfig, model: str, dep: StageDeploymentConfig) -> dict[str, Any]:
    opts = dict(cfg.executor_options)
    kind = cfg.executor_kind(dep)
    if kind == "emulated":
        out = {**opts, "width": dep.width, "time_scale": cfg.time_scale}
        if "chunk_boundary_s" in cfg.executor_options:  # else the executor's default (the simulator's)
            out["chunk_boundary_s"] = float(cfg.executor_options["chunk_boundary_s"])
        if cfg.loras and dep.stage == "diffuse":  # sleeps for adapter loads as the policy charges them
            out.update(lora_slots=cfg.lora_slots,
                       adapter_load_s=float(cfg.policy.options.get("adapter_load_s", ADAPTER_LOAD_S)))
        return out
    if model in cfg.model_paths:
        opts["source"] = cfg.model_paths[model]
    if cfg.loras and dep.stage != "decode" and not cfg.multi_rank(dep):  # LoRAs: width-1 executors only
        opts.update(loras=dict(cfg.loras), lora_slots=cfg.lora_slots)
    if kind == "xfuser":
        opts["width"] = dep.width
        if cfg.multi_rank(dep):
            opts.pop("keep_float", None)  # a decode option (float frames too); rank groups do not take it
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
        self.name = DeploymentKey(stage, width).name
        dep = self.config.deployment(self.name)
        kind = self.config.executor_kind(dep)
        self.mailbox = PreviewMailbox()
        previews = stage == "diffuse" and (kind == "diffusers" or (kind == "xfuser" and width == 1))
        opts = {"on_preview": self.mailbox.put} if previews else {}
        self.executors: dict[str, StageExecutor] = {
            m: build_executor(kind, m, stage, **_executor_options(self.config, m, dep), **opts)
            for m in self.config.models
        }
        self._run_batch.set_max_batch_size(dep.max_batch)
        self._run_batch.set_batch_wait_timeout_s(dep.batch_wait_s)
        self.gather_s = max(dep.batch_wait_s, 0.05)
        self.batches: dict[int, tuple[list[tuple[StagePayload, asyncio.Future]], asyncio.TimerHandle | None]] = {}
        self.replica_id, self.node_id, self.gpu_ids = _whoami()
        # emulated pool slots run many launches at once, each sleeping in a thread of its own
        self._threads = ThreadPoolExecutor(64, thread_name_prefix=self.name) if kind == "emulated" else None
        self._heartbeat: asyncio.Task | None = None
        if controller is not None and self.replica_id is not None:
            try:
                self._heartbeat = asyncio.get_running_loop().create_task(self._register_loop())
            except RuntimeError:  # no event loop (a plain constructor call in a test)
                self._heartbeat = None

    async def _register_loop(self) -> None:
        """Register (once Serve's routers can reach this replica) and heartbeat: a restarted
        controller relearns this replica within one beat."""
        await asyncio.sleep(FIRST_REGISTER_S)
        while True:
            try:
                await asyncio.wait_for(self.controller.register.remote(
                    self.replica_id, self.name, self.node_id, list(self.gpu_ids)), self.config.faults.controller_timeout_s)
            except Exception as e:  # noqa: BLE001 - the controller is restarting: the next beat
                logger.info("could not register with the controller: %s", type(e).__name__)
            await asyncio.sleep(HEARTBEAT_S)

    async def __del__(self) -> None:
        """Serve stops this replica: leave the registry (a missed heartbeat would do it too)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self.controller is not None and self.replica_id is not None:
            try:
                await asyncio.wait_for(self.controller.deregister.remote(self.replica_id), 2.0)
            except Exception:  # noqa: BLE001 - it will expire
                pass

    async def run(self, payload: StagePayload, grant: Grant | None = None) -> StagePayload:
        """Run this stage on one payload; `grant` is the controller's dispatch decision."""
        self._check_adapters(payload)
        if self.stage == "diffuse":
            payload = with_step_range(payload, getattr(grant, "steps", None))
        if grant is None or getattr(grant, "batch_id", None) is None:
            return await self._run_batch(payload)  # no launch to follow: Serve's batching
        if grant.replica_id is not None and self.replica_id is not None and grant.replica_id != self.replica_id:
            raise WrongReplicaError(grant, self.replica_id)
        if grant.batch <= 1:
            return self._one(await self._execute([payload]), 0)
        return await self._gather(payload, grant)

    def _check_adapters(self, payload: StagePayload) -> None:
        """Refuse a LoRA request that this replica would run without its adapters (a sequence-
        parallel width > 1 diffuse or encode replica has no adapter support yet)."""
        if not payload.params.lora or self.stage == "decode" or self.config.executor == "emulated":
            return
        if getattr(self.executors.get(payload.params.model), "adapters", None) is None:
            raise ConfigError(f"{self.name} cannot apply LoRA adapters (width-1 diffusers replicas only)")

    async def _gather(self, payload: StagePayload, grant: Grant) -> StagePayload:
        """Wait for the other members of the launch, then run it as one batch."""
        fut = asyncio.get_running_loop().create_future()
        members, timer = self.batches.get(grant.batch_id, ([], None))
        members.append((payload, fut))
        if timer is None:
            timer = asyncio.get_running_loop().call_later(self.gather_s, self._launch, grant.batch_id)
        self.batches[grant.batch_id] = (members, timer)
        if len(members) >= grant.batch:
            self._launch(grant.batch_id)
        return await fut

    def _launch(self, batch_id: int) -> None:
        members, timer = self.batches.pop(batch_id, ([], None))
        if timer is not None:
            timer.cancel()
        if members:
            asyncio.get_running_loop().create_task(self._run_members(members))

    async def _run_members(self, members: list[tuple[StagePayload, asyncio.Future]]) -> None:
        results = await self._execute([p for p, _ in members])
        for (_, fut), r in zip(members, results):
            if fut.done():
                continue
            if isinstance(r, Exception):
                fut.set_exception(r)
            else:
                fut.set_result(r)

    @staticmethod
    def _one(results: list, i: int) -> StagePayload:
        if isinstance(results[i], Exception):
            raise results[i]
        return results[i]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def _run_batch(self, payloads: list[StagePayload]) -> list[StagePayload | Exception]:
        return await self._execute(payloads)

    async def _execute(self, payloads: list[StagePayload]) -> list[StagePayload | Exception]:
        """Run payloads as same-shape executor batches in a worker thread (the event loop stays free)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(payloads):
            groups[(p.params.model, p.params.shape, p.params.steps, p.step_range)].append(i)
        out: list[Any] = [None] * len(payloads)
        for (model, *_), idx in groups.items():
            batch = [payloads[i] for i in idx]
            t0 = time.perf_counter()
            try:
                if self._threads is not None:
                    results = await asyncio.get_running_loop().run_in_executor(
                        self._threads, self.executors[model].run, batch)
                else:
                    results = await asyncio.to_thread(self.executors[model].run, batch)
            except Exception as e:  # one bad group must not fail the others in the batch
                results = [e] * len(batch)
            took = time.perf_counter() - t0
            for i, r in zip(idx, results):
                if isinstance(r, StagePayload):
                    r.meta[f"{self.stage}_wall_s"] = took
                    r.meta[f"{self.stage}_deployment"] = self.name
                    r.meta[f"{self.stage}_batch"] = len(batch)
                    if payloads[i].step_range is not None:  # the chunks a request ran, where
                        a, b = payloads[i].step_range
                        r.meta["diffuse_chunks"] = [*r.meta.get("diffuse_chunks", []), [a, b, self.name]]
                out[i] = r
        return out

    def adapter_stats(self) -> dict[str, Any]:
        """Per model: the LoRA adapters loaded here (LRU order), hits, loads, evictions and the
        seconds spent loading and unloading them (`trident_rs.models.adapters.AdapterStats`)."""
        out = {}
        for model, executor in self.executors.items():
            stats = getattr(executor, "adapter_stats", lambda: None)()
            if stats is not None:
                out[model] = stats
        return out

    async def previews(self, request_id: str, grant: Grant | None = None, drop: bool = False) -> list:
        """The partial images of `request_id` made so far, as [(index, PNG bytes)], each once;
        `drop`: forget the request (its diffuse is done). `grant` only routes the call here."""
        return self.mailbox.take(request_id, drop)

    def check_health(self) -> None:
        if not self.executors:
            raise RuntimeError("no executors")
        for executor in self.executors.values():  # a rank group broken mid-request: Serve restarts us
            check = getattr(executor, "check_health", None)
            if check is not None:
                check()


def with_step_range(payload: StagePayload, steps: tuple[int, int] | None) -> StagePayload:
    """The diffuse payload to run for a grant's `steps` (a chunk [a, b) of the request's denoising
    steps); without steps, a payload carrying a chunk state runs the steps it has left."""
    if steps is None:
        at = payload.tensors.get(STEP)
        if at is None or payload.step_range is not None:
            return payload
        steps = (int(at), payload.params.steps or 0)
    return dataclasses.replace(payload, step_range=(int(steps[0]), int(steps[1])))


class PreviewMailbox:
    """Partial images per request id, put by the executor's thread, taken by the ingress. Holds
    at most `max_requests` requests (the oldest go first: an ingress that never came back)."""

    def __init__(self, max_requests: int = 256):
        self.max_requests = max_requests
        self.boxes: dict[str, list[tuple[int, bytes]]] = {}
        self.lock = threading.Lock()

    def put(self, request_id: str, index: int, png: bytes) -> None:
        with self.lock:
            self.boxes.setdefault(request_id, []).append((index, png))
            while len(self.boxes) > self.max_requests:
                self.boxes.pop(next(iter(self.boxes)))

    def take(self, request_id: str, drop: bool = False) -> list[tuple[int, bytes]]:
        with self.lock:
            got = self.boxes.pop(request_id, [])
            if got and not drop:
                self.boxes[request_id] = []
            return got


def _whoami() -> tuple[str | None, str, tuple[str, ...]]:
    """(Serve replica id, Ray node id, GPU ids) of this replica; (None, "", ()) outside Serve."""
    try:
        import ray

        rid = serve.get_replica_context().replica_id.unique_id
        return rid, ray.get_runtime_context().get_node_id(), tuple(str(g) for g in ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - not in a replica (tests build the class directly)
        return None, "", ()


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
