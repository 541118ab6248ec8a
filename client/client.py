"""A small synchronous client for the smcserve gRPC API."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from smcserve.protos import smcserve_pb2 as pb
from smcserve.protos import smcserve_pb2_grpc
from smcserve.protos.messages import BUILTIN_KINDS, DEFAULT_ADDRESS, build_request, potential_message
from smcserve.scheduler.auth import API_KEY_ENV

__all__ = ["BUILTIN_KINDS", "DEFAULT_ADDRESS", "Client", "Completion", "build_request", "potential_message"]


@dataclass
class Completion:
    request_id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    usage: pb.Usage | None = None
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)  # with logprobs=k: one per token


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, key: str):
        self.entry = ("authorization", f"Bearer {key}")

    def _with_key(self, details):
        return details._replace(metadata=[*(details.metadata or ()), self.entry])

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)


def channel_credentials(tls: bool | str) -> grpc.ChannelCredentials | None:
    """TLS credentials: ``True`` trusts the system's root certificates, a path the CA certificate (PEM) in
    that file; ``False``/"": None (plaintext)."""
    if not tls:
        return None
    if isinstance(tls, str):
        with open(tls, "rb") as f:
            return grpc.ssl_channel_credentials(f.read())
    return grpc.ssl_channel_credentials()


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None, tls: bool | str = False):
        """``api_key``: sent as a bearer token (default: ``$SMCSERVE_API_KEY``, if set). ``tls``: True
        (the system's root certificates) or the path of a CA certificate (PEM) to trust."""
        credentials = channel_credentials(tls)
        if credentials is not None:
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        channel = grpc.intercept_channel(self.channel, _Bearer(key)) if key else self.channel
        self.stub = smcserve_pb2_grpc.SmcServeStub(channel)

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
            out.logprobs.extend(r.logprobs)
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
        plus ``extensions``, ``scheme``, ``ess_threshold`` and the patch rule (``patch_max_tokens``,
        ``entropy_threshold``: nats or ``"auto"``, ``weight_drop``; see ``smc.patch``). ``potentials``: dicts such as
        ``{"kind": "max_word_length", "max_len": 5, "weight": 1.0}`` or, for a plugin,
        ``{"kind": "max_bytes", "options": {"limit": 40}}`` (see :func:`potential_message`)."""
        steering = {"particles": particles, "potentials": list(potentials)}
        for key in ("extensions", "scheme", "ess_threshold", "patch_max_tokens", "entropy_threshold", "weight_drop"):
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


def add_connection_arguments(parser) -> None:
    """The flags every command that connects takes: ``--address``, ``--api-key``, ``--tls``, ``--tls-ca``."""
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="server address")
    parser.add_argument("--api-key", default=None, help=f"API key (default: ${API_KEY_ENV})")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the system's root certificates)")
    parser.add_argument("--tls-ca", default=None, help="connect with TLS, trusting this CA certificate (PEM)")


def client_from_args(args) -> Client:
    return Client(args.address, args.api_key, args.tls_ca or args.tls)
