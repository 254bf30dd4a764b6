"""Value diagnostics of a run on its dataset: Q and V against the Monte-Carlo return-to-go, the CQL gap, and a
per-token advantage view (``scripts/evaluate.py RUN --diagnostics``).

    batches = dataset_batches(cfg, tokenizer, max_records=4096)      # the run's data, packed as training packs it
    result = value_diagnostics(cfg, params, batches)                  # per decision position, and a summary
    paths = write_diagnostics(out_dir, result, batches, tokenizer)    # PNGs, JSON, HTML, NPZ

At every decision position ``i`` of docs/design.md section 2.1 (``h_i`` scores the agent token ``a_i = x[i+1]``)
``value_diagnostics`` records ``Q = min_k Q_k(h_i, a_i)``, ``V(h_i)``, the return-to-go ``G_i`` of the data
(``returns_to_go``), the turn index, ``max_a min_k Q_k(h_i, a)`` over the real vocabulary and the CQL gap
``max_a min_k Q_k(h_i, a) - Q``. The gap is the hard max, 0 when the data action is the greedy one; the training
metric ``cql_gap`` is the soft one (``logsumexp``, per head). The advantage ``Q - V`` is what the ILQL policy
adds to the LM's log-probabilities (section 3).

What the comparison means: ``G_i`` is one sampled return of the behaviour policy, so a critic of the data's own
policy (``sarsa``, ``mc``) is calibrated when ``E[G | Q] = Q``, i.e. the binned points lie on ``y = x``, whereas
an optimistic backup (``max``, an expectile ``tau > 0.5``) should sit above the line where the data's actions
were not the best ones. Where each state has a single data action and the backup has converged, every point lies
on the line (``tests/test_diagnostics.py``).

The heads are read as ``rl.objective: token_q`` trains them, at every agent token. Under ``utterance_q`` only the
Q of a turn's last token and the V of the state before a turn are trained (docs/design.md section 9), so only
those positions of the files are meaningful there.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx

from jaxrl_lm import data, envs
from jaxrl_lm.batch import check_batch, trunk_inputs
from jaxrl_lm.config import Config
from jaxrl_lm.models import Params, model_graphdef
from jaxrl_lm.rl.losses import mask_padded_vocab
from jaxrl_lm.rl.transitions import monte_carlo_returns, transitions

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

# Per-decision arrays of value_diagnostics()["decisions"], each [N] (N decisions of all batches, batch order,
# then row, then position).
DECISION_FIELDS = ("batch", "row", "position", "segment", "turn", "action", "q", "v", "q_max", "cql_gap",
                   "advantage", "return", "complete")


class ReturnsToGo(NamedTuple):
    """value:    [B, L] float32  G_i = r_i + (1 - d_i) g_i G_{n(i)} at decisions, 0 elsewhere.
    complete: [B, L] bool     the chain of decisions from i reaches a terminal one (d_j = 1) inside its segment,
                              so G_i is a whole return; False at non-decisions."""

    value: jnp.ndarray
    complete: jnp.ndarray


def returns_to_go(batch: Mapping[str, jnp.ndarray], gamma: float,
                  time_step: Literal["token", "utterance"]) -> ReturnsToGo:
    """The Monte-Carlo discounted return-to-go at every decision position of a packed ``[B, L]`` batch.

    The return follows the backup's own chain (``rl.transitions``): ``n(i)`` inside the segment, the discount
    ``g_i`` of ``rl.time_step`` (``gamma`` per token, or once per agent turn), stopping at ``done``; it never
    crosses into the next packed episode or into padding.

    A truncated window (an episode cut by ``data.seq_len``, a ``split`` window before its episode's last, or an
    episode logged with ``done: false``) has no terminal decision: its ``G_i`` sums only the rewards inside the
    window, which is not an unbiased sample of the return. Such positions get ``complete = False``; the
    diagnostics leave them out of every calibration number and figure (and count them), while the CQL gap and
    the advantages, which need no return, use every decision.
    """
    tr = transitions(batch, gamma=gamma, time_step=time_step)
    value = monte_carlo_returns(tr, batch["segment_ids"])
    # The same recursion with reward d_i and discount 1 is 1 exactly when the chain reaches a terminal decision.
    reaches_done = tr._replace(reward=tr.done, discount=jnp.where(tr.decision, 1.0, 0.0))
    complete = tr.decision & (monte_carlo_returns(reaches_done, batch["segment_ids"]) > 0.5)
    return ReturnsToGo(value=value, complete=complete)


@functools.partial(jax.jit, static_argnames=("graphdef", "context", "vocab_size", "gamma", "time_step"))
def position_values(graphdef: nnx.GraphDef, params: Params, batch: Mapping[str, jax.Array], *, context: str,
                    vocab_size: int, gamma: float, time_step: str) -> dict[str, jax.Array]:
    """Per position of a ``[B, L]`` batch (zero where not a decision): ``decision`` bool, ``action`` int32 and,
    float32, ``q`` (``min_k Q_k(h_i, a_i)``), ``v``, ``q_max`` (``max_{a < vocab_size} min_k Q_k(h_i, a)``),
    ``return`` and ``complete`` (``returns_to_go``). The trunk reads the batch as training does
    (``model.context``); the ``[K, L, Vp]`` Q-values are formed one row at a time."""
    model = nnx.merge(graphdef, params)
    h = model.hidden(batch["tokens"], *trunk_inputs(batch, context))  # [B, L, D]
    tr = transitions(batch, gamma=gamma, time_step=time_step)

    def row(args):
        h_row, action = args  # [L, D], [L]
        q = jnp.min(model.q_logits(h_row), axis=0)  # [L, Vp]
        q_data = jnp.take_along_axis(q, action[:, None], axis=-1)[:, 0]
        return q_data, mask_padded_vocab(q, vocab_size).max(axis=-1)

    q_data, q_max = jax.lax.map(row, (h, tr.action))
    rtg = returns_to_go(batch, gamma, time_step)
    zero = jnp.float32(0.0)
    return {"decision": tr.decision, "action": tr.action, "q": jnp.where(tr.decision, q_data, zero),
            "v": jnp.where(tr.decision, model.value(h), zero), "q_max": jnp.where(tr.decision, q_max, zero),
            "return": rtg.value, "complete": rtg.complete}


def value_diagnostics(cfg: Config, params: Params, batches: Iterable[Mapping[str, np.ndarray]], *,
                      bins: int = 10) -> dict[str, Any]:
    """Q, V, returns and CQL gaps at every decision position of ``batches``, and their summary.

    Args:
      cfg: the run's config (model, ``rl.gamma``, ``rl.time_step``, ``model.context``).
      params: one model's parameters (a single seed of a stacked run).
      batches: ``jaxrl_lm.batch`` dicts of ``[B, L]`` numpy arrays (``dataset_batches``); batches of one shape
        compile once.
      bins: equal-count bins of the calibration tables.

    Returns:
      ``{"decisions": {field: [N] array for field in DECISION_FIELDS}, "summary": summarize(...)}``, where
      ``batch``/``row``/``position`` locate each decision, ``turn`` is the ``turn_ids`` of its action token, and
      ``complete`` says whether its return is a whole one (``returns_to_go``).
    """
    graphdef = model_graphdef(cfg.model)
    columns: dict[str, list[np.ndarray]] = {k: [] for k in DECISION_FIELDS}
    for index, batch in enumerate(batches):
        check_batch(batch)
        out = jax.device_get(position_values(
            graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()}, context=cfg.model.context,
            vocab_size=cfg.model.vocab_size, gamma=float(cfg.rl.gamma), time_step=cfg.rl.time_step))
        rows, positions = np.nonzero(out["decision"])
        found = {
            "batch": np.full(rows.shape, index, np.int32), "row": rows.astype(np.int32),
            "position": positions.astype(np.int32),
            "segment": np.asarray(batch["segment_ids"])[rows, positions],
            "turn": np.asarray(batch["turn_ids"])[rows, positions + 1],  # the action token's turn
            **{k: np.asarray(out[k])[rows, positions] for k in ("action", "q", "v", "q_max", "return", "complete")},
        }
        found["cql_gap"] = found["q_max"] - found["q"]
        found["advantage"] = found["q"] - found["v"]
        for k in DECISION_FIELDS:
            columns[k].append(found[k])
    if not columns["q"]:
        raise ValueError("value_diagnostics: no batch was given")
    decisions = {k: np.concatenate(v) for k, v in columns.items()}
    if decisions["q"].size == 0:
        raise ValueError("value_diagnostics: the batches hold no decision position (no agent token after a state)")
    return {"decisions": decisions, "summary": summarize(decisions, bins=bins)}


# ----------------------------------------------------------------------------------------------------------------
# Summary numbers.


def _fit(prediction: np.ndarray, target: np.ndarray) -> dict[str, Any]:
    """Bias, RMSE, MAE and Pearson correlation of predictions against returns (None where undefined)."""
    n = int(prediction.size)
    if n == 0:
        return {"count": 0, "bias": None, "rmse": None, "mae": None, "correlation": None,
                "mean_prediction": None, "mean_return": None}
    error = prediction.astype(np.float64) - target
    defined = n > 1 and np.std(prediction) > 0 and np.std(target) > 0
    return {"count": n, "bias": float(error.mean()), "rmse": float(np.sqrt(np.mean(error ** 2))),
            "mae": float(np.abs(error).mean()),
            "correlation": float(np.corrcoef(prediction, target)[0, 1]) if defined else None,
            "mean_prediction": float(prediction.mean()), "mean_return": float(np.mean(target))}


def calibration_table(prediction: np.ndarray, target: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Equal-count bins of the prediction (fewer when values tie): per bin its range, count, mean prediction
    and mean return. A calibrated critic has ``mean_return = mean_prediction`` in every bin."""
    if prediction.size == 0:
        return []
    edges = np.unique(np.quantile(prediction, np.linspace(0.0, 1.0, bins + 1)))
    which = np.searchsorted(edges[1:-1], prediction, side="right")
    table = []
    for b in range(max(len(edges) - 1, 1)):
        inside = which == b
        if inside.any():
            table.append({"low": float(prediction[inside].min()), "high": float(prediction[inside].max()),
                          "count": int(inside.sum()), "mean_prediction": float(prediction[inside].mean()),
                          "mean_return": float(target[inside].mean())})
    return table


