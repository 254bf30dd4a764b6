"""Training orchestration: TrainState, the jitted update, checkpoints, the loop."""

from jaxrl_lm.train import checkpoint

from jaxrl_lm.train.state import TrainState, init_state, make_optimizer, split_model, target_keys
from jaxrl_lm.train.update import build_update_fn, ema, make_update

__all__ = [
    "TrainState", "checkpoint", "build_update_fn", "ema", "init_state", "make_optimizer", "make_update", "split_model",
    "target_keys",
]
