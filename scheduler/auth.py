"""Who may call: the public API's keys (``--api-key``) and the decode workers' cluster secret.

A client sends ``authorization: Bearer <key>`` (gRPC metadata; the HTTP header of the same name);
:class:`ApiKeys` compares it with every configured key in constant time and names the caller by a
short digest of its key, so that ``Abort`` cancels only requests started with the same key. The
decode workers' internal service requires ``x-smcserve-secret`` (``decode.secret``), a random
secret the scheduler makes at start and hands to its workers through Ray; the scheduler's stubs
send it (:func:`with_secret`).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from smcserve.decode.secret import SECRET_HEADER

OPEN = ""  # the caller when no key is configured
API_KEY_ENV = "SMCSERVE_API_KEY"  # the key(s), server and client side, when no flag gives them (not in `ps`)


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` entry ("" when there is none)."""
    for name, value in metadata or ():
        if name.lower() == "authorization":
            value = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


@dataclass(frozen=True)
class ApiKeys:
    """The keys a caller may present; none configured: everyone may call (as :data:`OPEN`)."""

    keys: tuple[str, ...] = field(default=(), repr=False)  # never in a repr or a log

    @classmethod
    def parse(cls, text: str | None) -> ApiKeys:
        """``key`` or ``key1,key2,...`` (each a caller of its own)."""
        return cls(tuple(k.strip() for k in (text or "").split(",") if k.strip()))

    def caller(self, metadata) -> str | None:
        """The caller's key id, :data:`OPEN` when no key is configured, None for a missing or wrong key."""
        if not self.keys:
            return OPEN
        token = bearer(metadata).encode()
        found = None
        for key in self.keys:  # every key compared, in constant time each
            if hmac.compare_digest(token, key.encode()):
                found = key_id(key)
        return found


class _Entries:
    def __init__(self, entries: tuple[tuple[str, str], ...]):
        self.entries = entries

    def _details(self, d):
        return d._replace(metadata=grpc.aio.Metadata(*(d.metadata or ()), *self.entries))


class _UnaryMetadata(_Entries, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _StreamMetadata(_Entries, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def adding_metadata(entries: tuple[tuple[str, str], ...]) -> list:
    """Interceptors for a ``grpc.aio`` channel: every call carries ``entries`` (one interceptor per call
    kind: the channel files each under its first kind only)."""
    return [_UnaryMetadata(entries), _StreamMetadata(entries)]


def with_secret(secret: str) -> list:
    """Interceptors for a ``grpc.aio`` channel to a decode worker: every call carries the secret."""
    return adding_metadata(((SECRET_HEADER, secret),)) if secret else []


def with_api_key(key: str | None) -> list:
    """Interceptors for a ``grpc.aio`` channel to the API: every call carries ``key`` as a bearer token."""
    return adding_metadata((("authorization", f"Bearer {key}"),)) if key else []
