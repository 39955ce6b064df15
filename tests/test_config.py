from pathlib import Path

import pytest

from trainer.config import ConfigError, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.parallel.global_batch_size % (cfg.parallel.micro_batch_size * cfg.dp()) == 0


def test_shipped_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"tiny-cpu", "gpt2-124m", "llama-1b"}


def _err(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    return str(e.value)


def test_unknown_key_names_the_field():
    msg = _err({"model": {"d_modle": 64}})
    assert "model.d_modle" in msg and "unknown key" in msg and "d_model" in msg


def test_unknown_section_names_it():
    assert "modle" in _err({"modle": {}})


def test_wrong_type_names_the_field():
    msg = _err({"train": {"steps": "many"}})
    assert "train.steps" in msg and "integer" in msg


def test_bool_is_not_an_int():
    assert "train.steps" in _err({"train": {"steps": True}})


def test_d_model_not_divisible_by_heads():
    msg = _err({"model": {"d_model": 100, "n_heads": 3}})
    assert "model.d_model" in msg and "model.n_heads" in msg


def test_out_of_range_values():
    assert "optim.lr" in _err({"optim": {"lr": -1.0}})
    assert "cluster.num_workers" in _err({"cluster": {"num_workers": 0}})
    assert "checkpoint.keep" in _err({"checkpoint": {"keep": 1}})


def test_pipeline_with_zero3_is_refused_with_the_fix():
    msg = _err({"cluster": {"num_workers": 2}, "parallel": {"pp": 2, "zero_stage": 3}})
    assert "zero_stage: 1 or pp: 1" in msg


def test_global_batch_must_divide():
    msg = _err({"cluster": {"num_workers": 2}, "parallel": {"micro_batch_size": 3, "global_batch_size": 16}})
    assert "parallel.global_batch_size" in msg


def test_literal_choices():
    assert "'llama'" in _err({"model": {"arch": "mamba"}})


def test_overrides_beat_yaml_and_parse_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 10\noptim:\n  lr: 0.001\n")
    cfg = load_config(p, ["train.steps=25", "optim.lr=2e-4", "model.tie_embeddings=true"])
    assert cfg.train.steps == 25 and cfg.optim.lr == 2e-4 and cfg.model.tie_embeddings is True
    assert cfg.train.log_every == 10  # default kept


def test_override_of_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    with pytest.raises(ConfigError, match="train.stpes"):
        load_config(p, ["train.stpes=3"])


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_error_names_the_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  steps: -3\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: train\.steps"):
        load_config(p)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"model": {"d_modle": 64}}, "model.d_modle"),
        ({"train": {"steps": "many"}}, "train.steps"),
        ({"optim": {"lr": -1.0}}, "optim.lr"),
        ({"optim": {"beta2": 1.0}}, "optim.beta2"),
        ({"model": {"n_kv_heads": 3}}, "model.n_kv_heads"),
        ({"cluster": {"num_workers": 2}, "parallel": {"pp": 2, "zero_stage": 3}}, "parallel.zero_stage"),
        (
            {"cluster": {"num_workers": 2}, "parallel": {"tp": 2}, "model": {"vocab_size": 301}},
            "model.vocab_size",
        ),
        ({"checkpoint": {"storage": "/tmp/x"}}, "checkpoint.storage"),
    ],
)
def test_the_error_carries_the_field_to_change(raw, field):
    """A ConfigError is the one expected-failure type (exit 2), with the field it names."""
    from trainer.errors import PretrainError

    with pytest.raises(ConfigError) as e:
        from_dict(raw)
    assert isinstance(e.value, PretrainError) and isinstance(e.value, ValueError)
    assert e.value.field == field and e.value.exit_code == 2


def test_a_file_error_carries_the_path_and_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert e.value.path == str(tmp_path / "nope.yaml")
    p = tmp_path / "mine.yaml"
    p.write_text("train:\n  steps: -3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert (e.value.path, e.value.field) == (str(p), "train.steps")
