"""A tiny sharded training run, shared by tests/test_sharding.py and tests/test_multihost.py; run as a script,
one process of the two-process run that tests/test_multihost.py starts (on 127.0.0.1, CPU devices):

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/multihost_worker.py --process-id 0 --num-processes 2 --port 12355 --out /tmp/run

Every process trains on its own rows of each synthetic batch; process 0 writes the final parameters
(``params.npz``) and the losses (``losses.json``) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import jaxrl_lm
from jaxrl_lm import distributed
from jaxrl_lm.train import sharding
from jaxrl_lm.train.mesh import place_batch
from jaxrl_lm.models import model_graphdef

# Every dimension that a rule maps divides by 8. optim.eps: Adam's first step is lr * g / (|g| + eps), so with
# eps = 1e-8 a gradient that is zero in exact arithmetic (the key biases: softmax ignores a shift) becomes
# lr * sign(rounding noise), and two layouts that add in different orders differ by lr; 1e-4 bounds that.
TINY = dict(model__d_model=64, model__n_heads=8, model__n_layers=2, model__vocab_size=256, model__max_seq_len=16,
            data__seq_len=16, data__batch_size=8, optim__eps=1e-4)


def make_cfg(**kw: Any) -> jaxrl_lm.Config:
    return jaxrl_lm.load_config("configs/base.yaml", **{**TINY, **kw})


def synthetic_batch(cfg: jaxrl_lm.Config, seed: int) -> dict[str, np.ndarray]:
    """A global ``[B, L]`` batch: per row two packed episodes of alternating 3-token observation / action turns,
    the first ending (done), the second cut by the row end and, in even rows, replaced by padding. So rows (and
    therefore devices) hold different numbers of decisions: a per-device loss normalisation would show."""
    rng = np.random.default_rng(seed)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    turn = np.arange(length) // 3
    seg = np.tile(np.where(np.arange(length) < length // 2, 1, 2), (b, 1)).astype(np.int32)
    seg[::2, length // 2:] = 0
    action = np.where(seg > 0, turn % 2 == 1, 0).astype(np.int32)
    done = np.zeros((b, length), np.int32)
    done[:, max(i for i in range(length // 2) if action[0, i])] = 1
    turn_ids = np.where(seg == 1, turn, np.where(seg == 2, turn - turn[length // 2], 0)).astype(np.int32)
    tokens = np.where(seg > 0, rng.integers(0, cfg.model.vocab_size, (b, length)), 0).astype(np.int32)
    reward = (action * rng.normal(size=(b, length))).astype(np.float32)
    return {"tokens": tokens, "action_mask": action, "reward": reward, "done": done, "segment_ids": seg,
            "turn_ids": turn_ids}


def train_steps(cfg: jaxrl_lm.Config, par: sharding.Parallelism, steps: int,
                rows: slice = slice(None)) -> tuple[list[float], jaxrl_lm.train.TrainState]:
    """``steps`` updates on ``par``'s mesh from the fresh state; this process feeds ``rows`` of each batch."""
    state = sharding.init_sharded_state(cfg, par)
    graphdef = model_graphdef(cfg.model)
    update = jaxrl_lm.train.make_update(cfg, graphdef, state_sharding=par.state_sharding,
                                        batch_sharding=par.batch_sharding)
    losses = []
    for step in range(steps):
        local = {k: v[rows] for k, v in synthetic_batch(cfg, step).items()}
        state, metrics = update(state, place_batch(local, par.mesh))
        losses.append(float(metrics["loss"]))
    return losses, state


def flat_params(params: Any) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    cfg = make_cfg(mesh__data=2, mesh__fsdp=2, mesh__coordinator_address=f"127.0.0.1:{args.port}",
                   mesh__num_processes=args.num_processes, mesh__process_id=args.process_id)
    info = distributed.initialize(cfg)
    par = sharding.setup_parallelism(cfg)
    share = cfg.data.batch_size // info.count
    losses, state = train_steps(cfg, par, args.steps, slice(info.index * share, (info.index + 1) * share))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if info.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "params.npz", **flat_params(params))
        (args.out / "losses.json").write_text(json.dumps({"losses": losses, "processes": info.count,
                                                          "devices": jax.device_count()}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
