"""Numerics under fault (docs/reliability.md): batches with a NaN, Inf or huge reward, all padding, or no decision.

The update's guard (jaxrl_lm/train/update.py) rejects a step whose loss or gradient is not finite, or whose batch
holds no decision: the parameters, groups and optimizer state stay bitwise as they were, ``state.skipped`` and
``state.step`` count it. The loop (jaxrl_lm/train/loop.py) stops with an error once ``train.max_consecutive_skips``
updates in a row were rejected. Bad batches reach the loop through a ``BatchSource`` here: the episode reader
already refuses non-finite rewards in files (tests/test_fuzz.py), so this is the path a custom source or a
numerical blow-up takes.
"""

import itertools

import jax
import numpy as np
import pytest

from jaxrl_lm.config import load_config
from jaxrl_lm.experiments import run as run_lib
from jaxrl_lm.train import loop
from jaxrl_lm.train.state import init_state
from jaxrl_lm.train.update import make_update

TINY = dict(model__d_model=32, model__n_layers=1, data__task_episodes=200, data__batch_size=8, data__seq_len=64,
            optim__schedule="constant", train__checkpoint_every=0)


def tiny_cfg(**kw):
    return load_config("configs/demo.yaml", **{**TINY, **kw})


@pytest.fixture(scope="module", autouse=True)
def _compile_once(compile_once):
    """The loop runs of this module share one executable (conftest.py: ``compile_once``)."""


@pytest.fixture(scope="module")
def clean_batches():
    """Eight real ``[8, 64]`` batches of the demo task (numpy, ``jaxrl_lm.batch`` fields)."""
    return list(itertools.islice(run_lib.batches(tiny_cfg()), 8))


def with_reward(batch, value, where="decision"):
    """``batch`` with one reward set to ``value``: at the first decision position, or at a padding position."""
    out = {k: v.copy() for k, v in batch.items()}
    mask = out["action_mask"] > 0 if where == "decision" else out["segment_ids"] == 0
    out["reward"][tuple(np.argwhere(mask)[0])] = value
    return out


def all_padding(batch):
    return {k: np.zeros_like(v) for k, v in batch.items()}


def no_decisions(batch):
    return {**{k: v.copy() for k, v in batch.items()}, "action_mask": np.zeros_like(batch["action_mask"])}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def bitwise_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating))


BAD = {  # name -> (batch transform, whether the guard must reject it)
    "nan reward": (lambda b: with_reward(b, np.nan), True),
    "+inf reward": (lambda b: with_reward(b, np.inf), True),
    "-inf reward": (lambda b: with_reward(b, -np.inf), True),
    "reward 1e30 (its square overflows float32)": (lambda b: with_reward(b, 1e30), True),
    "reward 3e38 (float32 max)": (lambda b: with_reward(b, 3e38), True),
    "all padding": (all_padding, True),
    "no decision position": (no_decisions, True),
    # Handled as defined: a finite loss with a finite gradient is applied (clipped by optim.grad_clip).
    "reward 1e18 (finite loss 1e34)": (lambda b: with_reward(b, 1e18), False),
    # A NaN where no row reads it (padding) changes nothing: the update equals the clean batch's.
    "nan reward at a padding position": (lambda b: with_reward(b, np.nan, "padding"), False),
}


