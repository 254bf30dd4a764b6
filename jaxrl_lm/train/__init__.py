"""Training: TrainState and its parameter groups, the jitted update, sharding, checkpoints, the host loop."""

from jaxrl_lm.train import checkpoint
from jaxrl_lm.train.state import TrainState, init_state, make_optimizer, param_groups
from jaxrl_lm.train.update import build_update_fn, ema, make_update

__all__ = [
    "TrainState", "build_update_fn", "checkpoint", "ema", "init_state", "make_optimizer", "make_update",
    "param_groups",
]
