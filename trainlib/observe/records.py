"""A metrics record (one log window, as the trainer writes it to train.metrics) as flat numeric series.

Sinks log every numeric key they find, so a key the trainer adds later flows through without a
change here. Nested per-rank values become one series per rank:

    {"step": 10, "loss": 2.5, "per_rank": {"t_step_s": [0.11, 0.14]}}
    -> {"loss": 2.5, "per_rank/t_step_s/0": 0.11, "per_rank/t_step_s/1": 0.14}
"""
from __future__ import annotations

from typing import Any

# the x axis every sink logs against, not a series of its own
STEP_KEY = "step"


def flatten_numeric(record: dict[str, Any], sep: str = "/") -> dict[str, float]:
    """Every int/float leaf of `record` (nested dicts and lists included), keyed by its path joined
    with `sep`; strings, None and bools are left out (a bool is a flag, not a measurement)."""
    out: dict[str, float] = {}
    _walk(record, "", sep, out)
    out.pop(STEP_KEY, None)
    return out


def _walk(value: Any, prefix: str, sep: str, out: dict[str, float]) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, (int, float)):
        out[prefix] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{prefix}{sep}{k}" if prefix else str(k), sep, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{prefix}{sep}{i}" if prefix else str(i), sep, out)


def flatten_config(config: dict[str, Any], sep: str = ".") -> dict[str, str]:
    """A config tree as `section.key -> str(value)`: what MLflow keeps as a run's params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{sep}{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)

    walk(config, "")
    return out
