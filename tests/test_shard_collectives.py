"""Reduce-scatter and all-gather of flat buffers (sharded data parallel's collectives) on every
transport, against the formula: chunk r after reduce-scatter = the sum over the dp ranks of their
chunk r; every chunk k after all-gather = dp rank k's chunk k.

Inputs are small integers (|x| <= 8, sums <= 32), exact in fp32, bf16 and fp16 whatever the order
of summation, so every dtype and transport is compared for equality; random fp32 inputs are
compared bitwise with dp=2 (a + b is the same float in either order) and within 1e-6 otherwise.

One spawned group of 4 ranks runs every torch/shm/hierarchical case: dp=4 (hierarchical as 2
emulated nodes x 2 ranks, contiguous and interleaved, through $TRAINLIB_NODE_ID), dp=2 (two pairs;
hierarchical as 2 nodes x 1) and dp=3 + dp=1 (ranks 0-2 and rank 3 alone). MPI runs under a real
`mpiexec -n 3` when mpiexec and mpi4py exist:

    mpiexec -n 3 python -m tests.test_shard_collectives
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

WORLD = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
C = 40  # elements per chunk: not a multiple of shm's 16-element alignment
PARTITIONS = {"dp4": [[0, 1, 2, 3]], "dp2": [[0, 1], [2, 3]], "dp3": [[0, 1, 2], [3]]}
# (partition, transport, node of each global rank for $TRAINLIB_NODE_ID; None: one node)
CONFIGS = [
    ("dp4", "torch", None), ("dp4", "shm", None),
    ("dp4", "hierarchical", ["a", "a", "b", "b"]), ("dp4", "hierarchical", ["a", "b", "a", "b"]),
    ("dp2", "torch", None), ("dp2", "shm", None), ("dp2", "hierarchical", ["a", "b", "c", "d"]),
    ("dp3", "torch", None), ("dp3", "shm", None), ("dp3", "hierarchical", ["a", "b", "c", "d"]),
]


def _ints(k: int, numel: int, dtype: torch.dtype, salt: int = 0) -> torch.Tensor:
    """Rank k's exact input: integers in [-8, 8]."""
    i = torch.arange(numel)
    return ((i * (k + 3) + 7 * k + salt) % 17 - 8).to(dtype)


def _randn(k: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 + k))


def _reduce_scatter_case(sync, dp: int, me: int, numel: int, dtype: torch.dtype, from_alloc: bool) -> bool:
    flat = sync.alloc(numel, dtype, "cpu") if from_alloc else torch.zeros(numel, dtype=dtype)
    flat.copy_(_ints(me, numel, dtype))
    sync.start_reduce_scatter(flat)
    sync.wait()
    want = sum(_ints(k, numel, dtype).view(dp, -1)[me].double() for k in range(dp))
    return torch.equal(flat.view(dp, -1)[me].double(), want)


def _all_gather_case(sync, dp: int, me: int, numel: int, dtype: torch.dtype, from_alloc: bool) -> bool:
    flat = sync.alloc(numel, dtype, "cpu") if from_alloc else torch.zeros(numel, dtype=dtype)
    flat.fill_(float("nan"))  # every chunk but our own must be overwritten
    flat.view(dp, -1)[me].copy_(_ints(me, numel, dtype).view(dp, -1)[me])
    sync.start_all_gather(flat)
    sync.wait()
    want = torch.cat([_ints(k, numel, dtype).view(dp, -1)[k] for k in range(dp)])
    return torch.equal(flat, want)


def _all_gather_into_case(sync, dp: int, me: int, numel: int, dtype: torch.dtype, from_alloc: bool) -> bool:
    """start_all_gather_into(out, chunk): ZeRO-3's gather of a shard (from alloc(): read out of the peers'
    shared memory on shm) into private memory; twice, the shard changed in between, as between two steps."""
    per = numel // dp
    chunk = sync.alloc(per, dtype, "cpu") if from_alloc else torch.zeros(per, dtype=dtype)
    ok = True
    for salt in (0, 9):
        chunk.copy_(_ints(me, numel, dtype, salt).view(dp, -1)[me])
        out = torch.full((numel,), float("nan"), dtype=dtype)
        sync.start_all_gather_into(out, chunk)
        sync.wait()
        ok &= torch.equal(out, torch.cat([_ints(k, numel, dtype, salt).view(dp, -1)[k] for k in range(dp)]))
    return ok


