"""tl.DataParallel against torch DDP and single-process references, on real gloo ranks."""
import pytest

from trainlib.testing import run_ranks
from tests import dp_models


@pytest.mark.parametrize("bucket_mb,set_to_none", [(25.0, True), (0.0005, False)])
def test_gradients_equal_torch_ddp(bucket_mb, set_to_none):
    # 0.0005 MB buckets: many buckets, so in-order launch with an unused branch is exercised
    for r in run_ranks(dp_models.versus_ddp, 2, bucket_mb, set_to_none):
        assert r["grad_diff"] <= 1e-6, r
        assert r["buffer_diff"] <= 1e-6, r
        assert r["views"] and r["frozen_untouched"], r
    if bucket_mb < 0.01:
        assert r["buckets"] > 3


def test_no_sync_accumulation_equals_big_batch():
    for r in run_ranks(dp_models.no_sync_accumulation, 2, 3):
        assert r["diff"] <= 1e-6, r


@pytest.mark.parametrize("compress,tol", [("bf16", 2 ** -7), ("fp16", 2 ** -10)])
def test_compression_within_rounding(compress, tol):
    for r in run_ranks(dp_models.compressed, 2, compress):
        assert r["dtype"] == f"torch.{ {'bf16': 'bfloat16', 'fp16': 'float16'}[compress]}"
        assert 0 < r["rel_err"] <= tol, r


def test_mismatched_models_name_the_difference():
    msgs = run_ranks(dp_models.mismatched_models, 2)
    for m in msgs:
        assert "differs across data-parallel ranks" in m and "weight" in m, m


def test_mpi_transport_under_real_mpiexec_equals_ddp():
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("mpi4py")
    mpiexec = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec")
    from tests.test_runtime import ROOT, _clean_env

    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "tests.rank_scripts", "dp_mpi"], env=_clean_env(),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    for r in rows:
        assert r["source"] == "mpi" and r["transport"] == "mpi", r
        assert r["diff"] <= 1e-6, r


@pytest.mark.parametrize("world", [2, 3])
def test_shm_transport_equals_ddp(world):
    for r in run_ranks(dp_models.shm_versus_ddp, world):
        assert r["grad_diff"] <= 1e-6, r
        assert r["buckets"] > 3 and r["leftovers"] == [], r


def test_shm_refuses_what_does_not_fit_in_dev_shm():
    # (node, writable, free bytes, this rank's bytes): a write past a full tmpfs is SIGBUS, so the
    # decision is made up front from all ranks' needs against the smallest free space reported
    from trainlib.sync.shm import why_not

    mib = 1 << 20
    assert why_not([(7, True, 1024 * mib, 100 * mib)] * 2) is None
    reason = why_not([(7, True, 64 * mib, 48 * mib)] * 2)  # Docker's default 64 MB /dev/shm, 2 x 48 MiB of buckets
    assert "needs 96 MiB" in reason and "64 MiB are free" in reason and "--shm-size" in reason
    assert "one node" in why_not([(7, True, 1024 * mib, mib), (8, True, 1024 * mib, mib)])
    assert "writable" in why_not([(7, True, 1024 * mib, mib), (7, False, 1024 * mib, mib)])
