"""trident_rs demo UI: a Gradio app that is only a client of the HTTP API (httpx).

    python ui/app.py --api http://127.0.0.1:8000 --port 7860

Left: prompt, model (from /v1/models), size, steps, frames, seed, SLO; the request's progress
through the stages (polled from /v1/requests/{id}); the result (image or video).
Right, refreshed by a timer from /v1/status: the placement plan drawn as nodes x GPUs, queues per
deployment, each running request as a progress bar (diffuse step i of n, width, paused), and SLO
attainment and latency over time. Works with any deployments/ config: it
only reads what the server reports.
"""
from __future__ import annotations

import argparse
import base64
import html
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Iterator

import httpx

from trident_rs.vocab import STAGES, DeploymentKey

STAGE_COLORS = {"encode": "#4c9be8", "diffuse": "#c157d1", "decode": "#4caf6e"}
IDLE = "#e4e4e4"


class Api:
    """The few HTTP calls the UI makes."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, transport: httpx.BaseTransport | None = None,
                 api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport, headers=headers)

    def models(self) -> list[dict]:
        return self.http.get("/v1/models").raise_for_status().json()["data"]

    def status(self) -> dict:
        return self.http.get("/v1/status", timeout=10).raise_for_status().json()

    def progress(self, rid: str) -> dict | None:
        r = self.http.get(f"/v1/requests/{rid}", timeout=10)
        return r.json() if r.status_code == 200 else None

    def generate(self, body: dict, rid: str) -> dict:
        r = self.http.post("/v1/generate", json=body, headers={"X-Request-Id": rid})
        if r.status_code >= 400:
            try:
                msg = r.json()["error"]["message"]
            except Exception:
                msg = r.text[:300]
            raise RuntimeError(f"HTTP {r.status_code}: {msg}")
        return r.json()


# -- pictures of the status --------------------------------------------------------------------------
def _stage_color(deployment: str) -> str:
    try:
        stage = DeploymentKey.parse(deployment).stages[0]
    except ValueError:
        stage = ""
    return STAGE_COLORS.get(stage, "#e8a33c")


def plan_figure(status: dict):
    """Nodes as rows, GPUs as boxes coloured by the stage of the replica group holding them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    nodes = status.get("nodes") or []
    per = (status.get("cluster") or {}).get("gpus_per_node") or max((n.get("gpus", 1) for n in nodes), default=1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * per, 0.6 + 0.8 * max(1, len(nodes))))
    for row, n in enumerate(nodes):
        y = len(nodes) - 1 - row
        for g in range(per):
            ax.add_patch(Rectangle((g + 0.05, y + 0.1), 0.9, 0.8, facecolor=IDLE, edgecolor="white"))
        for grp in n.get("groups", []):
            gpus = sorted(grp.get("gpus", []))
            if not gpus:
                continue
            color = _stage_color(grp["deployment"])
            for g in gpus:
                ax.add_patch(Rectangle((g + 0.05, y + 0.1), 0.9, 0.8, facecolor=color, edgecolor="black", lw=0.6))
            ax.text((gpus[0] + gpus[-1]) / 2 + 0.5, y + 0.5, grp["deployment"], ha="center", va="center",
                    fontsize=8, color="white", weight="bold")
    ax.set_xlim(0, per)
    ax.set_ylim(0, max(1, len(nodes)))
    ax.set_xticks([g + 0.5 for g in range(per)], [f"GPU {g}" for g in range(per)], fontsize=7)
    ax.set_yticks([len(nodes) - 1 - r + 0.5 for r in range(len(nodes))], [f"node {n['node']}" for n in nodes])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.legend(handles=[Patch(color=c, label=s) for s, c in STAGE_COLORS.items()] + [Patch(color=IDLE, label="idle")],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=7, frameon=False)
    ax.set_title(f"placement plan ({status.get('policy', '?')})", fontsize=9)
    fig.tight_layout()
    return fig


def queues_html(status: dict) -> str:
    """Deployments with replicas, queue and stage latency; then waiting, in-flight and re-plans."""
    counts, queues = status.get("counts", {}), status.get("queues", {})
    lat = status.get("stage_latency_s", {})
    rows = []
    for name in sorted(set(counts) | set(queues)):
        p = lat.get(name, {})
        ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
        rows.append(f"<tr><td style='color:{_stage_color(name)};font-weight:bold'>{html.escape(name)}</td>"
                    f"<td>{counts.get(name, '-')}</td><td>{queues.get(name, 0)}</td>"
                    f"<td>{ms(p.get('p50'))}</td><td>{ms(p.get('p90'))}</td></tr>")
    waiting = ", ".join(f"{k} {v}" for k, v in (status.get("waiting") or {}).items())
    att = (status.get("attainment") or {}).get("recent_60s")
    replans = status.get("replans") or []
    last = replans[-1] if replans else {}
    stats = status.get("stats", {})
    return (
        "<div id='plan-panel'><table><thead><tr><th>deployment</th><th>replicas</th><th>queue</th>"
        "<th>p50 ms</th><th>p90 ms</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
        f"<p>waiting for a launch: {html.escape(waiting) or '-'}<br>"
        f"in flight: {status.get('active_requests', 0)} &middot; done {stats.get('completed', 0)}, "
        f"failed {stats.get('failed', 0)}, rejected {stats.get('rejected', 0)} &middot; "
        f"SLO attainment (60 s): {'-' if att is None else f'{100 * att:.0f}%'}<br>"
        f"re-plans: {max(0, len(replans) - 1)}; last: {html.escape(str(last.get('reason', '-')))}</p>"
        + running_html(status) + "</div>"
    )


