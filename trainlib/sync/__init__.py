"""Gradient-sync backends behind one protocol (base.GradSync): collective all-reduce or a parameter server."""
from .allreduce import AllReduce
from .base import GradSync

__all__ = ["AllReduce", "GradSync", "ParameterServer"]


def __getattr__(name: str):
    if name == "ParameterServer":  # pyzmq and the server code load only when asked for
        from .ps import ParameterServer

        return ParameterServer
    raise AttributeError(f"module 'trainlib.sync' has no attribute {name!r}")
