"""`make demo`: a local Ray with fake GPUs + `serve run deployments/tiny-cpu.yaml`, one request,
then the trident policy at work on an emulated cluster beside it.

    python -m trident_rs.devtools.demo [--config deployments/tiny-cpu.yaml] [--once] [--gpus 2]
                                       [--no-cluster] [--no-ui]

Starts its own Ray head (`ray start --head --block --num-gpus=N`, on a free port, so it never
joins someone else's cluster) with its dashboard on a free port, and prints the `serve status`
command for it; runs `serve run` on a copy of the config whose HTTP port is free, waits for
/healthz, prints a ready `curl`, sends one request itself and saves `out/demo.png`. Then it adds
the `cluster` application (`deployments/demo-cluster.yaml`: trident on an emulated 8-GPU node,
diffuse at widths 1, 2 and 4) and drives a mix that shifts between small and large images every
`--phase-s`, so the plan re-shapes; and starts the Gradio UI (`ui/app.py`), generating with the
real tiny model and showing the cluster app's plan, queues and re-plans.
Ctrl-C, SIGTERM or SIGHUP (or `--once`, after the first image) stop the load, the UI, serve and
the Ray head it started: nothing is left running and no port stays taken.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from trident_rs.client import TridentClient
from trident_rs.devtools.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def _bin(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def _wait_for_head(log_path: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Wait until `ray start --block` says the runtime started."""
    while time.monotonic() < deadline and proc.poll() is None:
        if "Ray runtime started" in log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the Ray head did not start; see {log_path}")


