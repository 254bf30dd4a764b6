"""Normalised scores as in LMRL-Gym: piecewise linear through (worst, 0), (dataset, 50), (optimal, 100).

``worst`` is the lowest return the task allows, ``dataset`` the mean return of the offline data's behaviour,
``optimal`` the return of the task's optimal (or reference) policy. A return above ``optimal`` scores above 100
and is not clipped: for Wordle the reference is a strong solver, not a proven optimum, and beating it should show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class TaskStats:
    """The three returns that anchor a task's normalised score."""

    worst: float
    dataset: float
    optimal: float

    def __post_init__(self) -> None:
        # Both linear pieces need a positive width; equal anchors would divide by zero.
        if not self.worst < self.dataset < self.optimal:
            raise ValueError(
                f"TaskStats needs worst < dataset < optimal, got worst={self.worst}, "
                f"dataset={self.dataset}, optimal={self.optimal}"
            )

    @classmethod
    def from_dict(cls, stats: Mapping[str, Any]) -> "TaskStats":
        """From ``{"worst", "dataset", "optimal"}`` or a whole stats file holding them under ``"normalisation"``."""
        fields = stats.get("normalisation", stats)
        missing = [key for key in ("worst", "dataset", "optimal") if key not in fields]
        if missing:
            raise KeyError(f"task stats lack {missing}; expected keys worst, dataset, optimal")
        return cls(float(fields["worst"]), float(fields["dataset"]), float(fields["optimal"]))

    def to_dict(self) -> dict[str, float]:
        """Plain dict for the stats JSON file."""
        return asdict(self)


def normalize(returns: float | np.ndarray, task_stats: TaskStats | Mapping[str, Any]) -> float | np.ndarray:
    """Normalised score of a return (or an array of returns): worst -> 0, dataset mean -> 50, optimal -> 100."""
    stats = task_stats if isinstance(task_stats, TaskStats) else TaskStats.from_dict(task_stats)
    r = np.asarray(returns, dtype=np.float64)
    low = 50.0 * (r - stats.worst) / (stats.dataset - stats.worst)
    high = 50.0 + 50.0 * (r - stats.dataset) / (stats.optimal - stats.dataset)
    score = np.where(r <= stats.dataset, low, high)
    return float(score) if score.ndim == 0 else score
