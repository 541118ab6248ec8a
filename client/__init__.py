"""Python client and CLI for smcserve."""

from client.client import Client, Completion

__all__ = ["Client", "Completion"]
