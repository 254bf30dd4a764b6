"""Fuzz drills: property-based tests (hypothesis) over every parser of outside input.

The episode JSONL reader (and the token layout of what it accepts), the config loader (YAML files, dotted and
keyword overrides), the tokenizers (round trips, tokenizer files) and every built-in environment's action parser.
Each property holds for any input: a valid result, or the project's own error naming where (file, line and field;
config key or file) -- never another exception, a hang, or a record dropped unseen.

docs/reliability.md tables the drills, the examples each ran (``--hypothesis-show-statistics``) and the holes they
found. Runs are derandomized, so CI sees the same examples every time; ``JAXRL_LM_FUZZ_SCALE=N`` runs N times as
many examples with fresh randomness (a longer soak).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import json
import math
import os
import re
import reprlib
import signal
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from jaxrl_lm import envs
from jaxrl_lm.config import REPO_ROOT, Config, ConfigError, load_config
from jaxrl_lm.data import (
    TOKEN_FIELDS,
    EpisodeError,
    build_char_tokenizer,
    iter_episodes,
    load_tokenizer,
    memory_records,
    read_jsonl,
    synthetic_episodes,
    tokenize_episode_windows,
    train_bpe_tokenizer,
)
from jaxrl_lm.data.tokenizer import Tokenizer, save_tokenizer
from jaxrl_lm.envs import chess_endgames, dialogue, maze, negotiation, twenty_questions
from jaxrl_lm.rl.objective import get_objective, registered
from script_loader import load_script

SCALE = int(os.environ.get("JAXRL_LM_FUZZ_SCALE", "1"))
# Totals over all examples (records read, valid, reported, ...), written as JSON to $JAXRL_LM_FUZZ_COUNTS when set.
TOTALS: Counter = Counter()
# A hang guard, not a speed test: every example here takes milliseconds; one that runs this long is stuck.
HANG_SECONDS = 60


def fuzz(examples: int) -> settings:
    """Settings of a drill: ``examples`` (times SCALE) inputs, no per-example deadline (the hang guard does that),
    no example database (nothing written into the repository)."""
    return settings(max_examples=examples * SCALE, derandomize=SCALE == 1, database=None, deadline=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                            HealthCheck.large_base_example])


class Hang(BaseException):
    """No result within HANG_SECONDS. A BaseException, so that no ``except Exception`` under test swallows it."""


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120


@contextlib.contextmanager
def no_hang(what: object):
    """Fails with ``Hang`` when the block runs longer than HANG_SECONDS (SIGALRM; tests run in the main thread)."""

    def alarm(signum, frame):
        raise Hang(f"no result within {HANG_SECONDS} s on {_SHORT.repr(what)}")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def write_totals():
    yield
    if os.environ.get("JAXRL_LM_FUZZ_COUNTS"):
        Path(os.environ["JAXRL_LM_FUZZ_COUNTS"]).write_text(json.dumps(dict(sorted(TOTALS.items())), indent=1) + "\n")


# ============================================================================================ (a) episode files

ROLES = ("observation", "action")
F32_MAX = float(np.finfo(np.float32).max)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
IDS = st.one_of(st.sampled_from(["a", "b", "ep-0"]), st.text(min_size=1, max_size=10))  # repeats test duplicate ids
TEXTS = st.text(max_size=30)  # any Unicode scalar value (hypothesis leaves out lone surrogates)
GOOD_REWARDS = st.one_of(st.floats(-1e30, 1e30, allow_nan=False), st.integers(-10**9, 10**9))
BAD_REWARDS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.integers(39, 400).map(lambda k: 10**k),  # beyond float32; from 309 digits beyond float64 too
    st.floats(min_value=3.5e38, allow_infinity=False), st.floats(max_value=-3.5e38, allow_infinity=False),
    st.booleans(), st.none(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
)
NOT_BOOL = JSON_VALUES.filter(lambda v: not isinstance(v, bool))
NOT_STR = JSON_VALUES.filter(lambda v: not isinstance(v, str))
NOT_DICT = JSON_VALUES.filter(lambda v: not isinstance(v, dict))
# Whitespace that JSON does not count as such: a line of it is a record (reported), not a blank line.
NON_JSON_SPACE = st.sampled_from(["\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2028", "\u3000", "\ufeff"])
# Bytes that make any UTF-8 text invalid wherever they are inserted (continuation bytes, C0/C1, F5..FF).
BAD_UTF8 = st.sampled_from([*range(0x80, 0xC2), *range(0xF5, 0x100)])


@st.composite
def valid_episodes(draw) -> dict:
    turns = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            turns.append({"role": "observation", "text": draw(TEXTS)})
        else:
            turns.append({"role": "action", "text": draw(TEXTS)})
            if draw(st.booleans()):
                turns[-1]["reward"] = draw(GOOD_REWARDS)
    if not any(t["role"] == "action" for t in turns):
        turns[draw(st.integers(0, len(turns) - 1))]["role"] = "action"
    episode = {"id": draw(IDS), "turns": turns, "done": draw(st.booleans())}
    if draw(st.booleans()):
        episode["meta"] = draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3))
    return episode


MUTATIONS = ("drop key", "unknown key", "bad id", "bad turns", "turn not object", "bad role", "text not string",
             "missing text", "lone surrogate", "unknown turn key", "observation reward", "bad reward",
             "rewards overflow float32", "no action", "bad done", "bad meta", "duplicate key")


@st.composite
def broken_episodes(draw) -> tuple[str, str]:
    """``(JSON text, mutation)`` of an episode that breaks exactly one rule of the schema."""
    ep = draw(valid_episodes())
    turns = ep["turns"]
    i = draw(st.integers(0, len(turns) - 1))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "drop key":
        del ep[draw(st.sampled_from(["id", "turns", "done"]))]
    elif kind == "unknown key":
        ep[draw(st.text(max_size=6).filter(lambda k: k not in ("id", "turns", "done", "meta")))] = draw(JSON_VALUES)
    elif kind == "bad id":
        ep["id"] = draw(st.one_of(st.just(""), NOT_STR))
    elif kind == "bad turns":
        ep["turns"] = draw(st.one_of(st.just([]), JSON_VALUES.filter(lambda v: not isinstance(v, list))))
    elif kind == "turn not object":
        turns[i] = draw(NOT_DICT)
    elif kind == "bad role":
        turns[i]["role"] = draw(JSON_VALUES.filter(lambda r: r not in ROLES))
    elif kind == "text not string":
        turns[i]["text"] = draw(NOT_STR)
    elif kind == "missing text":
        del turns[i]["text"]
    elif kind == "lone surrogate":
        turns[i]["text"] += chr(draw(st.integers(0xD800, 0xDFFF)))  # json.dumps writes it as a \udXXX escape
    elif kind == "unknown turn key":
        turns[i][draw(st.text(max_size=6).filter(lambda k: k not in ("role", "text", "reward")))] = draw(JSON_VALUES)
    elif kind == "observation reward":
        turns.append({"role": "observation", "text": "", "reward": draw(GOOD_REWARDS)})
    elif kind == "bad reward":
        turns.append({"role": "action", "text": draw(TEXTS), "reward": draw(BAD_REWARDS)})
    elif kind == "rewards overflow float32":  # each one fits, their sum does not
        ep["turns"] = [{"role": "action", "text": "", "reward": 3e38}, {"role": "action", "text": "", "reward": 3e38}]
    elif kind == "no action":
        ep["turns"] = [{"role": "observation", "text": t.get("text", "")} for t in turns]
    elif kind == "bad done":
        ep["done"] = draw(NOT_BOOL)
    elif kind == "bad meta":
        ep["meta"] = draw(NOT_DICT)
    text = json.dumps(ep, ensure_ascii=draw(st.booleans()) or kind == "lone surrogate")
    if kind == "duplicate key":
        text = '{"done": ' + json.dumps(not ep["done"]) + ", " + text[1:]
    return text, kind


@st.composite
def episode_lines(draw) -> tuple[str, bytes, object]:
    """``(kind, raw line without its newline, the episode dict for kind "valid")``. Kinds: valid, invalid (breaks
    a rule), bom (a byte order mark before a valid episode: valid only at the start of the file), blank, any."""
    choice = draw(st.integers(0, 9))
    if choice <= 3:
        ep = draw(valid_episodes())
        return "valid", json.dumps(ep, ensure_ascii=draw(st.booleans())).encode(), ep
    if choice <= 5:
        text, _ = draw(broken_episodes())
        return "invalid", text.encode("utf-8", "surrogatepass"), None
    if choice == 6:  # a valid line broken at the byte level
        raw = json.dumps(draw(valid_episodes()), ensure_ascii=False).encode()
        if draw(st.booleans()):
            at = draw(st.integers(0, len(raw)))
            return "invalid", raw[:at] + bytes([draw(BAD_UTF8)]) + raw[at:], None
        return "invalid", raw[:draw(st.integers(1, len(raw) - 1))], None  # a cut object is never valid JSON
    if choice == 7:
        ep = draw(valid_episodes())
        return "bom", codecs.BOM_UTF8 + json.dumps(ep).encode(), ep
    if choice == 8:
        return "blank", draw(st.sampled_from([b"", b" ", b"\t", b"\r", b" \t\r "])), None
    return "any", draw(st.one_of(st.binary(max_size=30), st.text(max_size=30).map(str.encode),
                                 NON_JSON_SPACE.map(str.encode))).replace(b"\n", b""), None


@st.composite
def episode_files(draw) -> tuple[list, bool, bytes]:
    lines = draw(st.lists(episode_lines(), max_size=8))
    bom = draw(st.integers(0, 4)) == 0
    trailing = draw(st.booleans())
    data = codecs.BOM_UTF8 if bom else b""
    for k, (_, raw, _) in enumerate(lines):
        data += raw + (draw(st.sampled_from([b"\n", b"\r\n"])) if k < len(lines) - 1 or trailing else b"")
    return lines, bom, data


def physical_records(data: bytes) -> list[int]:
    """The line numbers that are records by the documented rule: split at \\n, the file's BOM skipped, a line of
    only JSON whitespace blank. (Independent of jsonl_records.)"""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    return [n for n, raw in enumerate(data.split(b"\n"), start=1) if raw.strip(b" \t\r\n")]


def _field_kind(field: str) -> str:
    """The field of a rejection, for the statistics: list indices dropped, unknown keys lumped together."""
    field = re.sub(r"\[\d+\]", "[i]", field)
    known = ("episode", "json", "encoding", "id", "turns", "done", "meta", "turns[i]", "turns[i].role",
             "turns[i].text", "turns[i].reward")
    return field if field in known else "an unknown key"


def check_accepted(ep, seq_len: int, side: str) -> None:
    """An accepted episode holds only what the rest of the pipeline can use, and tokenizes (convert.py)."""
    assert ep.id and all(t.role in ROLES for t in ep.turns) and any(t.role == "action" for t in ep.turns)
    for t in ep.turns:
        t.text.encode("utf-8")  # valid Unicode
        assert isinstance(t.reward, float) and math.isfinite(t.reward) and abs(t.reward) <= F32_MAX
    windows = tokenize_episode_windows(ep, BYTES, seq_len=seq_len, truncate_side=side)
    assert windows
    for w in windows:
        n = w.num_tokens
        assert 2 <= n <= seq_len
        for key, dtype in TOKEN_FIELDS.items():
            assert w.arrays[key].dtype == dtype and w.arrays[key].shape == (n,), key
        assert np.isfinite(w.arrays["reward"]).all(), "a reward became infinite in float32"
        assert w.arrays["done"].sum() <= int(ep.done)


@fuzz(400)
@given(case=episode_files(), seq_len=st.integers(2, 48), side=st.sampled_from(["split", "left", "right"]))
def test_episode_files_give_episodes_or_errors_naming_file_line_field(fuzz_dir, case, seq_len, side):
    lines, bom, data = case
    path = fuzz_dir / "episodes.jsonl"
    path.write_bytes(data)
    with no_hang(data):
        episodes, rejected = read_jsonl(path, skip_invalid=True)
        try:
            strict, strict_error = read_jsonl(path)[0], None
        except EpisodeError as e:
            strict, strict_error = None, e

    # Every record is an episode or a reported rejection, never both, never neither.
    records = physical_records(data)
    accepted = {int(ep.source.rsplit(":", 1)[1]): ep for ep in episodes}
    reported = {r.line: r for r in rejected}
    assert len(accepted) == len(episodes) and len(reported) == len(rejected)
    assert not accepted.keys() & reported.keys()
    assert sorted(accepted.keys() | reported.keys()) == records
    for r in rejected:
        assert r.path == str(path) and r.reason
        assert str(r).startswith(f"{path}:{r.line}: {r.field}: ")
        event(f"rejected: {_field_kind(r.field)}")
    TOTALS.update({"episode files": 1, "episode file records": len(records), "episode file valid": len(episodes),
                   "episode file reported": len(rejected)})

    # Strict mode stops at the first rejection, with the same message; else it reads the same episodes.
    if rejected:
        assert strict_error is not None and str(strict_error) == str(rejected[0])
    else:
        assert strict_error is None and [e.source for e in strict] == [e.source for e in episodes]

    # The oracle: what each generated line must give (ids are unique among the accepted ones).
    seen_ids: set[str] = set()
    for n, (kind, raw, ep) in enumerate(lines, start=1):
        if kind == "bom":
            kind = "valid" if n == 1 and not bom else "invalid"
        if kind == "valid" and ep["id"] in seen_ids:
            kind = "invalid"  # a duplicate id
        if kind == "valid":
            assert n in accepted, f"line {n} is a valid episode, rejected: {reported.get(n)}"
            got = accepted[n]
            assert (got.id, got.done) == (ep["id"], ep["done"])
            assert [(t.role, t.text, t.reward) for t in got.turns] == [
                (t["role"], t["text"], float(t.get("reward", 0.0))) for t in ep["turns"]]
        elif kind == "invalid":
            assert n in reported, f"line {n} breaks the schema, accepted: {raw[:200]!r}"
        if n in accepted:
            seen_ids.add(accepted[n].id)
    for ep in episodes[:3]:
        check_accepted(ep, seq_len, side)


PY_VALUES = st.one_of(JSON_VALUES, st.just(10**5000), st.just(2**64), st.binary(max_size=4),
                      st.tuples(st.integers()), st.frozensets(st.integers(), max_size=2), st.complex_numbers())


@st.composite
def memory_objects(draw) -> object:
    """What an environment or a user hands ``memory_records``: episode dicts, broken ones, any Python value."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(valid_episodes())
    if choice == 4:  # keys that JSON cannot have: numbers, None, tuples, next to the real ones
        ep = draw(valid_episodes())
        odd_keys = st.dictionaries(st.one_of(st.integers(), st.none(), st.tuples(st.integers()), st.text(max_size=3)),
                                   PY_VALUES, max_size=2)
        target = draw(st.sampled_from(["episode", "turn"]))
        (ep if target == "episode" else ep["turns"][0]).update(draw(odd_keys))
        return ep
    if choice == 1:
        return json.loads(draw(broken_episodes())[0])
    if choice == 2:
        ep = draw(valid_episodes())
        ep["turns"][draw(st.integers(0, len(ep["turns"]) - 1))][draw(st.sampled_from(["text", "reward"]))] = \
            draw(PY_VALUES)
        return ep
    return draw(PY_VALUES)


