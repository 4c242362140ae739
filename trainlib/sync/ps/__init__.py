"""The parameter-server gradient-sync backend: sharded sync and bounded-staleness async over ZeroMQ.

protocol.py (wire format, MAC), sharding.py (partitions -> servers), state.py (what a server
holds), server.py (`trainlib ps-server`), client.py (a worker's requests), backend.py
(`ParameterServer`, the GradSync adapter), colocated.py / launch.py / token.py (starting servers).
"""
from .backend import ParameterServer

__all__ = ["ParameterServer"]
