"""`PausedState`: the chunk state that paused requests hold in host memory.

A diffuse paused at a chunk boundary keeps its latents and its solver's state in host memory
(`payload_size.chunk_state_bytes`) until it resumes. Three owners keep this ledger: the pool
policy and the step-level baselines, so as to pause only within the budget, and the simulator,
which charges the state's trip back at resume and fails a run that overflows the budget."""
from __future__ import annotations

import math

from trident_rs.policy.payload_size import chunk_state_bytes
from trident_rs.policy.types import Request


class PausedState:
    def __init__(self, budget_bytes: float = math.inf) -> None:
        self.budget = budget_bytes
        self.bytes: dict[str, float] = {}  # request -> bytes of its state
        self.since: dict[str, float] = {}  # request -> when it paused (pause order)
        self.total = 0.0
        self.peak = 0.0

    @staticmethod
    def size(request: Request) -> float:
        """Bytes `request`'s state would hold if it paused now."""
        return chunk_state_bytes(request.model, request.shape)

    def __contains__(self, rid: str) -> bool:
        return rid in self.bytes

    def __len__(self) -> int:
        return len(self.bytes)

    @property
    def room(self) -> float:
        """Bytes left under the budget."""
        return self.budget - self.total

    def pause(self, request: Request, now: float) -> None:
        size = self.size(request)
        self.bytes[request.id], self.since[request.id] = size, now
        self.total += size
        self.peak = max(self.peak, self.total)

    def release(self, rid: str) -> bool:
        """The request resumed (or failed): its state leaves host memory. False if it held none."""
        size = self.bytes.pop(rid, None)
        if size is None:
            return False
        del self.since[rid]
        self.total -= size
        return True