def summarize(decisions: Mapping[str, np.ndarray], *, bins: int = 10) -> dict[str, Any]:
    """The summary of ``value_diagnostics``: counts; Q and V against the return over complete decisions, overall
    (``q``, ``v``), per turn index (``per_turn``) and binned (``calibration``); the CQL gap and the advantage
    over every decision. Undefined numbers (a correlation of constant values, an empty set) are None."""
    complete = decisions["complete"].astype(bool)
    g = decisions["return"][complete]
    q, v, turns = decisions["q"][complete], decisions["v"][complete], decisions["turn"][complete]
    gap, adv = decisions["cql_gap"], decisions["advantage"]
    per_turn = [{"turn": int(t), "q": _fit(q[turns == t], g[turns == t]), "v": _fit(v[turns == t], g[turns == t])}
                for t in np.unique(turns)]
    return {
        "decisions": int(complete.size),
        "calibrated_decisions": int(complete.sum()),
        "truncated_decisions": int((~complete).sum()),
        "q": _fit(q, g),
        "v": _fit(v, g),
        "per_turn": per_turn,
        "calibration": {"q": calibration_table(q, g, bins), "v": calibration_table(v, g, bins)},
        "cql_gap": {"mean": float(gap.mean()), "median": float(np.median(gap)),
                    "p90": float(np.quantile(gap, 0.9)), "max": float(gap.max()),
                    "data_action_is_greedy": float(np.mean(gap <= 0.0))},
        "advantage": {"mean": float(adv.mean()), "std": float(adv.std()), "positive": float(np.mean(adv > 0.0))},
    }


