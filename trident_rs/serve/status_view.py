"""What the controller shows: the `/v1/status` picture and the Prometheus text of `/metrics`.

Rendering only: it reads the broker (plan, launches, grants, replica registry) and the request
log (progress, counts, latencies) and changes nothing but the metrics' gauges.
"""
from __future__ import annotations

from typing import Any

from trident_rs.serve.broker import Broker
from trident_rs.serve.request_log import RequestLog
from trident_rs.vocab import percentile


def percentiles(values: Any) -> dict:
    vals = list(values)
    if not vals:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    pick = lambda q: round(percentile(vals, q), 4)  # noqa: E731
    return {"n": len(vals), "p50": pick(50), "p90": pick(90), "p99": pick(99),
            "mean": round(sum(vals) / len(vals), 4)}


def update_gauges(broker: Broker, log: RequestLog) -> tuple[dict[str, int], dict[str, int], float | None]:
    per_dep, waiting = broker.queues()
    att = log.attainment()
    log.metrics.gauges(per_dep, waiting, len(log.active), att)
    return per_dep, waiting, att


def metrics_text(broker: Broker, log: RequestLog) -> str:
    update_gauges(broker, log)
    return log.metrics.text()


def status(broker: Broker, log: RequestLog, now: float) -> dict:
    """The whole picture: plan per node (and the replica running each group), queues, in-flight
    requests, attainment, latency, re-plans."""
    per_dep, waiting, att = update_gauges(broker, log)
    cluster, plan = broker.cluster, broker.plan
    bound = broker.bindings()
    registry = broker.registry

    def group(g: Any) -> dict:
        replica = bound.get(g.id)
        return {"id": g.id, "deployment": g.deployment, "stage": "+".join(g.stages), "stages": list(g.stages),
                "width": g.width, "model": g.model, "node": g.node, "gpus": list(g.gpus), "replica": replica,
                "replica_node": registry.node_of(replica) if replica else None}

    groups = [group(g) for g in plan.groups]
    down = broker.down
    nodes = [{"node": n, "gpus": cluster.gpus_per_node, "down": n in down,
              "groups": [g for g in groups if g["node"] == n]} for n in range(cluster.nodes)]
    stats = dict(log.stats)
    return {
        "policy": getattr(broker.policy, "name", type(broker.policy).__name__),
        "time_s": round(now, 3),
        "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "down": sorted(down)},
        "counts": dict(broker.counts),
        "published_counts": dict(broker.published or {}),
        "plan": groups,
        "nodes": nodes,
        "replicas": registry.snapshot(),
        "queues": per_dep,
        "waiting": waiting,
        "pending": broker.policy.pending(),
        "inflight_launches": len(broker.inflight),
        "active_requests": len(log.active),
        "inflight": log.inflight(),
        "stats": stats,
        "attainment": {"recent_60s": att, "finished": len(log.outcomes),
                       "overall": stats["on_time"] / stats["completed"] if stats["completed"] else None},
        "latency_s": percentiles(log.latencies),
        "stage_latency_s": {d: percentiles(v) for d, v in log.stage_lat.items()},
        "replans": list(broker.replans),
        "defrags": list(broker.defrags),
        "metrics": {"prometheus": "/metrics", "ray_serve_metrics": bool(log.metrics.ray.m)},
    }
