"""trainlib.testing.run_ranks, the multi-process harness every multi-rank test stands on."""
from __future__ import annotations

import time


def _late_store_read(delay_s: float) -> str:
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    if dist.get_rank() == 0:   # rank 0 hosts the store and returns at once
        store.set("late-read", "from rank 0")
        return "done"
    time.sleep(delay_s)        # rank 1 still needs the store (as one still building its groups does)
    return store.get("late-read").decode()


def test_store_host_waits_for_a_peer_still_using_the_store():
    """A rank that returns first must not take the job's store from a peer still building its groups
    (CI: 'DistNetworkError: Broken pipe' in new_group on the slower rank)."""
    from trainlib.testing import run_ranks

    t0 = time.monotonic()
    assert run_ranks(_late_store_read, 2, 1.5, timeout_s=60) == ["done", "from rank 0"]
    assert time.monotonic() - t0 < 30


def _fail_on_rank0() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        raise ValueError("rank 0 fails on purpose")
    time.sleep(0.5)


def test_a_failed_store_host_leaves_at_once():
    from trainlib.testing import RankError, run_ranks

    got = run_ranks(_fail_on_rank0, 2, timeout_s=60, expect_failure=True)
    assert isinstance(got[0], RankError) and "on purpose" in str(got[0]), got
