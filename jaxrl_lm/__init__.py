"""jaxrl_lm: token-level Q-learning for language models as multi-turn agents, in JAX/Flax.

The functional core, as a notebook uses it::

    import jaxrl_lm
    cfg = jaxrl_lm.load_config("configs/models/tiny.yaml", rl__backup="max")
    model = jaxrl_lm.models.build(cfg.model)
    graphdef, params = jaxrl_lm.train.split_model(model)
    state = jaxrl_lm.train.init_state(cfg, params)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    state, metrics = update(state, batch)        # batch: dict of [B, L] arrays, see jaxrl_lm.batch
"""

from jaxrl_lm import models, rl, train
from jaxrl_lm.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "models", "rl", "train"]
