"""Shared engine code: model loading, the KV block layout, sampling and detokenisation."""