@fuzz(200)
@given(objs=st.lists(memory_objects(), max_size=6))
def test_in_memory_records_are_each_accepted_or_reported(objs):
    rejected: list = []
    with no_hang(objs):
        episodes = list(iter_episodes(memory_records(objs), skip_invalid=True, rejected=rejected))
    assert len(episodes) + len(rejected) == len(objs)
    assert sorted([int(e.source.rsplit(":", 1)[1]) for e in episodes] + [r.line for r in rejected]) == \
        list(range(len(objs)))
    for r in rejected:
        assert str(r).startswith(f"<memory>:{r.line}: {r.field}: ")
        event(f"rejected: {_field_kind(r.field)}")
    TOTALS.update({"memory records": len(objs), "memory valid": len(episodes), "memory reported": len(rejected)})
    for ep in episodes:
        check_accepted(ep, 16, "split")


@pytest.mark.parametrize("skip", [False, True])
def test_dataset_script_names_file_and_line_of_a_non_utf8_byte(tmp_path, capsys, skip):
    """The reported case: a byte that is not UTF-8 on line 2 stopped scripts/build_tfds_dataset.py with "'utf-8'
    codec can't decode byte 0xff in position 139", naming neither file nor line (and even with --skip-invalid)."""
    good, bad = (json.dumps(e).encode() for e in synthetic_episodes(2))
    path = tmp_path / "eps.jsonl"
    path.write_bytes(good + b"\n" + bad[:40] + b"\xff" + bad[40:] + b"\n")
    args = [str(path), "--out", str(tmp_path / "ds"), "--seq-len", "64"] + (["--skip-invalid"] if skip else [])
    rc = load_script("build_tfds_dataset").main(args)
    err = capsys.readouterr().err
    assert f"{path}:2: encoding: not valid UTF-8: byte 0xff at byte 41 of the line" in err
    assert rc == (0 if skip else 1)
    rc = load_script("make_tokenizer").main([str(path), "--out", str(tmp_path / "tok.json")])
    assert rc == 1 and f"{path}:2: encoding:" in capsys.readouterr().err