# ----------------------------------------------------------------------------------------------------------------
# The dataset of a run.


def dataset_batches(cfg: Config, tokenizer: data.Tokenizer, *, max_records: Optional[int] = None,
                    rows: int = 64) -> list[dict[str, np.ndarray]]:
    """The run's dataset (``cfg.data``: ``task:NAME`` through ``envs.task_dataset``, else the JSONL or built
    dataset at ``data.path``) as packed ``[rows, data.seq_len]`` batches, one pass in the loader's order
    (``data.shuffle`` with ``data.seed``), stopping at the batch that reaches ``max_records`` records (episodes,
    or their windows under ``truncate_side: split``); None = all."""
    if tokenizer.vocab_size > cfg.model.padded_vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                         f"({tokenizer.vocab_size}, data.tokenizer={cfg.data.tokenizer!r})")
    episodes = envs.task_dataset(cfg.data) if cfg.data.path.startswith(envs.TASK_PREFIX) else None
    data_cfg = dataclasses.replace(cfg.data, batch_size=rows, num_epochs=1)
    loader = data.make_loader(data_cfg, tokenizer=tokenizer, episodes=episodes)
    batches, records = [], 0
    try:
        for batch in loader:
            seg = batch["segment_ids"]
            batches.append(batch)
            records += int(np.sum((seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] != 0)) + np.sum(seg[:, 0] != 0))
            if max_records is not None and records >= max_records:
                break
    finally:
        loader.close()
    return batches


