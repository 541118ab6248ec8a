"""What the public API's clients share below ``client/`` and ``loadtest/``: the default address.

:data:`DEFAULT_PORT` is where ``smcserve serve`` listens and :data:`DEFAULT_ADDRESS` where the client,
the CLI and ``smcserve bench`` connect, unless told otherwise. Both the client library and the load
tester import from here (the lowest layer), so neither has to import the other for it.
"""
from __future__ import annotations

DEFAULT_PORT = 50051
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"
