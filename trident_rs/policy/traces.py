"""The published workload traces shipped in `benchmarks/data`, read in one place.

Two kinds of file:
- request traces (`arrival_s,height,width,num_frames,num_inference_steps`), one model each:
  the TridentServe authors' FLUX and HunyuanVideo traces, or any CSV of that format;
- the Azure LLM conversation trace, used only for its real arrival times (and a per-request
  key from its token columns, so shapes drawn from a mix vary deterministically with it).

Used by the policy layer (forecasts for the placement solver) and by the simulator (requests).
Pure Python + numpy: no Ray, no torch, nothing from `trident_rs.sim`.
"""
from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from trident_rs.errors import ConfigError
from trident_rs.policy.types import Shape

DATA_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "data"

# Published request traces by name -> (file name in DATA_DIR, model).
PAPER_TRACES: dict[str, tuple[str, str]] = {
    "flux-paper": ("flux_paper_trace.csv", "flux"),
    "hunyuanvideo-paper": ("hunyuanvideo_paper_trace.csv", "hunyuanvideo"),
}
AZURE_FILE = "azure_llm_conv_2023.csv"
TRACE_COLUMNS = ("arrival_s", "height", "width", "num_frames", "num_inference_steps")


@dataclass(frozen=True)
class TraceRow:
    """One request of a trace: when it arrives (s, trace clock), its model, shape and steps."""

    arrival: float
    model: str
    shape: Shape
    steps: int


def data_file(name: str) -> Path:
    """Path of a file shipped in `benchmarks/data`."""
    path = DATA_DIR / name
    if not path.is_file():
        raise ConfigError(f"workload file {name} not found in {DATA_DIR}")
    return path


def find_trace(workload: str) -> tuple[Path, str]:
    """Path and model of a named published trace, or of a CSV path (model guessed from its name)."""
    if workload in PAPER_TRACES:
        name, model = PAPER_TRACES[workload]
        return data_file(name), model
    path = Path(workload)
    if not path.is_file():
        raise ConfigError(f"unknown workload {workload!r}: not one of {sorted(PAPER_TRACES)} nor a CSV file")
    model = next((m for _, m in PAPER_TRACES.values() if m in path.name), "")
    if not model:
        raise ConfigError(f"cannot tell the model of {path.name}; name it like *flux*.csv or *hunyuanvideo*.csv")
    return path, model


def read_trace(path: Path | str, model: str) -> list[TraceRow]:
    """The rows of a request-trace CSV (columns `TRACE_COLUMNS`), all for `model`, in file order."""
    rows: list[TraceRow] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ConfigError(f"{path}: missing columns {missing}")
        for i, row in enumerate(reader, start=2):
            try:
                shape = Shape(int(row["height"]), int(row["width"]), int(row["num_frames"]))
                rows.append(TraceRow(float(row["arrival_s"]), model, shape, int(row["num_inference_steps"])))
            except ValueError as e:
                raise ConfigError(f"{path}:{i}: {e}") from None
    if not rows:
        raise ConfigError(f"{path}: no requests")
    return rows


def read_named_trace(workload: str) -> list[TraceRow]:
    """`read_trace` of `find_trace(workload)`."""
    path, model = find_trace(workload)
    return read_trace(path, model)


@functools.cache
def _azure_cached(path: str) -> tuple[np.ndarray, np.ndarray]:
    times, keys = [], []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            head, _, frac = r["TIMESTAMP"].partition(".")
            t = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + (frac or "0"))
            times.append(t)
            keys.append(int(r["ContextTokens"]) * 65_537 + int(r["GeneratedTokens"]))
    t = np.asarray(times)
    order = np.argsort(t, kind="stable")
    return t[order] - t[order][0], np.asarray(keys, dtype=np.int64)[order]


def azure_arrivals(path: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times (s from the first, sorted) and a per-request integer key from the token columns."""
    t, k = _azure_cached(str(path or data_file(AZURE_FILE)))
    return t.copy(), k.copy()


__all__ = ["AZURE_FILE", "DATA_DIR", "PAPER_TRACES", "TRACE_COLUMNS", "TraceRow", "azure_arrivals", "data_file",
           "find_trace", "read_named_trace", "read_trace"]
