"""Episode schema validation: every rule's message names file, line and field; skip mode counts every line."""

import json

import pytest

from jaxrl_lm.data import EpisodeError, parse_episode, read_jsonl, synthetic_episodes, write_jsonl

GOOD = {"id": "ep-0", "turns": [{"role": "observation", "text": "at 1"},
                                {"role": "action", "text": "go 2", "reward": -1.0}], "done": True}


def _line(**changes) -> str:
    ep = json.loads(json.dumps(GOOD))
    ep.update(changes)
    return json.dumps(ep)


def _turns(*turns) -> str:
    return _line(id="ep-bad", turns=list(turns))


OBS = {"role": "observation", "text": "x"}
ACT = {"role": "action", "text": "y"}

# (bad line, field named in the message, words of the reason)
CASES = {
    "malformed json": ('{"id": "ep-bad", "turns": [', "json", "not valid JSON"),
    "not an object": ("[1, 2]", "episode", "JSON object"),
    "unknown role": (_turns(OBS, {"role": "agent", "text": "y"}), "turns[1].role", "unknown role 'agent'"),
    "missing text": (_turns({"role": "observation"}, ACT), "turns[0].text", "missing"),
    "text not a string": (_turns(OBS, {"role": "action", "text": 3}), "turns[1].text", "must be a string"),
    "nan reward": (_turns(OBS, {**ACT, "reward": float("nan")}), "turns[1].reward", "finite"),
    "infinite reward": (_turns(OBS, {**ACT, "reward": float("inf")}), "turns[1].reward", "finite"),
    "reward not a number": (_turns(OBS, {**ACT, "reward": "1"}), "turns[1].reward", "must be a number"),
    "reward on observation": (_turns({**OBS, "reward": 1.0}, ACT), "turns[0].reward", "observation turns"),
    "no action turn": (_turns(OBS, OBS), "turns", "no action turn"),
    "empty turns": (_turns(), "turns", "non-empty list"),
    "duplicate id": (_line(), "id", "duplicate id 'ep-0', first seen at"),
    "missing done": (json.dumps({"id": "ep-bad", "turns": [ACT]}), "done", "true (terminal) or false"),
    "bad id": (_line(id=""), "id", "non-empty string"),
    "unknown turn key": (_turns(OBS, {**ACT, "rewrd": 1.0}), "turns[1].rewrd", "unknown key"),
    "unknown episode key": (_line(id="ep-bad", dne=True), "dne", "unknown key"),
    "meta not an object": (_line(id="ep-bad", meta=[1]), "meta", "must be an object"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_strict_mode_names_file_line_field(tmp_path, name):
    bad, field, reason = CASES[name]
    path = tmp_path / "eps.jsonl"
    path.write_text(_line() + "\n\n" + bad + "\n")  # the bad episode sits on line 3, after a blank line
    with pytest.raises(EpisodeError) as info:
        read_jsonl(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: {field}: ")
    assert reason in err.reason


def test_skip_mode_reports_and_counts_every_rejected_line(tmp_path):
    good = synthetic_episodes(5, seed=1)
    lines = [_line()] + [json.dumps(e) for e in good]  # ep-0 first, so the "duplicate id" case duplicates it
    bad_at = {}
    for name in sorted(CASES):
        bad, field, _ = CASES[name]
        lines.append(bad)
        bad_at[len(lines)] = field
    lines.append(json.dumps(synthetic_episodes(6, seed=1)[5]))
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    episodes, rejected = read_jsonl(path, skip_invalid=True)
    assert [e.id for e in episodes] == ["ep-0"] + [e["id"] for e in synthetic_episodes(6, seed=1)]
    assert len(rejected) == len(CASES)
    assert {r.line: r.field for r in rejected} == bad_at
    assert all(str(r).startswith(f"{path}:{r.line}: {r.field}: ") for r in rejected)


def test_valid_episode_parses_with_defaults_and_meta():
    ep = parse_episode({"id": "a", "turns": [OBS, ACT], "done": False, "meta": {"k": [1]}}, path="f", line=7)
    assert ep.turns[1].reward == 0.0 and ep.done is False and ep.meta == {"k": [1]} and ep.source == "f:7"


def test_write_then_read_round_trips(tmp_path):
    eps = synthetic_episodes(10, seed=3)
    write_jsonl(tmp_path / "a.jsonl", eps)
    back, rejected = read_jsonl(tmp_path / "a.jsonl")
    assert not rejected
    write_jsonl(tmp_path / "b.jsonl", back)  # Episode objects write back to the same lines
    lines = [(tmp_path / n).read_text().splitlines() for n in ("a.jsonl", "b.jsonl")]
    assert [json.loads(x) for x in lines[0]] == [json.loads(x) for x in lines[1]]
