"""Checkpoints: exact resume through the real loop, SIGTERM, crash mid-write, keep-last-K/best, any-mesh restore."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxrl_lm import envs
from jaxrl_lm.config import ConfigError, REPO_ROOT, load_config
from jaxrl_lm.experiments import run as run_lib
from jaxrl_lm.train import checkpoint, loop
from helpers import assert_bitwise_equal

N = 3  # the interrupted run stops after N of 2N steps
TINY = dict(model__d_model=32, model__n_layers=1, data__task_episodes=200, data__batch_size=8, data__seq_len=64,
            optim__schedule="constant", train__log_every=N, train__checkpoint_every=0)


def tiny_cfg(out_dir, **kw):
    return load_config("configs/demo.yaml", **{**TINY, "train__out_dir": str(out_dir), **kw})


EPISODES = envs.task_dataset(tiny_cfg("unused").data)  # data.path task:grid, as the entry point resolves it


@pytest.fixture(scope="module", autouse=True)
def _compile_once(compile_once):
    """The 2N-step and the N-step runs share the executable (conftest.py: ``compile_once``)."""


class Recorder:
    """A loop hook that keeps every batch the loop consumed (the data order)."""

    def __init__(self):
        self.batches = []

    def __call__(self, ctx):
        self.batches.append((ctx.step, {k: np.array(v) for k, v in ctx.batch.items()}))


def run(cfg, **kw):
    rec = Recorder()
    final = loop.train(cfg, progress=False, hooks=[loop.Hook(rec, every=1)], episodes=EPISODES, **kw)
    return final, rec.batches


def load(out_dir, step=None):
    cfg = tiny_cfg(out_dir)
    return checkpoint.restore(checkpoint.checkpoint_dir(cfg), SingleDeviceSharding(jax.devices()[0]), step)


def assert_same_batches(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert_bitwise_equal(x, y)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A: 2N steps straight (a checkpoint every 2 steps, keep 2). Run B: N steps, then --resume to 2N."""
    root = tmp_path_factory.mktemp("runs")
    a = run(tiny_cfg(root / "a", train__steps=2 * N, train__checkpoint_every=2, train__keep_checkpoints=2))
    b1 = run(tiny_cfg(root / "b", train__steps=N))
    b2 = run(tiny_cfg(root / "b", train__steps=2 * N), resume=True)
    return {"root": root, "a": a, "b1": b1, "b2": b2}


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(runs):
    (final_a, batches_a), (final_b1, batches_b1), (final_b2, batches_b2) = runs["a"], runs["b1"], runs["b2"]
    assert final_a["step"] == 2 * N and final_a["resumed_from"] is None and not final_a["preempted"]
    assert final_b1["step"] == N and final_b2["resumed_from"] == N and final_b2["step"] == 2 * N
    assert_same_batches(batches_a, batches_b1 + batches_b2)  # data order: the same batches, none repeated
    a, b = load(runs["root"] / "a"), load(runs["root"] / "b")
    assert a.step == b.step == 2 * N
    assert_bitwise_equal(a.state, b.state)  # params, target params, optimizer state, step, skipped, rng
    assert a.loader_state == b.loader_state
    assert int(a.state.step) == 2 * N and a.state.rng.dtype == jnp.uint32
    for moment in (a.state.opt_state[1][0].mu, a.state.opt_state[1][0].nu):
        leaves = jax.tree.leaves(moment)
        assert leaves and all(x.dtype == jnp.float32 for x in leaves)
        assert any(np.any(np.asarray(x) != 0) for x in leaves)


def test_loop_keeps_the_newest_k(runs):
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(tiny_cfg(runs["root"] / "a"))) == [4, 6]
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(tiny_cfg(runs["root"] / "b"))) == [N, 2 * N]


def test_sigterm_saves_at_the_next_step_and_stops(runs, tmp_path, capsys):
    def preempt(ctx):
        if ctx.step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    cfg = tiny_cfg(tmp_path, train__steps=2 * N)
    final = loop.train(cfg, progress=False, hooks=[loop.Hook(preempt, every=1)], episodes=EPISODES)
    assert final["preempted"] and final["step"] == 4
    assert "SIGTERM: saved the checkpoint of step 4" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before
    assert checkpoint.complete_steps(checkpoint.checkpoint_dir(cfg)) == [4]
    saved, reference = load(tmp_path), load(runs["root"] / "a", step=4)
    assert_bitwise_equal(saved.state, reference.state)
    assert saved.loader_state == reference.loader_state


CRASH = """
import os, sys
import jax
from jaxrl_lm.config import load_config
from jaxrl_lm.train import checkpoint

cfg = load_config("configs/demo.yaml", train__out_dir=sys.argv[1])
directory = checkpoint.checkpoint_dir(cfg)
restored = checkpoint.restore(directory, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
# 128 MiB of ballast: the background write is still running when the process dies.
ballast = jax.random.normal(jax.random.key(0), (32, 1024, 1024))
state = restored.state.replace(params={**restored.state.params, "ballast": ballast})
manager = checkpoint.make_manager(directory, cfg.train)
checkpoint.save(manager, restored.step + 1, state, loader_state=restored.loader_state, cfg=cfg)
os._exit(1)  # a crash (or kill -9) mid-write: no wait, no finalisation
"""


def test_crash_mid_write_resumes_from_the_previous_complete_checkpoint(runs, tmp_path):
    out_dir = tmp_path / "run"
    src = checkpoint.checkpoint_dir(tiny_cfg(runs["root"] / "a"))
    subprocess.run(["cp", "-r", str(src.parent), str(out_dir)], check=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CRASH), str(out_dir)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    directory = out_dir / checkpoint.CHECKPOINT_SUBDIR
    assert [p.name for p in directory.iterdir() if p.name.startswith("7")] == ["7.orbax-checkpoint-tmp"]
    assert checkpoint.latest_step(directory) == 6 and load(out_dir).step == 6
    final = loop.train(tiny_cfg(out_dir, train__steps=8), progress=False, resume=True, episodes=EPISODES)
    assert final["resumed_from"] == 6 and final["step"] == 8
    assert sorted(p.name for p in directory.iterdir()) == ["4", "6", "8"]  # the debris is gone


