"""`make demo` stopped by SIGTERM (a supervisor, `kill`, `timeout`) is as clean as Ctrl-C: the
Ray head, `serve run`, the load and the UI all stop and no port stays taken; and while it runs,
`serve status` (with the address the demo prints) lists the stage deployments (issue 21)."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _port_free(port: int) -> bool:
    """Nothing listens there (connections closed by the server may still sit in TIME_WAIT, which
    does not keep a new server from binding with SO_REUSEADDR, as uvicorn and Ray do)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


def _procs_mentioning(needle: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if needle in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_sigterm_stops_everything_and_serve_status_works_meanwhile(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "trident_rs.devtools.demo", "--no-ui", "--no-cluster",
                             "--out", str(tmp_path)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving;"):
                break
        text = "".join(lines)
        assert "serving;" in text, text
        gcs = int(re.search(r"Ray head 127\.0\.0\.1:(\d+)", text).group(1))
        dash = re.search(r"dashboard (http://127\.0\.0\.1:(\d+))", text)
        http = int(re.search(r"at http://127\.0\.0\.1:(\d+)", text).group(1))
        first = float(re.search(r"first image after ([\d.]+) s", text).group(1))
        status = subprocess.run([str(Path(sys.executable).with_name("serve")), "status", "--address", dash.group(1)],
                                env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "encode-w1" in status.stdout and "diffuse-w1" in status.stdout, status
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0 and "stopped" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1.0)
    assert _procs_mentioning(f"--port={gcs}") == []  # the Ray head (`ray start --block`) is gone
    assert _procs_mentioning(f"127.0.0.1:{gcs}") == []  # and every Ray process of that cluster
    assert _procs_mentioning(str(tmp_path / "demo-config.yaml")) == []  # `serve run` is gone
    for port in (gcs, int(dash.group(2)), http):
        assert _port_free(port), f"port {port} still taken"
    print(f"first image after {first:.1f} s")
