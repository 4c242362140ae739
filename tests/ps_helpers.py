"""Helpers shared by the parameter-server tests."""
from __future__ import annotations

from trainlib.sync.ps.client import PSClient


def server_stats(addr: str, token: str) -> dict:
    """One server's STATS, asked by a short-lived client of its own."""
    c = PSClient([addr], token, worker=0, nworkers=1, timeout_s=10)
    c.hello()
    try:
        return c.stats(0)
    finally:
        c.close()