def test_resume_refuses_a_changed_shape_or_meaning(runs):
    out_dir = runs["root"] / "b"
    with pytest.raises(ConfigError) as err:
        loop.resume_step(tiny_cfg(out_dir, model__d_model=64, data__batch_size=16), resume=True)
    assert "model.d_model: checkpoint 32, config 64" in str(err.value)
    assert "data.batch_size: checkpoint 8, config 16" in str(err.value)
    with pytest.raises(ConfigError, match=r"rl\.gamma"):
        loop.resume_step(tiny_cfg(out_dir, rl__gamma=0.9), resume=True)
    assert loop.resume_step(tiny_cfg(out_dir, train__steps=100, optim__learning_rate=1e-5), resume=True) == 2 * N


def test_resume_flag_without_checkpoint_and_fresh_run_over_checkpoints(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume: no complete checkpoint in .*checkpoints"):
        run_lib.main(["--resume", "--config", "configs/demo.yaml", f"train.out_dir={tmp_path}"])
    with pytest.raises(FileExistsError, match="already holds checkpoints .*step 6.*--resume"):
        loop.resume_step(tiny_cfg(runs["root"] / "b"), resume=False)


# ----------------------------------------------------------------------------------------------------------------
# Orbax-level: keep-last-K plus best, restoring onto another mesh.


@pytest.fixture(scope="module")
def random_state():
    """A tiny model's TrainState (host arrays) with every leaf random: zero moments would hide a mix-up."""
    cfg = tiny_cfg("unused")
    rng = np.random.default_rng(1)
    shapes = checkpoint.abstract_state(cfg, SingleDeviceSharding(jax.devices()[0]))
    state = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype) if s.dtype == np.float32
                         else rng.integers(0, 1000, s.shape).astype(s.dtype), shapes)
    return cfg, state


def test_keep_last_k_and_the_best(random_state, tmp_path):
    cfg, state = random_state
    losses = [0.1, 0.5, 0.4, 0.3, 0.2]
    for mode, best in (("min", 1), ("max", 2)):
        cfg_k = tiny_cfg(tmp_path / mode, train__keep_checkpoints=2, train__keep_best_metric="loss",
                         train__keep_best_mode=mode)
        manager = checkpoint.make_manager(checkpoint.checkpoint_dir(cfg_k), cfg_k.train)
        for step, loss in enumerate(losses, start=1):
            checkpoint.save(manager, step, state, loader_state={}, cfg=cfg_k, metrics={"loss": loss})
        manager.close()
        assert checkpoint.complete_steps(checkpoint.checkpoint_dir(cfg_k)) == sorted({best, 4, 5})
    cfg_r = tiny_cfg(tmp_path / "bad", train__keep_best_metric="return")
    manager = checkpoint.make_manager(checkpoint.checkpoint_dir(cfg_r), cfg_r.train)
    with pytest.raises(ConfigError, match="train.keep_best_metric: 'return' is not a metric"):
        checkpoint.save(manager, 1, state, loader_state={}, cfg=cfg_r, metrics={"loss": 1.0})
    manager.close()
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        tiny_cfg(tmp_path, train__keep_checkpoints=0)


def _shard(shapes, mesh, spec_fn):
    return jax.tree.map(lambda s: NamedSharding(mesh, spec_fn(s.shape)), shapes)


def _on_8(shape):
    """The first axis that 8 divides is sharded (replicated leaves would make Orbax slice them per replica)."""
    axis = next((i for i, n in enumerate(shape) if n % 8 == 0), None)
    return P() if axis is None else P(*([None] * axis), "x")


def _on_2x4(shape):
    if len(shape) >= 2 and shape[0] % 2 == 0 and shape[1] % 4 == 0:
        return P("a", "b")
    return P("b") if shape and shape[0] % 4 == 0 else P()


def test_restore_onto_one_device_and_another_mesh(random_state, tmp_path):
    cfg, state = random_state
    devices = np.array(jax.devices())
    assert devices.size == 8
    shapes = checkpoint.abstract_state(cfg, SingleDeviceSharding(devices[0]))
    sharded = jax.device_put(state, _shard(shapes, Mesh(devices, ("x",)), _on_8))
    assert sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(sharded)) >= 30
    directory = tmp_path / "ckpt"
    manager = checkpoint.make_manager(directory, cfg.train)
    checkpoint.save(manager, int(state.step), sharded, loader_state={"position": 7}, cfg=cfg)
    manager.close()

    single = checkpoint.restore(directory, SingleDeviceSharding(devices[0]))
    assert single.step == int(state.step) and single.loader_state == {"position": 7}
    assert all(leaf.sharding == SingleDeviceSharding(devices[0]) for leaf in jax.tree.leaves(single.state))
    assert_bitwise_equal(single.state, state)

    target = _shard(shapes, Mesh(devices.reshape(2, 4), ("a", "b")), _on_2x4)
    on_2x4 = checkpoint.restore(directory, checkpoint.abstract_state(cfg, target))
    assert all(x.sharding == t for x, t in zip(jax.tree.leaves(on_2x4.state), jax.tree.leaves(target)))
    assert any(t.spec == P("a", "b") for t in jax.tree.leaves(target))
    assert_bitwise_equal(on_2x4.state, state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(on_2x4.state.opt_state[1][0].mu))
