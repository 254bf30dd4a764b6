"""Vocabulary trimming (``jaxrl_lm.data.vocab_trim``, ``jaxrl_lm.interop.vocab_trim``, ``scripts/import_hf.py
--trim-vocab``): the kept texts tokenize exactly as before, any other text still round-trips, and the trimmed
model's LM and Q logits are the old ones at the kept ids. (SmolLM2 itself: ``tests/test_hf.py``, slow.)
"""

import json

import numpy as np
import pytest
import tokenizers
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from tokenizers import models

from jaxrl_lm.data.tokenizer import Tokenizer, train_bpe_tokenizer
from jaxrl_lm.data.vocab_trim import trim_bpe
from jaxrl_lm.config import DataConfig
from jaxrl_lm.envs import vocabulary_texts
from jaxrl_lm.interop import config_from_hf, export_hf, params_from_hf, trim_hf_vocab
from helpers import engine_forward
from script_loader import load_script

WORDS = ("animal", "animals", "plugged", "plug", "metal", "metallic", "water", "waterfall", "bigger", "biggest",
         "person", "personal", "elephant", "eagle", "salmon", "whale", "kettle", "kitten", "home", "homes")
# Word pairs and triples, so that BPE learns merges several levels deep (intermediate tokens the closure keeps).
CORPUS = [f"is it {a} or {b}? {c}" for a in WORDS for b in WORDS for c in ("yes", "no") if a != b]
KEPT_TEXTS = ["is it an animal?", "yes", "no", "is it plugged in?", "is it a kitten?", "guess the object"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe_tokenizer(CORPUS, vocab_size=420)


def test_kept_texts_tokenize_exactly_as_before(bpe):
    trimmed, kept = trim_bpe(bpe.backend, KEPT_TEXTS)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)  # old order, no duplicates
    assert trimmed.get_vocab_size(with_added_tokens=True) == kept.size < bpe.vocab_size
    old = bpe.backend.encode_batch(KEPT_TEXTS, add_special_tokens=False)
    new = trimmed.encode_batch(KEPT_TEXTS, add_special_tokens=False)
    for text, o, n in zip(KEPT_TEXTS, old, new):
        assert kept[n.ids].tolist() == o.ids, text
    # The texts need merges whose results they never show (the closure): "plugged" is built through "plug".
    assert max(len(bpe.backend.id_to_token(i)) for o in old for i in o.ids) >= 5
    for role in ("<pad>", "<bos>", "<eos>", "<eot>"):  # special tokens keep their strings under new ids
        assert trimmed.id_to_token(int(np.searchsorted(kept, bpe.backend.token_to_id(role)))) == role


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40))
def test_any_text_still_round_trips(text):
    tok = train_bpe_tokenizer(CORPUS[:200], vocab_size=330)
    trimmed, _ = trim_bpe(tok.backend, KEPT_TEXTS)
    assert trimmed.decode(trimmed.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_refuses_a_tokenizer_that_is_not_bpe():
    wordlevel = tokenizers.Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="supports BPE tokenizers, not 'WordLevel'"):
        trim_bpe(wordlevel, ["a"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_trimmed_model_gives_the_old_logits_at_the_kept_ids(bpe, tmp_path, kind):
    """Untied Llama (embedding and LM head both trimmed) and tied GPT-2, Q-heads initialised from the LM head."""
    common = dict(vocab_size=bpe.vocab_size, bos_token_id=bpe.bos_id, eos_token_id=bpe.eos_id,
                  pad_token_id=bpe.pad_id)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
    else:
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=False, **common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    tensors = load_file(tmp_path / "model.safetensors")

    small_config, small_tensors, trimmed, kept = trim_hf_vocab(hf_config, tensors, bpe.backend, KEPT_TEXTS)
    assert small_config["vocab_size"] == kept.size and hf_config["vocab_size"] == bpe.vocab_size  # input untouched
    for key, tid in (("bos_token_id", bpe.bos_id), ("eos_token_id", bpe.eos_id), ("pad_token_id", bpe.pad_id)):
        assert kept[small_config[key]] == tid

    # A transcript as the episode layout writes one: each turn's text encoded alone.
    turns = ["guess the object", "is it an animal?", "yes", "is it plugged in?", "no", "is it a kitten?"]
    old_ids = np.concatenate(bpe.encode_batch(turns))[None]
    new_ids = np.asarray([sum((e.ids for e in trimmed.encode_batch(turns, add_special_tokens=False)), [])],
                         dtype=np.int32)
    assert np.array_equal(kept[new_ids], old_ids)
    heads = dict(q_head="linear", n_q_heads=2, vocab_pad_multiple=1)
    cfg = config_from_hf(hf_config, "full", **heads)
    small_cfg = config_from_hf(small_config, "trimmed", **heads)
    lm, q, _ = engine_forward(cfg)(params_from_hf(cfg, tensors, q_init="lm_head"), old_ids)
    small_params = params_from_hf(small_cfg, small_tensors, q_init="lm_head")
    small_lm, small_q, _ = engine_forward(small_cfg)(small_params, new_ids)
    np.testing.assert_allclose(small_lm, lm[..., kept], atol=1e-5, rtol=0)
    np.testing.assert_allclose(small_q, q[..., kept], atol=1e-5, rtol=0)
    assert small_q.shape[-1] == kept.size < q.shape[-1]

    # Exported, it is a plain causal LM of kept.size tokens whose tokenizer transformers loads.
    out = export_hf(small_params, small_cfg, tmp_path / "export",
                    tokenizer=Tokenizer(trimmed, specials=bpe.special_tokens, name="trimmed"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(turns[1], add_special_tokens=False).input_ids == trimmed.encode(turns[1]).ids
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out)(torch.as_tensor(new_ids)).logits.numpy()
    np.testing.assert_allclose(theirs, small_lm, atol=1e-4, rtol=0)


def test_trim_refuses_inconsistent_checkpoints(bpe):
    config = {"vocab_size": bpe.vocab_size, "bos_token_id": bpe.bos_id}
    rows = np.zeros((bpe.vocab_size + 1, 4), np.float32)
    with pytest.raises(ValueError, match=f"model.embed_tokens.weight has {bpe.vocab_size + 1} rows"):
        trim_hf_vocab(config, {"model.embed_tokens.weight": rows}, bpe.backend, KEPT_TEXTS)
    with pytest.raises(ValueError, match="beyond config.json's vocab_size 3"):
        trim_hf_vocab({"vocab_size": 3}, {}, bpe.backend, KEPT_TEXTS)


def test_vocabulary_texts_of_a_task_cover_its_data_starts_and_legal_actions():
    texts = vocabulary_texts(DataConfig(path="task:twenty_questions", task_episodes=20))
    assert texts == sorted(set(texts))
    assert {"guess the object", "is it an animal?", "is it a cat?", "yes", "no"} <= set(texts)
    assert "is it a seaweed?" in texts and "is it a television?" in texts  # legal guesses, in the data or not


def test_import_script_refuses_trimming_a_hugging_face_directory(tmp_path, capsys):
    script = load_script("import_hf")
    assert script.main([str(tmp_path), str(tmp_path / "out"), "--trim-vocab"]) == 1
    assert "--trim-vocab is supported for the SmolLM2 GGUF import (smollm2) only" in capsys.readouterr().err
