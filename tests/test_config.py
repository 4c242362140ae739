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