def _overlapped_case(sync, dp: int, me: int) -> bool:
    """Four collectives in flight at once (as the wrapper starts them during backward), one wait();
    one buffer is not from alloc(), so on the shm transports it runs on torch beside their worker."""
    a, b, c = (sync.alloc(dp * C * (j + 1), torch.float32, "cpu") for j in range(3))
    d = torch.zeros(dp * C * 4)
    for t, salt in ((a, 1), (c, 3), (d, 4)):
        t.copy_(_ints(me, t.numel(), t.dtype, salt=salt))
    b.fill_(float("nan"))
    b.view(dp, -1)[me].copy_(_ints(me, b.numel(), b.dtype, salt=2).view(dp, -1)[me])
    sync.start_reduce_scatter(a)
    sync.start_reduce_scatter(d)
    sync.start_all_gather(b)
    sync.start_reduce_scatter(c)
    sync.wait()
    ok = torch.equal(b, torch.cat([_ints(k, b.numel(), b.dtype, 2).view(dp, -1)[k] for k in range(dp)]))
    for t, salt in ((a, 1), (c, 3), (d, 4)):
        ok &= torch.equal(t.view(dp, -1)[me], sum(_ints(k, t.numel(), t.dtype, salt).view(dp, -1)[me]
                                                  for k in range(dp)))
    return ok


def _start_returns_at_once(sync, dp: int, me: int) -> float:
    """Seconds the starts took on a rank whose last peer comes 0.6 s late (that peer: -1.0)."""
    import time

    a, b = sync.alloc(dp * C, torch.float32, "cpu"), sync.alloc(dp * C, torch.float32, "cpu")
    if me == dp - 1:
        time.sleep(0.6)
    t0 = time.perf_counter()
    sync.start_reduce_scatter(a)
    sync.start_all_gather(b)
    took = time.perf_counter() - t0
    sync.wait()
    return -1.0 if me == dp - 1 else took


def _random_fp32_case(sync, dp: int, me: int) -> float:
    """Max |error| of a reduce-scatter of random fp32 data; 0.0 means bitwise equal to sum()."""
    numel = dp * 1000
    flat = sync.alloc(numel, torch.float32, "cpu")
    flat.copy_(_randn(me, numel))
    sync.start_reduce_scatter(flat)
    sync.wait()
    parts = [_randn(k, numel).view(dp, -1)[me] for k in range(dp)]
    want = parts[0] + parts[1] if dp == 2 else sum(p.double() for p in parts)
    return (flat.view(dp, -1)[me].double() - want.double()).abs().max().item()


def _resized_storage_case(sync, dp: int, me: int) -> bool:
    """ZeRO-3 frees a gathered buffer with untyped_storage().resize_(0) and grows it back before the
    next all-gather: the transport must not hold on to the old memory (the torch path, and the
    torch fallback of the shm transports, which this buffer takes: it is not from alloc())."""
    numel = dp * C
    flat = torch.zeros(numel)
    ok = True
    for step in range(2):
        flat.view(dp, -1)[me].copy_(_ints(me, numel, flat.dtype, salt=step).view(dp, -1)[me])
        sync.start_all_gather(flat)
        sync.wait()
        ok &= torch.equal(flat, torch.cat([_ints(k, numel, flat.dtype, step).view(dp, -1)[k] for k in range(dp)]))
        flat.untyped_storage().resize_(0)
        flat.untyped_storage().resize_(numel * flat.element_size())
    flat.copy_(_ints(me, numel, flat.dtype, salt=5))
    sync.start_reduce_scatter(flat)
    sync.wait()
    return ok and torch.equal(flat.view(dp, -1)[me],
                              sum(_ints(k, numel, flat.dtype, 5).view(dp, -1)[me] for k in range(dp)))