# ============================================================================================ (b) configs

SECTION_CLASSES = {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)
                   if f.name != "sections"}
SECTION_CLASSES.update({name: get_objective(name).settings for name in registered()})
FIELD_TYPES = {s: typing.get_type_hints(cls) for s, cls in SECTION_CLASSES.items()}
KEYS = sorted(f"{s}.{f}" for s, fields in FIELD_TYPES.items() for f in fields)

# Values that are near something valid, at an edge, or of the wrong kind altogether.
PLAIN = st.one_of(
    st.none(), st.booleans(), st.integers(-4, 300), st.integers(), st.floats(), st.text(max_size=12),
    st.sampled_from(["1e-3", "-2E+4", "1e400", ".nan", "-.inf", "auto", "v5p-8", "h100-8", "v5e:4x4", "v5p-0", "max",
                     "expectile", "llama", "bfloat16", "task:grid", "task:maze", "x.jsonl", "awr", "value"]),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 10**400]), st.just("1" * 3000),
)
VALUES = st.recursive(PLAIN, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=6)


def values_for(tp) -> st.SearchStrategy:
    """Mostly values of the field's own type (so that many configs are valid and the cross-field checks run)."""
    if typing.get_origin(tp) is typing.Literal:
        return st.one_of(st.sampled_from(typing.get_args(tp)), PLAIN)
    own = {bool: st.booleans(), int: st.integers(-2, 300), float: st.floats(-2, 300), str: st.text(max_size=8)}
    base = own.get(tp)
    if base is None and typing.get_origin(tp) is not None and type(None) in typing.get_args(tp):
        base = st.one_of(st.none(), st.floats(-10, 10))  # Optional[float]
    return st.one_of(base, base, base, VALUES) if base is not None else VALUES  # 3:1 for the field's own type


