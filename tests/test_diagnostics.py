"""Value diagnostics (jaxrl_lm.experiments.diagnostics, scripts/evaluate.py --diagnostics): the Monte-Carlo
return-to-go against a loop, a converged chain MDP whose Q and V equal its returns, the advantage page, and the
script on a tiny trained run."""

from __future__ import annotations

import html
import json
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrl_lm
from jaxrl_lm import data, envs
from jaxrl_lm.batch import segment_positions
from jaxrl_lm.config import load_config
from jaxrl_lm.experiments.diagnostics import (DECISION_FIELDS, advantage_html, dataset_batches, returns_to_go,
                                              value_diagnostics)
from jaxrl_lm.experiments.run import run
from script_loader import load_script
from test_bellman import random_batch


# ----------------------------------------------------------------------------------------------------------------
# returns_to_go against a loop over each segment's decisions, read straight from the batch fields.


def loop_returns(batch: dict, gamma: float, time_step: str) -> tuple[np.ndarray, np.ndarray]:
    """(G [B, L], complete [B, L]) walking forward from each decision: sum over the later decisions j of its
    segment of (product of the discounts before j) r_j, stopping after the first terminal one."""
    tok = {k: np.asarray(v) for k, v in batch.items()}
    B, L = tok["tokens"].shape
    returns, complete = np.zeros((B, L)), np.zeros((B, L), bool)
    for b in range(B):
        seg, am, turn = tok["segment_ids"][b], tok["action_mask"][b], tok["turn_ids"][b]
        decisions = [i for i in range(L - 1) if am[i + 1] == 1 and seg[i] != 0 and seg[i + 1] == seg[i]]
        for n, i in enumerate(decisions):
            chain = [j for j in decisions[n:] if seg[j] == seg[i]]
            total, factor = 0.0, 1.0
            for k, j in enumerate(chain):
                total += factor * tok["reward"][b, j + 1]
                if tok["done"][b, j + 1]:
                    complete[b, i] = True
                    break
                if k + 1 < len(chain):  # discount between decision j and the next one
                    later_turn = turn[chain[k + 1] + 1] > turn[j + 1]
                    factor *= gamma if time_step == "token" or later_turn else 1.0
            returns[b, i] = total
    return returns, complete


@pytest.mark.parametrize("time_step", ["token", "utterance"])
def test_returns_to_go_match_a_loop_on_random_packed_batches(time_step):
    for seed in range(6):
        batch = random_batch(seed, batch_size=5, seq_len=40)
        rtg = jax.jit(returns_to_go, static_argnums=(1, 2))({k: jnp.asarray(v) for k, v in batch.items()},
                                                           0.9, time_step)
        chex.assert_shape([rtg.value, rtg.complete], batch["tokens"].shape)
        chex.assert_type([rtg.value, rtg.complete], [jnp.float32, jnp.bool_])
        expected, complete = loop_returns(batch, 0.9, time_step)
        np.testing.assert_allclose(np.asarray(rtg.value), expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(rtg.complete), complete)
        # The generator makes both kinds: terminal episodes and windows cut without their end.
        decision = np.asarray(rtg.value) != 0
        assert complete.any() and (decision & ~complete).any()


# ----------------------------------------------------------------------------------------------------------------
# A chain MDP with one data action per history: once the backup has converged, Q = V = G at every decision of a
# terminal episode.

PAD, BOS, EOT, S0, S1, S2, A, B, C = range(9)
GAMMA = 0.9
L_CHAIN = 20


def chain_episode(turns: list[tuple[str, list[int], float]], done: bool) -> dict[str, list]:
    """The layout of jaxrl_lm.data.convert: BOS, then each turn's ids and its EOT (the action's reward on it)."""
    ep = dict(tokens=[BOS], action_mask=[0], reward=[0.0], done=[0], turn_ids=[0])
    for t, (role, ids, reward) in enumerate(turns):
        for k, x in enumerate([*ids, EOT]):
            ep["tokens"].append(x)
            ep["action_mask"].append(int(role == "action"))
            ep["reward"].append(reward if k == len(ids) else 0.0)
            ep["done"].append(0)
            ep["turn_ids"].append(t)
    if done:
        ep["done"][max(i for i, a in enumerate(ep["action_mask"]) if a)] = 1
    return ep


