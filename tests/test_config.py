"""Config loading: YAML includes, dotted and keyword overrides, and errors that name the key."""

import pytest

import jaxrl_lm
from jaxrl_lm.config import ConfigError, load_config, replace
from jaxrl_lm.rl import decision_capacity


def test_includes_and_overrides(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"include: {jaxrl_lm.config.REPO_ROOT / 'configs/models/tiny.yaml'}\ntoken_q:\n  backup: max\n")
    cfg = load_config(child, ["model.n_layers=3", "token_q.value_max=0"], optim__learning_rate=1e-3)
    assert (cfg.model.family, cfg.model.n_layers, cfg.token_q.backup) == ("gpt2", 3, "max")
    assert cfg.token_q.value_max == 0.0 and isinstance(cfg.token_q.value_max, float)
    assert cfg.optim.learning_rate == 1e-3
    assert replace(cfg, model__n_layers=4).model.n_layers == 4


@pytest.mark.parametrize("overrides,message", [
    (["model.n_layer=3"], "unknown config key 'model.n_layer'"),
    (["token_q.backup=maxx"], "token_q.backup: 'maxx' is not one of"),
    (["model.n_layers=two"], "model.n_layers: expected an integer"),
    (["model.tie_embeddings=1"], "model.tie_embeddings: expected true/false"),
    (["rl.gamma=1.5"], "rl.gamma must be in (0, 1]"),
    (["data.batch_size=6", "optim.grad_accum=4"], "data.batch_size (6) must be divisible by optim.grad_accum (4)"),
    (["model.d_model=30"], "model.d_model (30) must be divisible by model.n_heads"),
    (["token_q.awr_max_weight=0"], "token_q.awr_max_weight must be positive"),
    (["rl.n_layers=2", "rl.n_layers=3"], "given more than once"),
    (["model=3"], "model: expected a mapping"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/base.yaml", overrides)
    assert message in str(err.value)


def test_bad_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train.stepz.*bad.yaml"):
        load_config(path)


def test_decision_capacity_is_exact_for_decimal_fractions():
    cfg = load_config("configs/base.yaml", rl__decision_fraction=0.07)
    assert decision_capacity(cfg.rl, 100) == 7
    assert decision_capacity(cfg.rl, 101) == 8


def test_scientific_notation_without_a_dot_is_a_number():
    cfg = load_config("configs/demo.yaml", optim__learning_rate="1e-3", token_q__value_min="-2E+1")
    assert cfg.optim.learning_rate == 1e-3 and cfg.token_q.value_min == -20.0
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config("configs/demo.yaml", optim__learning_rate="fast")