# ----------------------------------------------------------------------------------------------------------------
# Files.


def _line(ax, lo: float, hi: float) -> None:
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="y = x")


def plot_calibration(result: Mapping[str, Any], path: Path, title: str = "") -> None:
    """Q and V (y) against the Monte-Carlo return (x), one point per complete decision, with the binned means
    (``calibration_table``) and ``y = x``."""
    d, s = result["decisions"], result["summary"]
    complete = d["complete"].astype(bool)
    g = d["return"][complete]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.5), sharex=True, sharey=True)
    values = np.concatenate([g, d["q"][complete], d["v"][complete]]) if g.size else np.zeros(1)
    lo, hi = float(values.min()), float(values.max())
    pad = 0.05 * max(hi - lo, 1e-6)
    for ax, key, name in zip(axes, ("q", "v"), ("Q(h, a_data) = min_k Q_k", "V(h)")):
        ax.scatter(g, d[key][complete], s=6, alpha=0.25, color="tab:blue", lw=0, label="decisions")
        table = s["calibration"][key]
        ax.plot([r["mean_return"] for r in table], [r["mean_prediction"] for r in table], "o-", color="tab:red",
                ms=4, lw=1.2, label="binned by prediction (mean)")
        _line(ax, lo - pad, hi + pad)
        fit = s[key]
        stats = ("no complete return" if not fit["count"] else
                 f"bias {fit['bias']:+.3f}, RMSE {fit['rmse']:.3f}, r "
                 + ("-" if fit["correlation"] is None else f"{fit['correlation']:.2f}"))
        ax.set_title(f"{name}\n{stats}", fontsize=9)
        ax.set_xlabel("Monte-Carlo return-to-go of the data")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted value")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{title}{': ' if title else ''}{s['calibrated_decisions']} decisions with a complete return "
                 f"({s['truncated_decisions']} in truncated windows left out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_turn_errors(result: Mapping[str, Any], path: Path, title: str = "") -> None:
    """Per turn index: the bias (mean of prediction - return, with its standard error) and the RMSE of Q and V."""
    rows = result["summary"]["per_turn"]
    d = result["decisions"]
    complete = d["complete"].astype(bool)
    fig, (ax_bias, ax_rmse) = plt.subplots(1, 2, figsize=(10.0, 4.0), sharex=True)
    turns = np.array([r["turn"] for r in rows])
    for key, colour in (("q", "tab:blue"), ("v", "tab:orange")):
        error = d[key][complete].astype(np.float64) - d["return"][complete]
        stderr = [error[d["turn"][complete] == t].std() / np.sqrt(max(r[key]["count"], 1))
                  for t, r in zip(turns, rows)]
        ax_bias.errorbar(turns, [r[key]["bias"] for r in rows], yerr=stderr, marker="o", ms=4, capsize=3,
                         color=colour, label=key.upper())
        ax_rmse.plot(turns, [r[key]["rmse"] for r in rows], marker="o", ms=4, color=colour, label=key.upper())
    ax_bias.axhline(0.0, color="black", lw=0.8, ls="--")
    ax_bias.set_ylabel("bias: mean(prediction - return)")
    ax_rmse.set_ylabel("RMSE")
    for ax in (ax_bias, ax_rmse):
        ax.set_xlabel("turn index of the action (turn_ids: observation turns count too)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    counts = ", ".join(f"{r['turn']}: {r['q']['count']}" for r in rows[:12]) + (", ..." if len(rows) > 12 else "")
    fig.suptitle(f"{title}{': ' if title else ''}decisions per turn {counts}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cql_gap(result: Mapping[str, Any], path: Path, title: str = "") -> None:
    """Histogram of ``max_a min_k Q - min_k Q(a_data)`` over every decision."""
    gap, s = result["decisions"]["cql_gap"], result["summary"]["cql_gap"]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    ax.hist(gap, bins=50, color="tab:purple", alpha=0.8)
    ax.axvline(s["mean"], color="black", lw=1.0, ls="--", label=f"mean {s['mean']:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("CQL gap: max_a min_k Q(h, a) - min_k Q(h, a_data)")
    ax.set_ylabel("decisions")
    ax.set_title(f"{title}{': ' if title else ''}the data action is the greedy one at "
                 f"{100 * s['data_action_is_greedy']:.1f}% of {gap.size} decisions", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _token_texts(ids: Sequence[int], tokenizer: data.Tokenizer) -> list[str]:
    """The text of each token of one turn: prefix decodes, so that a character split over several byte tokens
    shows whole (on the token that completes it) instead of as replacement characters."""
    texts, shown = [], ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[:k + 1])
        if text.endswith("\ufffd") and k < len(ids) - 1:
            texts.append("")  # an incomplete character: its text comes with a later token
            continue
        texts.append(text[len(shown):] if text.startswith(shown) else tokenizer.decode([ids[k]]))
        shown = text
    return texts


def _colour(advantage: float, scale: float) -> str:
    t = float(np.clip(advantage / scale, -1.0, 1.0))
    rgb = "0, 150, 60" if t >= 0 else "210, 40, 40"
    return f"rgba({rgb}, {0.85 * abs(t):.3f})"


_STYLE = """body { font-family: sans-serif; margin: 1.5em; max-width: 70em; }
.episode { border: 1px solid #ccc; border-radius: 4px; padding: 0.6em; margin: 1em 0; }
.turn { font-family: monospace; white-space: pre-wrap; margin: 0.15em 0; }
.role { display: inline-block; width: 7em; color: #666; font-family: sans-serif; font-size: 0.85em; }
.obs { color: #555; }
.tok { border-radius: 2px; }
.special { color: #999; font-size: 0.8em; }"""


def advantage_html(result: Mapping[str, Any], batches: Sequence[Mapping[str, np.ndarray]],
                   tokenizer: data.Tokenizer, *, episodes: int = 8, title: str = "") -> str:
    """A static HTML page (no script) showing the first ``episodes`` packed episodes of ``batches`` turn by turn,
    each agent token's background coloured by its advantage ``min_k Q - V`` at the state before it (green
    positive, red negative, saturated at the 95th percentile of ``|Q - V|`` over all decisions); hovering a token
    shows Q, V, the advantage and the return. All text is HTML-escaped."""
    d = result["decisions"]
    scale = float(np.quantile(np.abs(d["advantage"]), 0.95)) or 1.0
    by_key = {(int(b), int(r), int(p)): i for i, (b, r, p) in enumerate(zip(d["batch"], d["row"], d["position"]))}
    specials = {tokenizer.bos_id: "BOS", tokenizer.eot_id: "EOT", tokenizer.eos_id: "EOS", tokenizer.pad_id: "PAD"}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title or 'advantages')}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Per-token advantage{': ' + html.escape(title) if title else ''}</h1>",
             "<p>Each agent token is coloured by <code>A = min_k Q_k(h, a) - V(h)</code> at the state before it (the "
             "term the ILQL policy adds to the LM's log-probabilities, times beta). Observation tokens are grey. "
             "Hover a token for Q, V, A and the Monte-Carlo return-to-go G (marked * when its window was truncated, "
             "so G is not a whole return).</p>",
             "<p>Legend: " + " ".join(f"<span class='tok' style='background:{_colour(a, scale)}'>&nbsp;{a:+.3g}&nbsp;"
                                      f"</span>" for a in np.linspace(-scale, scale, 7)) + "</p>"]
    for shown, (b, r, where, head) in enumerate(_first_episodes(batches, by_key, episodes), start=1):
        state = "complete" if d["complete"][head] else "truncated window"
        parts.append(f"<div class='episode'><b>episode {shown}</b> (batch {b}, row {r}, segment "
                     f"{int(batches[b]['segment_ids'][r, where[0]])}; {state}; return-to-go from its first decision "
                     f"{d['return'][head]:+.3f})")
        parts.extend(_turn_lines(batches[b], r, where, b, by_key, d, tokenizer, specials, scale))
        parts.append("</div>")
    s = result["summary"]
    parts.append(f"<p>{s['decisions']} decisions; advantage mean {s['advantage']['mean']:+.3f}, std "
                 f"{s['advantage']['std']:.3f}, positive at {100 * s['advantage']['positive']:.1f}%.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _first_episodes(batches, by_key, episodes):
    """``(batch, row, positions [n], first decision's index)`` of the first ``episodes`` segments with a decision,
    in batch, row and segment order."""
    found = 0
    for b, batch in enumerate(batches):
        seg = np.asarray(batch["segment_ids"])
        for r in range(seg.shape[0]):
            for s in [int(x) for x in np.unique(seg[r]) if x != 0]:
                if found == episodes:
                    return
                where = np.nonzero(seg[r] == s)[0]
                heads = [by_key[(b, r, int(p))] for p in where if (b, r, int(p)) in by_key]
                if heads:
                    found += 1
                    yield b, r, where, heads[0]


def _turn_lines(batch, r, where, b, by_key, d, tokenizer, specials, scale) -> list[str]:
    """One ``<div class='turn'>`` per turn of one episode (positions ``where`` of row ``r`` of batch ``b``)."""
    tokens = np.asarray(batch["tokens"])
    turn_ids, action_mask = np.asarray(batch["turn_ids"])[r], np.asarray(batch["action_mask"])[r]
    lines, start = [], 0
    while start < len(where):
        end = start
        while end + 1 < len(where) and turn_ids[where[end + 1]] == turn_ids[where[start]] \
                and action_mask[where[end + 1]] == action_mask[where[start]]:
            end += 1
        positions = where[start:end + 1]
        ids = [int(tokens[r, p]) for p in positions]
        plain = [i for i in ids if i not in specials]
        texts = iter(_token_texts(plain, tokenizer))
        agent = bool(action_mask[positions[0]])
        spans = []
        for p, i in zip(positions, ids):
            text = (f"<span class='special'>[{specials[i]}]</span>" if i in specials
                    else html.escape(next(texts)).replace("\n", "\u21b5\n"))
            key = (b, r, int(p) - 1)
            if agent and key in by_key:
                k = by_key[key]
                tip = (f"Q {d['q'][k]:+.3f}  V {d['v'][k]:+.3f}  A {d['advantage'][k]:+.3f}  "
                       f"G {d['return'][k]:+.3f}{'' if d['complete'][k] else '*'}")
                spans.append(f"<span class='tok' style='background:{_colour(d['advantage'][k], scale)}' "
                             f"title='{html.escape(tip)}'>{text}</span>")
            else:
                spans.append(f"<span class='{'tok' if agent else 'obs'}'>{text}</span>")
        role = "agent" if agent else "observation"
        label = f"<span class='role'>{role} {turn_ids[positions[0]]}</span>"
        lines.append(f"<div class='turn'>{label}{''.join(spans)}</div>")
        start = end + 1
    return lines


def _json_ready(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def write_diagnostics(out_dir: str | Path, result: Mapping[str, Any], batches: Sequence[Mapping[str, np.ndarray]],
                      tokenizer: data.Tokenizer, *, episodes: int = 8, title: str = "",
                      suffix: str = "") -> dict[str, Path]:
    """Writes ``calibration<suffix>.png`` (``plot_calibration``), ``turn_errors<suffix>.png``, ``cql_gap<suffix>.png``,
    ``summary<suffix>.json`` (``summarize``), ``advantages<suffix>.html`` (``advantage_html``, ``episodes`` of
    them) and ``decisions<suffix>.npz`` (every ``DECISION_FIELDS`` array) under ``out_dir``; returns their paths
    by name (``calibration``, ``turn_errors``, ``cql_gap``, ``summary``, ``advantages``, ``decisions``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}{suffix}.{ext}" for name, ext in
             (("calibration", "png"), ("turn_errors", "png"), ("cql_gap", "png"), ("summary", "json"),
              ("advantages", "html"), ("decisions", "npz"))}
    plot_calibration(result, paths["calibration"], title)
    plot_turn_errors(result, paths["turn_errors"], title)
    plot_cql_gap(result, paths["cql_gap"], title)
    paths["summary"].write_text(json.dumps(_json_ready(result["summary"]), indent=1) + "\n")
    paths["advantages"].write_text(advantage_html(result, batches, tokenizer, episodes=episodes, title=title),
                                   encoding="utf-8")
    np.savez_compressed(paths["decisions"], **result["decisions"])
    return paths