# Two-token action, then a one-token action (reward 1); a one-step episode (0.5); an episode cut after its action.
LONG = chain_episode([("observation", [S0], 0), ("action", [A, B], 0.0), ("observation", [S1], 0),
                      ("action", [C], 1.0)], done=True)
SHORT = chain_episode([("observation", [S2], 0), ("action", [B], 0.5)], done=True)
CUT = chain_episode([("observation", [S1], 0), ("action", [A], 0.25), ("observation", [S0], 0)], done=False)
# Per utterance: one discount between LONG's two actions. Decisions 2, 3, 4 (A, B, EOT) and 7, 8 (C, EOT).
LONG_RETURNS = {2: GAMMA, 3: GAMMA, 4: GAMMA, 7: 1.0, 8: 1.0}


def chain_batch() -> dict[str, np.ndarray]:
    """Rows [LONG, SHORT], [CUT, SHORT], [SHORT, LONG]: packed, so values must not depend on the neighbour."""
    rows = []
    for episodes in ((LONG, SHORT), (CUT, SHORT), (SHORT, LONG)):
        row = {k: np.zeros(L_CHAIN, np.float32 if k == "reward" else np.int32)
               for k in ("tokens", "action_mask", "reward", "done", "segment_ids", "turn_ids")}
        pos = 0
        for sid, ep in enumerate(episodes, start=1):
            n = len(ep["tokens"])
            for k, v in ep.items():
                row[k][pos:pos + n] = v
            row["segment_ids"][pos:pos + n] = sid
            pos += n
        rows.append(row)
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_converged_chain_mdp_is_calibrated_exactly():
    """As tests/test_convergence.py trains its chain, but every history has a single data action, so the expectile
    backup's fixed point is Q(h, a) = V(h) = the return-to-go; CQL and BC are off, and the target follows the
    online heads every step (rl.target_ema = 1)."""
    cfg = load_config(
        "configs/base.yaml", model__vocab_size=9, model__vocab_pad_multiple=16, model__d_model=32, model__n_layers=1,
        model__n_heads=2, model__max_seq_len=L_CHAIN, data__seq_len=L_CHAIN, data__batch_size=3,
        token_q__backup="expectile", rl__gamma=GAMMA, rl__time_step="utterance", token_q__cql_alpha=0.0,
        token_q__lambda_bc=0.0, rl__target_ema=1.0, optim__learning_rate=3e-3, optim__schedule="cosine",
        optim__grad_clip=0.0, train__steps=1000)
    model = jaxrl_lm.models.build(cfg.model, seed=0)
    graphdef, params = jaxrl_lm.split_model(model)
    state = jaxrl_lm.train.init_state(cfg, params)
    update = jaxrl_lm.train.make_update(cfg, graphdef)
    batch = chain_batch()
    for _ in range(cfg.train.steps):
        state, _ = update(state, batch)
    params = jax.device_get(state.params)
    # Padded vocabulary ids (9..15) with a huge Q: the greedy action and the CQL gap must not see them.
    params["q_heads"]["out_bias"] = np.asarray(params["q_heads"]["out_bias"]).copy()
    params["q_heads"]["out_bias"][:, 9:] = 1e6

    result = value_diagnostics(cfg, params, [batch])
    d, s = result["decisions"], result["summary"]
    assert set(d) == set(DECISION_FIELDS) and all(v.shape == d["q"].shape for v in d.values())
    rows = {(int(r), int(p)): k for k, (r, p) in enumerate(zip(d["row"], d["position"]))}
    # The returns by hand: LONG in rows 0 (first) and 2 (after SHORT, 5 tokens on), SHORT 0.5, CUT incomplete.
    for offset, row in ((0, 0), (5, 2)):
        for pos, g in LONG_RETURNS.items():
            k = rows[(row, pos + offset)]
            assert d["return"][k] == pytest.approx(g) and d["complete"][k]
    for row, pos in ((0, 12), (0, 13), (1, 9), (1, 10), (2, 2), (2, 3)):
        assert d["return"][rows[(row, pos)]] == pytest.approx(0.5) and d["complete"][rows[(row, pos)]]
    assert not d["complete"][rows[(1, 2)]] and not d["complete"][rows[(1, 3)]]
    assert s["decisions"] == 18 and s["calibrated_decisions"] == 16 and s["truncated_decisions"] == 2

    complete = d["complete"]
    np.testing.assert_allclose(d["q"][complete], d["return"][complete], atol=1e-3)
    np.testing.assert_allclose(d["v"][complete], d["return"][complete], atol=1e-3)
    for key in ("q", "v"):
        assert abs(s[key]["bias"]) < 1e-3 and s[key]["rmse"] < 1e-3 and s[key]["correlation"] > 0.999
        for row in s["calibration"][key]:
            assert row["mean_prediction"] == pytest.approx(row["mean_return"], abs=1e-3)
    assert [t["turn"] for t in s["per_turn"]] == [1, 3] and all(abs(t["q"]["bias"]) < 1e-3 for t in s["per_turn"])

    # max_a min_k Q over the real vocabulary, from the model directly.
    merged = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    seg = jnp.asarray(batch["segment_ids"])
    h = merged.hidden(jnp.asarray(batch["tokens"]), segment_positions(seg), seg)
    q_all = np.asarray(jnp.min(merged.q_logits(h), axis=0))  # [B, L, 16]
    best = q_all[d["row"], d["position"], :9].max(axis=-1)
    np.testing.assert_allclose(d["q_max"], best, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d["cql_gap"], best - d["q"], rtol=1e-5, atol=1e-5)
    assert (d["cql_gap"] >= 0).all() and s["cql_gap"]["max"] < 1e5


