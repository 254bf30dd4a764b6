"""JSONL -> TFDS (ArrayRecord, no TensorFlow) -> loader gives exactly the in-memory path's batches."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

from jaxrl_lm.batch import BATCH_FIELDS
from jaxrl_lm.config import DataConfig
from jaxrl_lm.data import (
    EpisodeError,
    Tokenizer,
    build_char_tokenizer,
    build_dataset,
    find_dataset_dir,
    make_loader,
    open_dataset,
    synthetic_episodes,
    write_jsonl,
)
from script_loader import load_script

TOK = build_char_tokenizer()


def _make_dataset_main():
    return load_script("build_tfds_dataset").main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A JSONL with 60 episodes (some cut at seq_len 64) and one bad line, built by scripts/build_tfds_dataset.py."""
    root = tmp_path_factory.mktemp("tfds")
    jsonl = root / "eps.jsonl"
    write_jsonl(jsonl, synthetic_episodes(60, seed=5))
    with open(jsonl, "a") as f:
        f.write('{"id": "broken"\n')
    rc = _make_dataset_main()([str(jsonl), "--out", str(root / "out"), "--seq-len", "64", "--skip-invalid"])
    assert rc == 0
    return jsonl, root / "out"


def test_script_prints_statistics(built, capsys):
    jsonl, out = built
    rc = _make_dataset_main()([str(jsonl), "--out", str(out), "--seq-len", "64", "--skip-invalid", "--overwrite"])
    printed = capsys.readouterr()
    assert rc == 0
    assert f"rejected {jsonl}:61: json: not valid JSON" in printed.err
    summary = json.loads(printed.out[printed.out.index("{"):])
    assert summary["episodes"] == 60 and summary["rejected"] == 1 and summary["truncated"] > 0
    assert summary["windows"] > 60  # long episodes were split into windows of whole turns
    assert set(summary["return"]) == {"mean", "min", "max", "q05", "q25", "q50", "q75", "q95"}
    assert 0 < summary["action_token_fraction"] < 1


def test_records_readable_with_plain_tfds(built):
    jsonl, out = built
    path = find_dataset_dir(out)
    source = tfds.builder_from_directory(str(path)).as_data_source("train")
    by_name = tfds.data_source("jaxrl_episodes", data_dir=str(out), split="train")
    assert len(source) == len(by_name) > 60  # one record per window
    assert len({r["id"].split(b"/")[0] for r in source}) == 60
    first = source[0]
    assert first["id"] == b"syn-5-0" and first["tokens"][0] == TOK.bos_id
    assert json.loads(first["meta"]) == {"seed": 5}


@pytest.mark.parametrize("pack", [True, False])
def test_round_trip_gives_the_in_memory_batches(built, pack):
    jsonl, out = built
    common = dict(seq_len=64, batch_size=4, seed=1, pack=pack, skip_invalid=True)
    from_jsonl = make_loader(DataConfig(path=str(jsonl), **common), tokenizer=TOK)
    from_tfds = make_loader(DataConfig(path=str(out), **common), tokenizer=TOK)
    for _ in range(40):  # more than one epoch
        a, b = next(from_jsonl), next(from_tfds)
        for k in BATCH_FIELDS:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
            assert a[k].dtype == b[k].dtype == BATCH_FIELDS[k]
    assert from_tfds.summary == json.loads(json.dumps(from_jsonl.summary))


def test_mismatched_settings_are_refused(built):
    _, out = built
    with pytest.raises(ValueError, match="data.seq_len"):
        make_loader(DataConfig(path=str(out), seq_len=128), tokenizer=TOK)
    with pytest.raises(ValueError, match="data.truncate_side"):
        make_loader(DataConfig(path=str(out), seq_len=64, truncate_side="right"), tokenizer=TOK)
    backend = tokenizers.Tokenizer.from_str(TOK.backend.to_str())
    backend.add_tokens(["<tool>"])
    other = Tokenizer(backend, specials=TOK.special_tokens, name="extended")
    with pytest.raises(ValueError, match="data.tokenizer"):
        make_loader(DataConfig(path=str(out), seq_len=64), tokenizer=other)
    _, meta = open_dataset(out)
    assert meta["tokenizer"]["fingerprint"] == TOK.fingerprint and meta["seq_len"] == 64


def test_strict_build_stops_at_the_bad_line_and_existing_dataset_is_kept(built, tmp_path):
    jsonl, out = built
    with pytest.raises(EpisodeError, match=r"eps.jsonl:61: json"):
        build_dataset(jsonl, tmp_path / "strict", tokenizer=TOK, seq_len=64)
    with pytest.raises(FileNotFoundError):
        find_dataset_dir(tmp_path / "strict")
    with pytest.raises(FileExistsError, match="overwrite"):
        build_dataset(jsonl, out, tokenizer=TOK, seq_len=64, skip_invalid=True)
    (tmp_path / "bad.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"no usable episode \(1 rejected lines.*bad.jsonl:1: turns"):
        build_dataset(tmp_path / "bad.jsonl", tmp_path / "empty", tokenizer=TOK, seq_len=64, skip_invalid=True)
