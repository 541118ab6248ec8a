"""The multi-host suite runs only when asked for by name (``-m multihost``, ``make test-multihost``):
it needs root and builds network namespaces. ``addopts`` deselects it by default; a ``-m`` of your
own replaces that, so one that does not name it (``-m "not e2e"``) skips it here instead."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "multihost" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="multi-host suite: run it with -m multihost (make test-multihost)")
    for item in items:
        if "multihost" in item.keywords:
            item.add_marker(skip)