DEFAULTS = {s: dataclasses.asdict(cls()) for s, cls in SECTION_CLASSES.items()}


def values_near_default(section: str, field: str) -> st.SearchStrategy:
    """Values a user would plausibly set (the default, or one step from it), so many override sets are valid
    and the check that each one is applied runs."""
    tp, default = FIELD_TYPES[section][field], DEFAULTS[section][field]
    if tp is bool:
        return st.booleans()
    if typing.get_origin(tp) is typing.Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is int:
        return st.sampled_from([default, default + 1, default * 2, max(default - 1, 0)])
    if tp is float:
        return st.sampled_from([default, default / 2, min(default * 2, 1.0) if default <= 1 else default * 2])
    return st.just(default)


SECTION_NAMES = st.one_of(st.sampled_from(sorted(FIELD_TYPES)), st.text(max_size=6), st.integers(), st.none())
INCLUDES = st.sampled_from(["missing.yaml", "", 3, None, [], ["missing.yaml"], [7], {"a": 1}, "config.yaml",
                            str(REPO_ROOT / "configs/models/tiny.yaml"), str(REPO_ROOT / "configs/base.yaml")])


@st.composite
def config_trees(draw) -> dict:
    tree: dict = {}
    if draw(st.integers(0, 4)) == 0:
        tree["include"] = draw(INCLUDES)
    for section in draw(st.lists(SECTION_NAMES, max_size=4, unique_by=str)):
        if section in FIELD_TYPES and draw(st.integers(0, 9)) > 0:
            fields = FIELD_TYPES[section]
            names = draw(st.lists(st.one_of(st.sampled_from(sorted(fields)), st.text(max_size=6)), max_size=4,
                                  unique=True))
            tree[section] = {f: draw(values_for(fields.get(f))) for f in names}
        else:
            tree[section] = draw(VALUES)
    return tree


