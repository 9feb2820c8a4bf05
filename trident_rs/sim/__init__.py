"""Discrete-event cluster simulator: runs any policy in virtual time (no ray, no torch)."""
from trident_rs.sim.config import SimConfig
from trident_rs.sim.engine import PolicyViolation, Simulator, simulate
from trident_rs.sim.records import SimResult, StageRecord
from trident_rs.sim.metrics import Metrics, summarize

__all__ = ["Metrics", "PolicyViolation", "SimConfig", "SimResult", "Simulator", "StageRecord", "simulate", "summarize"]
