"""Hypothesis fuzz of the HTTP API, in-process (the ingress's FastAPI app, fake controller/stages).

    .venv/bin/python benchmarks/fuzz_http.py [--cases 10000] [--out benchmarks/results/fuzz_http.json]

Asserts no response has status >= 500 and that the app still answers (healthz + one valid
generation) afterwards; prints the status counts and writes them as JSON. Stops by itself
(bounded by --cases and --max-s).
"""
import argparse
import asyncio
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from ingress_fakes import FUZZ_CONFIG, http_requests, make_ingress, unpatch  # noqa: E402


def fuzz(cases: int, max_s: float = 600.0) -> dict:
    app, inst = make_ingress(FUZZ_CONFIG)
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fuzz", timeout=30)
    counts: collections.Counter = collections.Counter()
    edit_counts: collections.Counter = collections.Counter()  # POST /v1/images/edits alone
    bad: list = []
    t0 = time.perf_counter()

    @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(http_requests())
    def one(req):
        if time.perf_counter() - t0 > max_s:
            return
        method, path, headers, body = req
        r = loop.run_until_complete(client.request(method, path, headers=headers, content=body))
        counts[r.status_code] += 1
        if path == "/v1/images/edits":
            edit_counts[r.status_code] += 1
        if r.status_code >= 500 and len(bad) < 20:
            bad.append({"method": method, "path": path, "body": body[:200].decode("latin-1"),
                        "status": r.status_code, "text": r.text[:300]})

    try:
        one()
        loop.run_until_complete(asyncio.sleep(0.2))  # let background video jobs finish
        health = loop.run_until_complete(client.get("/healthz")).status_code
        valid = loop.run_until_complete(client.post("/v1/generate", json={
            "model": "tiny-sd3", "prompt": "after", "height": 64, "width": 64, "steps": 1})).status_code
        leaked = sum(inst.admission.per_model.values())
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        unpatch()
    total = sum(counts.values())
    return {"cases": total, "status_counts": {str(k): v for k, v in sorted(counts.items())},
            "status_5xx": sum(v for k, v in counts.items() if k >= 500), "examples_5xx": bad,
            "edits": {"cases": sum(edit_counts.values()), "status_counts": {str(k): v for k, v in sorted(edit_counts.items())},
                      "status_5xx": sum(v for k, v in edit_counts.items() if k >= 500)},
            "healthz_after": health, "valid_generate_after": valid, "admission_slots_leaked": leaked,
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--max-s", type=float, default=600.0)
    ap.add_argument("--out", default="benchmarks/results/fuzz_http.json")
    a = ap.parse_args()
    res = fuzz(a.cases, a.max_s)
    print(json.dumps({k: v for k, v in res.items() if k != "examples_5xx"}, indent=1))
    for ex in res["examples_5xx"][:5]:
        print("5xx:", ex)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    ok = res["status_5xx"] == 0 and res["healthz_after"] == 200 and res["valid_generate_after"] == 200
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
