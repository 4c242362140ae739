"""Mesh layout math (pure) and its errors; the process groups on real ranks."""
import pytest

from trainlib.mesh import MeshError, MeshLayout, resolve_sizes
from trainlib.testing import run_ranks


def test_infer_dp():
    assert resolve_sizes(8, pp=2, dp=-1, tp=2) == {"pp": 2, "dp": 2, "tp": 2}
    assert resolve_sizes(6, pp=1, dp=3, tp=-1) == {"pp": 1, "dp": 3, "tp": 2}


@pytest.mark.parametrize("world,kw,needle", [
    (8, dict(pp=2, dp=3, tp=2), "dp(3) * tp(2)"),
    (8, dict(pp=2, dp=3, tp=2), "= 12 != world_size 8; set dp=-1"),
    (6, dict(pp=4, dp=-1, tp=1), "not divisible by 4"),
    (8, dict(pp=-1, dp=-1, tp=2), "at most one axis"),
    (8, dict(pp=0, dp=-1, tp=2), "pp=0 must be a positive integer"),
])
def test_errors_name_values_and_fix(world, kw, needle):
    with pytest.raises(MeshError, match=None) as e:
        resolve_sizes(world, **kw)
    assert needle in str(e.value)


def test_tp_innermost_pp_outermost():
    m = MeshLayout.build(8, pp=2, dp=2, tp=2)
    # rank = (pp * dp + dp_idx) * tp + tp_idx
    assert [m.coords(r) for r in (0, 1, 2, 5, 7)] == [
        {"pp": 0, "dp": 0, "tp": 0}, {"pp": 0, "dp": 0, "tp": 1}, {"pp": 0, "dp": 1, "tp": 0},
        {"pp": 1, "dp": 0, "tp": 1}, {"pp": 1, "dp": 1, "tp": 1}]
    assert m.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert m.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert m.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for r in range(8):
        assert m.rank_of(**m.coords(r)) == r
        for axis in ("pp", "dp", "tp"):
            assert r in m.group_ranks(axis, r)


def test_groups_partition_the_world():
    m = MeshLayout.build(24, pp=2, dp=-1, tp=3)
    for axis in ("pp", "dp", "tp"):
        flat = sorted(r for g in m.groups(axis) for r in g)
        assert flat == list(range(24))
        assert all(len(g) == m.size(axis) for g in m.groups(axis))


def _mesh_on_ranks():
    import torch

    import trainlib as tl
    from trainlib import comm

    tl.init()
    mesh = tl.Mesh(pp=1, dp=2, tp=2)
    t = torch.tensor([float(mesh.rank_global)])
    comm.all_reduce(t, group=mesh.group("tp"))
    u = torch.tensor([float(mesh.rank_global)])
    comm.all_reduce(u, group=mesh.group("dp"))
    # building meshes again (a sweep, a benchmark, a reused Ray actor) opens no new sockets
    import os

    fds = []
    for _ in range(3):
        for kw in ({"pp": 1, "dp": 2, "tp": 2}, {"pp": 2, "dp": 2, "tp": 1}, {"pp": 4, "dp": 1, "tp": 1}):
            again = tl.Mesh(**kw)
            comm.barrier(again.group("dp"))
        fds.append(len(os.listdir("/proc/self/fd")))
    return mesh.coords(), t.item(), u.item(), fds


def test_process_groups_on_four_ranks():
    out = run_ranks(_mesh_on_ranks, 4)
    # tp groups {0,1},{2,3}: sums 1, 5; dp groups {0,2},{1,3}: sums 2, 4
    assert [o[1] for o in out] == [1, 1, 5, 5]
    assert [o[2] for o in out] == [2, 4, 2, 4]
    assert [o[0]["dp"] for o in out] == [0, 0, 1, 1]
    # without the per-world cache each round opened 36 more descriptors per rank; a helper thread may hold
    # one or two for a moment
    assert all(o[3][-1] - o[3][0] <= 3 for o in out), [o[3] for o in out]
