"""`trainlib bench reshard --quick`: the JSON it writes and the correctness flag its loads must earn; and
that the benchmark's own check (reshard_ranks._tl_check / _dcp_check) names a wrong value, so a fast
wrong load cannot score.

One run of the benchmark (3 spawned groups: make the state, load on 2 ranks, load on 1 rank) feeds the
JSON checks; the checker test runs in this process (no group: the state is unsharded).
"""
from __future__ import annotations

import json

import pytest
import torch

from trainlib.benchmarks import bench_reshard, harness
from trainlib.benchmarks import reshard_ranks as rr

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("bench") / "reshard.json"
    assert harness.main(["reshard", "--quick", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_json_structure_and_every_load_correct(result):
    meta = result["meta"]
    assert meta["benchmark"] == "reshard" and meta["quick"] is True
    assert meta["command"].startswith("trainlib bench reshard")
    names = {j["name"] for j in bench_reshard.TO_TWO + bench_reshard.TO_ONE}
    assert set(result["loads"]) == names
    for name, row in result["loads"].items():
        assert row["correct"] is True and row["mismatch"] == [], (name, row["mismatch"])
        assert len(row["all_s"]) == result["reps"] and all(t > 0 for t in row["all_s"])
        # the reported time is the slowest rank's per repetition, so its median is at least each rank's own
        assert row["median_s"] >= max(row["rank_median_s"]) - 1e-5
        world = 2 if name in {j["name"] for j in bench_reshard.TO_TWO} else 1
        assert len(row["rank_median_s"]) == len(row["read_bytes_per_rank"]) == world
    s = result["summary"]
    assert s["correct"] is True and s["params"] > 0
    for d, (t, p) in bench_reshard.PAIRS.items():
        want = result["loads"][t]["median_s"] / result["loads"][p]["median_s"]
        assert s[f"ratio_trainlib/dcp:{d}"] == pytest.approx(want, rel=1e-2, abs=1e-3)
        rounds = [a / b for a, b in zip(result["loads"][t]["all_s"], result["loads"][p]["all_s"])]
        assert s[f"paired_ratio_trainlib/dcp:{d}"] == pytest.approx(sorted(rounds)[len(rounds) // 2], rel=1e-2,
                                                                    abs=1e-3)


def test_read_bytes_cover_the_state(result):
    """A 1-rank load must read every byte of the fp32 weights and both AdamW moments (12 bytes a
    parameter), from whichever old ranks hold them; /proc/self/io counted them."""
    state = result["summary"]["params"] * 12
    for name in ("trainlib:2zero3->1", "dcp:2fsdp2->1", "trainlib:2tp2->1"):
        assert result["loads"][name]["read_bytes_per_rank"][0] >= state, name
    # 1 -> 2: the only old file holds everything, so each new rank reads (at least) its data
    for rank_bytes in result["loads"]["trainlib:1->2zero3"]["read_bytes_per_rank"]:
        assert rank_bytes >= state


def test_the_benchmark_check_names_a_wrong_value():
    """The checks a load must pass, against a state built here: equal -> nothing named; one element
    of one moment changed (or the step count) -> that tensor named, in both systems' checkers."""
    import trainlib as tl
    from trainlib.models.gpt import GPT, GPTConfig, lm_loss

    model = GPT(GPTConfig(vocab_size=256, seq_len=8, n_layer=1, n_head=2, d_model=16), seed=0)
    opt = tl.DistributedOptimizer(torch.optim.AdamW(model.parameters()), model)   # pass-through: unsharded
    x = torch.randint(0, 256, (2, 8))
    lm_loss(model(x), x).backward()
    opt.step()
    ref = {}
    for name, p in model.named_parameters():
        st = opt.inner.state[p]
        ref.update({f"p:{name}": p.detach().clone(), f"m:{name}": st["exp_avg"].clone(),
                    f"v:{name}": st["exp_avg_sq"].clone()})
    ref["step"] = torch.tensor(1.0)
    assert rr._tl_check(model, opt, ref) == [] and rr._dcp_check(model, opt.inner, ref) == []
    name, p = next(iter(model.named_parameters()))
    opt.inner.state[p]["exp_avg_sq"].view(-1)[3] += 1e-3
    assert rr._tl_check(model, opt, ref) == [f"exp_avg_sq:{name}"]
    assert rr._dcp_check(model, opt.inner, ref) == [f"exp_avg_sq:{name}"]
    ref["step"] = torch.tensor(2.0)
    assert len(rr._dcp_check(model, opt.inner, ref)) == 1 + len(list(model.parameters()))
