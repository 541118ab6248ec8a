"""A small synchronous client for the smcserve gRPC API."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import grpc

from protos import smcserve_pb2 as pb
from protos import smcserve_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: pb.Usage | None = None


def potential_message(pot: dict | pb.Potential) -> pb.Potential:
    """A ``Potential`` message from a dict such as ``{"kind": "regex", "pattern": "[0-9]+"}``.

    Keys are the message's fields (``kind``, ``weight``, ``pattern``, ``grammar``, ``format``, ``schema``,
    ``max_len``, ``chars``, ``case_sensitive``, ``phrases``, ``n``, ``prompts``) plus ``options``: a
    JSON-like dict for an operator-installed (plugin) kind, sent as a ``google.protobuf.Struct``
    (numbers travel as doubles; the server hands integral ones to the plugin as int).
    ``case_insensitive`` is accepted too (the server-side name) and sent as ``case_sensitive``;
    ``schema`` may be a dict (sent as JSON text). A ``Potential`` message is passed through.
    """
    if isinstance(pot, pb.Potential):
        return pot
    d = dict(pot)
    options = d.pop("options", None)
    if "case_insensitive" in d:
        ci = d.pop("case_insensitive")
        if ci is not None:
            d["case_sensitive"] = not ci
    if isinstance(d.get("schema"), (dict, bool)):
        d["schema"] = json.dumps(d["schema"])
    if d.get("weight") is None:
        d.pop("weight", None)
    try:
        msg = pb.Potential(**d)
    except (TypeError, ValueError) as err:
        raise ValueError(f"potential {pot!r}: {err}") from None
    if options:
        if not isinstance(options, Mapping):
            raise ValueError(f"potential {pot.get('kind')!r}: options must be a dict, got {type(options).__name__}")
        try:
            msg.options.update(options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"potential {pot.get('kind')!r}: options are not JSON-like: {err}") from None
    return msg


def build_request(prompt: str | None = None, messages: Sequence[dict] | None = None, *, request_id: str = "",
                  model: str = "", temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                  max_tokens: int | None = None, stop: Sequence[str] = (), seed: int | None = None,
                  ignore_eos: bool = False, steering: dict | None = None) -> pb.GenerateRequest:
    """A GenerateRequest from a raw ``prompt`` or chat ``messages`` ([{"role", "content"}, ...]).

    ``steering``: {"particles": N, "extensions": K, "scheme": ..., "ess_threshold": ...,
    "potentials": [{"kind": "regex", "pattern": ...}, ...]} turns on SMC steering (each potential a
    dict as :func:`potential_message` takes it, plugin ``options`` included, or a ``Potential`` message).
    """
    sampling = pb.SamplingParams(top_k=top_k, stop=list(stop), ignore_eos=ignore_eos)
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if seed is not None:
        sampling.seed = seed
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=sampling)
    if steering is not None:
        spec = dict(steering)
        potentials = spec.pop("potentials", [])
        req.steering.CopyFrom(pb.SteeringSpec(**spec))
        req.steering.potentials.extend(potential_message(pot) for pot in potentials)
    if messages is not None:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        req.prompt = prompt or ""
    return req


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS):
        self.channel = grpc.insecure_channel(address)
        self.stub = smcserve_pb2_grpc.SmcServeStub(self.channel)

    def stream(self, prompt: str | None = None, messages: Sequence[dict] | None = None, **kw) -> Iterator[pb.GenerateResponse]:
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

    def steer(self, prompt: str | None = None, messages: Sequence[dict] | None = None, *, particles: int,
              potentials: Sequence[dict] = (), on_progress=None, **kw) -> pb.SteeringResult:
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

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
