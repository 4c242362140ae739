"""trainlib: distributed training runtime for PyTorch. See README.md and ../DESIGN.md."""
from __future__ import annotations

import importlib
import logging as _logging

from .mesh import Mesh, MeshLayout
from .runtime import Runtime, init

__version__ = "0.1.0"

_logging.getLogger("trainlib").addHandler(_logging.NullHandler())

# Subpackages and late-bound names load on first use, so `import trainlib` stays light
# (launchers import it in containers that may never touch tensor or pipeline parallelism).
_LAZY = {
    "DataParallel": ("trainlib.data_parallel", "DataParallel"),
    "AllReduce": ("trainlib.sync", "AllReduce"),
    "ParameterServer": ("trainlib.sync", "ParameterServer"),
    "MixedPrecision": ("trainlib.precision", "MixedPrecision"),
    "DistributedOptimizer": ("trainlib.optim", "DistributedOptimizer"),
    "clip_grad_norm_": ("trainlib.data_parallel", "clip_grad_norm_"),
    "tensor_parallel": ("trainlib.tensor_parallel", None),
    "pipeline": ("trainlib.pipeline", None),
    "checkpoint": ("trainlib.checkpoint", None),
    "parallelize": ("trainlib.compose", "parallelize"),
    "Callback": ("trainlib.callbacks", "Callback"),
}

__all__ = ["init", "Runtime", "Mesh", "MeshLayout", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'trainlib' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)