def _bad_numel_message(sync, dp: int) -> str:
    try:
        sync.start_reduce_scatter(torch.zeros(dp * C + 1))
    except ValueError as e:
        return str(e)
    return ""


def _one_config(rank: int, part: str, transport: str, nodes: list[str] | None) -> dict:
    import torch.distributed as dist

    import trainlib as tl
    from trainlib import comm
    from trainlib.sync.shm import NODE_ID_ENV

    group = comm.subgroups(PARTITIONS[part], dist.group.WORLD)
    dp, me = dist.get_world_size(group), dist.get_rank(group)
    if nodes is None:
        os.environ.pop(NODE_ID_ENV, None)
    else:
        os.environ[NODE_ID_ENV] = nodes[rank]
    sync = tl.AllReduce(transport=transport)
    sync.bind_group(group)
    res: dict = {"dp": dp, "resolved": sync.resolved_transport}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        res[f"rs_{name}"] = _reduce_scatter_case(sync, dp, me, dp * C, dtype, from_alloc=True)
        res[f"ag_{name}"] = _all_gather_case(sync, dp, me, dp * C, dtype, from_alloc=True)
        # a buffer not from alloc(): the shm transports send it through torch (same result)
        res[f"rs_{name}_not_alloc"] = _reduce_scatter_case(sync, dp, me, dp * C, dtype, from_alloc=False)
        res[f"ag_{name}_not_alloc"] = _all_gather_case(sync, dp, me, dp * C, dtype, from_alloc=False)
        res[f"agi_{name}"] = _all_gather_into_case(sync, dp, me, dp * C, dtype, from_alloc=True)
        res[f"agi_{name}_not_alloc"] = _all_gather_into_case(sync, dp, me, dp * C, dtype, from_alloc=False)
    res["overlapped"] = _overlapped_case(sync, dp, me)
    res["start_s"] = _start_returns_at_once(sync, dp, me) if part == "dp2" else -1.0
    res["random_fp32_err"] = _random_fp32_case(sync, dp, me)
    res["resized"] = _resized_storage_case(sync, dp, me)
    res["bad_numel"] = _bad_numel_message(sync, dp) if dp > 1 else "n/a"
    shm = sync._shm
    res["shared_memory"] = shm is not None and _is_shm(sync.alloc(dp * C, torch.float32, "cpu"))
    sync.close()
    os.environ.pop(NODE_ID_ENV, None)
    return res


def _is_shm(t: torch.Tensor) -> bool:
    """Whether `t` lives in a shared file mapping (torch.from_file(shared=True))."""
    return t.untyped_storage().is_shared()


