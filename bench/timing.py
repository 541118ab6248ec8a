"""What the benchmarks share: the prompt and a streamer that timestamps HF ``generate``."""

from __future__ import annotations

import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class StreamClock:
    """An HF streamer that records when each batch of tokens arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass
