"""Executors run one stage of one model on one replica (layer 3 in DESIGN.md).

All share `StageExecutor`: a batch of `StagePayload`s in, a batch out. Payload tensors are
numpy arrays, so they cross process boundaries through Ray's object store zero-copy.
"""
from trident_rs.executors.base import StageExecutor, StagePayload, build_executor

__all__ = ["StageExecutor", "StagePayload", "build_executor"]
