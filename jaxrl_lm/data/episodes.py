"""Episode schema and validation for JSON Lines files (one episode per line).

Schema of one line::

    {"id": "ep-17",
     "turns": [{"role": "observation", "text": "..."},
               {"role": "action", "text": "...", "reward": -1.0}, ...],
     "done": true,
     "meta": {...}}

- ``id``: non-empty string, unique within one read.
- ``turns``: non-empty list; ``role`` is ``"observation"`` (the environment's text) or ``"action"`` (the agent's);
  ``text`` is a string (may be empty); ``reward`` (a finite number, default 0) is allowed on action turns only.
  At least one turn must be an action turn. Rewards, and the episode's return, must fit in float32 (the token
  arrays store them so: a larger number would silently become infinite there).
- ``done``: true when the episode really ended (terminal), false when it was cut off (truncated).
- ``meta``: optional object, passed through untouched.

Unknown keys are errors (a misspelt ``"reward"`` must not silently become 0), and so is a key given twice in one
object (JSON parsers keep the last value and drop the other unseen). Texts and ids must be valid Unicode (a lone
surrogate such as ``"\\ud800"`` is not; no tokenizer can encode it).

Files are UTF-8, split into lines at ``\\n`` (line numbers are what ``grep -n`` and ``sed -n`` count); a trailing
``\\r`` (CRLF files) is whitespace, and a UTF-8 byte order mark at the start of the file is skipped. Blank lines
(only spaces, tabs, CR) are not episodes and are ignored; every other line is one record, and every record either
becomes an ``Episode`` or is reported, never dropped unseen. Every problem is reported as ``file:line: field:
reason`` (a line that is not valid UTF-8 too, as field ``encoding``): strict mode raises ``EpisodeError`` on the
first one; ``skip_invalid`` mode records a ``Rejection`` per bad line and goes on.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping, NamedTuple

from jaxrl_lm.config import show_value

ROLES = ("observation", "action")
_EPISODE_KEYS = {"id", "turns", "done", "meta"}
_TURN_KEYS = {"role", "text", "reward"}
# Largest float32 magnitude: rewards are stored as float32 token arrays (jaxrl_lm.data.convert.TOKEN_FIELDS).
FLOAT32_MAX = 3.4028234663852886e38
_JSON_BLANK = b" \t\r\n"  # JSON's whitespace: a line of only these is blank




class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def _unknown_keys(obj: Mapping, allowed: set[str]) -> list[str]:
    """The keys of ``obj`` outside ``allowed`` as field names, sorted; an in-memory dict may have keys of any
    type (a non-string key is named by its repr)."""
    return sorted(k if isinstance(k, str) else repr(k) for k in obj if k not in allowed)


def _bad_unicode(text: str) -> str | None:
    """Why ``text`` cannot be UTF-8 encoded (a lone surrogate, which JSON's ``\\udXXX`` escapes can produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start}"
    return None


# An episode as one JSON object (a JSONL line, or what the environments write): the plain-dict form of
# ``Episode``, which ``parse_episode`` validates.
EpisodeRecord = dict[str, Any]


class EpisodeError(ValueError):
    """One invalid episode line. ``str()`` is ``file:line: field: reason``."""

    def __init__(self, path: str, line: int, field: str, reason: str):
        super().__init__(f"{path}:{line}: {field}: {reason}")
        self.path, self.line, self.field, self.reason = path, line, field, reason


class Rejection(NamedTuple):
    """A line skipped in ``skip_invalid`` mode, with the same parts as an ``EpisodeError``."""

    path: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class Turn:
    role: Literal["observation", "action"]
    text: str
    reward: float = 0.0


@dataclasses.dataclass(frozen=True)
class Episode:
    """A validated episode. ``source`` is ``file:line`` (or ``<memory>:index``) for later reports."""

    id: str
    turns: tuple[Turn, ...]
    done: bool
    meta: dict = dataclasses.field(default_factory=dict)
    source: str = ""

    @property
    def episode_return(self) -> float:
        return float(sum(t.reward for t in self.turns))


def _parse_turn(obj: Any, field: str, fail) -> Turn:
    if not isinstance(obj, dict):
        fail(field, f"a turn must be an object, got {type(obj).__name__}")
    unknown = _unknown_keys(obj, _TURN_KEYS)
    if unknown:
        fail(f"{field}.{unknown[0]}", f"unknown key (allowed: {sorted(_TURN_KEYS)})")
    role = obj.get("role")
    if role not in ROLES:
        fail(f"{field}.role", f"unknown role {role!r} (allowed: {list(ROLES)})")
    if "text" not in obj:
        fail(f"{field}.text", "missing")
    if not isinstance(obj["text"], str):
        fail(f"{field}.text", f"must be a string, got {type(obj['text']).__name__}")
    bad_text = _bad_unicode(obj["text"])
    if bad_text:
        fail(f"{field}.text", bad_text)
    reward = obj.get("reward", 0.0)
    if "reward" in obj and role == "observation":
        fail(f"{field}.reward", "rewards belong to action turns; observation turns carry none")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)):
        fail(f"{field}.reward", f"must be a number, got {show_value(reward)}")
    try:
        value = float(reward)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if not math.isfinite(value):
        fail(f"{field}.reward", f"must be finite, got {show_value(reward)}")
    if abs(value) > FLOAT32_MAX:
        fail(f"{field}.reward", f"must fit in float32 (magnitude at most {FLOAT32_MAX:.4g}), got {show_value(reward)}")
    return Turn(role=role, text=obj["text"], reward=value)