@st.composite
def config_documents(draw) -> tuple[bytes, dict]:
    tree = draw(config_trees())
    try:
        text = yaml.safe_dump(tree, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.booleans()))
    except yaml.YAMLError:  # something PyYAML cannot write (rare): a document of its repr instead
        text = repr(tree)
    data = text.encode("utf-8", "surrogatepass")
    edit = draw(st.integers(0, 5))
    at = draw(st.integers(0, len(data)))
    if edit == 1:  # a span cut out
        data = data[:at] + data[at + draw(st.integers(1, 20)):]
    elif edit == 2:  # characters pasted in
        data = data[:at] + draw(st.text(max_size=6)).encode() + data[at:]
    elif edit == 3:  # a byte that is not UTF-8
        data = data[:at] + bytes([draw(BAD_UTF8)]) + data[at:]
    return data, tree


def names_config_place(message: str, path: Path, tree: dict) -> bool:
    """Whether a ConfigError says where: the file, or a key of a section the document sets."""
    return str(path.parent) in message or any(
        f"{s}." in message for s in tree if isinstance(s, str) and s in FIELD_TYPES)


@fuzz(250)
@given(doc=config_documents())
def test_yaml_files_give_a_config_or_a_config_error_naming_where(fuzz_dir, doc):
    data, tree = doc
    path = fuzz_dir / "config.yaml"
    path.write_bytes(data)
    note(data.decode("utf-8", "replace"))
    with no_hang(data):
        try:
            cfg, error = load_config(path), None
        except ConfigError as e:
            cfg, error = None, e
    if error is None:
        assert isinstance(cfg, Config)
        event("valid Config")
    else:
        assert names_config_place(str(error), path, tree), str(error)
        event("ConfigError naming the file" if str(path.parent) in str(error) else "ConfigError naming a key")
    TOTALS["yaml documents"] += 1
    TOTALS["yaml valid" if error is None else "yaml ConfigError"] += 1


