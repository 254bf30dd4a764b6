"""Tables and figures of an experiment's results (``jaxrl_lm.experiments.harness``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def best_bc(results: Mapping[str, Any]) -> Optional[tuple[str, str, float]]:
    """``(method, decoding, mean)`` of the best-scoring BC method and decoding (the strongest simple baseline:
    greedy or sampled imitation, whichever scores higher), or None when the experiment has no BC method."""
    rows = [(name, d, mean) for name, m in results["methods"].items() if m["policy"] == "bc"
            for d, mean in m["mean"].items()]
    return max(rows, key=lambda r: r[2]) if rows else None


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown: one row per method and decoding (greedy, sampled), normalised final scores over seeds, the margin
    over BC's better decoding, and an actor's KL to its reference policy (the training metric
    ``kl_to_reference`` at the last step, nats per turn, mean over seeds)."""
    seeds = results["seeds"]
    kl = {name: m["final_kl"] for name, m in results["methods"].items() if m.get("final_kl") is not None}
    bc = best_bc(results)
    head = ["method", "policy", "decoding", "normalised (mean)", "std", "min", "max", *[f"seed {s}" for s in seeds]]
    head += [f"vs best BC ({bc[0]} {bc[1]}, {bc[2]:.1f})"] if bc else []
    head += ["KL to reference (nats/turn)"] if kl else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        for d in m["mean"]:
            cells = [name, m["policy"], d, f"{m['mean'][d]:.1f}", f"{m['std'][d]:.1f}", f"{m['min'][d]:.1f}",
                     f"{m['max'][d]:.1f}"]
            cells += [f"{m['final'][d][s]:.1f}" for s in seeds]
            cells += [f"{m['mean'][d] - bc[2]:+.1f}"] if bc else []
            cells += [f"{kl[name]:.2f}" if name in kl else "-"] if kl else []
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Mapping[str, Any], path: Path) -> None:
    """Normalised score against steps: each method's mean over seeds per decoding (sampled solid, greedy dashed),
    its min-max band shaded."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for i, (name, m) in enumerate(results["methods"].items()):
        for d, by_seed in m["curves"].items():
            curves = list(by_seed.values())
            steps = [s for s, _ in curves[0]]
            scores = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
            ax.plot(steps, scores.mean(axis=0), marker="o", ms=3, color=f"C{i}", ls="--" if d == "greedy" else "-",
                    label=f"{name} ({m['policy']}, {d})")
            if len(scores) > 1:
                ax.fill_between(steps, scores.min(axis=0), scores.max(axis=0), color=f"C{i}", alpha=0.15)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("normalised score (50 = data, 100 = optimal)")
    ax.set_title(f"{results['experiment']}: {len(results['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
