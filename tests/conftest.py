"""Shared pytest fixtures. Each block belongs to one package's tests; keep blocks separate."""

from __future__ import annotations

import os

import pytest

# --- engine: the graph cache writes beside an export; the shared tiny exports are read-only, so it is off
# unless a test turns it on (tests/test_graph_cache.py does, on its own copies) ------------------------------
os.environ.setdefault("STEPWISE_GRAPH_CACHE", "0")

# --- exporters: tiny exports shared by the whole session (tests/test_export*.py, engine tests) ---------


@pytest.fixture(scope="session")
def tiny_exports_home(tmp_path_factory):
    """The folder the session's tiny exports are written under (not a STEPWISE_HOME)."""
    return tmp_path_factory.mktemp("tiny-exports")


@pytest.fixture(scope="session")
def exported_tiny(tiny_exports_home):
    """``exported_tiny(family, **export_kwargs)`` -> the folder of a validated export of ``tiny:<family>``.

    Exported once per session per (family, kwargs), e.g. ``exported_tiny("sdxl")``,
    ``exported_tiny("sdxl", model_id="sdxl-turbo")``, ``exported_tiny("sd15", use_optimum=False)``.
    Treat the folder as read-only: copy it before changing anything in it.
    """
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import exporters

    cache: dict = {}

    def get(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in cache:
            suffix = "".join(f"-{k}={v}" for k, v in sorted(kwargs.items()))
            out = tiny_exports_home / f"tiny-{family}{suffix}"
            cache[key] = exporters.export(f"tiny:{family}", out=out, progress=None, **kwargs)
        return cache[key]

    return get


# --- end of the exporters block ---------------------------------------------------------------------------
