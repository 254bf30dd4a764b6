"""The update's objective on packed rows equals the objective on the same episodes one per row: no backup or
attention crosses an episode boundary, and padding contributes nothing (docs/design.md section 2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm import data
from jaxrl_lm.rl import count_decisions
from jaxrl_lm.train.update import loss_fn

SEQ_LEN = 96


def token_episodes(n, seed):
    tok = data.build_char_tokenizer()
    episodes = [data.parse_episode(e) for e in data.synthetic_episodes(n, seed=seed)]
    return [data.tokenize_episode(e, tok, seq_len=SEQ_LEN, truncate_side="left").arrays for e in episodes]


@pytest.mark.parametrize("backup,scope", [("expectile", "heads"), ("max", "full"), ("sarsa", "heads")])
def test_packed_and_unpacked_batches_give_the_same_losses(backup, scope):
    cfg = jaxrl_lm.load_config(
        "configs/models/tiny.yaml", model__n_layers=1, model__max_seq_len=SEQ_LEN, data__seq_len=SEQ_LEN,
        token_q__backup=backup, token_q__target_scope=scope, token_q__awr_beta=1.0)
    graphdef, params = jaxrl_lm.split_model(jaxrl_lm.models.build(cfg.model))
    state = jaxrl_lm.train.init_state(cfg, params)
    episodes = token_episodes(12, seed=3)
    packed = data.episodes_to_batch(episodes, SEQ_LEN, pack=True)
    unpacked = data.episodes_to_batch(episodes, SEQ_LEN, pack=False)
    assert packed["tokens"].shape[0] < unpacked["tokens"].shape[0]  # the test must really pack
    assert packed["segment_ids"].max() > 1

    @jax.jit
    def objective(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        return loss_fn(cfg, graphdef, state.params, state.groups, batch, count_decisions(batch, cfg.rl), None)

    loss_p, metrics_p = objective(packed)
    loss_u, metrics_u = objective(unpacked)
    assert float(metrics_p["decisions"]) == float(metrics_u["decisions"]) > 0
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    for key in ("q_loss", "v_loss", "cql_loss", "bc_loss", "q_mean", "v_mean", "target_mean", "td_error"):
        np.testing.assert_allclose(float(metrics_p[key]), float(metrics_u[key]), rtol=1e-5, atol=1e-6, err_msg=key)
