"""jaxrl_lm: value-based RL (token-level Q-learning first) for language models as multi-turn agents, in JAX/Flax.

The library path a notebook takes (``notebooks/quickstart.ipynb`` runs all of it)::

    import jaxrl_lm
    cfg = jaxrl_lm.load_config("configs/demo.yaml", token_q__backup="max")  # YAML + keyword overrides
    state = jaxrl_lm.init_state(cfg)                                    # TrainState of a new model
    update = jaxrl_lm.make_update(cfg)                                  # jitted, state donated
    for batch in jaxrl_lm.batches(cfg, steps=100):                      # dicts of [B, L] numpy arrays
        state, metrics = update(state, batch)                           # metrics: float32 device scalars

Public API (``help(jaxrl_lm.NAME)`` documents each, with shapes and an example):

- configs: ``load_config``, ``Config``, ``ConfigError``
- models and state: ``build_model``, ``split_model``, ``init_state``, ``TrainState``
- the update: ``make_update`` (the objective ``rl.objective``: ``jaxrl_lm.rl.register`` adds one); many seeds in
  one compile: ``init_states``, ``make_multi_seed_update``, ``train_seeds``, ``unstack``
- the loop: ``jaxrl_lm.train.loop.train`` (one run or stacked seeds, with hooks); ``jaxrl_lm.experiments.run.run``
  adds the config's data and evaluation, as ``scripts/train.py`` does
- data: ``make_dataset`` (a built-in task's offline episodes), ``batches``, ``load_tokenizer``
- checkpoints, policies and evaluation: ``load_params``, ``load_policy``, ``evaluate_params``, ``evaluate_policy``
- Hugging Face: ``export_hf``, ``import_hf``

``import jaxrl_lm`` loads only the configs, the model and the update; the data pipeline, environments,
decoding and Hugging Face names load on first use.
"""

import importlib
from typing import Any

from jaxrl_lm import models, rl, train
from jaxrl_lm.config import Config, ConfigError, load_config
from jaxrl_lm.models import build as build_model
from jaxrl_lm.models import split_model
from jaxrl_lm.train import TrainState, init_state, make_update

# Name -> module that defines it, imported on first access (PEP 562): these modules pull in grain, TFDS,
# scipy and Hugging Face, which a script that only trains from arrays never needs.
_LAZY = {
    "batches": "jaxrl_lm.experiments.run",
    "init_states": "jaxrl_lm.train.seeds",
    "make_multi_seed_update": "jaxrl_lm.train.seeds",
    "train_seeds": "jaxrl_lm.experiments.run",
    "unstack": "jaxrl_lm.train.seeds",
    "make_dataset": "jaxrl_lm.envs",
    "load_tokenizer": "jaxrl_lm.data",
    "load_params": "jaxrl_lm.checkpoints",
    "load_policy": "jaxrl_lm.model_policy",
    "evaluate_params": "jaxrl_lm.eval",
    "evaluate_policy": "jaxrl_lm.eval",
    "export_hf": "jaxrl_lm.interop",
    "import_hf": "jaxrl_lm.interop",
}
_SUBMODULES = ("batch", "checkpoints", "config", "data", "distributed", "envs", "eval", "experiments", "generate",
               "interop", "model_policy")

__all__ = [
    "Config", "ConfigError", "TrainState", "batches", "build_model", "evaluate_params", "evaluate_policy",
    "export_hf", "import_hf", "init_state", "init_states", "load_config", "load_params", "load_policy",
    "load_tokenizer",
    "make_dataset", "make_multi_seed_update", "make_update", "models", "rl", "split_model", "train",
    "train_seeds", "unstack", *_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"jaxrl_lm.{name}")
    else:
        raise AttributeError(f"module 'jaxrl_lm' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
