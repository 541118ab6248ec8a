"""The Python client library for the smcserve gRPC API."""

from smcserve.client.client import Client, Completion

__all__ = ["Client", "Completion"]