def _comm_flat_collectives(rank: int) -> dict:
    """comm.reduce_scatter_tensor / all_gather_into_tensor, in place and not, in each of their
    implementations on gloo: point-to-point, torch's native collective, and the fallback for a
    backend that lacks it (all-reduce / list all-gather; torch 2.5's gloo had no reduce-scatter).
    The transports' cases above run gloo's default choice (small buffers: all-reduce / native)."""
    import torch.distributed as dist

    from trainlib import comm

    n, out = dist.get_world_size(), {}
    gloo_impl = dict(comm.GLOO_IMPL)
    # (reduce-scatter, all-gather) implementation, whatever the size; "fallback": gloo's flat
    # collectives missing (the capability set says so, as the first failed call would)
    impls = {"p2p": ("p2p", "p2p"), "native": ("native", "native"), "fallback": ("native", "native")}
    for impl, (rs, ag) in impls.items():
        comm.GLOO_IMPL.update(reduce_scatter=(rs, rs), all_gather=(ag, ag))
        comm._LACKS.pop("gloo", None)
        if impl == "fallback":
            comm._LACKS["gloo"] = {"reduce_scatter", "all_gather"}
        x = _ints(rank, n * C, torch.float32)
        want_rs = sum(_ints(k, n * C, torch.float32).view(n, -1)[rank] for k in range(n))
        sep = torch.empty(C)
        comm.reduce_scatter_tensor(sep, x.clone())
        inplace = x.clone()
        h = comm.reduce_scatter_tensor(inplace.view(n, -1)[rank], inplace, async_op=True)
        h.wait()
        out[f"rs_{impl}"] = torch.equal(sep, want_rs) and torch.equal(inplace.view(n, -1)[rank], want_rs)
        want_ag = torch.cat([_ints(k, n * C, torch.float32).view(n, -1)[k] for k in range(n)])
        gathered = torch.full((n * C,), float("nan"))
        comm.all_gather_into_tensor(gathered, x.view(n, -1)[rank].clone())
        inplace = torch.full((n * C,), float("nan"))
        inplace.view(n, -1)[rank].copy_(x.view(n, -1)[rank])
        comm.all_gather_into_tensor(inplace, inplace.view(n, -1)[rank], async_op=True).wait()
        out[f"ag_{impl}"] = torch.equal(gathered, want_ag) and torch.equal(inplace, want_ag)
    comm._LACKS.pop("gloo", None)
    comm.GLOO_IMPL.update(gloo_impl)
    out["logged"] = sorted({r.op for r in comm.recent_collectives() if "scatter" in r.op or "into_tensor" in r.op})
    try:
        comm.reduce_scatter_tensor(torch.empty(C), torch.zeros(n * C + 1))
        out["bad_sizes"] = ""
    except ValueError as e:
        out["bad_sizes"] = str(e)
    out["timeout"] = _late_peer_times_out(rank, n)
    return out


def _late_peer_times_out(rank: int, n: int) -> str:
    """The last rank skips a point-to-point reduce-scatter: the others' wait ends after its timeout
    with a CollectiveTimeout naming the collective. gloo closes the pairs of a timed-out receive,
    so the group is unusable afterwards: this runs last."""
    from trainlib import comm

    comm.GLOO_IMPL.update(reduce_scatter=("p2p", "p2p"))
    flat = torch.ones(n * C)
    if rank == n - 1:
        return "late"
    h = comm.reduce_scatter_tensor(flat.view(n, -1)[rank], flat, async_op=True)
    try:
        h.wait(timeout_s=1.0)
    except comm.CollectiveTimeout as e:
        return str(e)
    return "no timeout"


def _all_cases() -> dict:
    import torch.distributed as dist

    from trainlib import comm

    rank = dist.get_rank()
    # gloo goes point-to-point from 1000 bytes here (4 MB by default), so the transports' cases run
    # both of its paths: the small buffers all-reduce / all-gather natively, the larger ones (the
    # overlapped and random cases) send chunks point-to-point, beside the shm worker's collectives
    comm.GLOO_P2P_MIN_BYTES = 1000
    return {"configs": [_one_config(rank, *cfg) for cfg in CONFIGS], "comm": _comm_flat_collectives(rank)}


@pytest.fixture(scope="module")
def results():
    from trainlib.testing import run_ranks

    return run_ranks(_all_cases, WORLD, timeout_s=300)


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=[f"{p}-{t}{'-' + ''.join(n) if n else ''}"
                                                        for p, t, n in CONFIGS])
def test_every_transport_and_dtype_equals_the_formula(results, i):
    part, transport, _ = CONFIGS[i]
    for rank, r in enumerate(results):
        c = r["configs"][i]
        assert c["resolved"] == transport, c
        failed = [k for k, v in c.items() if isinstance(v, bool) and k != "shared_memory" and not v]
        assert not failed, (rank, failed, c)
        if c["dp"] <= 2:  # a + b: the same float in either order
            assert c["random_fp32_err"] == 0.0, (rank, c)
        else:
            assert c["random_fp32_err"] <= 1e-6, (rank, c)
        if c["dp"] > 1:
            assert "multiple of dp=" in c["bad_numel"] and "pad it" in c["bad_numel"], c
        # asynchronous: a start does not wait for the late peer (it slept 0.6 s)
        assert c["start_s"] < 0.3, (rank, c)
        # alloc() gives shared memory exactly on the transports that reduce in it
        assert c["shared_memory"] == (transport != "torch"), (rank, c)
    assert sorted({r["configs"][i]["dp"] for r in results}) == {"dp4": [4], "dp2": [2], "dp3": [1, 3]}[part]


