"""Tables and figures of an experiment's results (``jaxrl_lm.experiments.harness``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown: one row per method, normalised final scores over seeds, and an actor's KL to its reference
    policy (the training metric ``kl_to_reference`` at the last step, nats per turn, mean over seeds)."""
    seeds = results["seeds"]
    kl = {name: m["final_kl"] for name, m in results["methods"].items() if m.get("final_kl") is not None}
    head = ["method", "policy", "normalised (mean)", "std", "min", "max", *[f"seed {s}" for s in seeds]]
    head += ["KL to reference (nats/turn)"] if kl else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        cells = [name, m["policy"], f"{m['mean']:.1f}", f"{m['std']:.1f}", f"{m['min']:.1f}", f"{m['max']:.1f}"]
        cells += [f"{m['final'][s]:.1f}" for s in seeds]
        cells += [f"{kl[name]:.2f}" if name in kl else "-"] if kl else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: Mapping[str, Any], path: Path) -> None:
    """Normalised score against steps: each method's mean over seeds, its min-max band shaded."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for name, m in results["methods"].items():
        curves = list(m["curves"].values())
        steps = [s for s, _ in curves[0]]
        scores = np.array([[v for _, v in c] for c in curves if len(c) == len(steps)])
        ax.plot(steps, scores.mean(axis=0), marker="o", ms=3, label=f"{name} ({m['policy']})")
        if len(scores) > 1:
            ax.fill_between(steps, scores.min(axis=0), scores.max(axis=0), alpha=0.2)
    ax.axhline(50, color="grey", lw=0.8, ls="--")
    ax.axhline(100, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("normalised score (50 = data, 100 = optimal)")
    ax.set_title(f"{results['experiment']}: {len(results['seeds'])} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
