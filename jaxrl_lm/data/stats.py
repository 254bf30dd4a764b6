"""Dataset statistics and the account of everything left out (rejected lines, episodes with no decision)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxrl_lm.data.episodes import Rejection

RETURN_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclasses.dataclass
class DataStats:
    """Counts over the episodes that made it into a dataset, plus every line or episode that did not.

    Attributes:
      rejected: invalid lines skipped in ``skip_invalid`` mode.
      no_decision: ``"source: id ...: reason"`` for valid episodes left out because no action token fit.
      episodes, windows, tokens, action_tokens, truncated: over the kept episodes and their windows (one per
        episode unless ``truncate_side`` is ``"split"``; tokens after truncation; truncated counts windows).
      returns: each kept episode's return (sum of its rewards, before truncation), once per episode.
    """

    rejected: list[Rejection] = dataclasses.field(default_factory=list)
    no_decision: list[str] = dataclasses.field(default_factory=list)
    episodes: int = 0
    windows: int = 0
    tokens: int = 0
    action_tokens: int = 0
    truncated: int = 0
    returns: list[float] = dataclasses.field(default_factory=list)

    def add(self, action_mask: np.ndarray, truncated: bool, episode_return: float, first_window: bool = True) -> None:
        """Counts one kept window; ``first_window`` also counts its episode. ``action_mask``: ``[n] int32``."""
        self.windows += 1
        self.tokens += int(action_mask.shape[0])
        self.action_tokens += int(action_mask.sum())
        self.truncated += int(truncated)
        if first_window:
            self.episodes += 1
            self.returns.append(float(episode_return))

    def summary(self) -> dict[str, Any]:
        """JSON-able figures: counts, action-token fraction, return distribution (mean/min/max/quantiles)."""
        r = np.asarray(self.returns, dtype=np.float64)
        ret: dict[str, float | None] = {"mean": None, "min": None, "max": None}
        ret.update({f"q{round(q * 100):02d}": None for q in RETURN_QUANTILES})
        if r.size:
            ret.update(mean=float(r.mean()), min=float(r.min()), max=float(r.max()))
            quantiles = np.quantile(r, RETURN_QUANTILES)
            ret.update({f"q{round(q * 100):02d}": float(v) for q, v in zip(RETURN_QUANTILES, quantiles)})
        return {
            "episodes": self.episodes,
            "windows": self.windows,
            "tokens": self.tokens,
            "action_token_fraction": self.action_tokens / self.tokens if self.tokens else 0.0,
            "return": ret,
            "truncated": self.truncated,
            "rejected": len(self.rejected),
            "no_decision": len(self.no_decision),
        }

    def left_out(self) -> list[str]:
        """One line per rejected line and per episode without a decision position, in input order per kind."""
        return [f"rejected {r}" for r in self.rejected] + [f"no decision {s}" for s in self.no_decision]
