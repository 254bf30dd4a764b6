"""The seams of the engine: an objective registered from outside ``train/``, parameter groups (a frozen group),
objective config sections, the one loop for one run or stacked seeds, and checkpoints written before groups."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

import jaxrl_lm
from jaxrl_lm import checkpoints, envs
from jaxrl_lm.config import ConfigError, from_dict, load_config, to_yaml
from jaxrl_lm.rl import HeadFlops, Objective, ParamGroup, get_objective, register, registered
from jaxrl_lm.train import checkpoint, loop
from jaxrl_lm.train.flops import update_flops

TINY = dict(model__d_model=32, model__n_layers=1, data__task_episodes=100, data__batch_size=8, data__seq_len=64,
            train__log_every=5, train__checkpoint_every=0)


# ----------------------------------------------------------------------------------------------------------------
# A toy objective, registered here: V regresses on a constant, pulled towards a frozen reference copy of V.


@dataclasses.dataclass(frozen=True)
class ToyValueConfig:
    target: float = 1.0
    pull: float = 0.5  # weight of (V - V_reference)^2

    def validate(self, where: str) -> None:
        if self.pull < 0:
            raise ConfigError(f"{where}.pull must be non-negative, got {self.pull}")


def toy_loss(settings, rl, batch, hidden, views, denominator, *, vocab_size):
    real = (batch["segment_ids"] != 0).astype(jnp.float32)  # [B, L]
    value = views["online"].value(hidden)  # [B, L]
    reference = jax.lax.stop_gradient(views["reference"].value(hidden))
    fit = jnp.sum(real * jnp.square(value - settings.target)) / denominator
    pull = jnp.sum(real * jnp.square(value - reference)) / denominator
    loss = fit + settings.pull * pull
    return loss, {"loss": loss, "fit": fit, "pull": pull, "tokens_scored": jnp.sum(real)}


TOY = register(Objective(
    name="toy_value",
    settings=ToyValueConfig,
    loss=toy_loss,
    denominator=lambda settings, rl, batch: jnp.maximum(jnp.sum(batch["segment_ids"] != 0, dtype=jnp.float32), 1.0),
    groups=lambda settings, rl: (ParamGroup("reference", "frozen", ("v_head",)),),
    summed_metrics=frozenset({"loss", "fit", "pull", "tokens_scored"}),
    head_flops=lambda settings, rl, model, b, seq: HeadFlops(trunk_forwards=0,
                                                             heads=float(b * seq * 3 * 4 * model.d_model)),
))


def toy_cfg(out_dir, **kw):
    return load_config("configs/demo.yaml", **{"rl__objective": "toy_value", "toy_value__pull": 0.25, **TINY,
                                              "train__out_dir": str(out_dir), **kw})


@pytest.fixture(scope="module")
def episodes():
    return envs.task_dataset(toy_cfg("unused").data)


def test_a_registered_objective_has_its_own_config_section(tmp_path):
    cfg = toy_cfg(tmp_path)
    assert {"token_q", "toy_value"} <= set(registered()) and get_objective("toy_value") is TOY
    with pytest.raises(KeyError, match="no objective 'nope'"):
        get_objective("nope")
    assert cfg.objective == ToyValueConfig(target=1.0, pull=0.25) and cfg.toy_value.pull == 0.25
    assert cfg.token_q.backup == "expectile"  # base.yaml's section is still there, unused
    assert from_dict(cfg.to_dict()) == cfg and "toy_value:" in to_yaml(cfg)
    with pytest.raises(ConfigError, match="toy_value.pull must be non-negative"):
        toy_cfg(tmp_path, toy_value__pull=-1.0)
    with pytest.raises(ConfigError, match="unknown config key 'toy_value.nope'"):
        toy_cfg(tmp_path, toy_value__nope=1)
    with pytest.raises(ConfigError, match="rl.objective: 'nope' is not a registered objective"):
        load_config("configs/demo.yaml", rl__objective="nope")
    with pytest.raises(ConfigError, match="unknown config key 'nosection'"):
        load_config("configs/demo.yaml", nosection__x=1)
    assert update_flops(cfg, 4, 64).heads == 4 * 64 * 3 * 4 * 32


def test_a_registered_objective_trains_through_the_loop_and_its_frozen_group_never_moves(tmp_path, episodes):
    cfg = toy_cfg(tmp_path, train__steps=10, train__checkpoint_every=5)
    initial = jaxrl_lm.init_state(cfg)
    chex.assert_trees_all_equal(initial.groups, {"reference": {"v_head": initial.params["v_head"]}})
    final = loop.train(cfg, episodes=episodes, progress=False)
    assert final["step"] == 10 and final["skipped"] == 0
    assert {"fit", "pull", "tokens_scored", "grad_norm"} <= set(final)
    logged = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    directory = checkpoint.checkpoint_dir(cfg)
    device = SingleDeviceSharding(jax.devices()[0])
    first, last = (checkpoint.restore(directory, device, step) for step in (5, 10))
    # The frozen group is bitwise the initial copy at every checkpoint; the trained V head moved.
    for restored in (first, last):
        chex.assert_trees_all_equal(restored.state.groups, jax.device_get(initial.groups))
    assert not np.array_equal(last.state.params["v_head"]["out_bias"], initial.params["v_head"]["out_bias"])
    # ...and it survives a resume: 10 more steps from step 10 leave it as it was.
    resumed = loop.train(toy_cfg(tmp_path, train__steps=20, train__checkpoint_every=5), episodes=episodes,
                         progress=False, resume=True)
    assert resumed["resumed_from"] == 10 and resumed["step"] == 20
    _, params, groups, step = checkpoints.load_state_params(tmp_path)
    assert step == 20
    chex.assert_trees_all_equal(groups, jax.device_get(initial.groups))
    _, reference_view, _ = checkpoints.load_params(tmp_path, group="reference")
    chex.assert_trees_all_equal(reference_view["v_head"], jax.device_get(initial.params["v_head"]))
    chex.assert_trees_all_equal(reference_view["transformer"], params["transformer"])


def test_a_frozen_group_can_be_given_and_a_wrong_one_is_refused(tmp_path):
    cfg = toy_cfg(tmp_path)
    other = jaxrl_lm.split_model(jaxrl_lm.build_model(cfg.model, seed=7))[1]
    state = jaxrl_lm.init_state(cfg, groups={"reference": other})
    chex.assert_trees_all_equal(state.groups["reference"], {"v_head": other["v_head"]})
    with pytest.raises(ValueError, match="not frozen groups"):
        jaxrl_lm.init_state(cfg, groups={"target": other})
    with pytest.raises(ValueError, match="lack \\['v_head'\\]"):
        jaxrl_lm.init_state(cfg, groups={"reference": {"transformer": other["transformer"]}})


# ----------------------------------------------------------------------------------------------------------------
# One loop for one run or a stack of seeds.


def test_stacked_seeds_stop_on_dropped_decisions_like_a_single_run(tmp_path, episodes):
    cfg = load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(tmp_path), "train__steps": 2,
                                              "train__log_every": 1, "rl__decision_fraction": 0.01})
    for seeds in (None, [0, 1]):
        with pytest.raises(RuntimeError, match="decisions did not fit the head slots"):
            loop.train(cfg, seeds=seeds, episodes=episodes, progress=False, outputs=False)


def test_decisions_dropped_between_log_steps_still_stop_the_run(tmp_path):
    """Only the first batch overflows the head slots and only step 3 is logged: the loop still stops."""
    def episode(i, observation, action):
        return {"id": f"e{i}", "turns": [{"role": "observation", "text": observation},
                                         {"role": "action", "text": action, "reward": 0.0}], "done": True}

    # 8 rows of one 34-token episode with 31 decisions each (16 slots: 15 dropped a row), then rows of one
    # 40-token episode with 2 decisions each (nothing dropped), in order.
    long = [episode(i, "o", "a" * 30) for i in range(8)]
    short = [episode(8 + i, "o" * 36, "a") for i in range(16)]
    cfg = load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(tmp_path), "train__steps": 3,
                                              "train__log_every": 3, "data__shuffle": False,
                                              "rl__decision_fraction": 0.25})
    with pytest.raises(RuntimeError, match="steps 1-3: 120 decisions did not fit"):
        loop.train(cfg, episodes=long + short, progress=False, outputs=False)
    # The same data with room for every decision trains through.
    roomy = load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(tmp_path), "train__steps": 3,
                                                "train__log_every": 3, "data__shuffle": False})
    assert loop.train(roomy, episodes=long + short, progress=False, outputs=False)["decisions_dropped"] == 0


def test_stacked_seeds_through_the_loop_checkpoint_and_resume(tmp_path, episodes):
    cfg = load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(tmp_path), "train__steps": 4,
                                              "train__log_every": 2, "train__checkpoint_every": 2})
    final = loop.train(cfg, seeds=[3, 4], episodes=episodes, progress=False)
    assert final["seeds"] == [3, 4] and final["skipped"] == [0, 0] and final["step"] == 4
    restored = checkpoint.restore(checkpoint.checkpoint_dir(cfg), loop.state_layout(
        cfg, loop.setup_parallelism(cfg), (3, 4))[1])
    assert restored.state.step.shape == (2,) and restored.state.groups["target"]["q_heads"]["out_kernel"].shape[0] == 2
    # Seed i of the stack starts as init_state(cfg, seed=seeds[i]) (the update is the vmapped single-seed one).
    with pytest.raises(ValueError, match="seeds is empty"):
        loop.train(cfg, seeds=[], episodes=episodes, progress=False)


def test_the_data_running_out_is_an_error_naming_the_keys(tmp_path, episodes):
    cfg = load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(tmp_path), "train__steps": 50,
                                              "data__num_epochs": 1})
    with pytest.raises(ValueError, match="data ran out after .* data.num_epochs"):
        loop.train(cfg, episodes=episodes[:8], progress=False, outputs=False)


def test_a_task_path_needs_its_episodes_from_the_entry_point():
    cfg = load_config("configs/demo.yaml", **TINY)
    with pytest.raises(ValueError, match="names a built-in task.*task_dataset"):
        jaxrl_lm.data.make_loader(cfg.data, tokenizer=jaxrl_lm.data.build_char_tokenizer())


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints written before parameter groups.


def legacy_config(cfg):
    """``cfg.to_dict()`` as it was before objective sections: token_q's keys inside ``rl``."""
    saved = cfg.to_dict()
    saved["rl"] = {k: v for k, v in saved["rl"].items() if k != "objective"}
    saved["rl"].update(saved.pop("token_q"))
    return saved


