"""Gradient compression on the wire: the names `sync.compress` / `AllReduce(compress=...)` accept,
each with the dtype a bucket is cast to before it is reduced (None: the bucket's own dtype).

The one list of them: the config validates `sync.compress` against it and AllReduce casts by it.
"""
from __future__ import annotations

import torch

COMPRESS: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
