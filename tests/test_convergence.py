"""A two-step chain MDP written as tokens: the learned Q-values match the analytic ones.

State s0 is the observation token S0. Action L (token 3) moves to s1 (observation S1, reward 0); action R
(token 4) ends the episode with reward 0.5. At s1, L ends with reward 1 and R ends with reward 0. With gamma 0.9:

    Q*(s1, L) = 1, Q*(s1, R) = 0, Q*(s0, L) = 0.9 * 1 = 0.9, Q*(s0, R) = 0.5      (optimal: L, L)

The behaviour policy picks R with probability 0.8 in both states, so the data mostly shows the bad actions.
The `max` backup must recover Q* (and the optimal actions). The expectile backup (tau = 0.9) instead learns
V(s1) = the tau-expectile of Q(s1, a) under the data's actions at s1, {1 w.p. p, 0 w.p. 1 - p} with p the
sample's frequency of L there (0.2 in expectation): tau p (1 - v) = (1 - tau)(1 - p) v, so
v = tau p / (tau p + (1 - tau)(1 - p)) and Q(s0, L) = 0.9 v (0.62 at p = 0.2), which still beats 0.5.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import jaxrl_lm

S0, S1, L_, R_, PAD = 1, 2, 3, 4, 0
GAMMA = 0.9
TAU = 0.9
ROWS, BATCH, STEPS = 4096, 256, 500


def episode(first, second):
    """(tokens, action_mask, reward, done, turn_ids) of one episode, unpadded."""
    if first == R_:
        return [S0, R_], [0, 1], [0.0, 0.5], [0, 1], [0, 1]
    r = 1.0 if second == L_ else 0.0
    return [S0, L_, S1, second], [0, 1, 0, 1], [0.0, 0.0, 0.0, r], [0, 0, 0, 1], [0, 1, 2, 3]


def dataset(n_rows, seed):
    """One episode per row, sampled from the behaviour policy; rows padded to length 4."""
    rng = np.random.default_rng(seed)
    rows = {k: np.zeros((n_rows, 4), np.int32) for k in ("tokens", "action_mask", "done", "segment_ids", "turn_ids")}
    rows["reward"] = np.zeros((n_rows, 4), np.float32)
    for b in range(n_rows):
        first = R_ if rng.random() < 0.8 else L_
        second = R_ if rng.random() < 0.8 else L_
        tok, am, rew, done, turns = episode(first, second)
        n = len(tok)
        rows["tokens"][b, :n], rows["action_mask"][b, :n], rows["reward"][b, :n] = tok, am, rew
        rows["done"][b, :n], rows["turn_ids"][b, :n], rows["segment_ids"][b, :n] = done, turns, 1
    return rows


def q_values(cfg, graphdef, params, prefix):
    """min_k Q_k at the state after reading `prefix`, for actions L and R."""
    model = nnx.merge(graphdef, params)
    tokens = np.array([prefix], np.int32)
    h = model.hidden(tokens, np.arange(len(prefix), dtype=np.int32)[None], np.ones_like(tokens))[:, -1]
    q = np.asarray(model.q_logits(h)).min(axis=0)[0]
    return q[L_], q[R_]


def expected_q(backup, data):
    """Analytic (Q(s0, L), Q(s0, R)) and (Q(s1, L), Q(s1, R)) for this sample of the behaviour policy."""
    if backup == "max":
        return {"s0": (GAMMA * 1.0, 0.5), "s1": (1.0, 0.0)}
    reached_s1 = data["tokens"][:, 1] == L_
    p = float(np.mean(data["tokens"][reached_s1, 3] == L_))
    v = TAU * p / (TAU * p + (1 - TAU) * (1 - p))
    return {"s0": (GAMMA * v, 0.5), "s1": (1.0, 0.0)}


@pytest.mark.parametrize("backup", ["max", "expectile"])
def test_chain_mdp_q_values(backup):
    cfg = jaxrl_lm.load_config(
        "configs/base.yaml", model__vocab_size=8, model__d_model=32, model__n_layers=1, model__n_heads=2,
        model__max_seq_len=4, data__seq_len=4, data__batch_size=BATCH, token_q__backup=backup, rl__gamma=GAMMA,
        token_q__expectile_tau=TAU, token_q__cql_alpha=0.01, token_q__lambda_bc=0.0, rl__target_ema=0.1,
        optim__learning_rate=3e-3, optim__schedule="cosine", optim__grad_clip=0.0, train__steps=STEPS,
    )
    model = jaxrl_lm.models.build(cfg.model, seed=0)
    graphdef, params = jaxrl_lm.split_model(model)
    state = jaxrl_lm.train.init_state(cfg, params)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    data = dataset(ROWS, seed=0)
    for step in range(cfg.train.steps):
        lo = (step * BATCH) % ROWS
        state, metrics = update(state, {k: v[lo:lo + BATCH] for k, v in data.items()})
    expected = expected_q(backup, data)
    params = jax.device_get(state.params)
    q_s0 = q_values(cfg, graphdef, params, [S0])
    q_s1 = q_values(cfg, graphdef, params, [S0, L_, S1])
    np.testing.assert_allclose(q_s0, expected["s0"], atol=0.05)
    np.testing.assert_allclose(q_s1, expected["s1"], atol=0.05)
    # The optimal action L is recovered in both states although the data picks R 80% of the time.
    assert q_s0[0] > q_s0[1] and q_s1[0] > q_s1[1]
