"""Every `serve run` config we ship parses and would pass the start-up checks (xfuser present,
the node sizes its cluster block declares): a stale config fails here, not on a user's GPUs."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trident_rs.serve.config import AppConfig

CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "deployments").glob("*.yaml")
                 if "applications" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    for app in yaml.safe_load(path.read_text())["applications"]:
        cfg = AppConfig.parse(app.get("args") or {})
        cluster = cfg.cluster
        cfg.check_multi_rank(True, [float(cluster.gpus_per_node)] * cluster.nodes)
        assert cfg.deployments, path.name


def test_configs_were_found():
    assert len(CONFIGS) >= 8
