"""Prefill pool: computes a prompt's KV and writes it, block by block, to the KV store."""
