"""Test-suite configuration shared by every test file.

`long`: tests that take minutes (e.g. the 1,000,000-message server fuzz). They are deselected unless
a `-m` expression is given, so `pytest -q tests` stays fast: run them with `pytest -m long tests`.
"""
from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: minutes-long test, deselected by default; run with `-m long`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.option.markexpr:  # the caller chose what runs (e.g. -m long, -m "long or not long")
        return
    long = [item for item in items if item.get_closest_marker("long")]
    if long:
        config.hook.pytest_deselected(items=long)
        items[:] = [item for item in items if not item.get_closest_marker("long")]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A real local Ray instance on this machine's 2 CPUs, one per test module (the Ray tests)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield
    ray.shutdown()
