"""Issue 20 item 3: `trainlib report RUN_DIR` on a real 2-rank run's directory (the PNG decodes at the
page's fixed size, the HTML shows it and the run's numbers), the figure's data against the records it
was drawn from, and the errors for a run directory that cannot make a report."""
from __future__ import annotations

import json

import pytest

from trainlib import cli
from trainlib.observe.report import ReportError, load_run, read_records
from trainlib.observe.report_figure import DPI, FIGSIZE, build_figure
from trainlib.testing import run_ranks

pytestmark = pytest.mark.timeout(180)
GIB = 2 ** 30


def train(argv: list[str]) -> dict:
    from trainlib import trainer
    from trainlib.config import load_config

    return trainer.train(load_config(None, argv))


def test_report_of_a_real_run(tmp_path):
    run = tmp_path / "run"
    argv = ["--train.steps=4", "--train.log_every=2", "--model.n_layer=1", f"--train.metrics={run / 'metrics.jsonl'}",
            f"--checkpoint.dir={tmp_path / 'ck'}"]
    s0, _ = run_ranks(train, 2, argv, timeout_s=150, env={"OMP_NUM_THREADS": "1"})
    (run / "summary.json").write_text(json.dumps(s0))  # what `trainlib train` prints as its last line
    assert cli.main(["report", str(run)]) == 0
    from PIL import Image

    with Image.open(run / "report.png") as img:
        img.load()  # decodes every pixel
        assert img.format == "PNG" and img.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
        assert len(img.convert("L").getcolors(1 << 16)) > 50  # drawn on, not a blank page
    page = (run / "report.html").read_text()
    assert "<img src='report.png'" in page and s0["weights_sha256"] in page
    records = read_records(run / "metrics.jsonl")
    assert f"last log window (step {records[-1]['step']})" in page
    # the panels hold the run's own numbers
    fig = build_figure(records, s0, "t")
    loss = fig.axes[0].lines[0]
    assert list(loss.get_xdata()) == [1, 2, 4] and list(loss.get_ydata()) == [r["loss"] for r in records]
    # the trainer's breakdown (observe.breakdown, on by default): one stacked band per part, ranks named
    assert len(fig.axes[2].collections) >= 5 and len(fig.axes[3].lines) == 2
    assert f"straggler: rank {records[-1]['straggler_rank']}" in fig.axes[3].get_title() or \
        "straggler: rank" in fig.axes[3].get_title()


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
