"""Config: TOML + --section.key overrides, types and validation errors."""
import pytest

from trainlib.config import ConfigError, load_config, parse_overrides


def test_defaults_toml_and_overrides_precedence(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("[train]\nsteps = 40\nlr = 0.01\n[mesh]\ntp = 2\n")
    cfg = load_config(str(f), ["--train.steps=7", "--model.d_model", "64", "--sync.compress=bf16"])
    assert cfg.train.steps == 7          # command line beats the file
    assert cfg.train.lr == 0.01          # the file beats the default
    assert cfg.mesh.tp == 2 and cfg.mesh.dp == -1
    assert cfg.model.d_model == 64 and cfg.sync.compress == "bf16"
    assert load_config().train.batch_size == 32


@pytest.mark.parametrize("argv,needle", [
    (["--train.steps=abc"], "train.steps='abc' is not a valid int"),
    (["--train.steps=0"], "train.steps=0 must be > 0"),
    (["--trian.steps=3"], "unknown config section 'trian'"),
    (["--train.step=3"], "unknown key train.step; train has steps"),
    (["--model.n_head=3"], "model.d_model=128 is not divisible by model.n_head=3"),
    (["--sync.kind=nccl"], "sync.kind='nccl' is not one of allreduce, ps"),
    (["--sync.compress=int8"], "sync.compress='int8' is not one of none, bf16, fp16"),
    (["steps=3"], "overrides look like --section.key=value"),
    (["--train.steps"], "--train.steps needs a value"),
    (["--train.lr=nan"], "train.lr='nan' is not a finite number"),
    (["--sync.bucket_mb=inf"], "sync.bucket_mb='inf' is not a finite number"),
    (["--checkpoint.dir=/etc/hostname/ck"], "'/etc/hostname' is a file, not a directory"),
])
def test_errors_name_key_value_and_choices(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, argv)
    assert needle in str(e.value)


def test_bad_toml(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train\nsteps=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.toml"))


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b=1", "--c.d-e", "2"]) == [("a", "b", "1"), ("c", "d_e", "2")]


def test_layout_checks_and_warnings(tmp_path):
    """trainlib.validate: cross-field checks raise with the value and the fix; values the layout
    ignores come back as one-line warnings (printed by the launcher), in a fixed order."""
    from trainlib.validate import check_run

    base = ["--train.metrics", str(tmp_path / "m.jsonl")]
    cfg = load_config(None, [*base, "--mesh.schedule", "gpipe", "--sync.partition_mb", "8", "--checkpoint.keep", "5"])
    assert check_run(cfg, 2) == [
        "sync.partition_mb=8.0 has no effect with sync.kind=allreduce (it sizes the parameter server's partitions); "
        "drop it",
        "mesh.schedule='gpipe' has no effect with pp=1 (no pipeline); drop it or set --mesh.pp > 1",
        "checkpoint.keep=5 has no effect without checkpoint.dir; set --checkpoint.dir to save checkpoints"]
    assert check_run(load_config(None, base), 2) == []
    with pytest.raises(ConfigError, match=r"train.batch_size=32 is not divisible by dp=3 .* --train.batch_size 33"):
        check_run(load_config(None, base), 3)
    with pytest.raises(ConfigError, match=r"^mesh: pp\(1\) \* dp\(3\) \* tp\(2\) = 6 != world_size 4; set dp=-1"):
        check_run(load_config(None, [*base, "--mesh.dp", "3", "--mesh.tp", "2"]), 4)


def test_rank_errors_first_failing_rank_wins(tmp_path, monkeypatch, capsys):
    from trainlib import rank_errors

    monkeypatch.delenv(rank_errors.DEBUG_ENV, raising=False)
    monkeypatch.setenv(rank_errors.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert rank_errors.report("trainlib train: error: step 2: gradient norm is nan") is True
    monkeypatch.setenv("RANK", "0")
    assert rank_errors.report("trainlib train: lost a peer: rank 1") is False  # a consequence, not the cause
    assert rank_errors.first_error(tmp_path) == "trainlib train: error: step 2: gradient norm is nan (rank 1)"
    assert capsys.readouterr().err == ""  # the launcher prints the line, last
    monkeypatch.delenv(rank_errors.ERROR_DIR_ENV)
    assert rank_errors.report("trainlib train: error: x") is True  # torchrun by hand: every rank says it
    assert capsys.readouterr().err == "trainlib train: error: x\n"
