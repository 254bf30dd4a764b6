"""List-valued config fields (mesh.rules) and the mesh section's checks: errors name the key and the item."""

import pytest

from jaxrl_lm.config import DEFAULT_SHARDING_RULES, ConfigError, MeshConfig, load_config, replace, to_yaml


def test_base_yaml_documents_the_defaults():
    assert load_config("configs/base.yaml").mesh == MeshConfig()
    assert MeshConfig().rules == DEFAULT_SHARDING_RULES


def test_rules_from_a_file_and_overrides_become_tuples(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text("mesh:\n  rules:\n    - [embed, fsdp]\n    - [vocab, [fsdp, tensor]]\n    - [layers, null]\n")
    cfg = load_config(path)
    assert cfg.mesh.rules == (("embed", "fsdp"), ("vocab", ("fsdp", "tensor")), ("layers", None))
    cfg = load_config("configs/base.yaml", ["mesh.rules=[[mlp, tensor], [embed, [data, fsdp]]]"])
    assert cfg.mesh.rules == (("mlp", "tensor"), ("embed", ("data", "fsdp")))


def test_rules_survive_yaml_and_replace(tmp_path):
    cfg = load_config("configs/base.yaml", mesh__rules=[["embed", ["fsdp", "tensor"]], ["layers", None]])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert replace(cfg, mesh__fsdp=2).mesh.rules == cfg.mesh.rules


@pytest.mark.parametrize("value,message", [
    ("embed", "mesh.rules: expected a list, got 'embed'"),
    ([["embed"]], "mesh.rules[0]: expected a list of 2 items, got ['embed']"),
    ([["embed", "fsdp"], ["vocab", 3]], "mesh.rules[1][1]: expected a string or a list, each item a string or null, "
                                        "got 3"),
    ([[None, "fsdp"]], "mesh.rules[0][0]: expected a string, got None"),
    ([["embed", ["fsdp", 1]]], "mesh.rules[0][1]: expected a string or a list"),
    ([["embed", "fsdq"]], "mesh.rules[0]: ['embed', 'fsdq'] must be [logical axis, mesh axis"),
    ([["embed", ["fsdp", "fsdp"]]], "mesh.rules[0]: ['embed', ('fsdp', 'fsdp')] must be"),
    ([["", "fsdp"]], "mesh.rules[0]: ['', 'fsdp'] must be"),
])
def test_bad_rules_name_the_item(value, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/base.yaml", mesh__rules=value)
    assert message in str(err.value)


def test_a_bad_rule_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mesh:\n  rules:\n    - [embed, 7]\n")
    with pytest.raises(ConfigError, match=r"mesh.rules\[0\]\[1\].*\(from .*bad.yaml\)"):
        load_config(path)


@pytest.mark.parametrize("overrides,message", [
    (["mesh.data=0"], "mesh.data must be positive or -1"),
    (["mesh.tensor=0"], "mesh.tensor must be positive"),
    (["mesh.num_slices=0"], "mesh.num_slices must be positive"),
    (["mesh.data=3", "mesh.num_slices=2"], "mesh.data (3) must be divisible by mesh.num_slices (2)"),
    (["mesh.max_replicated_fraction=1.5"], "mesh.max_replicated_fraction must be in [0, 1]"),
    (["mesh.distributed=maybe"], "mesh.distributed: 'maybe' is not one of"),
    (["mesh.num_processes=2", "mesh.process_id=2"], "mesh.process_id (2) must be below mesh.num_processes (2)"),
    (["mesh.process_id=-2"], "mesh.process_id (-2) >= -1"),
])
def test_bad_mesh_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/base.yaml", overrides)
    assert message in str(err.value)
