"""`trident status`: a running server's plan per node, queues, in-flight requests (each with its
diffuse step i of n as a bar, its width, and whether it is paused at a chunk boundary), SLO
attainment, latency percentiles and recent re-plans (from `GET /v1/status`), drawn with rich.

    trident status --url http://127.0.0.1:8000 [--watch 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from trident_rs.errors import TridentError
from trident_rs.vocab import DeploymentKey

STAGE_COLORS = {"encode": "cyan", "diffuse": "magenta", "decode": "green"}


class StatusError(TridentError):
    http_status = 503


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (with any route prefix)")
    parser.add_argument("--watch", type=float, default=0.0, metavar="S", help="refresh every S seconds")
    parser.add_argument("--json", action="store_true", help="print the raw /v1/status JSON")
    parser.add_argument("--timeout-s", type=float, default=10.0)


def fetch(url: str, timeout_s: float = 10.0, transport: httpx.BaseTransport | None = None) -> dict:
    try:
        with httpx.Client(base_url=url, timeout=timeout_s, transport=transport) as http:
            r = http.get("/v1/status")
    except httpx.HTTPError as e:
        raise StatusError(f"cannot reach {url}: {e}") from None
    if r.status_code != 200:
        raise StatusError(f"{url}/v1/status answered HTTP {r.status_code}: {r.text[:200]}")
    return r.json()


def _color(deployment: str) -> str:
    try:
        stage = DeploymentKey.parse(deployment).stages[0]
    except ValueError:
        stage = ""
    return STAGE_COLORS.get(stage, "yellow")


def step_bar(r: dict, cells: int = 10) -> str:
    """Diffuse progress as a text bar: '█████░░░░░ 14/28', plus 'paused' at a chunk boundary."""
    steps, step = r.get("steps") or 0, r.get("step") or 0
    if not steps:
        return "-"
    full = min(cells, round(cells * step / steps))
    return "█" * full + "░" * (cells - full) + f" {step}/{steps}" + (" paused" if r.get("paused") else "")


def _fmt_s(v: Any) -> str:
    return "-" if v is None else f"{1000 * v:.0f} ms" if v < 1 else f"{v:.2f} s"


def render(st: dict) -> Any:
    """The rich renderable of one status answer."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    stats = st.get("stats", {})
    att = st.get("attainment", {})
    recent = att.get("recent_60s")
    head = Text.assemble(
        ("policy ", "bold"), str(st.get("policy", "?")), "   ",
        ("requests ", "bold"), f"{stats.get('submitted', 0)} in, {stats.get('completed', 0)} done, "
                               f"{stats.get('failed', 0)} failed, {stats.get('rejected', 0)} rejected", "   ",
        ("SLO (60 s) ", "bold"), ("-" if recent is None else f"{100 * recent:.0f}%",
                                  "green" if (recent or 0) >= 0.9 else "red" if recent is not None else ""),
    )
    parts.append(head)

    cluster = st.get("cluster", {})
    nodes = st.get("nodes") or []
    if nodes:
        grid = Table(title="placement plan (one cell per GPU)", show_header=True, expand=False)
        grid.add_column("node")
        per = cluster.get("gpus_per_node") or max((n.get("gpus", 0) for n in nodes), default=0)
        for g in range(per):
            grid.add_column(f"gpu{g}", justify="center")
        for n in nodes:
            cells = [Text("idle", style="dim")] * per
            for grp in n.get("groups", []):
                for k in grp.get("gpus", []):
                    if k < per:
                        cells[k] = Text(grp["deployment"], style=_color(grp["deployment"]))
            grid.add_row(str(n["node"]), *cells)
        parts.append(grid)

    q = Table(title="deployments", show_header=True)
    for col in ("deployment", "replicas", "queue", "p50", "p90", "p99", "n"):
        q.add_column(col, justify="left" if col == "deployment" else "right")
    lat = st.get("stage_latency_s", {})
    names = sorted(set(st.get("counts", {})) | set(st.get("queues", {})))
    for name in names:
        p = lat.get(name, {})
        q.add_row(Text(name, style=_color(name)), str(st.get("counts", {}).get(name, "-")),
                  str(st.get("queues", {}).get(name, 0)), _fmt_s(p.get("p50")), _fmt_s(p.get("p90")),
                  _fmt_s(p.get("p99")), str(p.get("n", 0)))
    parts.append(q)
    waiting = st.get("waiting", {})
    e2e = st.get("latency_s", {})
    parts.append(Text("waiting for a launch: " + ", ".join(f"{k} {v}" for k, v in waiting.items())
                      + f"   end-to-end p50 {_fmt_s(e2e.get('p50'))}, p90 {_fmt_s(e2e.get('p90'))}, "
                        f"p99 {_fmt_s(e2e.get('p99'))} (n={e2e.get('n', 0)})"))

    inflight = st.get("inflight") or []
    if inflight:
        t = Table(title=f"in flight ({st.get('active_requests', len(inflight))})")
        for col in ("id", "model", "shape", "state", "stage", "done", "diffuse step", "width"):
            t.add_column(col)
        for r in inflight[:20]:
            t.add_row(str(r.get("id", ""))[:12], str(r.get("model", "")), str(r.get("shape", "")),
                      str(r.get("state", "")), str(r.get("stage") or "-"), ",".join(r.get("stages_done", [])),
                      step_bar(r), "-" if r.get("width") is None else f"w{r['width']}")
        parts.append(t)

    replans = st.get("replans") or []
    if replans:
        t = Table(title="recent re-plans")
        t.add_column("t (s)", justify="right")
        t.add_column("reason")
        t.add_column("replicas")
        for r in replans[-5:]:
            t.add_row(f"{r.get('t', 0):.1f}", str(r.get("reason", "")),
                      ", ".join(f"{k}={v}" for k, v in sorted(r.get("counts", {}).items())))
        parts.append(t)
    return Panel(Group(*parts), title="trident status", expand=False)


def run(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    from rich.console import Console

    console = Console()
    if args.json:
        console.print_json(json.dumps(fetch(args.url, args.timeout_s, transport)))
        return 0
    if args.watch <= 0:
        console.print(render(fetch(args.url, args.timeout_s, transport)))
        return 0
    from rich.live import Live

    with Live(render(fetch(args.url, args.timeout_s, transport)), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(args.watch)
                live.update(render(fetch(args.url, args.timeout_s, transport)))
        except KeyboardInterrupt:
            return 0
