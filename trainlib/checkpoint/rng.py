"""Every random number generator a training step may draw from, as checkpointable state.

Bit-identical resume needs all of them on every rank: torch's CPU generator (dropout, init,
randperm without an explicit generator), each CUDA device's generator, Python's `random` and
NumPy's legacy global generator. Explicit `torch.Generator`s (the data sampler's) are the
owner's business: they are re-seeded from saved state by the sampler itself.
"""
from __future__ import annotations

import random
from typing import Any

import torch


def capture() -> dict[str, Any]:
    """This rank's RNG states as a checkpointable tree (tensors and JSON values)."""
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:  # numpy is optional at runtime
        return out
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


def restore(state: dict[str, Any]) -> None:
    """Set every generator captured by `capture` (on a machine with fewer GPUs, the first ones)."""
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