def _stop(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop as on Ctrl-C."""


def _on_signal(signum: int, _frame: object) -> None:
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # once: cleaning up must not be interrupted
        signal.signal(s, signal.SIG_IGN)
    raise _Stop(signal.Signals(signum).name)


class ShiftingLoad(threading.Thread):
    """Requests to the cluster app whose mix shifts between small and large images every `phase_s`."""

    PHASES = (("small images (256x256)", "256x256", 0.25), ("large images (2048x2048)", "2048x2048", 0.8))

    def __init__(self, url: str, phase_s: float):
        super().__init__(daemon=True, name="demo-load")
        self.url, self.phase_s = url, phase_s
        self.stop = threading.Event()
        self.sent = self.ok = 0

    def run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=120) as http:
            def one(size: str, seed: int) -> None:
                try:
                    r = http.post("/v1/images/generations", json={"model": "sd3", "prompt": "x", "size": size,
                                                                  "steps": 28, "seed": seed})
                    self.ok += r.status_code == 200
                except Exception:  # noqa: BLE001 - the demo is stopping
                    pass
            phase = 0
            while not self.stop.is_set():
                name, size, every_s = self.PHASES[phase % len(self.PHASES)]
                print(f"[cluster] load: {name}", flush=True)
                end = time.monotonic() + self.phase_s
                while time.monotonic() < end and not self.stop.is_set():
                    threading.Thread(target=one, args=(size, self.sent), daemon=True).start()
                    self.sent += 1
                    self.stop.wait(every_s)
                phase += 1


def _deploy_cluster_app(run_config: dict, out: Path, dashboard: str, env: dict, log) -> bool:
    """Add the emulated `cluster` application next to the running one (`serve deploy`)."""
    cluster_app = yaml.safe_load((ROOT / "deployments" / "demo-cluster.yaml").read_text())
    both = dict(run_config, applications=list(run_config["applications"]) + [cluster_app])
    path = out / "demo-config-cluster.yaml"
    path.write_text(yaml.safe_dump(both, sort_keys=False))
    r = subprocess.run([_bin("serve"), "deploy", str(path), "--address", dashboard], env=env, cwd=ROOT,
                       stdout=log, stderr=subprocess.STDOUT, timeout=60)
    return r.returncode == 0


def _wait_for_ui(url: str, proc: subprocess.Popen, deadline: float) -> None:
    import httpx

    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "deployments" / "tiny-cpu.yaml"))
    ap.add_argument("--gpus", type=int, default=2, help="fake GPUs the local Ray head advertises")
    ap.add_argument("--once", action="store_true", help="stop after the first image")
    ap.add_argument("--out", default=str(ROOT / "out"))
    ap.add_argument("--timeout-s", type=float, default=180.0)
    ap.add_argument("--ui-port", type=int, default=7860, help="port of the Gradio UI (ui/app.py)")
    ap.add_argument("--no-ui", action="store_true", help="do not start the Gradio UI")
    ap.add_argument("--no-cluster", action="store_true", help="do not add the emulated trident cluster app")
    ap.add_argument("--phase-s", type=float, default=30.0, help="how long each mix of the cluster app's load lasts")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config = yaml.safe_load(Path(args.config).read_text())
    app_args = config["applications"][0].get("args", {})
    for model in app_args.get("models", []):  # build tiny models once, before three replicas race
        if model.startswith("tiny-") and app_args.get("executor", "diffusers") == "diffusers":
            from trident_rs.models.tiny import ensure_tiny_model

            ensure_tiny_model(model)
    port = free_port(config.get("http_options", {}).get("port", 8000))
    config.setdefault("http_options", {}).update(host="127.0.0.1", port=port)
    run_config = out / "demo-config.yaml"
    run_config.write_text(yaml.safe_dump(config, sort_keys=False))

    gcs_port, dash_port = free_port(), free_port(8265)
    dashboard = f"http://127.0.0.1:{dash_port}"
    # A loopback-only local cluster: Ray 2.60's `ray start` would otherwise turn on token auth.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}", "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled"}
    ray_head = serve_proc = ui_proc = None
    load: ShiftingLoad | None = None
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    log = open(out / "demo-serve.log", "w", buffering=1)
    try:
        ray_head = subprocess.Popen(
            [_bin("ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--num-gpus={args.gpus}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
             "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait_for_head(Path(log.name), ray_head, deadline=t0 + args.timeout_s)
        print(f"Ray head 127.0.0.1:{gcs_port}, dashboard {dashboard}. In another shell:\n"
              f"  RAY_AUTH_MODE=disabled {_bin('serve')} status --address {dashboard}", flush=True)
        serve_proc = subprocess.Popen([_bin("serve"), "run", str(run_config)], stdout=log,
                                      stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        client = TridentClient(url, timeout_s=120)
        while True:
            if serve_proc.poll() is not None or ray_head.poll() is not None:
                print(f"serve exited early; see {log.name}", file=sys.stderr)
                return 1
            if time.monotonic() - t0 > args.timeout_s:
                print(f"not healthy after {args.timeout_s:.0f} s; see {log.name}", file=sys.stderr)
                return 1
            try:
                client.health()
                break
            except Exception:
                time.sleep(0.5)
        model = app_args.get("models", ["tiny-sd3"])[0]
        print(f"ready after {time.monotonic() - t0:.1f} s at {url}. Try:\n"
              f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\\n"
              f"    -d '{{\"model\": \"{model}\", \"prompt\": \"a lighthouse at dusk\", \"size\": \"64x64\", \"seed\": 1}}'"
              f" | python3 -c 'import sys,json,base64; sys.stdout.buffer.write(base64.b64decode("
              f"json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))' > out.png", flush=True)
        png = client.image("a lighthouse at dusk", model=model, seed=1)
        (out / "demo.png").write_bytes(png)
        print(f"first image after {time.monotonic() - t0:.1f} s -> {out / 'demo.png'} ({len(png)} bytes)", flush=True)
        if args.once:
            return 0
        status_url = None
        if not args.no_cluster:  # after the first image: not to slow it
            if _deploy_cluster_app(config, out, dashboard, env, log):
                status_url = f"{url}/cluster"
                load = ShiftingLoad(status_url, args.phase_s)
                load.start()
                print(f"trident at work: {status_url}/v1/status (plan: diffuse at widths 1, 2, 4 on an emulated "
                      f"8-GPU node; the load shifts every {args.phase_s:.0f} s)", flush=True)
            else:
                print(f"could not add the cluster app; see {log.name}", file=sys.stderr)
        ui_url = None
        if not args.no_ui and (ROOT / "ui" / "app.py").exists():
            ui_port = free_port(args.ui_port)
            ui_url = f"http://127.0.0.1:{ui_port}"
            ui_log = open(out / "demo-ui.log", "w", buffering=1)
            ui_cmd = [sys.executable, str(ROOT / "ui" / "app.py"), "--api", url, "--port", str(ui_port)]
            if status_url:
                ui_cmd += ["--status-api", status_url]
            ui_proc = subprocess.Popen(ui_cmd, stdout=ui_log, stderr=subprocess.STDOUT,
                                       env={**env, "GRADIO_ANALYTICS_ENABLED": "False"}, cwd=ROOT, start_new_session=True)
        if ui_url is not None:
            _wait_for_ui(ui_url, ui_proc, time.monotonic() + 60)
            print(f"UI: {ui_url}  (log: {out / 'demo-ui.log'})" if ui_proc.poll() is None
                  else f"the UI did not start; see {out / 'demo-ui.log'}", flush=True)
        print("serving; Ctrl-C (or SIGTERM) to stop", flush=True)
        serve_proc.wait()
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (_Stop)
        print(f"stopping ({e or 'Ctrl-C'})", flush=True)
        return 0
    finally:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        if load is not None:
            load.stop.set()
        _stop(ui_proc, grace_s=5.0)
        _stop(serve_proc)
        _stop(ray_head)
        log.close()
        for s, h in previous.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("stopped: UI, serve and the Ray head", flush=True)


if __name__ == "__main__":
    sys.exit(main())