@st.composite
def overrides(draw) -> tuple[list[str], dict]:
    """CLI ``key=value`` strings and keyword overrides (``section__field``): mostly real keys."""
    keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: k + ".x"),
                     st.sampled_from(sorted(FIELD_TYPES)), st.text(max_size=10))
    cli = []
    for key in draw(st.lists(keys, max_size=3)):
        tp = _field_type(key)
        if draw(st.booleans()):
            value = draw(values_for(tp))
            try:
                raw = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n")
            except yaml.YAMLError:
                raw = repr(value)
        else:
            raw = draw(st.text(max_size=20))
        cli.append(f"{key}={raw.strip()}" if draw(st.integers(0, 9)) else key)
    plausible = draw(st.booleans())
    kw = {}
    for k in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        section, field = k.split(".")
        kw[f"{section}__{field}"] = draw(values_near_default(section, field) if plausible
                                         else values_for(_field_type(k)))
    return ([] if plausible else cli), kw


def _field_type(key: str):
    section, _, field = key.partition(".")
    return FIELD_TYPES.get(section, {}).get(field)


def _expected(value, tp):
    """What a keyword override's value becomes in the Config (lists -> tuples, numbers -> float)."""
    if tp is float or (typing.get_origin(tp) is not None and float in typing.get_args(tp) and value is not None):
        return float(value)
    if isinstance(value, list):
        return tuple(_expected(v, None) for v in value)
    return value


@fuzz(250)
@given(case=overrides())
def test_overrides_give_a_config_or_a_config_error_naming_the_key(case):
    cli, kw = case
    with no_hang(case):
        try:
            cfg, error = load_config("configs/base.yaml", cli, **kw), None
        except ConfigError as e:
            cfg, error = None, e
    keys = [c.split("=", 1)[0].strip() for c in cli] + [k.replace("__", ".") for k in kw]
    if error is not None:
        message = str(error)
        sections = {k.split(".")[0] for k in keys} & FIELD_TYPES.keys()
        assert "override" in message or any(f"{s}." in message for s in sections), message
        event("ConfigError")
        TOTALS.update({"override sets": 1, "override ConfigError": 1})
        return
    event("valid Config")
    tree = cfg.to_dict()
    for k, value in kw.items():  # every override given is applied, none dropped
        section, field = k.split("__", 1)
        assert tree[section][field] == _expected(value, FIELD_TYPES[section][field]), k
    TOTALS.update({"override sets": 1, "override valid": 1, "keyword overrides checked as applied": len(kw)})


def test_config_edge_cases_found_by_the_drill(fuzz_dir):
    """Inputs the drill found raising another exception, hanging or passing unchecked (now ConfigErrors)."""
    alias_bomb = "a0: &a0 {x: 1}\n" + "".join(  # 10**8 leaves through aliases: the merge walked them all
        f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(10)) + "}\n" for i in range(1, 9))
    cases = {
        alias_bomb: "unknown config key 'a0' (from",
        "include: 3\n": "include: expected a file name",
        "1: 2\nfoo: 3\n": "unknown config key 1 (from",
        "model: &a {d_model: *a}\n": "model.d_model: expected an integer",
        "a: " + "[" * 5000 + "]" * 5000 + "\n": "nested too deeply",
        "optim: {learning_rate: .nan}\n": "optim.learning_rate: expected a finite number",
        "optim: {learning_rate: 1" + "0" * 400 + "}\n": "optim.learning_rate: expected a finite number",
        "model: {d_model: 1" + "0" * 30 + "}\n": "model.d_model: 1000000000000000000000000000000 is outside the 64-bit",
        "optim: {learning_rate: 1" + "0" * 5000 + "}\n": "Exceeds the limit",
        "include: /nonexistent/x.yaml\n": "config file not found: /nonexistent/x.yaml (included from",
    }
    path = fuzz_dir / "edge.yaml"
    for text, message in cases.items():
        path.write_text(text)
        with no_hang(text), pytest.raises(ConfigError) as info:
            load_config(path)
        assert message in str(info.value) and names_config_place(str(info.value), path, {}), str(info.value)
    path.write_bytes(b"model:\n  d_model: \xff\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: not valid UTF-8")):
        load_config(path)
    with no_hang("a long run of digits"), pytest.raises(ConfigError, match="optim.learning_rate: expected a number"):
        load_config("configs/base.yaml", optim__learning_rate="1" * 200_000 + "x")  # quadratic regex before
    with pytest.raises(ConfigError, match=re.escape("override '.': an empty name")):
        load_config("configs/base.yaml", [".="])
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'foo' (from override)")):
        load_config("configs/base.yaml", ["foo.bar=1"])


