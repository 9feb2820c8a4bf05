"""Prometheus metrics of the serving runtime, kept by the (single) Controller replica.

The controller is the one place that sees every arrival, grant, finished stage, outcome and
re-plan, so it owns the metrics; the ingress serves them as text at `GET /metrics`
(`Controller.metrics_text`) from a private `prometheus_client` registry. Every update is also
mirrored into `ray.serve.metrics` (same names; `stage_deployment` stands for `deployment`, which
Serve reserves for the reporting replica), which Ray exports as `ray_trident_*` on each node's
metrics-export port next to Serve's own `ray_serve_*`, for clusters already scraping Ray.
`/metrics` is the primary path because Ray's export needs the metrics agent (not started by
`ray.init(include_dashboard=False)`), aggregates with a delay and adds Ray's own tags, which
makes exact counts awkward to scrape in a test or on a laptop.

    trident_stage_latency_seconds{stage, width, deployment}   histogram, grant -> stage done
    trident_request_latency_seconds{model}                     histogram, arrival -> finish (ok)
    trident_requests_total{outcome}                            on_time | late | rejected | failed |
                                                               cancelled | timed_out
    trident_stage_retries_total{stage}                         stage re-runs after a replica died
    trident_policy_errors_total                                policy calls that raised (logged)
    trident_queue_length{deployment}                           granted, not yet finished
    trident_stage_waiting{stage}                               waiting for the policy to launch
    trident_inflight_requests                                  admitted, not yet finished
    trident_slo_attainment                                     on-time share of recent finished
    trident_replans_total                                      plan changes after the initial one
    trident_solver_seconds                                     policy time of calls that re-planned
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OUTCOMES = ("on_time", "late", "rejected", "failed", "cancelled", "timed_out")
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
        self.retries = Counter("trident_stage_retries", "Stage re-runs after a replica died", ["stage"], registry=r)
        self.policy_errors = Counter("trident_policy_errors", "Policy calls that raised", registry=r)
        self.solver = Histogram("trident_solver_seconds", "Policy time of the calls that produced a new plan",
                                registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0))

        self.ray = _RayMirror()

    # -- updates (prometheus_client and the Ray mirror) ----------------------------------------------
    def stage_done(self, stage: str, width: int, deployment: str, seconds: float) -> None:
        tags = {"stage": stage, "width": str(width), "deployment": deployment}
        self.stage_latency.labels(**tags).observe(seconds)
        self.ray.call("stage_latency", "observe", seconds, tags)

    def request_done(self, model: str, seconds: float) -> None:
        self.request_latency.labels(model).observe(seconds)
        self.ray.call("request_latency", "observe", seconds, {"model": model})

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()
        self.ray.call("requests", "inc", 1, {"outcome": outcome})

    def stage_retry(self, stage: str) -> None:
        self.retries.labels(stage).inc()
        self.ray.call("retries", "inc", 1, {"stage": stage})

    def policy_error(self) -> None:
        self.policy_errors.inc()
        self.ray.call("policy_errors", "inc", 1, {})

    def replan(self) -> None:
        self.replans.inc()
        self.ray.call("replans", "inc", 1, {})

    def solver_time(self, seconds: float) -> None:
        self.solver.observe(seconds)
        self.ray.call("solver", "observe", seconds, {})

    def gauges(self, queues: dict[str, int], waiting: dict[str, int], inflight: int,
               attainment: float | None) -> None:
        for name, n in queues.items():
            self.queue.labels(name).set(n)
            self.ray.call("queue", "set", n, {"deployment": name})
        for stage, n in waiting.items():
            self.waiting.labels(stage).set(n)
            self.ray.call("waiting", "set", n, {"stage": stage})
        self.inflight.set(inflight)
        self.ray.call("inflight", "set", inflight, {})
        if attainment is not None:
            self.attainment.set(attainment)
            self.ray.call("attainment", "set", attainment, {})

    def text(self) -> str:
        return generate_latest(self.registry).decode()


class _RayMirror:
    """The same metrics as `ray.serve.metrics` objects; silently off outside a Ray worker."""

    def __init__(self) -> None:
        self.m: dict = {}
        try:
            import ray
            from ray.serve import metrics as rm

            if not ray.is_initialized():
                return
            self.m = {
                "stage_latency": rm.Histogram("trident_stage_latency_seconds", "Stage latency, grant to done",
                                              boundaries=list(LATENCY_BUCKETS),
                                              tag_keys=("stage", "width", "stage_deployment")),
                "request_latency": rm.Histogram("trident_request_latency_seconds", "End-to-end latency",
                                                boundaries=list(LATENCY_BUCKETS), tag_keys=("model",)),
                "requests": rm.Counter("trident_requests", "Requests by outcome", tag_keys=("outcome",)),
                "replans": rm.Counter("trident_replans", "Plan changes after the initial plan"),
                "retries": rm.Counter("trident_stage_retries", "Stage re-runs after a replica died",
                                      tag_keys=("stage",)),
                "policy_errors": rm.Counter("trident_policy_errors", "Policy calls that raised"),
                "solver": rm.Histogram("trident_solver_seconds", "Policy time of re-planning calls",
                                       boundaries=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]),
                "queue": rm.Gauge("trident_queue_length", "Granted, not yet done", tag_keys=("stage_deployment",)),
                "waiting": rm.Gauge("trident_stage_waiting", "Waiting for a stage launch", tag_keys=("stage",)),
                "inflight": rm.Gauge("trident_inflight_requests", "Admitted requests not yet finished"),
                "attainment": rm.Gauge("trident_slo_attainment", "On-time share of recently finished requests"),
            }
        except Exception:  # metrics are best effort: never fail the controller over them
            self.m = {}

    def call(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        metric = self.m.get(name)
        if metric is None:
            return
        if "deployment" in tags:  # Serve reserves the 'deployment' tag for the reporting replica's own
            tags = {("stage_deployment" if k == "deployment" else k): v for k, v in tags.items()}
        try:
            getattr(metric, method)(value, tags=tags or None)
        except Exception:
            self.m.pop(name, None)
