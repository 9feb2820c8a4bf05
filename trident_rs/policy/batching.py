"""How many same-shape requests to batch into one launch."""
from __future__ import annotations

from typing import Callable


def best_batch_size(time_of: Callable[[int], float], max_batch: int, gain: float = 1.05) -> int:
    """The batch size (powers of two up to `max_batch`) with the most requests per second, a
    larger size taken only if it beats the best so far by `gain`. `time_of(b)` is the launch's
    predicted seconds at batch b; a cost model without batch data (it raises) means batch 1."""
    best_size, best_rate = 1, 1.0 / time_of(1)
    size = 2
    while size <= max_batch:
        try:
            rate = size / time_of(size)
        except Exception:  # noqa: BLE001 - no batch data: do not batch
            break
        if rate > best_rate * gain:
            best_size, best_rate = size, rate
        size *= 2
    return best_size