# ============================================================================================ (c) tokenizers

BYTES = build_char_tokenizer()


@pytest.fixture(scope="module")
def bpe(fuzz_dir) -> Tokenizer:
    texts = [t["text"] for e in synthetic_episodes(200) for t in e["turns"]]
    texts += ["héllo wörld ☃ 日本語 🙂\r\n\t"] * 3
    return train_bpe_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def bpe_hf_dir(bpe, fuzz_dir) -> Tokenizer:
    save_tokenizer(bpe, fuzz_dir / "bpe_hf")
    return load_tokenizer(fuzz_dir / "bpe_hf")


ANY_TEXT = st.one_of(st.text(), st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Co"])),
                     st.sampled_from(["<eot>", "<bos>text<eos>", "<pad>", " " * 5, "\r\n", "\x00"]))


@fuzz(400)
@given(text=ANY_TEXT)
def test_byte_tokenizer_round_trips_any_text(text):
    ids = BYTES.encode_batch([text])[0]
    assert ids.tolist() == [4 + b for b in text.encode()]  # one id per UTF-8 byte, never a special token
    assert BYTES.decode(ids) == text
    TOTALS["byte tokenizer texts"] += 1


@fuzz(300)
@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=4))
def test_task_bpe_tokenizer_round_trips_any_text(bpe, bpe_hf_dir, texts):
    """train_bpe_tokenizer claims any text round-trips; so must the HF tokenizer directory written from it."""
    specials = {bpe.bos_id, bpe.eos_id, bpe.eot_id, bpe.pad_id}
    for tok in (bpe, bpe_hf_dir):
        for text, ids in zip(texts, tok.encode_batch(texts)):
            assert not specials & set(ids.tolist())
            assert tok.decode(ids) == text
    TOTALS["bpe texts (each through both)"] += len(texts)


@pytest.mark.parametrize("target", ["tokenizer.json", "hf_dir/tokenizer_config.json"])
@fuzz(40)
@given(cut=st.integers(0, 100_000), at=st.integers(0, 100_000), junk=st.binary(min_size=1, max_size=6),
       mode=st.sampled_from(["cut", "insert", "replace"]))
def test_broken_tokenizer_files_raise_errors_naming_the_file(bpe, fuzz_dir, target, cut, at, junk, mode):
    """A tokenizer.json, or the tokenizer_config.json of a HF tokenizer directory, with bytes cut, inserted or
    replaced: a Tokenizer, or a ValueError naming the file (the directory)."""
    hf_dir = fuzz_dir / "hf_dir"
    if not hf_dir.is_dir():
        save_tokenizer(bpe, hf_dir)
    path = fuzz_dir / target
    good = (bpe.backend.to_str().encode() if target == "tokenizer.json"
            else (hf_dir / "tokenizer_config.json").read_bytes())
    at, cut = at % len(good), cut % len(good)
    data = {"cut": good[:cut], "insert": good[:at] + junk + good[at:],
            "replace": good[:at] + junk + good[at + len(junk):]}[mode]
    path.write_bytes(data)
    where = path if target == "tokenizer.json" else hf_dir
    try:
        with no_hang(data[:200]):
            try:
                tok = load_tokenizer(where)
            except ValueError as e:
                assert str(where) in str(e), str(e)
                event("ValueError naming the file")
                TOTALS["tokenizer files refused"] += 1
                return
        assert isinstance(tok, Tokenizer)
        event("loaded (the edit left a valid tokenizer)")
        TOTALS["tokenizer files loaded"] += 1
    finally:
        if target != "tokenizer.json":
            path.write_bytes(good)


# ============================================================================================ (d) environments

