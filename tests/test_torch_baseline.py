"""The benchmark's PyTorch baseline (scripts/torch_ilql_step.py) does the same work as our update: on the same
initial weights (exported with ``export_initial_state``) and the same packed batch, its loss and loss terms equal
ours, and after one optimizer step its parameters, its EMA target heads and the next loss do too
(docs/design.md sections 2 and 8)."""

import numpy as np
import pytest

import jaxrl_lm
from jaxrl_lm.interop.hf_export import trunk_to_hf
from script_loader import load_script

torch_step = load_script("torch_ilql_step")

TERMS = ("loss", "q_loss", "v_loss", "cql_loss", "bc_loss")


def packed_batch(seed: int = 0, batch: int = 4, length: int = 48, vocab: int = 260) -> dict[str, np.ndarray]:
    """Rows of packed episodes (alternating observation / agent turns of random lengths), some terminated, and
    trailing padding: every rule of the transitions (segments, next decisions, done, turns) is exercised."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((batch, length), np.int32) for k in ("tokens", "action_mask", "done", "segment_ids",
                                                           "turn_ids")}
    out["reward"] = np.zeros((batch, length), np.float32)
    for row in range(batch):
        pos, segment = 0, 1
        while pos < length - 8 - 6 * row:  # rows end in more and more padding
            episode_end = min(length - 6 * row, pos + int(rng.integers(12, 30)))
            turn, agent = 0, False
            out["tokens"][row, pos] = 0  # BOS
            out["segment_ids"][row, pos] = segment
            i = pos + 1
            while i < episode_end:
                run = min(int(rng.integers(2, 6)), episode_end - i)
                sl = slice(i, i + run)
                out["action_mask"][row, sl] = int(agent)
                out["turn_ids"][row, sl] = turn
                if agent:
                    out["reward"][row, i + run - 1] = rng.normal()
                i, turn, agent = i + run, turn + 1, not agent
            out["segment_ids"][row, pos:episode_end] = segment
            out["tokens"][row, pos + 1:episode_end] = rng.integers(1, vocab, episode_end - pos - 1)
            if rng.random() < 0.5 and out["action_mask"][row, episode_end - 1]:
                out["done"][row, episode_end - 1] = 1  # terminated (else truncated)
            pos, segment = episode_end, segment + 1
    return out


def ours_by_name(cfg, params, groups) -> dict[str, np.ndarray]:
    """Our parameters under the torch step's names (``TorchILQLStep.state_numpy``)."""
    out = {k: np.asarray(v) for k, v in trunk_to_hf(cfg.model, params).items()}
    for head in ("q_heads", "v_head"):
        out.update({f"{head}.{k}": np.asarray(v) for k, v in params[head].items()})
    out.update({f"target.q_heads.{k}": np.asarray(v) for k, v in groups["target"]["q_heads"].items()})
    return out


@pytest.mark.parametrize("overrides", [
    [],  # the default: expectile backup, CQL and BC on, target heads on the online trunk
    ["token_q.backup=max", "token_q.cql_alpha=0", "rl.decision_fraction=0.25", "optim.weight_decay=0.1"],
    ["token_q.backup=sarsa", "token_q.target_scope=full", "rl.time_step=utterance", "token_q.awr_beta=1.0",
     "token_q.value_max=0.5", "optim.grad_accum=2", "model.n_q_heads=1"],
], ids=["default", "max_nocql_dropped_decay", "sarsa_full_utterance_awr_accum"])
def test_torch_step_equals_ours(tmp_path, overrides):
    cfg = jaxrl_lm.load_config("configs/models/tiny.yaml", overrides + [
        "data.batch_size=4", "data.seq_len=48", "optim.learning_rate=1e-3"])
    batch = packed_batch()
    state = jaxrl_lm.init_state(cfg)
    torch_step.export_initial_state(cfg, state, tmp_path)
    baseline = torch_step.TorchILQLStep.from_export(tmp_path)
    initial = ours_by_name(cfg, state.params, state.groups)
    assert initial.keys() == baseline.state_numpy().keys()
    for name, value in baseline.state_numpy().items():  # the same initial weights
        np.testing.assert_array_equal(value, initial[name], err_msg=name)

    update = jaxrl_lm.make_update(cfg)
    state, ours_first = update(state, batch)
    after_one = ours_by_name(cfg, state.params, state.groups)
    state, ours_second = update(state, batch)
    theirs_first = baseline.step(torch_step.torch_batch(batch))
    after_one_theirs = baseline.state_numpy()
    theirs_second = baseline.step(torch_step.torch_batch(batch))

    assert float(ours_first["decisions"]) > 0 and float(ours_first["update_applied"]) == 1.0
    if "rl.decision_fraction=0.25" in overrides:
        assert float(ours_first["decisions_dropped"]) > 0  # the slot buffer's rule is exercised
    for term in TERMS:  # the same initial loss, term by term, to 1e-4
        np.testing.assert_allclose(theirs_first[term], float(ours_first[term]), rtol=1e-4, atol=1e-6, err_msg=term)
    np.testing.assert_allclose(theirs_first["grad_norm"], float(ours_first["grad_norm"]), rtol=1e-4)
    # One AdamW step of learning rate 1e-3 moves a weight by up to about 1e-3 (Adam's first step is close to
    # lr * sign(g)). Each tensor's update agrees to 0.2% in norm, and every element to 5% of the learning rate
    # (an element whose gradient is near Adam's eps may differ in its last bits, hence not tighter).
    for name, value in after_one_theirs.items():
        delta_ours, delta_theirs = after_one[name] - initial[name], value - initial[name]
        assert np.abs(delta_theirs - delta_ours).max() <= 5e-5, name
        assert np.linalg.norm(delta_theirs - delta_ours) <= 2e-3 * np.linalg.norm(delta_ours) + 1e-9, name
    for name in ("transformer.wte.weight", "transformer.h.1.mlp.c_fc.weight", "q_heads.out_kernel"):
        assert np.abs(after_one[name] - initial[name]).max() > 1e-4, name  # the step did move them
    assert np.abs(after_one["target.q_heads.out_kernel"] - initial["target.q_heads.out_kernel"]).max() > 0
    for term in TERMS:  # the loss at the updated parameters
        np.testing.assert_allclose(theirs_second[term], float(ours_second[term]), rtol=1e-4, atol=1e-6,
                                   err_msg=term)
