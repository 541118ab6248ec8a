"""A small synchronous client for the smcserve gRPC API."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from smcserve.protos import smcserve_pb2 as pb
from smcserve.protos import smcserve_pb2_grpc
from smcserve.protos.messages import BUILTIN_KINDS, DEFAULT_ADDRESS, build_request, potential_message

__all__ = ["BUILTIN_KINDS", "DEFAULT_ADDRESS", "Client", "Completion", "build_request", "potential_message"]


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: pb.Usage | None = None


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS):
        self.channel = grpc.insecure_channel(address)
        self.stub = smcserve_pb2_grpc.SmcServeStub(self.channel)

    def stream(
        self, prompt: str | None = None, messages: Sequence[dict] | None = None, **kw
    ) -> Iterator[pb.GenerateResponse]:
        """Stream the responses; the last one has ``finish_reason`` and ``usage`` set."""
        return self.stub.Generate(build_request(prompt, messages, **kw))

    def generate(self, prompt: str | None = None, messages: Sequence[dict] | None = None, **kw) -> Completion:
        out = Completion()
        for r in self.stream(prompt, messages, **kw):
            out.request_id = r.request_id
            out.text += r.text
            out.token_ids.extend(r.token_ids)
            if r.finish_reason:
                out.finish_reason, out.usage = r.finish_reason, r.usage
        return out

    def steer(
        self,
        prompt: str | None = None,
        messages: Sequence[dict] | None = None,
        *,
        particles: int,
        potentials: Sequence[dict] = (),
        on_progress=None,
        **kw,
    ) -> pb.SteeringResult:
        """Run SMC steering; returns the weighted particles and log Z. Keyword arguments as for ``generate``
        plus ``extensions``, ``scheme`` and ``ess_threshold``. ``potentials``: dicts such as
        ``{"kind": "max_word_length", "max_len": 5, "weight": 1.0}`` or, for a plugin,
        ``{"kind": "max_bytes", "options": {"limit": 40}}`` (see :func:`potential_message`)."""
        steering = {"particles": particles, "potentials": list(potentials)}
        for key in ("extensions", "scheme", "ess_threshold"):
            if key in kw:
                steering[key] = kw.pop(key)
        result = None
        for r in self.stub.Generate(build_request(prompt, messages, steering=steering, **kw)):
            if r.HasField("progress") and on_progress is not None:
                on_progress(r.progress)
            if r.HasField("result"):
                result = r.result
        return result

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(pb.AbortRequest(request_id=request_id)).found

    def info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest())

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
