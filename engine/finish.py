"""Why a generation ended: a decoded sequence's or an SMC particle's ``finish_reason``.

A ``str`` enum, so the members are the very strings the protocol carries (``"stop"``, ...).
"""

from __future__ import annotations

from enum import StrEnum


class FinishReason(StrEnum):
    STOP = "stop"  # EOS (unless ignore_eos) or a stop string
    LENGTH = "length"  # max_tokens generated
    ABORT = "abort"  # the client went away
    ERROR = "error"  # the worker failed it (the event says how)
    VIOLATED = "violated"  # SMC: every continuation breaks a hard constraint, or a potential ruled it out
