"""The replay buffer of online RL: the agent's own tokenized episodes in, packed ``[B_local, L]`` batches out.

    buffer = ReplayBuffer(capacity=4096, seq_len=256, pad_id=tok.pad_id)
    buffer.add(windows)                            # TOKEN_FIELDS dicts of [n] arrays (data.convert's layout)
    loader = ReplayLoader(buffer, rows=8, pack=True, seed=0, offline=source, offline_fraction=0.25)
    batch = next(loader)                           # BATCH_FIELDS [8, 256], what the offline loader yields

Storage is a ring of ``capacity`` slots, one tokenized window each (``TOKEN_FIELDS`` ``[capacity, seq_len]`` plus
``lengths [capacity]``): a fixed shape, so the whole buffer is one set of arrays in the run's checkpoint, and
FIFO eviction is writing over the oldest slot. The episodes are tokenized and cut into windows by the offline
pipeline's own code (``data.convert``, ``truncate_side``), and the batches are packed by the same first-fit rule
and code as the offline loader's (``data.packing``), so an online batch means exactly what an offline one does.

Sampling, episode by episode with replacement: from the offline dataset with probability ``offline_fraction``
(uniform over its records), else from the buffer, uniformly (``recency_half_life`` 0) or with weight
``2 ** (-age / recency_half_life)`` (age 0 = the newest episode). Episodes are drawn until the next one fits in
none of the ``rows`` first-fit bins; that one opens the next batch, as in the offline packer, so nothing drawn
is thrown away. Everything is a function of the buffer, the seed and the loader state, which
``get_state``/``get_arrays`` capture whole: a restored loader continues exactly.

Several processes: each keeps its own buffer (the episodes its own collector played) and draws its own
``B_local`` rows, as each reads its own share of an offline dataset.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxrl_lm.batch import BATCH_FIELDS, IMITATE, OPTIONAL_FIELDS
from jaxrl_lm.data.convert import TOKEN_FIELDS
from jaxrl_lm.data.packing import episodes_to_batch, fill_batch, pad_row, select_fields

OFFLINE, REPLAY = 0, 1  # where a drawn episode comes from


class ReplayBuffer:
    """A FIFO ring of tokenized windows (module docstring).

    Attributes:
      capacity: slots. seq_len: the longest window (``data.seq_len``). size: slots filled.
      inserted: windows ever added (the newest is slot ``(inserted - 1) % capacity``).
    """

    def __init__(self, capacity: int, seq_len: int, pad_id: int):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity, self.seq_len, self.pad_id = int(capacity), int(seq_len), int(pad_id)
        self.fields = {k: np.zeros((self.capacity, self.seq_len), dt) for k, dt in TOKEN_FIELDS.items()}
        self.fields["tokens"][:] = pad_id
        self.lengths = np.zeros(self.capacity, np.int32)
        self.inserted = 0

    @property
    def size(self) -> int:
        return min(self.inserted, self.capacity)

    def add(self, windows: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Appends windows (``TOKEN_FIELDS`` -> ``[n]``, ``n <= seq_len``) in order, evicting the oldest when full."""
        for window in windows:
            n = int(np.shape(window["tokens"])[0])
            if not 0 < n <= self.seq_len:
                raise ValueError(f"a replay window has {n} tokens; it must have 1..{self.seq_len} (data.seq_len)")
            slot = self.inserted % self.capacity
            for k, array in self.fields.items():
                array[slot] = self.pad_id if k == "tokens" else 0
                array[slot, :n] = np.asarray(window[k], TOKEN_FIELDS[k])
            self.lengths[slot] = n
            self.inserted += 1

    def window(self, slot: int) -> dict[str, np.ndarray]:
        """The window in ``slot``: ``TOKEN_FIELDS`` -> ``[n]`` arrays (views)."""
        n = self.lengths[slot]
        return {k: array[slot, :n] for k, array in self.fields.items()}

    def slot_of_age(self, age: np.ndarray) -> np.ndarray:
        """Slots of the windows ``age`` insertions older than the newest (0 = newest). ``[n] -> [n]``."""
        return (self.inserted - 1 - np.asarray(age, np.int64)) % self.capacity

    def recency_weights(self, half_life: float) -> np.ndarray:
        """Sampling probability of each age ``0 .. size-1``: uniform for ``half_life`` 0, else
        ``2 ** (-age / half_life)`` normalised. ``[size] float64``."""
        if half_life <= 0:
            return np.full(self.size, 1.0 / self.size)
        w = np.exp2(-np.arange(self.size) / half_life)
        return w / w.sum()

    def get_arrays(self) -> dict[str, np.ndarray]:
        return {**{k: v.copy() for k, v in self.fields.items()}, "lengths": self.lengths.copy()}

    def set_arrays(self, arrays: Mapping[str, np.ndarray], inserted: int) -> None:
        for k, array in self.fields.items():
            got = np.asarray(arrays[k])
            if got.shape != array.shape:
                raise ValueError(f"replay arrays {k!r} have the shape {got.shape}, this buffer's is {array.shape}: "
                                 f"resume with the same online.capacity and data.seq_len")
            array[...] = got
        self.lengths[...] = np.asarray(arrays["lengths"], np.int32)
        self.inserted = int(inserted)