def test_comm_reduce_scatter_and_all_gather_every_implementation(results):
    for r in results:
        c = r["comm"]
        failed = [k for k in ("rs_p2p", "ag_p2p", "rs_native", "ag_native", "rs_fallback", "ag_fallback") if not c[k]]
        assert not failed, (failed, c)
        assert {"reduce_scatter_tensor[p2p]", "all_gather_into_tensor[p2p]", "reduce_scatter_tensor",
                "all_gather_into_tensor", "reduce_scatter_tensor[via all_reduce]",
                "all_gather_into_tensor[via all_gather]"} <= set(c["logged"]), c
        assert "must hold 4 x the chunk's elements" in c["bad_sizes"], c
    for rank, r in enumerate(results[:-1]):
        t = r["comm"]["timeout"]
        assert f"rank {rank}: reduce_scatter_tensor[p2p] #" in t and "did not complete within 1s" in t, t
    assert results[-1]["comm"]["timeout"] == "late"


def test_mpi_transport_under_real_mpiexec():
    import shutil
    import subprocess
    from pathlib import Path

    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    from tests.test_runtime import ROOT, _clean_env

    out = subprocess.run([mpiexec, "-n", "3", sys.executable, "-m", "tests.test_shard_collectives"], env=_clean_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3, out.stdout
    for r in rows:
        assert r["resolved"] == "mpi", r
        failed = [k for k, v in r.items() if isinstance(v, bool) and not v]
        assert not failed, (failed, r)
        for name in ("bfloat16", "float16"):
            assert "no 16-bit float sum" in r[f"rs_{name}_refused"], r
        assert r["auto_None"] == "mpi" and r["auto_torch.bfloat16"] == "shm", r


def _mpi_main() -> None:
    """Under mpiexec: the MPI transport's reduce-scatter (fp32, fp64) and all-gather (every dtype)."""
    import torch.distributed as dist

    import trainlib as tl

    tl.init()
    sync = tl.AllReduce(transport="mpi")
    sync.bind_group(dist.group.WORLD)
    dp, me = dist.get_world_size(), dist.get_rank()
    res: dict = {"resolved": sync.resolved_transport}
    for dtype in (torch.float32, torch.float64):
        res[f"rs_{dtype}"] = _reduce_scatter_case(sync, dp, me, dp * C, dtype, from_alloc=True)
    for dtype in DTYPES:
        res[f"ag_{dtype}"] = _all_gather_case(sync, dp, me, dp * C, dtype, from_alloc=True)
        res[f"agi_{dtype}"] = _all_gather_into_case(sync, dp, me, dp * C, dtype, from_alloc=True)
    res["overlapped"] = _overlapped_case(sync, dp, me)
    res["start_at_once"] = _start_returns_at_once(sync, dp, me) < 0.3
    res["random_fp32_small_err"] = _random_fp32_case(sync, dp, me) <= 1e-6
    res["resized"] = _resized_storage_case(sync, dp, me)
    for dtype in (torch.bfloat16, torch.float16):
        try:
            sync.start_reduce_scatter(torch.zeros(dp * C, dtype=dtype))
            res[f"rs_{str(dtype).removeprefix('torch.')}_refused"] = ""
        except ValueError as e:
            res[f"rs_{str(dtype).removeprefix('torch.')}_refused"] = str(e)
    sync.close()
    # transport='auto' under mpiexec picks MPI, unless told the sum will be 16-bit (then shm, one node)
    for reduce_dtype in (None, torch.bfloat16):
        auto = tl.AllReduce()
        auto.bind_group(dist.group.WORLD, reduce_dtype=reduce_dtype)
        res[f"auto_{reduce_dtype}"] = auto.resolved_transport
        if reduce_dtype is not None:
            res["auto_bf16_rs"] = _reduce_scatter_case(auto, dp, me, dp * C, reduce_dtype, from_alloc=True)
        auto.close()
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    _mpi_main()
