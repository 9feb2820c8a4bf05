"""The serve application's configuration: one pydantic schema for YAML `args`, CLI and Python.

    build_app({"models": ["tiny-sd3"], "executor": "diffusers", ...})

Everything is validated up front; a bad config raises `ConfigError` with the reason.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from trident_rs.errors import ConfigError
from trident_rs.models.spec import REGISTRY, get_spec
from trident_rs.policy.types import Cluster, Stage


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
        return f"{self.stage}-w{self.width}"


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
    max_video_jobs: int = Field(64, ge=1, description="finished video jobs kept for polling")
    request_timeout_s: float = Field(600.0, gt=0)


class AppConfig(BaseModel):
    """The whole application: which models, which executors, which deployments, which policy."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=lambda: ["tiny-sd3"], min_length=1)
    executor: Literal["diffusers", "emulated"] = "diffusers"
    executor_options: dict[str, Any] = Field(default_factory=dict, description="passed to make_executor")
    model_paths: dict[str, str] = Field(
        default_factory=dict, description="model name -> local directory or hub id overriding the spec's source"
    )
    time_scale: float = Field(1.0, gt=0, description="emulated executors sleep predicted time × this")
    deployments: list[StageDeploymentConfig] = Field(
        default_factory=lambda: [StageDeploymentConfig(stage=s) for s in ("encode", "diffuse", "decode")]
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    reserve_gpus: bool = Field(True, description="stage replicas reserve `width` (fake or real) GPUs")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    slo_scale: float = Field(4.0, gt=0, description="deadline = slo_scale × predicted latency at width 1")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    replica_cpus: float = Field(0.0, ge=0, description="num_cpus per stage replica (0 lets many share 2 cores)")

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        for m in self.models:
            if m not in REGISTRY:
                raise ValueError(f"unknown model {m!r}; known: {', '.join(sorted(REGISTRY))}")
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError(f"deployments listed twice: {sorted(n for n in names if names.count(n) > 1)}")
        for stage in ("encode", "diffuse", "decode"):
            if not any(d.stage == stage for d in self.deployments):
                raise ValueError(f"no deployment for stage {stage!r}")
        for d in self.deployments:
            if d.width > self.cluster.gpus_per_node:
                raise ValueError(f"{d.name}: width {d.width} exceeds {self.cluster.gpus_per_node} GPUs per node")
        asked = sum(d.width * d.replicas for d in self.deployments)
        total = self.cluster.nodes * self.cluster.gpus_per_node
        if asked > total:  # the policy plans on `cluster` even when no GPUs are reserved
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

    def max_replicas(self, d: StageDeploymentConfig) -> int:
        if d.max_replicas is not None:
            return d.max_replicas
        if not self.reserve_gpus:
            return max(1, d.replicas)
        return max(1, self.cluster.nodes * (self.cluster.gpus_per_node // d.width))

    def source(self, model: str) -> str:
        return self.model_paths.get(model, get_spec(model).source)
