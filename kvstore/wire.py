"""One round trip for a batch of single-key commands on a redis-py connection, without copying block bytes.

redis-py opens, authenticates (and TLS-wraps) the connection; this module then writes a whole batch and
reads its replies on the connection's socket itself, because the values are large (a KV block is hundreds
of KB) and redis-py would copy each one several times:

- writing, a value may be given in pieces (the block header and a memoryview of the tensor's bytes), sent
  as they are: no joined copy of header and payload;
- reading, a bulk reply is received straight into a ``bytearray`` of its exact size (one copy, kernel to
  the buffer) that the codec then wraps as a tensor without copying again (``decode_block(take=True)``).

Replies understood: bulk strings (``$``; RESP3 null ``_``), arrays of them (``*``, MGET), integers
(``:``), simple strings (``+``) and errors (``-``, returned as ``ResponseError`` in the command's slot).
Anything else, or a broken socket, disconnects the connection (its replies are out of step) and raises
``redis.ConnectionError``. A connection whose parser still holds unread bytes (never, after a clean
handshake) is not read this way: the batch falls back to redis-py's own ``read_response``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
from redis.exceptions import ResponseError

_CHUNK = 1 << 16
_INLINE_MAX = 1 << 14  # smaller pieces are copied into the write buffer, larger ones sent as they are
Value = bytes | bytearray | memoryview | str | int | tuple  # a tuple: one value in pieces (Deferred ones too)


class Deferred:
    """A piece of ``nbytes`` bytes that ``fn()`` makes when the write reaches it (a block header whose
    crc32 another thread computes while the blocks before it are being sent)."""

    __slots__ = ("nbytes", "fn")

    def __init__(self, nbytes: int, fn: Callable[[], bytes]) -> None:
        self.nbytes = nbytes
        self.fn = fn


def _nbytes(piece: Any) -> int:
    return piece.nbytes if isinstance(piece, (memoryview, Deferred)) else len(piece)


def pack(commands: Sequence[Sequence[Value]]) -> Iterator:
    """RESP-encode ``commands``, lazily: large pieces are passed through (zero copy), a ``Deferred`` piece
    is made when the write reaches it."""
    buf = bytearray()
    for cmd in commands:
        buf += b"*%d\r\n" % len(cmd)
        for arg in cmd:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, int):
                arg = b"%d" % arg
            pieces = arg if isinstance(arg, tuple) else (arg,)
            buf += b"$%d\r\n" % sum(_nbytes(p) for p in pieces)
            for p in pieces:
                if isinstance(p, Deferred):
                    made = p.fn()
                    if len(made) != p.nbytes:
                        raise ValueError(f"a deferred piece made {len(made)} bytes, not {p.nbytes}")
                    buf += made
                elif _nbytes(p) > _INLINE_MAX:
                    yield buf
                    yield p
                    buf = bytearray()
                else:
                    buf += p
            buf += b"\r\n"
    if buf:
        yield buf


class _Reader:
    """Reads RESP replies from a socket, bulk payloads straight into their own buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise redis.ConnectionError("connection closed by server")
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n", self.pos)) < 0:
            self._fill()
        line = bytes(self.buf[self.pos : end])
        self.pos = end + 2
        return line

    def _exact(self, n: int) -> bytearray:
        out = bytearray(n)
        view = memoryview(out)
        have = min(n, len(self.buf) - self.pos)
        view[:have] = self.buf[self.pos : self.pos + have]
        self.pos += have
        got = have
        while got < n:
            r = self.sock.recv_into(view[got:], n - got)
            if not r:
                raise redis.ConnectionError("connection closed by server")
            got += r
        return out

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self._exact(n)
            if self._line() != b"":
                raise redis.ConnectionError("protocol error: bulk string not followed by CRLF")
            return data
        if kind == b"*":  # MGET
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"_":
            return None
        if kind == b"-":
            return ResponseError(rest.decode(errors="replace"))
        raise redis.ConnectionError(f"unexpected reply type {kind!r} in a batch")

    def clean(self) -> bool:
        return self.pos == len(self.buf)


def run(conn: Any, commands: Sequence[Sequence[Value]]) -> list[Any]:
    """Write ``commands`` on ``conn`` (a redis-py connection from its pool) and read every reply; each
    result is the reply or a ``ResponseError``. Raises ``redis.ConnectionError``/``TimeoutError`` (and
    disconnects ``conn``) when the connection breaks."""
    send(conn, commands)
    return receive(conn, len(commands))


def send(conn: Any, commands: Sequence[Sequence[Value]]) -> None:
    try:
        conn.send_packed_command(pack(commands), check_health=False)
    except (redis.RedisError, OSError):
        raise
    except Exception as err:  # from a Deferred piece: the connection was closed mid-command
        raise redis.ConnectionError(f"batch aborted while writing: {err!r}") from err


def receive(conn: Any, n: int) -> list[Any]:
    buffered = getattr(getattr(conn, "_parser", None), "_buffer", None)
    sock = getattr(conn, "_sock", None)
    if sock is None or buffered is None or buffered.unread_bytes():
        return [_read_via_redis_py(conn) for _ in range(n)]
    reader = _Reader(sock)
    try:
        out = [reader.reply() for _ in range(n)]
    except TimeoutError as err:  # socket.timeout
        conn.disconnect()
        raise redis.TimeoutError(f"timeout reading from Redis: {err}") from err
    except OSError as err:
        conn.disconnect()
        raise redis.ConnectionError(f"error reading from Redis: {err}") from err
    except BaseException:
        conn.disconnect()
        raise
    if not reader.clean():  # bytes nobody asked for: do not hand this connection to anyone else
        conn.disconnect()
    return out


def _read_via_redis_py(conn: Any) -> Any:
    try:
        return conn.read_response()
    except ResponseError as err:
        return err