HUGE = st.integers(1_000, 1_000_000).flatmap(lambda n: st.sampled_from(["a" * n, "go " + "9" * n, "i can do " + "5" * n,
                                                                       " " * n + "move up", "\x00" * n]))
ACTION_TEXT = st.one_of(st.text(), st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"])), st.just(""),
                        HUGE)


def valid_actions(task: str, env) -> list[str]:
    """Action texts the task's grammar accepts (whether or not legal in the state)."""
    if task == "grid":
        return [f"go {n}" for n in range(env.graph.num_nodes + 2)]
    if task in ("maze", "maze_po"):
        return list(maze.MOVES)
    if task == "wordle":
        return env.words.guesses[::97]
    if task == "twenty_questions":
        return list(twenty_questions.QUESTIONS) + [twenty_questions.guess_text(o) for o in twenty_questions.OBJECTS]
    if task == "negotiation":
        return [negotiation.DEAL, negotiation.NO_DEAL] + [negotiation.ask_text(p) for p in range(0, 110, 5)]
    if task == "dialogue":
        return list(dialogue.UTTERANCES)
    if task == "endgames":
        return sorted(chess_endgames.san_moves(env.board))
    raise KeyError(task)


def spelled(action: str) -> st.SearchStrategy:
    """Ways of writing a valid action: as is, other case, surrounding whitespace, a trailing mark, pasted junk."""
    return st.one_of(st.just(action), st.just(action.upper()), st.just(f"  {action}\n"), st.just(action + "+"),
                     st.text(max_size=3).map(lambda junk: action + junk))


def well_formed(task: str, env, action: str) -> bool:
    """Whether ``action`` is a move in the task's grammar, as its module docstring words it (every other text
    must be a penalised move)."""
    text = action.strip()
    if task == "grid":  # "go N" for any node, legal or not (Python's \d: digits of any script)
        return re.fullmatch(r"go \d{1,4}", text) is not None
    if task in ("maze", "maze_po"):  # case matters
        return text in maze.MOVES
    if task == "wordle":
        return text.lower() in env.words.allowed
    if task == "twenty_questions":  # either article
        guess = re.fullmatch(r"is it an? ([a-z]+)\?", text.lower())
        return text.lower() in twenty_questions.QUESTIONS or bool(guess and guess[1] in twenty_questions.CATALOGUE)
    if task == "negotiation":
        ask = re.fullmatch(r"i can do ([1-9][0-9]{0,2})", text.lower())
        return text.lower() in (negotiation.DEAL, negotiation.NO_DEAL) or bool(ask and int(ask[1]) <= 100)
    if task == "dialogue":
        return text.lower() in dialogue.UTTERANCES
    if task == "endgames":  # one trailing check or mate mark is ignored
        return (text[:-1] if text.endswith(("+", "#")) else text) in chess_endgames.san_moves(env.board)
    raise KeyError(task)


_ENVS: dict = {}


def run_env_drill(task: str, seed: int, data) -> None:
    env = _ENVS.setdefault(task, envs.make_env(task))
    observation = env.reset(seed)
    assert isinstance(observation, str)
    for step in range(data.draw(st.integers(1, 6), label="steps")):
        action = data.draw(st.one_of(ACTION_TEXT, st.sampled_from(valid_actions(task, env)).flatmap(spelled)),
                           label=f"action {step}")
        legal_text = well_formed(task, env, action)
        with no_hang((task, action)):
            out = env.step(action)
        assert isinstance(out, tuple) and len(out) == 3, out
        observation, reward, done = out
        assert isinstance(observation, str) and type(reward) is float and math.isfinite(reward), out
        assert type(done) is bool, out
        if not legal_text:
            assert reward < 0, f"malformed action {action[:80]!r} was not penalised: {out}"
        event("well-formed action" if legal_text else "malformed action (penalised)")
        TOTALS.update({f"{task} steps": 1, f"{task} malformed steps": int(not legal_text)})
        if done:
            event("episode ended")
            env.reset(seed + step + 1)


@pytest.mark.parametrize("task", [t for t in envs.task_names() if t != "endgames"])
@fuzz(120)
@given(seed=st.integers(0, 10**6), data=st.data())
def test_env_step_takes_any_action_text(task, seed, data):
    run_env_drill(task, seed, data)


@fuzz(15)  # every legal move waits for Stockfish's reply
@given(seed=st.integers(0, 10**6), data=st.data())
def test_chess_endgames_step_takes_any_action_text(seed, data):
    run_env_drill("endgames", seed, data)
