"""Fakes for testing the controller deployment without Ray: Serve's replica context and the KV
store the controller publishes replica counts to."""
from __future__ import annotations

import types

import pytest

from trident_rs.serve import controller as mod


@pytest.fixture
def published(monkeypatch):
    """Serve's replica context and the KV store, faked; returns what the controller published."""
    kv: dict[str, int] = {}
    monkeypatch.setattr(mod.serve, "get_replica_context", lambda: types.SimpleNamespace(app_name="app"))
    monkeypatch.setattr(mod, "publish_counts", lambda app, counts: kv.update(counts))
    monkeypatch.setattr(mod, "read_count", lambda app, dep: kv.get(dep))
    return kv
