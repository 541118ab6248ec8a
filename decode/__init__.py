"""Decode pool: loads prompt KV from the store and generates; each worker serves a gRPC service."""
