"""A CPU-load probe with a fixed answer, for the measured choices (dtype, speculation) that refuse to
cache timings taken on a busy machine: tests state the load instead of depending on this machine's."""


class FakeLoad:
    """A CPU-load probe that reports a fixed share of the CPU used by other processes."""

    def __init__(self, others: float):
        self.others = others

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None