# ----------------------------------------------------------------------------------------------------------------
# The advantage page.


def page_text(page: str) -> str:
    """What a browser shows: tags removed, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_advantage_page_escapes_text_and_colours_every_agent_token():
    tokenizer = data.load_tokenizer("")  # the byte tokenizer: "é" is two tokens
    cfg = load_config("configs/base.yaml", model__vocab_size=tokenizer.vocab_size, model__d_model=32,
                      model__n_layers=1, model__n_heads=2, model__max_seq_len=64, data__seq_len=64)
    texts = [("<b>x & y</b>", "say \"<script>alert('é')</script>\""), ("at 3", "go 4")]
    episodes = [{"id": str(k), "turns": [{"role": "observation", "text": o}, {"role": "action", "text": a,
                                                                             "reward": 1.0}], "done": True}
                for k, (o, a) in enumerate(texts)]
    source, _ = data.load_source(cfg.data, tokenizer, episodes)
    batch = data.episodes_to_batch(source, 64, pad_id=tokenizer.pad_id)
    _, params = jaxrl_lm.split_model(jaxrl_lm.models.build(cfg.model, seed=0))
    result = value_diagnostics(cfg, params, [batch])
    page = advantage_html(result, [batch], tokenizer, episodes=5, title="a <title>")
    assert "<script" not in page and "<b>x" not in page and "&lt;" in page and "&amp;" in page
    shown = page_text(page)
    for observation, action in texts:
        assert observation in shown and action in shown
    assert "a <title>" in shown
    # One coloured span (with its numbers) per agent token, EOT included; no script anywhere.
    agent_tokens = int(np.sum(batch["action_mask"]))
    assert page.count("title='Q ") == agent_tokens == result["summary"]["decisions"]
    assert "<script" not in page.lower()


# ----------------------------------------------------------------------------------------------------------------
# scripts/evaluate.py --diagnostics on a tiny run of configs/demo.yaml (two seeds trained together).


def finite_numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in finite_numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in finite_numbers(v)]
    return [] if tree is None or isinstance(tree, str) else [tree]


def test_evaluate_script_writes_the_diagnostics_of_a_tiny_run(tmp_path, capsys):
    cfg = load_config("configs/demo.yaml", model__d_model=32, model__n_layers=1, model__n_heads=2,
                      model__max_seq_len=64, data__seq_len=64, data__task_episodes=120, train__steps=20,
                      train__log_every=10, train__checkpoint_every=0, train__out_dir=str(tmp_path / "run"))
    run(cfg, seeds=[0, 1], progress=False)
    evaluate = load_script("evaluate")
    with pytest.raises(SystemExit):  # neither a task to play nor diagnostics
        evaluate.parse_args([str(tmp_path / "run")])

    assert evaluate.main([str(tmp_path / "run"), "--diagnostics", "--train-seed", "1",
                          "--diagnostics-episodes", "3"]) == 0
    out = tmp_path / "run" / "diagnostics"
    names = ("calibration", "turn_errors", "cql_gap", "summary", "advantages", "decisions")
    files = {n: next(out.glob(f"{n}_step20_seed1.*")) for n in names}
    printed = capsys.readouterr().out
    assert "Q(h, a_data) vs return" in printed and all(p.name in printed for p in files.values())
    for n in ("calibration", "turn_errors", "cql_gap"):
        assert files[n].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files[n].stat().st_size > 5000
    summary = json.loads(files["summary"].read_text())
    numbers = finite_numbers(summary)
    assert summary["calibrated_decisions"] > 0 and len(numbers) > 50
    assert all(math.isfinite(x) for x in numbers)
    with np.load(files["decisions"]) as arrays:
        assert set(arrays.files) == set(DECISION_FIELDS)
        assert arrays["q"].shape == (summary["decisions"],) and np.isfinite(arrays["q"]).all()

    # The page shows the first 3 episodes of the loader's order, each turn's text escaped.
    page = files["advantages"].read_text(encoding="utf-8")
    assert page.count("class='episode'") == 3
    tokenizer = data.load_tokenizer(cfg.data.tokenizer)
    first = dataset_batches(cfg, tokenizer, max_records=1)[0]
    row = first["segment_ids"][0]
    specials = {tokenizer.bos_id, tokenizer.eot_id}
    shown = page_text(page)
    for s in (1, 2, 3):
        where = row == s
        for t in np.unique(first["turn_ids"][0][where]):
            ids = [int(i) for i in first["tokens"][0][where & (first["turn_ids"][0] == t)] if i not in specials]
            assert tokenizer.decode(ids) in shown

    # Without --train-seed, every seed of the run gets its files.
    assert evaluate.main([str(tmp_path / "run"), "--diagnostics", "--out", str(tmp_path / "both"),
                          "--diagnostics-records", "40"]) == 0
    assert sorted(p.name for p in (tmp_path / "both").glob("summary_*")) == ["summary_step20_seed0.json",
                                                                            "summary_step20_seed1.json"]

    # load_policy on this run of two seeds loads the one it is asked for, and refuses to guess.
    with pytest.raises(ValueError, match=r"trained the seeds \[0, 1\] side by side"):
        jaxrl_lm.load_policy(tmp_path / "run", "bc")
    with pytest.raises(ValueError, match="not 7"):
        jaxrl_lm.load_policy(tmp_path / "run", "bc", train_seed=7)
    saved, stacked, _ = jaxrl_lm.checkpoints.load_params(tmp_path / "run")
    transcripts = [envs.get_task("grid").make_env().reset(s) + "\n" for s in range(4)]
    for seed in (0, 1):
        picked = jaxrl_lm.load_policy(tmp_path / "run", "ilql", temperature=0.0, train_seed=seed)
        sliced = jaxrl_lm.load_policy(jax.tree.map(lambda x, i=seed: x[i], stacked), "ilql", cfg=saved,
                                      temperature=0.0, tokenizer=picked.tokenizer)
        assert picked(transcripts) == sliced(transcripts)
