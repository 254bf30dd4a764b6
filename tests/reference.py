"""Plain Python / NumPy loop reference of docs/design.md section 2 (the token-level MDP and its losses).

Written from the design text only, one position at a time, so it shares no code (and no vectorisation trick)
with ``jaxrl_lm.rl``. Float64 throughout; the tests compare with tolerances.

Inputs of ``ref_objective`` are the head outputs at every position of the batch (sliced to the *unpadded*
vocabulary by the caller, which is what "over the unpadded vocab" means):

  q       [K, B, L, V]  Q_k(h_i, .)          online heads on online states
  qbar    [K, B, L, V]  Qbar_k(hbar_i, .)    target heads on the states the target heads read
  value   [B, L]        V(h_i)               online value head on online states
  lm      [B, L, V]     LM(h_i, .)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxrl_lm.config import RLConfig
from jaxrl_lm.rl import TokenQConfig


def _loss_config_class():
    """The fields of ``RLConfig`` and ``TokenQConfig`` as one frozen dataclass, so a test names one loss setting
    per case; ``.rl`` and ``.q`` give the two sections ``bellman_objective`` takes."""
    fields = [(f.name, f.type, dataclasses.field(default=f.default))
              for cls in (RLConfig, TokenQConfig) for f in dataclasses.fields(cls)]
    namespace = {
        "rl": property(lambda self: RLConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RLConfig)})),
        "q": property(lambda self: TokenQConfig(**{f.name: getattr(self, f.name)
                                                  for f in dataclasses.fields(TokenQConfig)})),
    }
    return dataclasses.make_dataclass("LossConfig", fields, frozen=True, namespace=namespace)


LossConfig = _loss_config_class()


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


def ref_transitions(batch: dict, gamma: float, time_step: str) -> dict:
    """Per-position transition data, looping over rows and positions.

    Returns a dict of [B, L] arrays: decision, action, reward, done, discount, next_index, next_is_decision,
    next_action. Entries off D are 0 (next_index: the position itself), as documented in transitions.py.
    """
    x = np.asarray(batch["tokens"])
    am = np.asarray(batch["action_mask"])
    rew = np.asarray(batch["reward"])
    dn = np.asarray(batch["done"])
    seg = np.asarray(batch["segment_ids"])
    turn = np.asarray(batch["turn_ids"])
    B, L = x.shape
    out = {
        "decision": np.zeros((B, L), bool),
        "action": np.zeros((B, L), np.int64),
        "reward": np.zeros((B, L), np.float64),
        "done": np.zeros((B, L), np.float64),
        "discount": np.zeros((B, L), np.float64),
        "next_index": np.tile(np.arange(L), (B, 1)),
        "next_is_decision": np.zeros((B, L), bool),
        "next_action": np.zeros((B, L), np.int64),
    }
    for b in range(B):
        # D = {i : action_mask[i+1] = 1 and seg[i+1] = seg[i] != 0}
        in_d = [False] * L
        for i in range(L - 1):
            if am[b, i + 1] == 1 and seg[b, i + 1] == seg[b, i] and seg[b, i] != 0:
                in_d[i] = True

        def segment_last(i: int) -> int:
            j = i
            while j + 1 < L and seg[b, j + 1] == seg[b, i]:
                j += 1
            return j

        def turn_of(j: int) -> int:
            if in_d[j]:
                return int(turn[b, j + 1])
            assert j == segment_last(j), "turn(j) is only defined for decisions and segment ends"
            return int(turn[b, j])

        for i in range(L):
            if not in_d[i]:
                continue
            last = segment_last(i)
            n = None
            for j in range(i + 1, last + 1):
                if in_d[j]:
                    n = j
                    break
            if n is None:
                n = last
            out["decision"][b, i] = True
            out["action"][b, i] = x[b, i + 1]
            out["reward"][b, i] = rew[b, i + 1]
            out["done"][b, i] = dn[b, i + 1]
            out["next_index"][b, i] = n
            out["next_is_decision"][b, i] = in_d[n]
            out["next_action"][b, i] = x[b, n + 1] if in_d[n] else 0
            if time_step == "token":
                g = gamma
            elif time_step == "utterance":
                g = gamma if turn_of(n) > turn[b, i + 1] else 1.0
            else:
                raise ValueError(time_step)
            out["discount"][b, i] = g
    return out


def kept_decisions(decision: np.ndarray, capacity: int | None) -> np.ndarray:
    """Per row, the first ``capacity`` decision positions (all of them when capacity is None)."""
    kept = np.zeros_like(decision)
    for b in range(decision.shape[0]):
        c = 0
        for i in range(decision.shape[1]):
            if decision[b, i] and (capacity is None or c < capacity):
                kept[b, i] = True
                c += 1
    return kept


def ref_objective(
    rl,
    batch: dict,
    q: np.ndarray,
    qbar: np.ndarray,
    value: np.ndarray,
    lm: np.ndarray,
    *,
    capacity: int | None = None,
    denominator: float | None = None,
) -> dict:
    """Losses, metrics and analytic gradients of docs/design.md section 2.

    With the batch's optional ``imitate`` field, the BC term counts only the decisions it marks.
    Decisions beyond a row's ``capacity`` are not scored (but still counted in N, the denominator, and in
    ``decisions_dropped``); capacity None scores every decision.
    Gradients returned: ``grad_q [K, B, L, V]``, ``grad_value [B, L]``, ``grad_lm [B, L, V]`` of the total loss L.
    """
    q, qbar, value, lm = (np.asarray(a, np.float64) for a in (q, qbar, value, lm))
    K, B, L, V = q.shape
    tr = ref_transitions(batch, rl.gamma, rl.time_step)
    dec = tr["decision"]
    kept = kept_decisions(dec, capacity)
    n_total = float(dec.sum())
    N = n_total if denominator is None else float(denominator)
    N = max(N, 1.0)
    T = rl.cql_temperature

    sums = dict(q=0.0, v=0.0, cql=0.0, bc=0.0)
    metric_sums = dict(q_mean=0.0, v_mean=0.0, target_mean=0.0, td_error=0.0, cql_gap=0.0, awr=0.0)
    grad_q = np.zeros_like(q)
    grad_value = np.zeros_like(value)
    grad_lm = np.zeros_like(lm)
    targets = np.zeros((B, L))
    awr_weights = np.zeros((B, L))
    n_kept = 0

    def return_to_go(b: int, i: int) -> float:
        """Discounted return from decision i to its segment's end, following n(i) (0 past the last decision)."""
        if not dec[b, i]:
            return 0.0
        j = int(tr["next_index"][b, i])
        return tr["reward"][b, i] + (1.0 - tr["done"][b, i]) * tr["discount"][b, i] * return_to_go(b, j)

    for b in range(B):
        for i in range(L):
            if not kept[b, i]:
                continue
            n_kept += 1
            a = int(tr["action"][b, i])
            j = int(tr["next_index"][b, i])
            # backup at the next state j = n(i)
            if rl.backup == "expectile":
                backup = value[b, j]
            elif rl.backup == "max" or (rl.backup == "sarsa" and not tr["next_is_decision"][b, i]):
                backup = max(min(qbar[k, b, j, act] for k in range(K)) for act in range(V))
            elif rl.backup == "sarsa":
                backup = min(qbar[k, b, j, int(tr["next_action"][b, i])] for k in range(K))
            elif rl.backup == "mc":
                backup = return_to_go(b, j)
            else:
                raise ValueError(rl.backup)
            y = tr["reward"][b, i] + (1.0 - tr["done"][b, i]) * tr["discount"][b, i] * backup
            if rl.value_min is not None:
                y = max(y, rl.value_min)
            if rl.value_max is not None:
                y = min(y, rl.value_max)
            targets[b, i] = y

            # L_Q
            for k in range(K):
                sums["q"] += (q[k, b, i, a] - y) ** 2
                grad_q[k, b, i, a] += rl.lambda_q * 2.0 * (q[k, b, i, a] - y) / N
            # L_V (expectile only)
            min_qbar_taken = min(qbar[k, b, i, a] for k in range(K))
            if rl.backup == "expectile":
                u = min_qbar_taken - value[b, i]
                wgt = abs(rl.expectile_tau - (1.0 if u < 0 else 0.0))
                sums["v"] += wgt * u * u
                grad_value[b, i] += rl.lambda_v * (-2.0 * wgt * u) / N
            # L_CQL
            for k in range(K):
                logits = q[k, b, i] / T
                sums["cql"] += _logsumexp(logits) - logits[a]
                g = _softmax(logits)
                g[a] -= 1.0
                grad_q[k, b, i] += rl.cql_alpha * g / T / N
                metric_sums["cql_gap"] += (_logsumexp(q[k, b, i]) - q[k, b, i, a]) / K
            # L_BC with AWR weights
            if rl.awr_beta == 0.0:
                w = 1.0
            else:
                w = min(math.exp(rl.awr_beta * (min_qbar_taken - value[b, i])), rl.awr_max_weight)
            imitated = 1.0 if "imitate" not in batch else float(batch["imitate"][b, i])
            sums["bc"] += imitated * w * (_logsumexp(lm[b, i]) - lm[b, i, a])
            g = _softmax(lm[b, i])
            g[a] -= 1.0
            grad_lm[b, i] += rl.lambda_bc * imitated * w * g / N
            metric_sums["awr"] += w
            awr_weights[b, i] = w

            q_mean = float(np.mean(q[:, b, i, a]))
            metric_sums["q_mean"] += q_mean
            metric_sums["v_mean"] += value[b, i]
            metric_sums["target_mean"] += y
            metric_sums["td_error"] += abs(q_mean - y)

    losses = {name: s / N for name, s in sums.items()}
    if rl.backup != "expectile":
        losses["v"] = 0.0
    loss = rl.lambda_q * losses["q"] + rl.lambda_v * losses["v"] + rl.cql_alpha * losses["cql"] + rl.lambda_bc * losses["bc"]
    m = max(n_kept, 1)
    per_row = dec.sum(axis=1)
    dropped = 0 if capacity is None else int(np.maximum(per_row - capacity, 0).sum())
    return dict(
        loss=loss,
        q_loss=losses["q"],
        v_loss=losses["v"],
        cql_loss=losses["cql"],
        bc_loss=losses["bc"],
        q_mean=metric_sums["q_mean"] / m,
        v_mean=metric_sums["v_mean"] / m,
        target_mean=metric_sums["target_mean"] / m,
        td_error=metric_sums["td_error"] / m,
        cql_gap=metric_sums["cql_gap"] / m,
        awr_weight_mean=metric_sums["awr"] / m,
        decisions=n_total,
        decisions_dropped=float(dropped),
        targets=targets,
        awr_weights=awr_weights,
        kept=kept,
        grad_q=grad_q,
        grad_value=grad_value,
        grad_lm=grad_lm,
    )