def test_the_guard_rejects_each_bad_batch_and_leaves_the_state_bitwise_unchanged(clean_batches):
    cfg = tiny_cfg()
    update = make_update(cfg)
    state = init_state(cfg)
    for batch in clean_batches[:3]:  # Adam's moments are nonzero: a zero gradient would still move parameters
        state, _ = update(state, batch)
    before = host(state)
    assert int(before.skipped) == 0
    probe = clean_batches[3]
    for name, (make_bad, rejected) in BAD.items():
        after, metrics = update(jax.tree.map(np.copy, before), make_bad(probe))
        after, metrics = host(after), host(metrics)
        assert int(after.step) == int(before.step) + 1, name  # the batch counts as consumed either way
        assert all_finite(after.params) and all_finite(after.groups) and all_finite(after.opt_state), name
        if rejected:
            assert float(metrics["update_applied"]) == 0.0, name
            assert int(after.skipped) == 1 and float(metrics["skipped"]) == 1.0, name
            for field in ("params", "groups", "opt_state"):
                assert bitwise_equal(getattr(after, field), getattr(before, field)), f"{name}: {field} changed"
        else:
            assert float(metrics["update_applied"]) == 1.0 and int(after.skipped) == 0, name
            assert not bitwise_equal(after.params, before.params), name
    # The padding NaN gives exactly the clean step.
    clean_after, _ = update(jax.tree.map(np.copy, before), probe)
    padded_after, _ = update(jax.tree.map(np.copy, before), BAD["nan reward at a padding position"][0](probe))
    assert bitwise_equal(host(clean_after), host(padded_after))


class Source:
    """A ``loop.BatchSource`` giving ``batches[i % n]`` transformed by ``fault(step)`` (``None`` = clean)."""

    def __init__(self, batches, fault):
        self.batches, self.fault, self.step = batches, fault, 0
        self.summary = {"episodes": 0}

    def __next__(self):
        self.step += 1
        batch = self.batches[(self.step - 1) % len(self.batches)]
        transform = self.fault(self.step)
        return batch if transform is None else transform(batch)

    def get_state(self):
        return {"step": self.step}

    def set_state(self, state, *args):
        self.step = state["step"]

    def close(self):
        pass


class Params:
    """A hook recording, after every step, whether the parameters are finite and a digest of them."""

    def __init__(self):
        self.finite, self.digests = [], []

    def __call__(self, ctx):
        params = host(ctx.state.params)
        self.finite.append(all_finite(params))
        self.digests.append(b"".join(x.tobytes() for x in jax.tree.leaves(params)))


def train(batches, fault, **kw):
    record = Params()
    cfg = tiny_cfg(**{"train__log_every": 2, **kw})
    final = loop.train(cfg, source=Source(batches, fault), hooks=[loop.Hook(record, every=1)], progress=False,
                       outputs=False)
    return final, record


def test_the_loop_stops_after_max_consecutive_skips_with_the_parameters_finite(clean_batches):
    """Steps 1-2 clean, then only NaN batches: skips at steps 3, 4, 5, 6; limit 3, log every 2 -> the stop comes
    at the log step 6 (the first log step at or after the third skip), naming the limit and the cause."""
    record = Params()
    cfg = tiny_cfg(train__steps=12, train__log_every=2, train__max_consecutive_skips=3)
    nan = BAD["nan reward"][0]
    source = Source(clean_batches, lambda step: nan if step >= 3 else None)
    with pytest.raises(RuntimeError) as err:
        loop.train(cfg, source=source, hooks=[loop.Hook(record, every=1)], progress=False, outputs=False)
    message = str(err.value)
    assert "step 6: 4 updates in a row were skipped (train.max_consecutive_skips = 3)" in message
    assert "non-finite loss or gradient" in message and "loss nan" in message
    assert len(record.finite) == 6 and all(record.finite)
    assert record.digests[1] == record.digests[2] == record.digests[5]  # nothing applied after step 2


def test_skips_that_are_not_consecutive_do_not_stop_the_run(clean_batches):
    """Every other batch is all padding (8 of 16 rejected), limit 2: the run ends; the count is exact."""
    final, record = train(clean_batches, lambda step: all_padding if step % 2 == 0 else None, train__steps=16,
                          train__max_consecutive_skips=2)
    assert final["step"] == 16 and final["skipped"] == 8 and all(record.finite)
    assert [record.digests[i] == record.digests[i - 1] for i in range(1, 16)] == [i % 2 == 1 for i in range(1, 16)]


def test_max_consecutive_skips_zero_never_stops(clean_batches):
    final, record = train(clean_batches, lambda step: BAD["+inf reward"][0], train__steps=6,
                          train__max_consecutive_skips=0)
    assert final["step"] == 6 and final["skipped"] == 6 and all(record.finite)
    assert len(set(record.digests)) == 1
