"""Admission: both placements and the early-rejection decision (as in Mooncake) in one call, :func:`place`.

A request is rejected when no decode instance has room for its KV blocks (``"decode: …"``), or, with
SLOs set, when its predicted TTFT or TBT misses them (``"ttft: …"``, ``"tbt: …"``). The caller turns a
rejection into ``RESOURCE_EXHAUSTED``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from smcserve.scheduler.conductor.cost import CostModel
from smcserve.scheduler.conductor.policies.base import (
    DecodeInstance,
    Policy,
    PrefillChoice,
    PrefillInstance,
    RequestInfo,
    kv_blocks_needed,
)


def admit(pred_ttft_ms: float, pred_tbt_ms: float, slo_ttft_ms: float | None, slo_tbt_ms: float | None) -> str | None:
    """None to admit; else why not (early rejection, as in Mooncake). An SLO of None is no limit."""
    if slo_ttft_ms is not None and pred_ttft_ms > slo_ttft_ms:
        return f"ttft: predicted {pred_ttft_ms:.0f} ms > SLO {slo_ttft_ms:.0f} ms"
    if slo_tbt_ms is not None and pred_tbt_ms > slo_tbt_ms:
        return f"tbt: predicted {pred_tbt_ms:.1f} ms > SLO {slo_tbt_ms:.1f} ms"
    return None


@dataclass
class Placement:
    prefill: PrefillChoice
    decode: DecodeInstance | None
    pred_tbt_ms: float  # cost.tbt_ms(decode.batch + 1); inf when no decode fits
    reject_reason: str | None  # None: admitted; "decode: …", "ttft: …" or "tbt: …"

    @property
    def admitted(self) -> bool:
        return self.reject_reason is None


def place(
    policy: Policy,
    req: RequestInfo,
    prefill: Sequence[PrefillInstance],
    global_hit_blocks: int,
    decode: Sequence[DecodeInstance],
    cost: CostModel,
    slo_ttft_ms: float | None = None,
    slo_tbt_ms: float | None = None,
) -> Placement:
    """Both choices and the admission decision in one call."""
    pc = policy.choose_prefill(req, prefill, global_hit_blocks, cost)
    dc = policy.choose_decode(req, decode, cost)
    if dc is None:
        return Placement(pc, None, math.inf, f"decode: no instance has {kv_blocks_needed(req)} free KV blocks")
    tbt = cost.tbt_ms(dc.batch + 1)
    return Placement(pc, dc, tbt, admit(pc.ttft_ms, tbt, slo_ttft_ms, slo_tbt_ms))
