"""A run directory that stands alone: moved away from the repository it loads and acts with its own tokenizer,
load_policy takes the settings the run was evaluated with, and reading a checkpoint logs no warnings."""

import logging
import shutil

import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm import envs
from jaxrl_lm.checkpoints import RUN_TOKENIZER
from jaxrl_lm.config import load_config
from jaxrl_lm.data import load_tokenizer
from jaxrl_lm.model_policy import describe
from jaxrl_lm.train import loop


def test_a_moved_run_loads_with_its_own_tokenizer_and_its_eval_settings(tmp_path, monkeypatch, caplog):
    cfg = load_config("configs/tasks/grid.yaml", model__d_model=32, model__n_layers=1, data__task_episodes=64,
                      train__steps=2, train__log_every=1, train__out_dir=str(tmp_path / "run"))
    assert cfg.data.tokenizer == "configs/tokenizers/grid.json"  # relative to the repository
    loop.train(cfg, progress=False, episodes=envs.task_dataset(cfg.data))
    original = load_tokenizer(cfg.data.tokenizer)
    text = ["at 3\n", "go 17", "you reached the goal"]
    copied = load_tokenizer(tmp_path / "run" / RUN_TOKENIZER)
    assert [t.tolist() for t in copied.encode_batch(text)] == [t.tolist() for t in original.encode_batch(text)]
    assert (copied.bos_id, copied.eos_id, copied.eot_id, copied.pad_id) == \
        (original.bos_id, original.eos_id, original.eot_id, original.pad_id)

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(tmp_path / "run", moved)
    monkeypatch.chdir(tmp_path)  # the repository's configs/ are out of reach
    with caplog.at_level(logging.WARNING):
        policy = jaxrl_lm.load_policy(moved)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
    knobs = describe(policy)
    # eval.* of grid.yaml: the last policy, its beta, and the first of eval.decodings (greedy)
    assert (knobs["kind"], knobs["beta"], knobs["temperature"]) == ("ilql", 4.0, 0.0)
    assert describe(jaxrl_lm.load_policy(moved, "bc", temperature=0.5))["temperature"] == 0.5  # asked: honoured
    with pytest.raises(ValueError, match="holds one model"):  # a seed to pick only in a run of several
        jaxrl_lm.load_policy(moved, train_seed=0)
    observation = envs.make_env("grid").reset(0)
    (action,) = policy([envs.render_transcript([{"role": "observation", "text": observation}])])
    assert isinstance(action, str)  # greedy after 2 steps may say nothing but the end of its turn
    sampled = jaxrl_lm.load_policy(moved, temperature=1.0)
    assert any(sampled([envs.render_transcript([{"role": "observation", "text": observation}])] * 8))
    assert np.isfinite(jaxrl_lm.load_params(moved)[1]["v_head"]["out_bias"]).all()
