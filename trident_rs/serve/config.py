"""The serve application's configuration: one pydantic schema for YAML `args`, CLI and Python.

    build_app({"models": ["tiny-sd3"], "executor": "diffusers", ...})

Everything is validated up front; a bad config raises `ConfigError` with the reason.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, ValidationError, model_validator

from trident_rs.errors import ConfigError
from trident_rs.models.spec import REGISTRY, get_spec
from trident_rs.policy.types import Cluster
from trident_rs.vocab import STAGES, DeploymentKey, Stage


class StageDeploymentConfig(BaseModel):
    """One Serve deployment: a stage at a width, e.g. diffuse at width 4 -> `diffuse-w4`."""

    model_config = ConfigDict(extra="forbid")

    stage: Stage
    width: int = Field(1, ge=1, le=64)
    replicas: int = Field(1, ge=0, description="initial replica count (the plan takes over)")
    max_replicas: int | None = Field(None, ge=1, description="default: GPUs / width (at least 1)")
    max_batch: int = Field(4, ge=1, description="largest same-shape batch one call runs")
    batch_wait_s: float = Field(0.005, ge=0.0)

    @property
    def name(self) -> str:
        return DeploymentKey(self.stage, self.width).name


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    gpu_memory_gb: float = Field(48.0, gt=0)
    gpu_name: str = "L20"

    def to_cluster(self) -> Cluster:
        return Cluster(self.nodes, self.gpus_per_node, self.gpu_memory_gb, self.gpu_name)


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("trident", description="'trident' (falls back to 'greedy' if absent) or 'greedy'")
    options: dict[str, Any] = Field(default_factory=dict)
    tick_s: float = Field(0.5, gt=0, description="how often the controller re-runs the policy unprompted")


class LimitsConfig(BaseModel):
    """Request limits at the ingress (on top of each model's own spec limits)."""

    model_config = ConfigDict(extra="forbid")

    max_n: int = Field(4, ge=1, description="images per /v1/images/generations call")
    max_video_jobs: int = Field(64, ge=1, description="video jobs kept for polling and GET /v1/videos (finished "
                                "ones dropped first; when all are running a new one gets 429)")
    request_timeout_s: float = Field(600.0, gt=0, description="longer requests are cancelled -> 504")
    # -- issue 8: enforced by trident_rs.serve.limits / admission / auth ----------------------------
    max_body_bytes: int = Field(1 << 20, ge=256, description="larger request bodies get 413")
    max_prompt_chars: int | None = Field(None, ge=1, description="None: each model's own limit")
    max_steps: int | None = Field(None, ge=1, description="None: each model's own limit")
    max_frames: int | None = Field(None, ge=1, description="None: each model's own limit")
    max_size: int | None = Field(None, ge=8, description="largest height or width; None: the model's")
    max_queue_per_model: int = Field(64, ge=1, description="accepted-not-finished requests per model; more get 429")
    admission: Literal["best_effort", "reject"] = Field(
        "best_effort", description="'reject': 429 a request whose SLO the current load cannot meet")
    admission_servers: int | None = Field(
        None, ge=1, description="parallel servers the SLO prediction assumes (None: configured diffuse replicas)")
    api_keys: list[str] = Field(default_factory=list, description="bearer tokens (plus env TRIDENT_API_KEYS); empty: open")
    max_loras: int = Field(4, ge=0, description="LoRA adapters one request may apply together; more get 422")
    # -- issue 18: idempotency (trident_rs.serve.idempotency) -------------------------------------------
    idempotency_ttl_s: float = Field(3600.0, gt=0, description="how long a repeated Idempotency-Key (or "
                                     "X-Request-Id) returns the first call's job or result")
    idempotency_keys: int = Field(1000, ge=1, description="keys remembered (least recent dropped first)")
    idempotency_bytes: int = Field(256 << 20, ge=0, description="bytes of remembered results (b64 images "
                                   "and MP4s); least recent dropped first")


class FilesConfig(BaseModel):
    """Where `response_format: "url"` results and video contents are stored (trident_rs.serve.files),
    served at `GET /v1/files/{id}/content`."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(None, description="an fsspec URL: a local directory (default <tmp>/trident_rs_files), "
                            "s3://bucket/prefix (s3fs), gs://bucket/prefix (gcsfs), ...")
    expires_after_s: float | None = Field(3600.0, gt=0, description="stored files are removed this long after "
                                          "they were written (then 410); None: kept")
    public_url: str | None = Field(None, description="base of the URLs handed out, e.g. "
                                   "'https://gen.example.com' (default: the URL the request came in on)")
    sweep_s: float = Field(60.0, gt=0, description="how often expired files are looked for and removed")


class FaultsConfig(BaseModel):
    """How the ingress survives dying replicas (trident_rs.serve.stage_retry, .controller_link)."""

    model_config = ConfigDict(extra="forbid")

    stage_retries: int = Field(2, ge=0, description="re-runs of a stage whose replica died, from the previous "
                               "stage's result; then HTTP 503")
    retry_backoff_s: float = Field(0.25, ge=0, description="wait before the first re-run, doubled each time")
    controller_timeout_s: float = Field(2.0, gt=0, description="a submit the controller does not answer in "
                                        "this time puts the ingress on the last plan; replicas wait no longer "
                                        "than this to report a finished stage")
    controller_probe_s: float = Field(5.0, gt=0, description="while the controller is down, try it again "
                                      "after this long")


class AppConfig(BaseModel):
    """The whole application: which models, which executors, which deployments, which policy."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["tiny-sd3"], min_length=1)
    executor: Literal["diffusers", "xfuser", "emulated"] = Field(
        "diffusers",
        description="'diffusers': real executors, width-1 replicas on diffusers and width > 1 on xfuser "
        "(one request on k ranks); 'xfuser': every replica through the xfuser module (adds memory-aware "
        "tiled decode at width 1); 'emulated': sleep for the cost model's time",
    )
    executor_options: dict[str, Any] = Field(default_factory=dict, description="passed to make_executor")
    model_paths: dict[str, str] = Field(
        default_factory=dict, description="model name -> local directory or hub id overriding the spec's source"
    )
    time_scale: float = Field(1.0, gt=0, description="emulated executors sleep predicted time × this")
    loras: dict[str, str] = Field(default_factory=dict, description="LoRA adapters requests may name: name -> "
                                  "local directory/file or hub id (diffusers' load_lora_weights)")
    lora_slots: int = Field(4, ge=1, description="adapters each encode/diffuse replica keeps loaded (LRU)")
    deployments: list[StageDeploymentConfig] = Field(
        default_factory=lambda: [StageDeploymentConfig(stage=s) for s in STAGES]
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    reserve_gpus: bool = Field(
        True, description="stage replicas reserve `width` (fake or real) GPUs; real width > 1 replicas "
        "always do (their ranks run on them)")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    slo_scale: float = Field(4.0, gt=0, description="deadline = slo_scale × predicted latency at width 1")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    replica_cpus: float = Field(0.0, ge=0, description="num_cpus per stage replica (0 lets many share 2 cores)")
    control_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Ray custom resources the Ingress and Controller replicas require, "
        "e.g. {\"head\": 0.01} with the head started `--resources '{\"head\": 1}'`: keeps the request "
        "path on a node that is not lost with the GPU nodes")
    gpu_wait_s: float = Field(
        30.0, ge=0, description="app build waits this long for a Ray node with the GPUs the widest real "
        "width > 1 deployment needs (nodes still joining) before failing with ConfigError")

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        for m in self.models:
            if m not in REGISTRY:
                raise ValueError(f"unknown model {m!r}; known: {', '.join(sorted(REGISTRY))}")
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError(f"deployments listed twice: {sorted(n for n in names if names.count(n) > 1)}")
        for stage in STAGES:
            if not any(d.stage == stage for d in self.deployments):
                raise ValueError(f"no deployment for stage {stage!r}")
        for d in self.deployments:
            if d.width > self.cluster.gpus_per_node:
                raise ValueError(f"{d.name}: width {d.width} exceeds {self.cluster.gpus_per_node} GPUs per node")
        if self.limits.max_loras > self.lora_slots:
            raise ValueError(f"limits.max_loras ({self.limits.max_loras}) exceeds lora_slots ({self.lora_slots}): "
                             "a request's adapters must fit in one replica at once")
        if any(not name.strip() for name in self.loras):
            raise ValueError("loras: an adapter name is empty")
        asked = sum(d.width * d.replicas for d in self.deployments)
        total = self.cluster.nodes * self.cluster.gpus_per_node
        if asked > total and not self.pool:  # pool replicas are slots, not GPUs (`pool`)  # the policy plans on `cluster` even when no GPUs are reserved
            raise ValueError(f"initial replicas need {asked} GPUs but the cluster has {total}")
        return self

    @classmethod
    def parse(cls, args: dict[str, Any] | "AppConfig" | None) -> "AppConfig":
        """Validate `args` (YAML/CLI dict); raise `ConfigError` with pydantic's message on failure."""
        if isinstance(args, AppConfig):
            return args
        try:
            return cls.model_validate(args or {})
        except ValidationError as e:
            raise ConfigError(f"invalid serve config: {e}") from None

    def deployment(self, name: str) -> StageDeploymentConfig:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    def widths(self, stage: Stage) -> list[int]:
        return sorted(d.width for d in self.deployments if d.stage == stage)

    def executor_kind(self, d: StageDeploymentConfig) -> str:
        """The executor kind one (stage, width) runs: real width > 1 is always xfuser (k ranks)."""
        if self.executor == "emulated":
            return "emulated"
        return "xfuser" if d.width > 1 else self.executor

    def multi_rank(self, d: StageDeploymentConfig) -> bool:
        """Whether replicas of `d` run one request on `d.width` rank actors (real, width > 1)."""
        return d.width > 1 and self.executor_kind(d) == "xfuser"

    @property
    def pool(self) -> bool:
        """The policy places launches on a shared GPU pool (`trident` with `placement: pool`, or
        `chunk-script`): it picks node, GPUs, width and, with `elastic`, diffuse chunks per launch.
        Replicas are then slots, one per (stage, width) and node or more, that hold no GPU in Ray
        (except real width > 1 replicas, whose ranks need theirs): the policy does the GPU
        accounting and never over-allocates, and each grant names the replica that runs it and
        the GPU ids it uses. Real replicas would have to run on the GPUs a grant names
        (regroupable ranks); see the README."""
        p = self.policy
        return p.name == "chunk-script" or (p.name == "trident" and p.options.get("placement") == "pool")

    def reserves_gpus(self, d: StageDeploymentConfig) -> bool:
        return self.multi_rank(d) or (self.reserve_gpus and not self.pool)

    def max_replicas(self, d: StageDeploymentConfig) -> int:
        if d.max_replicas is not None:
            return d.max_replicas
        if not self.reserves_gpus(d):
            return max(1, d.replicas)
        return max(1, self.cluster.nodes * (self.cluster.gpus_per_node // d.width))

    def source(self, model: str) -> str:
        return self.model_paths.get(model, get_spec(model).source)

    def check_multi_rank(self, xfuser_installed: bool, gpus_per_node: list[float] | None) -> None:
        """Raise `ConfigError` at start-up unless every real width > 1 deployment can run: xfuser
        (the `gpu` extra) installed, and a node with `width` GPUs (real or Ray's fake ones) for its
        STRICT_PACK placement group. `gpus_per_node`: the Ray cluster's nodes (None: not checked)."""
        multi = [d for d in self.deployments if self.multi_rank(d)]
        if not multi:
            return
        names = ", ".join(d.name for d in multi)
        if not xfuser_installed:
            raise ConfigError(
                f"{names} run(s) one request on several GPUs with xfuser (xDiT), which is not installed: "
                "pip install 'trident_rs[gpu]' (or pip install xfuser), or drop the width > 1 deployments")
        from trident_rs.models.families import FAMILIES

        with_xfuser = sorted(name for name, f in FAMILIES.items() if f.xfuser is not None)
        for d in multi:
            unsupported = [m for m in self.models if d.stage == "diffuse" and get_spec(m).family not in with_xfuser]
            if unsupported:
                raise ConfigError(
                    f"{d.name}: no sequence-parallel (xfuser) pipeline for {unsupported} (families with one: "
                    f"{with_xfuser}); serve them at width 1 or with the emulated executor")
        if gpus_per_node is None:
            return
        most = max(gpus_per_node, default=0)
        short = [d.name for d in multi if d.width > most]
        if short:
            raise ConfigError(
                f"{', '.join(short)} need(s) {max(d.width for d in multi)} GPUs on one node, but the "
                f"largest Ray node has {most:g} (GPUs per node: {[float(g) for g in gpus_per_node]}); "
                "on a CPU machine start Ray with fake GPUs: ray start --head --num-gpus=N")
