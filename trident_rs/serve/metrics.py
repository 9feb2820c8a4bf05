"""Prometheus metrics of the serving runtime, kept by the (single) Controller replica.

The controller is the one place that sees every arrival, grant, finished stage, outcome and
re-plan, so it owns the metrics; the ingress serves them as text at `GET /metrics`
(`Controller.metrics_text`). They live in a private `prometheus_client` registry rather than
in `ray.serve.metrics`: Ray exports its own metrics only through the per-node metrics agent
port (not started by `ray.init(include_dashboard=False)`, aggregated with a delay and with
extra Ray tags), which makes exact counts awkward to scrape in a test or on a laptop. Serve's
built-in per-deployment metrics (`ray_serve_*`) are still exported by Ray as usual.

    trident_stage_latency_seconds{stage, width, deployment}   histogram, grant -> stage done
    trident_request_latency_seconds{model}                     histogram, arrival -> finish (ok)
    trident_requests_total{outcome}                            on_time | late | rejected | failed
    trident_queue_length{deployment}                           granted, not yet finished
    trident_stage_waiting{stage}                               waiting for the policy to launch
    trident_inflight_requests                                  admitted, not yet finished
    trident_slo_attainment                                     on-time share of recent finished
    trident_replans_total                                      plan changes after the initial one
    trident_solver_seconds                                     policy time of calls that re-planned
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("on_time", "late", "rejected", "failed")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stage_latency = Histogram("trident_stage_latency_seconds", "Stage latency, grant to done",
                                       ["stage", "width", "deployment"], registry=r, buckets=LATENCY_BUCKETS)
        self.request_latency = Histogram("trident_request_latency_seconds", "End-to-end latency of completed "
                                         "requests", ["model"], registry=r, buckets=LATENCY_BUCKETS)
        self.requests = Counter("trident_requests", "Requests by outcome", ["outcome"], registry=r)
        for o in OUTCOMES:
            self.requests.labels(o)  # export zeros so dashboards see every series from the start
        self.queue = Gauge("trident_queue_length", "Requests granted to a deployment, not yet done",
                           ["deployment"], registry=r)
        self.waiting = Gauge("trident_stage_waiting", "Requests waiting for a stage launch", ["stage"], registry=r)
        self.inflight = Gauge("trident_inflight_requests", "Admitted requests not yet finished", registry=r)
        self.attainment = Gauge("trident_slo_attainment", "On-time share of recently finished requests",
                                registry=r)
        self.replans = Counter("trident_replans", "Plan changes after the initial plan", registry=r)
        self.solver = Histogram("trident_solver_seconds", "Policy time of the calls that produced a new plan",
                                registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0))

    def text(self) -> str:
        return generate_latest(self.registry).decode()
