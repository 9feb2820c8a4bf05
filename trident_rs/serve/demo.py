"""`make demo`: a local Ray with fake GPUs + `serve run deployments/tiny-cpu.yaml`, one request.

    python -m trident_rs.serve.demo [--config deployments/tiny-cpu.yaml] [--once] [--gpus 2]

Starts its own Ray head (`ray start --head --block --num-gpus=N`, on a free port, so it never
joins someone else's cluster), runs `serve run` on a copy of the config whose HTTP port is free,
waits for /healthz, prints a ready `curl`, sends one request itself and saves `out/demo.png`,
then starts the Gradio UI (`ui/app.py`, a client of the HTTP API) and prints its URL.
Ctrl-C (or `--once`, after the first image) stops serve and the Ray head it started.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from trident_rs.client import TridentClient
from trident_rs.serve.local import free_port

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

    gcs_port = free_port()
    # A loopback-only local cluster: Ray 2.60's `ray start` would otherwise turn on token auth.
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}", "PYTHONPATH": str(ROOT),
           "RAY_AUTH_MODE": "disabled"}
    ray_head = serve_proc = ui_proc = None
    log = open(out / "demo-serve.log", "w", buffering=1)
    try:
        ray_head = subprocess.Popen(
            [_bin("ray"), "start", "--head", "--block", f"--port={gcs_port}", f"--num-gpus={args.gpus}",
             "--include-dashboard=false", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _wait_for_head(Path(log.name), ray_head, deadline=t0 + args.timeout_s)
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
              f"json.load(sys.stdin)[\"data\"][0][\"b64_json\"]))' > out.png")
        png = client.image("a lighthouse at dusk", model=model, seed=1)
        (out / "demo.png").write_bytes(png)
        print(f"first image after {time.monotonic() - t0:.1f} s -> {out / 'demo.png'} ({len(png)} bytes)")
        ui_url = None
        if not args.no_ui and (ROOT / "ui" / "app.py").exists():  # after the first image: not to slow it
            ui_port = free_port(args.ui_port)
            ui_url = f"http://127.0.0.1:{ui_port}"
            ui_log = open(out / "demo-ui.log", "w", buffering=1)
            ui_proc = subprocess.Popen([sys.executable, str(ROOT / "ui" / "app.py"), "--api", url,
                                        "--port", str(ui_port)], stdout=ui_log, stderr=subprocess.STDOUT,
                                       env={**env, "GRADIO_ANALYTICS_ENABLED": "False"}, cwd=ROOT, start_new_session=True)
        if ui_url is not None:
            _wait_for_ui(ui_url, ui_proc, time.monotonic() + 60)
            print(f"UI: {ui_url}  (log: {out / 'demo-ui.log'})" if ui_proc.poll() is None
                  else f"the UI did not start; see {out / 'demo-ui.log'}", flush=True)
        if args.once:
            return 0
        print("serving; Ctrl-C to stop")
        serve_proc.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(ui_proc, grace_s=5.0)
        _stop(serve_proc)
        _stop(ray_head)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