def step_label(prog: dict) -> str:
    """'step 14/28 at w2', plus ' (paused)' at a chunk boundary with no next chunk granted."""
    steps = prog.get("steps") or 0
    if not steps:
        return ""
    width = f" at w{prog['width']}" if prog.get("width") else ""
    return f"step {prog.get('step') or 0}/{steps}{width}" + (" (paused)" if prog.get("paused") else "")


def running_html(status: dict, limit: int = 20) -> str:
    """Each in-flight request as a progress bar of its diffuse steps (`/v1/status` `inflight`)."""
    rows = []
    for r in (status.get("inflight") or [])[:limit]:
        steps = r.get("steps") or 1
        color = "#e8a33d" if r.get("paused") else _stage_color(r.get("deployment") or "diffuse-w1")
        rows.append(
            f"<div class='running' data-id='{html.escape(str(r.get('id', '')))}'>"
            f"<span>{html.escape(str(r.get('id', ''))[:16])} {html.escape(str(r.get('state', '')))} "
            f"{html.escape(step_label(r))}</span><br>"
            f"<progress max='{steps}' value='{min(r.get('step') or 0, steps)}' style='width:100%;accent-color:{color}'>"
            f"</progress></div>")
    if not rows:
        return "<div id='running'><p>running: none</p></div>"
    return "<div id='running'><p><b>running</b></p>" + "".join(rows) + "</div>"


class History:
    """Attainment and latency samples over time, one per timer tick."""

    def __init__(self, maxlen: int = 300):
        self.t0 = time.time()
        self.rows: deque[tuple[float, float | None, float | None, float | None]] = deque(maxlen=maxlen)

    def add(self, status: dict) -> None:
        lat = status.get("latency_s") or {}
        att = (status.get("attainment") or {}).get("recent_60s")
        self.rows.append((time.time() - self.t0, att, lat.get("p50"), lat.get("p90")))

    def figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 2.4))
        t = [r[0] for r in self.rows]
        a1.plot(t, [None if r[1] is None else 100 * r[1] for r in self.rows], color="#2a7")
        a1.set_ylim(-5, 105)
        a1.set_title("SLO attainment, last 60 s (%)", fontsize=9)
        a2.plot(t, [r[2] for r in self.rows], label="p50")
        a2.plot(t, [r[3] for r in self.rows], label="p90")
        a2.set_title("end-to-end latency (s)", fontsize=9)
        a2.legend(fontsize=7)
        for a in (a1, a2):
            a.set_xlabel("UI time (s)", fontsize=8)
            a.tick_params(labelsize=7)
        fig.tight_layout()
        return fig


# -- generation ----------------------------------------------------------------------------------------
def request_body(model: str, prompt: str, size: str, steps: Any, frames: Any, seed: Any, slo_s: Any,
                 is_video: bool) -> dict:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "seed": int(seed or 0)}
    if size:
        w, h = (int(x) for x in str(size).lower().split("x"))
        body.update(width=w, height=h)
    if steps:
        body["steps"] = int(steps)
    if is_video and frames:
        body["num_frames"] = int(frames)
    if slo_s:
        body["slo_ms"] = float(slo_s) * 1000.0
    return body


def progress_text(prog: dict | None, elapsed: float) -> str:
    if not prog:
        return f"submitted ({elapsed:.1f} s)"
    stages = list(STAGES)
    done = set(prog.get("stages_done", []))
    marks = " → ".join(f"✅ {s}" if s in done else f"⏳ {s}" if s == prog.get("stage") else f"▫️ {s}"
                       for s in stages)
    where = f" on {prog['deployment']}" if prog.get("deployment") and prog.get("stage") else ""
    steps = f", {step_label(prog)}" if prog.get("stage") == "diffuse" or prog.get("paused") else ""
    return f"{marks}   [{prog.get('state')}{where}{steps}, {elapsed:.1f} s]"


