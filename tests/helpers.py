"""Helpers several test files share: random parameters drawn in NumPy, the engine's jitted forward, and a run
trained straight against the same run interrupted and resumed."""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxrl_lm.config import Config, ModelConfig
from jaxrl_lm.models import build, model_graphdef
from jaxrl_lm.train import checkpoint, loop


def random_params(cfg: ModelConfig, seed: int = 0):
    """Random parameters of ``cfg``'s shapes (norm scales around 1, every bias nonzero), drawn in NumPy: no eager
    jax compiles."""
    shapes = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: build(cfg)), nnx.Param)[1])
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        centre = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(centre + 0.1 * rng.standard_normal(shape.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def engine_forward(cfg: ModelConfig):
    """Jitted ``params, tokens [B, L] -> (lm [B, L, Vp], q [K, B, L, Vp], value [B, L])`` of the engine's model
    for ``cfg`` (every position of every row one segment), as NumPy arrays; compiled once per config."""
    graphdef = model_graphdef(cfg)

    @jax.jit
    def run(params, tokens):
        m = nnx.merge(graphdef, params)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = m.hidden(tokens, positions, jnp.ones_like(tokens))
        return m.lm_logits(h), m.q_logits(h), m.value(h)

    return lambda params, tokens: jax.tree.map(np.asarray, run(params, jnp.asarray(tokens)))


def assert_bitwise_equal(a, b) -> None:
    """Two pytrees of the same structure whose every leaf has the same dtype, shape and bytes."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def straight_and_resumed(make_cfg: Callable[..., Config], root, episodes, **kw: Any) -> Config:
    """Run ``a``: 4 steps straight, a checkpoint every step (all kept). Run ``b``: 2 steps, then resumed to 4.
    ``make_cfg(**overrides)`` builds each run's config; returns run ``a``'s."""
    straight = make_cfg(train__out_dir=str(root / "a"), train__steps=4, train__checkpoint_every=1,
                        train__keep_checkpoints=4, **kw)
    loop.train(straight, progress=False, episodes=episodes)
    loop.train(make_cfg(train__out_dir=str(root / "b"), train__steps=2, **kw), progress=False, episodes=episodes)
    loop.train(make_cfg(train__out_dir=str(root / "b"), train__steps=4, **kw), progress=False, episodes=episodes,
               resume=True)
    return straight


def restore_state(cfg: Config, step=None):
    """The TrainState of ``cfg``'s run at ``step`` (default: the newest), on one device."""
    return checkpoint.restore(checkpoint.checkpoint_dir(cfg), SingleDeviceSharding(jax.devices()[0]), step).state
