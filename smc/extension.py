"""One child's extension by its drawn token: advance its potentials, decide how it ends, and its
log-weight increment. Shared by the decode workers (``decode.particles``) and the reference driver
(``smc.driver``), so the driver's statistical tests check the workers' arithmetic."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from .potentials import Potential, advance_all, finish_all
from .proposal import Proposal
from .step import LENGTH, STOP, VIOLATED


@dataclass(frozen=True)
class Extension:
    token: int  # −1: no token was allowed
    log_increment: float
    reason: str  # "" while running, else STOP, LENGTH or VIOLATED

    @property
    def finished(self) -> bool:
        """Finished or dead: never extended again."""
        return bool(self.reason)


def extend(
    potentials: Sequence[Potential],
    generated: list[int],
    prop: Proposal,
    row: int,
    col: int,
    eos_ids: Collection[int],
    max_tokens: int,
    ignore_eos: bool = False,
) -> Extension:
    """Append the token ``prop.tokens[row, col]`` to ``generated`` (in place) and advance ``potentials``
    (the child's own clones) with it.

    The increment is ``prop.increment(row, log G)`` with log G = Σ advance(token), plus Σ finish()
    when the child ends here: at EOS (STOP, unless ``ignore_eos``) or at ``max_tokens`` generated
    tokens (LENGTH). A child whose increment is −inf is VIOLATED (at EOS too: the text is incomplete
    for some potential), except one cut off at max_tokens, which stays LENGTH so the user learns to
    raise the limit. Token −1 (nothing allowed) is a dead child: increment −inf, VIOLATED.
    """
    token = int(prop.tokens[row, col])
    if token < 0:
        return Extension(-1, -math.inf, VIOLATED)
    log_g = advance_all(potentials, token)
    generated.append(token)
    reason = ""
    if token in eos_ids and not ignore_eos:
        reason = STOP
    elif len(generated) >= max_tokens:
        reason = LENGTH
    if reason:
        log_g += finish_all(potentials)
    inc = prop.increment(row, log_g)
    if inc == -math.inf and reason != LENGTH:
        reason = VIOLATED
    return Extension(token, inc, reason)