def run_generation(api: Api, body: dict, poll_s: float = 0.3) -> Iterator[tuple[str, str | None, str | None]]:
    """Yield (progress text, image path, video path) while the request runs, then the result."""
    rid = f"ui-{uuid.uuid4().hex[:12]}"
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["out"] = api.generate(body, rid)
        except Exception as e:  # shown in the progress line
            box["err"] = e

    th = threading.Thread(target=call, daemon=True)
    t0 = time.time()
    th.start()
    while th.is_alive():
        th.join(poll_s)
        if th.is_alive():
            try:
                prog = api.progress(rid)
            except httpx.HTTPError:
                prog = None
            yield progress_text(prog, time.time() - t0), None, None
    if "err" in box:
        yield f"❌ {box['err']}", None, None
        return
    out = box["out"]
    suffix = ".mp4" if out["format"] == "mp4" else ".png"
    path = Path(tempfile.mkdtemp(prefix="trident-ui-")) / f"{rid}{suffix}"
    path.write_bytes(base64.b64decode(out["b64"]))
    t = out.get("timings", {})
    stages = ", ".join(f"{s} {1000 * t[f'{s}_wall_s']:.0f} ms on {t.get(f'{s}_deployment', '?')}"
                       for s in STAGES if f"{s}_wall_s" in t)
    text = f"✅ done in {time.time() - t0:.2f} s ({stages})"
    yield (text, str(path), None) if suffix == ".png" else (text, None, str(path))


# -- the app -------------------------------------------------------------------------------------------
def build(api_url: str, refresh_s: float = 2.0, transport: httpx.BaseTransport | None = None,
          api_key: str | None = None, status_url: str | None = None):
    """`status_url`: the server whose plan the right-hand panel shows (default: `api_url`)."""
    import gradio as gr

    api = Api(api_url, transport=transport, api_key=api_key)
    status_api = api if not status_url else Api(status_url, transport=transport, api_key=api_key)
    try:
        models = {m["id"]: m for m in api.models()}
    except httpx.HTTPError:
        models = {}
    names = list(models) or ["tiny-sd3"]
    history = History()

    def defaults(name: str):
        m = models.get(name, {})
        h, w = (m.get("default_size") or [None, None])[:2]
        video = m.get("kind") == "video"
        return (gr.update(value=f"{w}x{h}" if h else ""), gr.update(value=m.get("default_steps")),
                gr.update(value=m.get("default_frames", 1), visible=video))

    def generate(prompt, model, size, steps, frames, seed, slo_s):
        body = request_body(model, prompt, size, steps, frames, seed, slo_s, models.get(model, {}).get("kind") == "video")
        yield from run_generation(api, body)

    def refresh():
        try:
            st = status_api.status()
        except httpx.HTTPError as e:
            return None, f"<div id='plan-panel'>server unreachable: {html.escape(str(e))}</div>", None
        history.add(st)
        import matplotlib.pyplot as plt

        plt.close("all")
        return plan_figure(st), queues_html(st), history.figure()

    first = names[0]
    size0, steps0, frames0 = (u["value"] if isinstance(u, dict) else None for u in defaults(first))
    with gr.Blocks(title="trident_rs") as demo:
        where = f"Server: `{api.base_url}`" + (f"; plan and queues of `{status_api.base_url}`" if status_url else "")
        gr.Markdown(f"## trident_rs: stage-level serving of diffusion pipelines\n{where}")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="prompt", value="a lighthouse at dusk", elem_id="prompt")
                model = gr.Dropdown(names, value=first, label="model", elem_id="model")
                with gr.Row():
                    size = gr.Textbox(label="size (WxH)", value=size0 or "", elem_id="size")
                    steps = gr.Number(label="steps", value=steps0, precision=0, elem_id="steps")
                with gr.Row():
                    frames = gr.Number(label="frames", value=frames0 or 1, precision=0,
                                       visible=models.get(first, {}).get("kind") == "video", elem_id="frames")
                    seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
                    slo = gr.Number(label="SLO (s; 0: the server's default)", value=0, elem_id="slo")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                progress = gr.Markdown("", elem_id="progress")
                image = gr.Image(label="image", type="filepath", elem_id="result-image")
                video = gr.Video(label="video", elem_id="result-video")
            with gr.Column(scale=1):
                plan = gr.Plot(label="placement plan", elem_id="plan-plot")
                panel = gr.HTML(elem_id="plan-html")
                plots = gr.Plot(label="attainment and latency", elem_id="history-plot")
        model.change(defaults, model, [size, steps, frames])
        go.click(generate, [prompt, model, size, steps, frames, seed, slo], [progress, image, video])
        gr.Timer(refresh_s).tick(refresh, None, [plan, panel, plots])
        demo.load(refresh, None, [plan, panel, plots])
    return demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", default="http://127.0.0.1:8000", help="trident_rs server (with any route prefix)")
    ap.add_argument("--status-api", default=None, help="server whose plan and queues the panel shows (default: --api)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--refresh-s", type=float, default=2.0)
    ap.add_argument("--api-key", default=os.environ.get("TRIDENT_API_KEY"),
                    help="bearer token for a server with API keys (default: $TRIDENT_API_KEY)")
    args = ap.parse_args(argv)
    build(args.api, args.refresh_s, api_key=args.api_key, status_url=args.status_api).queue().launch(server_name=args.host, server_port=args.port,
                                                   show_error=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
