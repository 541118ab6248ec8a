"""What an SMC particle group needs from the decode loop it lives in (:class:`decode.loop.DecodeLoop`).

Every method runs in the loop's thread (inside :meth:`DecodeLoop.call`, or from a step's
``ExtendJob.complete``), between or within steps, so the pool never changes under a forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from typing import Protocol

import torch

from smcserve.decode.batcher import ExtendJob, Reservation
from smcserve.engine.block_manager import BlockTable
from smcserve.engine.speculative import Speculator


class ParticleHost(Protocol):
    block_size: int  # tokens per KV block

    @property
    def fingerprint(self) -> str:
        """The model's, for KV block keys."""
        ...

    def fork(self, table: BlockTable) -> BlockTable:
        """A table sharing every block of ``table`` (copy-on-write)."""
        ...

    def free(self, tables: Iterable[BlockTable]) -> None:
        """Release every block of ``tables`` (they are left empty)."""
        ...

    def load(self, tokens: list[int], keys: list[str]) -> BlockTable:
        """A table holding the KV of ``tokens`` (chained block keys ``keys``): from the worker's prefix
        cache, else the KV store, else recomputed. Raises ``OutOfBlocks`` when the pool is full."""
        ...

    def save(self, table: BlockTable, tokens: list[int], keys: list[str]) -> None:
        """Write ``table``'s blocks to the KV store under ``keys`` (and to the worker's prefix cache)."""
        ...

    def reserve(self, request_id: str, reservation: Reservation) -> None:
        """Claim the blocks a steering request may hold (``Batcher.reserve``); ``OutOfBlocks`` if not free."""
        ...

    def release(self, request_id: str) -> None:
        """Drop the request's claim (its particles are freed)."""
        ...

    def count_imported(self, n: int) -> None:
        """Count ``n`` particles that migrated in from another worker (``WorkerStats.particles_imported``)."""
        ...

    @property
    def speculator(self) -> Speculator | None:
        """The MTP heads' drafter (``--speculative mtp``; its ``stats`` count the drafts), or None."""
        ...

    def truncate(self, table: BlockTable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` slots of ``table`` (rejected drafts' slots are rolled back)."""
        ...

    def count_drafts(self, k: int, accepted: int) -> None:
        """Count a verify of ``k`` drafts of which the first ``accepted`` were accepted (``SpecStats``)."""
        ...

    def extend(self, job: ExtendJob) -> Future:
        """Run ``job`` in the next batched step (a patch queues its next position from the last one's ``complete``)."""
        ...

    def prompt_logits(self, tokens: list[int]) -> torch.Tensor:
        """The model's next-token logits after every prefix of ``tokens`` ([len, vocab]; ``auto`` patches)."""
        ...
