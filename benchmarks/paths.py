"""Where benchmark results live, shared by the harness (writes them) and the table (reads them)
without either importing the other."""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def results_dir() -> Path:
    """benchmarks/results in a source checkout; ./benchmark-results elsewhere."""
    d = HERE / "results" if (HERE.parent / "setup.py").exists() else Path.cwd() / "benchmark-results"
    d.mkdir(parents=True, exist_ok=True)
    return d
