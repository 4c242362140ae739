"""Issue 20 item 3: `trainlib report`'s figure against the records it was drawn from, a page from
records without the breakdown, and the errors for a run directory that cannot make a report. The
report of a real 2-rank run's directory is tests/test_sinks.py::test_report_of_this_run (it reuses
that file's run: one training run for both)."""
from __future__ import annotations

import json

import pytest

from trainlib import cli
from trainlib.observe.report import ReportError, load_run
from trainlib.observe.report_figure import build_figure

pytestmark = pytest.mark.timeout(120)
GIB = 2 ** 30


def _records(n_ranks: int = 3, with_breakdown: bool = True) -> list[dict]:
    out = []
    for step in (1, 10, 20, 30):
        r = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "tokens_per_s": 1000.0 + step, "elapsed_s": step / 10}
        if with_breakdown:
            parts = {"t_data_s": 0.001, "t_forward_s": 0.01, "t_backward_s": 0.02, "t_sync_wait_s": 0.004,
                     "t_optimizer_s": 0.003, "t_bubble_s": 0.0, "t_other_s": 0.002}
            slow = 1 if step < 30 else 2
            per = [0.04 + (0.03 if k == slow else 0.0) for k in range(n_ranks)]
            r.update(parts, t_step_s=sum(parts.values()), straggler_rank=slow, bytes_dp=1 << 22, bw_gbps=0.5,
                     per_rank={"t_step_s": per, "t_sync_wait_s": [0.004] * n_ranks,
                               "mem_peak_bytes": [GIB * (1 + k) + step for k in range(n_ranks)]})
        out.append(r)
    return out


def test_figure_panels_hold_the_records_numbers():
    records = _records()
    fig = build_figure(records, None, "synthetic")
    loss, tps, breakdown, ranks, memory, comm = fig.axes[:6]
    assert list(tps.lines[0].get_ydata()) == [r["tokens_per_s"] for r in records]
    assert len(breakdown.collections) == 7  # the seven parts, stacked
    top = breakdown.lines[0].get_ydata()  # the measured step, drawn over the stack
    assert list(top) == pytest.approx([r["t_step_s"] * 1e3 for r in records])
    assert "straggler: rank 1 (3 of 4 windows)" in ranks.get_title()
    assert [list(line.get_ydata()) for line in ranks.lines] == \
        [pytest.approx([r["per_rank"]["t_step_s"][k] * 1e3 for r in records]) for k in range(3)]
    heights = [p.get_height() for p in memory.patches]
    assert heights == pytest.approx([(GIB * (1 + k) + 30) / GIB for k in range(3)])  # each rank's max
    assert list(comm.lines[0].get_ydata()) == [4.0] * 4  # 4 MiB per step on dp


def test_records_without_the_breakdown_still_make_a_page(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(with_breakdown=False)))
    assert cli.main(["report", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "page")]) == 0
    fig = build_figure(load_run(tmp_path).records, None, "old run")
    assert "no step breakdown" in fig.axes[2].texts[0].get_text()
    assert (tmp_path / "page" / "report.png").stat().st_size > 0 and (tmp_path / "page" / "report.html").exists()


def test_bad_run_dirs_are_named_with_the_fix(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 1
    assert f"{tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(ReportError, match="holds no metrics.jsonl; it has train.jsonl: pass that file's path"):
        load_run(tmp_path)
    with pytest.raises(ReportError, match="holds no records"):
        load_run(tmp_path / "train.jsonl")
    (tmp_path / "torn.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a run still writing
    assert [r["step"] for r in load_run(tmp_path / "torn.jsonl").records] == [1]
    (tmp_path / "bad.jsonl").write_text('not json\n{"step": 1}\n')
    with pytest.raises(ReportError, match=r"bad.jsonl:1 is not JSON"):
        load_run(tmp_path / "bad.jsonl")
