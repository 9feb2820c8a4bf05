"""The application builder: `import_path: trident_rs.serve.app:build_app` with typed `args`.

    serve run deployments/tiny-cpu.yaml
    serve run trident_rs.serve.app:build_app models='["tiny-sd3"]'   # args as key=value
    serve.run(build_app({"executor": "emulated", ...}))

The graph: Ingress -> Controller, Ingress -> one StageDeployment per (stage, width); every
stage replica also holds the Controller handle, to register itself and heartbeat (never on a
request's path).
"""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from trident_rs.serve.config import AppConfig
from trident_rs.serve.controller import ControllerDeployment
from trident_rs.serve.ingress import IngressDeployment
from trident_rs.serve.stage_deployment import StageDeployment, check_startup, stage_options


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Validate `args` against `AppConfig` (ConfigError on mistakes, including real width > 1
    deployments without xfuser or without a node of that many GPUs) and bind the deployments."""
    cfg = AppConfig.parse(args)
    check_startup(cfg)  # width > 1 with real executors: xfuser and enough GPUs, or ConfigError now
    raw = cfg.model_dump(mode="json")
    control = {"ray_actor_options": {"num_cpus": 0, "resources": cfg.control_resources}}
    controller = ControllerDeployment.options(**control).bind(raw)
    stages = {
        d.name: StageDeployment.options(**stage_options(cfg, d)).bind(raw, d.stage, d.width, controller)
        for d in cfg.deployments
    }
    return IngressDeployment.options(**control).bind(raw, controller, stages)
