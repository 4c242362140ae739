"""Data parallelism: gradient buckets and the backward-overlapped DataParallel wrapper."""
from .buckets import Bucket, build_buckets, plan_buckets
from .clip import clip_grad_norm_, grad_norm
from .wrapper import DataParallel

__all__ = ["Bucket", "DataParallel", "build_buckets", "clip_grad_norm_", "grad_norm", "plan_buckets"]