def test_a_checkpoint_from_before_parameter_groups_restores_and_resumes(tmp_path):
    cfg = load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(tmp_path), "token_q__backup": "max"})
    assert from_dict(legacy_config(cfg)) == cfg
    state = jaxrl_lm.init_state(cfg)
    state = state.replace(groups={"target": jax.tree.map(lambda x: x + 1.0, state.groups["target"])})
    legacy = {"params": state.params, "target_params": state.groups["target"], "opt_state": state.opt_state,
              "step": state.step, "skipped": state.skipped, "rng": state.rng}
    directory = checkpoint.checkpoint_dir(cfg)
    manager = checkpoint.make_manager(directory, cfg.train)
    manager.save(3, args=checkpoint.ocp.args.Composite(
        state=checkpoint.ocp.args.StandardSave(legacy), data=checkpoint.ocp.args.JsonSave({"step": 3}),
        config=checkpoint.ocp.args.JsonSave(legacy_config(cfg))), force=True)
    manager.close()

    restored = checkpoint.restore(directory, SingleDeviceSharding(jax.devices()[0]))
    chex.assert_trees_all_equal(restored.state.groups, jax.device_get(state.groups))
    chex.assert_trees_all_equal(restored.state.params, jax.device_get(state.params))
    checkpoint.check_resume_config(restored.config, cfg, directory)  # the old layout reads as today's
    loaded_cfg, target_view, step = checkpoints.load_params(tmp_path, group="target")
    assert step == 3 and loaded_cfg.token_q.backup == "max"
    chex.assert_trees_all_equal(target_view["q_heads"], jax.device_get(state.groups["target"]["q_heads"]))
