"""Benchmarks (JSON output; ratios measured side by side in one run). Not tests."""