class ReplayLoader:
    """Packed batches drawn from a ``ReplayBuffer`` and, at ``offline_fraction``, an offline dataset
    (module docstring). Iterates ``BATCH_FIELDS`` dicts ``[rows, seq_len]``, as ``data.Loader`` does.

    Args:
      buffer: the episodes collected so far (filled by the collector between batches).
      rows: ``B_local``. pack: first-fit packing (else one window per row). seed: of the sampling.
      offline: random-access ``TOKEN_FIELDS`` records (``data.load_source``), or None.
      offline_fraction: probability that a drawn episode is an offline one (needs ``offline``).
      recency_half_life: 0 = uniform over the buffer; else the age (in windows) at which the weight halves.
      imitate: ``"all"``, or ``"offline"``: every batch also carries ``imitate`` ``[rows, seq_len]`` int32
        (``jaxrl_lm.batch``), 1 on the tokens of offline episodes and 0 on collected ones, so that the BC term
        clones the offline data's behaviour only.
    """

    def __init__(self, buffer: ReplayBuffer, *, rows: int, pack: bool, seed: int,
                 offline: Optional[Sequence[Mapping[str, np.ndarray]]] = None, offline_fraction: float = 0.0,
                 recency_half_life: float = 0.0, imitate: str = "all", summary: Optional[dict[str, Any]] = None):
        if not 0.0 <= offline_fraction <= 1.0:
            raise ValueError(f"offline_fraction must lie in [0, 1], got {offline_fraction}")
        if offline_fraction > 0 and not offline:
            raise ValueError("offline_fraction > 0 needs offline episodes to mix in")
        if imitate not in ("all", "offline"):
            raise ValueError(f"imitate must be 'all' or 'offline', got {imitate!r}")
        if recency_half_life < 0:
            raise ValueError(f"recency_half_life must be >= 0 (0 = uniform), got {recency_half_life}")
        self.buffer, self.rows, self.pack = buffer, int(rows), bool(pack)
        self.offline = offline
        self.offline_fraction = float(offline_fraction)
        self.recency_half_life = float(recency_half_life)
        self.extra = {IMITATE: OPTIONAL_FIELDS[IMITATE]} if imitate == "offline" else {}
        self.rng = np.random.default_rng(seed)
        self.carry: Optional[tuple[int, int]] = None  # (source, index) of the episode that opens the next batch
        self.batches = 0
        self.drawn = {"offline": 0, "replay": 0}
        self._identity = {"capacity": buffer.capacity, "seq_len": buffer.seq_len, "rows": self.rows,
                          "pack": self.pack, "offline_episodes": len(offline) if offline else 0}
        self.summary = dict(summary or {})
        self.num_episodes = self._identity["offline_episodes"]

    def __iter__(self) -> "ReplayLoader":
        return self

    def _draw(self) -> tuple[int, int]:
        """One episode: ``(OFFLINE, record index)`` or ``(REPLAY, slot)``."""
        if self.offline_fraction > 0 and (self.buffer.size == 0 or self.rng.random() < self.offline_fraction):
            return OFFLINE, int(self.rng.integers(len(self.offline)))
        if self.buffer.size == 0:
            raise ValueError("the replay buffer is empty and there is no offline data to draw from: collect "
                             "episodes before the first batch (the online collector's first round does)")
        age = self.rng.choice(self.buffer.size, p=self.buffer.recency_weights(self.recency_half_life)) \
            if self.recency_half_life > 0 else self.rng.integers(self.buffer.size)
        return REPLAY, int(self.buffer.slot_of_age(np.asarray([age]))[0])

    def _episode(self, drawn: tuple[int, int]) -> dict[str, np.ndarray]:
        source, index = drawn
        episode = select_fields(self.offline[index]) if source == OFFLINE else self.buffer.window(index)
        if self.extra:  # the source mark: 1 on an offline episode's tokens, 0 on a collected one's
            episode[IMITATE] = np.full(episode["tokens"].shape, int(source == OFFLINE), np.int32)
        return episode

    def __next__(self) -> dict[str, np.ndarray]:
        seq_len, chosen = self.buffer.seq_len, []
        free: list[int] = []  # room left in each open first-fit bin
        while True:
            drawn = self.carry if self.carry is not None else self._draw()
            self.carry = None
            n = int(self._episode(drawn)["tokens"].shape[0])
            if not self.pack:
                if len(chosen) == self.rows:
                    self.carry = drawn
                    break
            else:
                fits = next((b for b, room in enumerate(free) if room >= n), None)
                if fits is None and len(free) == self.rows:
                    self.carry = drawn  # fits no bin: it opens the next batch, as in the offline packer
                    break
                if fits is None:
                    free.append(seq_len - n)
                else:
                    free[fits] -= n
            chosen.append(drawn)
            self.drawn["offline" if drawn[0] == OFFLINE else "replay"] += 1
        self.batches += 1
        episodes = [self._episode(d) for d in chosen]
        if not self.pack:
            rows = [pad_row(e, seq_len, self.buffer.pad_id, self.extra) for e in episodes]
            return {k: np.stack([r[k] for r in rows]) for k in {**BATCH_FIELDS, **self.extra}}
        batch = episodes_to_batch(episodes, seq_len, pack=True, pad_id=self.buffer.pad_id, extra=self.extra)
        if batch["tokens"].shape[0] > self.rows:  # same first-fit rule as above: a mismatch is a bug, not data
            raise AssertionError(f"first-fit packed {len(chosen)} episodes into {batch['tokens'].shape[0]} rows, "
                                 f"more than the {self.rows} it was drawn for")
        return fill_batch(batch, self.rows, self.buffer.pad_id)

    def close(self) -> None:
        """Nothing runs in the background here; kept for the loader protocol."""

    def get_state(self) -> dict[str, Any]:
        """JSON-able: the sampling rng, the carried episode, counters (the contents are ``get_arrays``)."""
        return {"identity": dict(self._identity), "rng": self.rng.bit_generator.state,
                "carry": list(self.carry) if self.carry is not None else None, "batches": self.batches,
                "drawn": dict(self.drawn), "inserted": self.buffer.inserted}

    def get_arrays(self) -> dict[str, np.ndarray]:
        return self.buffer.get_arrays()

    def set_state(self, state: Mapping[str, Any], arrays: Optional[Mapping[str, np.ndarray]] = None) -> None:
        """Continues from ``get_state()`` (and ``get_arrays()``); refuses one saved under other settings."""
        saved = state.get("identity", {})
        for key, value in self._identity.items():
            if saved.get(key) != value:
                raise ValueError(f"replay loader state was saved with {key}={saved.get(key)!r}, this loader has "
                                 f"{key}={value!r}; resume with the same online and data settings")
        self.rng.bit_generator.state = state["rng"]
        self.carry = tuple(state["carry"]) if state["carry"] is not None else None
        self.batches = int(state["batches"])
        self.drawn = dict(state["drawn"])
        if arrays is not None:
            self.buffer.set_arrays(arrays, state["inserted"])
        elif state["inserted"]:
            raise ValueError("replay loader state holds collected episodes, but no replay arrays were given")
