"""The environment the emulated-cluster tests give `trainlib launch` on every node."""
from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def job_env(tmp: Path, timeout_s: float = 60.0, **extra: str) -> dict[str, str]:
    """This process's env without launcher variables (the cluster sets a pod's), one thread per
    rank, trainlib's waits bounded by timeout_s, and this interpreter's bin on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TRAINLIB_TIMEOUT_S=str(timeout_s),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(extra)
    return env
