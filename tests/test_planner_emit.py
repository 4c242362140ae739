"""`trainlib plan --emit KIND`: the winner's manifest validates against the operators' CRD schemas (every
kind `trainlib k8s` makes here) and runs the planner's flags."""
from __future__ import annotations

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonschema")

from tests.test_k8s_manifests import needs_schemas, schema_errors  # noqa: E402
from trainlib.launchers.webhooks import check_all  # noqa: E402
from trainlib.plan_cli import main  # noqa: E402
from trainlib.planner.emit import k8s_kinds  # noqa: E402
from trainlib.trainer import config_from_argv  # noqa: E402

CLUSTERS = {"h200": ["--device", "h200", "--nodes", "2", "--devices-per-node", "8", "--global-batch", "64"],
            "trn1": ["--device", "trn1", "--nodes", "2", "--devices-per-node", "32", "--global-batch", "64"]}


def _train_flags(doc: dict) -> list[str]:
    """The --section.key=value flags of the training command inside a manifest, wherever the kind puts
    it (a container's args list, a RayJob's entrypoint string)."""
    found: list[str] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            found.extend(t for t in x.split() if t.startswith("--") and "." in t.split("=")[0] and "=" in t)

    walk(doc)
    return found


@needs_schemas
@pytest.mark.parametrize("kind", k8s_kinds())
@pytest.mark.parametrize("device", sorted(CLUSTERS))
def test_emit_validates_against_the_crds(kind, device, capsys):
    assert main(["--emit", kind, *CLUSTERS[device]]) == 0, capsys.readouterr().err
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert docs and check_all(docs) == []
    for d in docs:
        assert schema_errors(d) == [], (kind, d["kind"])
    assert main(["--json", *CLUSTERS[device]]) == 0
    import json

    winner = json.loads(capsys.readouterr().out)["plans"][0]["flags"]
    flags = next(f for f in map(_train_flags, docs) if f)
    assert all(f in flags for f in winner), (winner, flags)
    config_from_argv(flags)   # trainlib train's own parser accepts them