def parse_episode(obj: Any, *, path: str = "<memory>", line: int = 0) -> Episode:
    """Validates one decoded JSON object. Raises ``EpisodeError`` naming ``path``, ``line`` and the field."""

    def fail(field: str, reason: str):
        raise EpisodeError(path, line, field, reason)

    if not isinstance(obj, dict):
        fail("episode", f"a line must hold a JSON object, got {type(obj).__name__}")
    unknown = _unknown_keys(obj, _EPISODE_KEYS)
    if unknown:
        fail(unknown[0], f"unknown key (allowed: {sorted(_EPISODE_KEYS)})")
    ep_id = obj.get("id")
    if not isinstance(ep_id, str) or not ep_id:
        fail("id", f"must be a non-empty string, got {show_value(ep_id)}")
    bad_id = _bad_unicode(ep_id)
    if bad_id:
        fail("id", bad_id)
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        fail("turns", f"must be a non-empty list, got {show_value(turns)}")
    parsed = tuple(_parse_turn(t, f"turns[{i}]", fail) for i, t in enumerate(turns))
    if not any(t.role == "action" for t in parsed):
        fail("turns", "no action turn: an episode needs at least one agent turn to learn from")
    total = math.fsum(t.reward for t in parsed)
    if abs(total) > FLOAT32_MAX:
        fail("turns", f"the rewards sum to {total:.4g}, beyond float32 (magnitude at most {FLOAT32_MAX:.4g})")
    done = obj.get("done")
    if not isinstance(done, bool):
        fail("done", f"must be true (terminal) or false (cut off), got {show_value(done)}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        fail("meta", f"must be an object, got {type(meta).__name__}")
    return Episode(id=ep_id, turns=parsed, done=done, meta=meta, source=f"{path}:{line}")


def jsonl_records(path: str | Path) -> Iterator[tuple[str, int, bytes]]:
    """``(path, line_number, raw bytes)`` for every non-blank line of a JSONL file; line numbers start at 1.

    Lines are split at ``\\n`` only and kept undecoded: ``iter_episodes`` decodes each one, so a line that is
    not UTF-8 is reported with its own file and line like any other invalid record.
    """
    path = str(path)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if raw.strip(_JSON_BLANK):
                yield path, n, raw


def _decode(path: str, line: int, raw: str | bytes | Mapping) -> Any:
    if isinstance(raw, (bytes, bytearray)):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EpisodeError(path, line, "encoding",
                               f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line "
                               f"({e.reason}); episode files must be UTF-8") from None
    if not isinstance(raw, str):
        return raw
    try:
        return _DECODER.decode(raw)
    except json.JSONDecodeError as e:
        raise EpisodeError(path, line, "json", f"not valid JSON: {e.msg} at column {e.colno}") from None
    except _DuplicateKey as e:
        raise EpisodeError(path, line, "json", f"key {show_value(e.key)} appears twice in one object (JSON readers "
                                               f"keep only the last value)") from None
    except RecursionError:
        raise EpisodeError(path, line, "json", "not readable JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's 4300-digit conversion limit
        raise EpisodeError(path, line, "json", f"not readable JSON: {e}") from None


def iter_episodes(
    records: Iterable[tuple[str, int, str | bytes | Mapping]], *, skip_invalid: bool = False,
    rejected: list[Rejection] | None = None,
) -> Iterator[Episode]:
    """Validated episodes from ``(path, line, raw)`` records, raw being JSON text (``str``, or UTF-8 ``bytes`` as
    ``jsonl_records`` gives) or a decoded object.

    Ids must be unique across all records. In ``skip_invalid`` mode each bad record is appended to ``rejected``
    (required then) and skipped; otherwise the first one raises ``EpisodeError``.
    """
    if skip_invalid and rejected is None:
        raise ValueError("skip_invalid=True needs a `rejected` list to report the skipped lines into")
    first_seen: dict[str, str] = {}
    for path, line, raw in records:
        try:
            ep = parse_episode(_decode(path, line, raw), path=path, line=line)
            if ep.id in first_seen:
                raise EpisodeError(path, line, "id", f"duplicate id {show_value(ep.id)}, first seen at {first_seen[ep.id]}")
        except EpisodeError as e:
            if not skip_invalid:
                raise
            rejected.append(Rejection(e.path, e.line, e.field, e.reason))  # type: ignore[union-attr]
            continue
        first_seen[ep.id] = ep.source
        yield ep


def memory_records(objs: Iterable[Mapping | Episode], source: str = "<memory>") -> Iterator[tuple[str, int, Any]]:
    """Records for ``iter_episodes`` from in-memory dicts (e.g. an environment's rollouts); index = line.

    Already-validated ``Episode`` objects are turned back into dicts so they pass the same checks.
    """
    for i, obj in enumerate(objs):
        if isinstance(obj, Episode):
            obj = {"id": obj.id, "turns": [_turn_dict(t) for t in obj.turns], "done": obj.done, "meta": obj.meta}
        yield source, i, obj


def _turn_dict(t: Turn) -> dict:
    d: dict[str, Any] = {"role": t.role, "text": t.text}
    if t.role == "action":
        d["reward"] = t.reward
    return d


def read_jsonl(path: str | Path, *, skip_invalid: bool = False) -> tuple[list[Episode], list[Rejection]]:
    """All valid episodes of a JSONL file and the rejected lines (always empty in strict mode)."""
    rejected: list[Rejection] = []
    episodes = list(iter_episodes(jsonl_records(path), skip_invalid=skip_invalid, rejected=rejected))
    return episodes, rejected


def write_jsonl(path: str | Path, episodes: Iterable[Mapping | Episode]) -> None:
    """Writes episodes (dicts or ``Episode``) as JSON Lines, the inverse of ``read_jsonl``."""
    with open(path, "w", encoding="utf-8") as f:
        for _, _, obj in memory_records(episodes):
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def synthetic_episodes(n: int, *, seed: int = 0, max_turns: int = 6, terminal_fraction: float = 0.7) -> list[dict]:
    """``n`` valid random episode dicts (varied lengths, rewards, done flags) for tests and loader benchmarks."""
    rng = random.Random(seed)
    episodes = []
    for i in range(n):
        turns: list[dict] = []
        for k in range(rng.randint(1, max_turns)):
            turns.append({"role": "observation", "text": f"room {k}: " + "door " * rng.randint(0, 8)})
            turns.append({"role": "action", "text": "go " * rng.randint(1, 4), "reward": float(rng.randint(-2, 1))})
        episodes.append({"id": f"syn-{seed}-{i}", "turns": turns, "done": rng.random() < terminal_fraction,
                         "meta": {"seed": seed}})
    return episodes
