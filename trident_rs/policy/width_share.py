"""How one scheduling pass of the pool shares its free GPUs out as widths.

`WidthChoice` is what the pool policy decided a ready task may run at; `share_out` turns the
on-time tasks' choices and the free GPU count into a width for each."""
from __future__ import annotations

import heapq
from dataclasses import dataclass

SPARE_RULES = ("gain", "deadline")


@dataclass(frozen=True)
class WidthChoice:
    widths: tuple[int, ...]  # on time: the on-time widths, narrowest first; late: the one it waits for
    time: dict[int, float]  # stage seconds per width (batch 1)
    rest: float  # seconds of the stages after this one, as the on-time test counted them
    on_time: bool

    @property
    def narrowest(self) -> int:
        return self.widths[0]


def share_out(on_time: list[tuple[str, WidthChoice]], gpus: int, spare_rule: str = "gain") -> dict[str, int]:
    """Each on-time task's width now (`on_time` in queue order): the free GPUs cover every
    task's narrowest on-time width first; the spare then widens tasks up to their widest on-time
    width: `spare_rule="gain"`, where a GPU saves the most seconds (the widening of all queued
    ones with the largest time saved per extra GPU, again and again: long stages first, which
    are the tail); `"deadline"`, in queue (deadline) order."""
    out = {rid: c.narrowest for rid, c in on_time}
    spare = gpus - sum(out.values())
    if spare <= 0:
        return out
    if spare_rule == "deadline":
        for rid, c in on_time:
            fit = [w for w in c.widths if w - c.narrowest <= spare]
            out[rid] = w = max(fit)
            spare -= w - c.narrowest
        return out
    choices = dict(on_time)
    heap = []  # (-seconds saved per extra GPU, seq, request, from width, to width)
    for i, (rid, c) in enumerate(on_time):
        heap.extend((-gain(c, c.narrowest, w), i, rid, c.narrowest, w) for w in c.widths if w > c.narrowest)
    heapq.heapify(heap)
    while heap and spare > 0:
        neg, i, rid, base, w = heapq.heappop(heap)
        cur = out[rid]
        if w <= cur or neg >= 0:
            continue
        if base != cur:  # the task widened since: priced again from where it is
            heapq.heappush(heap, (-gain(choices[rid], cur, w), i, rid, cur, w))
            continue
        if w - cur <= spare:
            out[rid] = w
            spare -= w - cur
    return out


def gain(c: WidthChoice, narrow: int, wide: int) -> float:
    """Stage seconds saved per extra GPU by running at `wide` instead of `narrow`."""
    return (c.time[narrow] - c.time[wide]) / (wide - narrow)
