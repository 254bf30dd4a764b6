"""A trained model as an environment policy: ``load_policy(...)`` returns a ``ModelPolicy``, an
``act(transcripts)`` that decodes each episode's next action with the model (any ``envs.Policy`` can play a task;
this is the one backed by a checkpoint or parameters).

    policy = load_policy("runs/maze", kind="ilql", beta=4.0)
    actions = policy(transcripts)                    # list[str] -> list[str], one action text per episode

The prompt of an episode is laid out exactly as the data pipeline lays out the same episode prefix
(``jaxrl_lm.data.convert``): ``[BOS] w_0 [EOT] w_1 [EOT] ... w_n [EOT]``, ``w_k`` the ids of turn ``k``'s text
encoded alone, so the model sees at decision time what it was trained on. The turns come from the transcript:
its ``turns`` attribute (turn texts, or turn dicts with ``"text"``) when it carries one, else the rendered
string split at its newlines (``envs.render_transcript`` ends every turn with one; a turn whose text holds a
newline cannot be recovered from the string alone). Turns alternate observation, action, ... from an
observation, and a prompt that does not fit the context (or holds more than ``max_turns`` turns) keeps the most
recent whole turns from an observation on, as the data pipeline's windows do (``truncate_side: split``); only
when not even the last observation fits does it keep BOS and that turn's last tokens. A model trained with
``model.context: observation`` reads the latest observation alone, as in training: its prompt is ``w_n [EOT]``,
without BOS (``jaxrl_lm.batch.observation_windows``).

The action is the decoded turn up to its EOT (or the token budget). Special tokens other than the stop tokens
(BOS, PAD) are never sampled, so every action is plain text that encodes back to the tokens the model chose
(up to the tokenizer's own merge choices).

Legal actions (``actions=``): a policy may be held to a set of action texts, fixed (``actions=["crane", ...]``,
compiled once) or per episode and call (``actions=fn``, ``fn(transcript) -> texts or None``, e.g.
``jaxrl_lm.envs.base.transcript_legal_actions``, which asks the episode's env; or ``policy(transcripts,
actions=[...])``, one set or None per transcript). Each set becomes a token trie
(``jaxrl_lm.data.action_trie``, compiled once per distinct set and cached) and the decoder masks every step to
it, so the policy's scores (bc, ilql, q) and best-of-N are computed on the legal continuations only, and every
constrained action is exactly one of the texts. A set holding an action longer than the token budget, or a token
outside ``allowed_tokens``, is refused with an error that names it.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_lm.checkpoints import RUN_TOKENIZER, load_params, run_dir, run_seeds
from jaxrl_lm.config import Config, ModelConfig
from jaxrl_lm.data.action_trie import ActionTrie, compile_action_trie, pack_tries
from jaxrl_lm.data.tokenizer import Tokenizer, build_char_tokenizer, load_tokenizer
from jaxrl_lm.generate import DecodeSpec, Sampling, bucket, decode
from jaxrl_lm.models import Params, model_graphdef
from jaxrl_lm.rl.policy_extraction import TrieArrays

# Prompt widths and batch sizes are padded to powers of two at least this large (fewer compiled shapes).
MIN_PROMPT_BUCKET = 16
MIN_BATCH_BUCKET = 8
# Compiled action tries kept per policy (least recently used dropped): a chess game's positions each have a set.
TRIE_CACHE_SIZE = 4096

# A fixed action set, or a function of the transcript giving its set (None: that episode is unconstrained).
ActionSource = Union[Sequence[str], Callable[[str], Optional[Sequence[str]]]]


def transcript_turns(transcript: str) -> list[str]:
    """The turn texts of a transcript (module docstring): its ``turns`` attribute, else its lines."""
    turns = getattr(transcript, "turns", None)
    if turns is not None:
        return [t["text"] if isinstance(t, dict) else str(t) for t in turns]
    if not transcript.endswith("\n"):
        raise ValueError(f"transcript {transcript[-40:]!r} does not end with a newline: lay transcripts out with "
                         f"jaxrl_lm.envs.render_transcript (every turn's text followed by a newline)")
    return transcript[:-1].split("\n")


def prompt_tokens(turns: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """``[BOS] w_0 [EOT] ... w_n [EOT]`` for the turn texts ``turns``. Returns ``[1 + sum_k (n_k + 1)] int32``."""
    return _layout(tokenizer.encode_batch(list(turns)), tokenizer)


def _layout(turn_ids: Sequence[np.ndarray], tokenizer: Tokenizer) -> np.ndarray:
    return np.concatenate([[tokenizer.bos_id]] + [np.append(w, tokenizer.eot_id) for w in turn_ids]).astype(np.int32)


def window_prompt(turns: Sequence[str], tokenizer: Tokenizer, max_len: int,
                  max_turns: Optional[int] = None) -> np.ndarray:
    """The prompt of the most recent whole turns that fit (module docstring). Returns ``[n <= max_len] int32``.

    ``turns`` alternate observation / action from an observation at index 0, so a window starts at an even index.
    """
    turn_ids = tokenizer.encode_batch(list(turns))
    lengths = np.array([len(w) + 1 for w in turn_ids], np.int64)
    suffix_tokens = 1 + np.cumsum(lengths[::-1])[::-1]  # [BOS] + turns k.. for each k
    starts = [k for k in range(0, len(turns), 2)
              if suffix_tokens[k] <= max_len and (max_turns is None or len(turns) - k <= max_turns)]
    if starts:
        return _layout(turn_ids[starts[0]:], tokenizer)
    return truncate_left(_layout(turn_ids[-1:], tokenizer), max_len)


def observation_prompt(turns: Sequence[str], tokenizer: Tokenizer, max_len: int) -> np.ndarray:
    """``w_n [EOT]``, the latest turn alone without BOS (``model.context: observation``). ``[n <= max_len] int32``."""
    tokens = np.append(tokenizer.encode_batch([turns[-1]])[0], tokenizer.eot_id).astype(np.int32)
    if len(tokens) > max_len:
        raise ValueError(f"the observation {turns[-1][:40]!r}... is {len(tokens)} tokens, more than the "
                         f"{max_len}-token prompt budget of this policy (context_len - max_new_tokens)")
    return tokens


def truncate_left(tokens: np.ndarray, max_len: int) -> np.ndarray:
    """BOS plus the last ``max_len - 1`` tokens when ``tokens`` is longer than ``max_len`` (data layout "left")."""
    if len(tokens) <= max_len:
        return tokens
    return np.concatenate([tokens[:1], tokens[len(tokens) - (max_len - 1):]])


def sampling_mask(tokenizer: Tokenizer, vocab_size: int, padded_vocab: int,
                  allowed_tokens: Optional[Sequence[int]]) -> np.ndarray:
    """``[Vp]`` bool: the ids a turn may contain. ``allowed_tokens`` (or every real id) minus BOS and PAD, plus
    the stop ids (EOT, EOS), which end a turn and must always be reachable."""
    mask = np.zeros(padded_vocab, bool)
    if allowed_tokens is None:
        mask[:vocab_size] = True
    else:
        mask[np.asarray(allowed_tokens, np.int64)] = True
    mask[[tokenizer.bos_id, tokenizer.pad_id]] = False
    mask[stop_ids(tokenizer)] = True
    return mask


def stop_ids(tokenizer: Tokenizer) -> np.ndarray:
    """``[S] int32``: EOT ends an agent turn in the data layout; EOS is honoured too (a model from a chat
    checkpoint may still use it)."""
    return np.unique(np.array([tokenizer.eot_id, tokenizer.eos_id], np.int32))


class ModelPolicy:
    """``act(transcripts) -> actions`` with a ``QTransformer`` (module docstring); instances are callable.

    Attributes:
      cfg: the ``ModelConfig``. params: the parameter dict. tokenizer: the data pipeline's tokenizer.
      spec, sampling: the decoding knobs (``jaxrl_lm.generate``).
      max_prompt_len: longest prompt kept (``context_len - max_new_tokens``).
      max_turns: most turns of history a prompt keeps (None = as many whole turns as fit).
      actions: the legal action texts (a tuple), a function of the transcript giving them, or None
        (unconstrained); module docstring.
    """

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer: Tokenizer, *, spec: DecodeSpec,
                 sampling: Sampling, context_len: int, seed: int = 0,
                 allowed_tokens: Optional[Sequence[int]] = None, max_turns: Optional[int] = None,
                 actions: Optional[ActionSource] = None):
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but model.vocab_size is "
                             f"{cfg.vocab_size}: load the tokenizer the model was trained with (data.tokenizer)")
        if context_len > cfg.max_seq_len:
            raise ValueError(f"context_len {context_len} exceeds model.max_seq_len {cfg.max_seq_len}")
        if max_turns is not None and max_turns < 1:
            raise ValueError(f"max_turns must be >= 1 (or None = as many as fit), got {max_turns}")
        if cfg.context == "observation" and max_turns not in (None, 1):
            raise ValueError(f"max_turns {max_turns}: a model with context 'observation' reads the latest "
                             f"observation alone; pass max_turns=None or 1")
        self.max_turns = max_turns
        self.max_prompt_len = context_len - spec.max_new_tokens
        if self.max_prompt_len < 2:
            raise ValueError(f"max_new_tokens {spec.max_new_tokens} leaves no room for a prompt in the "
                             f"{context_len}-token context; lower it below {context_len - 1}")
        self.cfg, self.params, self.tokenizer, self.spec, self.sampling = cfg, params, tokenizer, spec, sampling
        self.graphdef = model_graphdef(cfg)
        self._allowed = sampling_mask(tokenizer, cfg.vocab_size, cfg.padded_vocab_size, allowed_tokens)
        self.allowed = jnp.asarray(self._allowed)
        self.stop_ids = jnp.asarray(stop_ids(tokenizer))
        self.stop_set = set(stop_ids(tokenizer).tolist())
        self.rng = jax.random.key(seed)
        self.context_len, self.seed, self.allowed_tokens = context_len, seed, allowed_tokens
        self._tries: OrderedDict[tuple[str, ...], ActionTrie] = OrderedDict()
        if isinstance(actions, str):
            raise ValueError(f"actions must be a sequence of action texts or a function, got the string {actions!r}")
        self.actions = actions if actions is None or callable(actions) else tuple(actions)
        if isinstance(self.actions, tuple):
            self.trie(self.actions)  # a fixed set is compiled (and checked) now

    def prompts(self, transcripts: Sequence[str]) -> list[np.ndarray]:
        """Each transcript's prompt tokens, laid out and truncated as the data pipeline would. ``[n_i] int32``."""
        if self.cfg.context == "observation":
            return [observation_prompt(transcript_turns(t), self.tokenizer, self.max_prompt_len) for t in transcripts]
        return [window_prompt(transcript_turns(t), self.tokenizer, self.max_prompt_len, self.max_turns)
                for t in transcripts]

    def batch(self, prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ``[B', P] int32`` prompts and ``[B'] int32`` lengths, ``B'`` and ``P`` bucketed; rows past
        ``len(prompts)`` have length 0 (they only pad the batch)."""
        width = min(bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET), self.max_prompt_len)
        rows = bucket(len(prompts), MIN_BATCH_BUCKET)
        tokens = np.full((rows, width), self.tokenizer.pad_id, np.int32)
        lengths = np.zeros(rows, np.int32)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = p
            lengths[i] = len(p)
        return tokens, lengths

    def trie(self, actions: tuple[str, ...]) -> ActionTrie:
        """The compiled trie of one action set (cached per policy), checked against the token budget and the
        allowed tokens."""
        trie = self._tries.get(actions)
        if trie is not None:
            self._tries.move_to_end(actions)
            return trie
        trie = compile_action_trie(actions, self.tokenizer)
        if trie.depth > self.spec.max_new_tokens:
            lengths = [len(x) for x in self.tokenizer.encode_batch(list(trie.actions))]
            longest = trie.actions[int(np.argmax(lengths))]
            raise ValueError(f"legal action {longest!r} is {trie.depth} tokens with its EOT, more than the policy's "
                             f"max_new_tokens {self.spec.max_new_tokens}: raise max_new_tokens to at least "
                             f"{trie.depth}")
        refused = trie.tokens[~self._allowed[trie.tokens]]
        if len(refused):
            raise ValueError(f"legal actions use token {int(refused[0])} ({self.tokenizer.decode(refused[:1])!r}), "
                             f"which allowed_tokens excludes: allow every token of the action texts")
        self._tries[actions] = trie
        if len(self._tries) > TRIE_CACHE_SIZE:
            self._tries.popitem(last=False)
        return trie

    def action_sets(self, transcripts: Sequence[str], actions: Optional[Sequence[Optional[Sequence[str]]]] = None
                    ) -> list[Optional[tuple[str, ...]]]:
        """Each transcript's legal action texts, or None (unconstrained): ``actions`` (one entry per transcript)
        when given, else the policy's own ``actions``."""
        if actions is not None:
            if len(actions) != len(transcripts):
                raise ValueError(f"got {len(actions)} action sets for {len(transcripts)} transcripts; pass one set "
                                 f"(or None) per transcript")
            sets = list(actions)
        elif callable(self.actions):
            sets = [self.actions(t) for t in transcripts]
        else:
            sets = [self.actions] * len(transcripts)
        for s in sets:
            if isinstance(s, str):
                raise ValueError(f"an action set must be a sequence of texts, got the string {s!r}")
        return [None if s is None else tuple(s) for s in sets]

    def trie_arrays(self, action_sets: Sequence[Optional[tuple[str, ...]]], rows: int) -> TrieArrays:
        """The decoder's ``TrieArrays`` for ``rows`` batch rows: row ``i < len(action_sets)`` held to its set, the
        others (batch padding, episodes without a set) unconstrained. Each distinct set is stored once."""
        tries: list[ActionTrie] = []
        index: dict[tuple[str, ...], int] = {}
        by_id: dict[int, int] = {}  # the same set object on many rows (a fixed set, Wordle's list) hashes once
        row_trie = np.full(rows, -1, np.int64)
        for i, actions in enumerate(action_sets):
            if actions is None:
                continue
            j = by_id.get(id(actions))
            if j is None:
                j = index.get(actions)
                if j is None:
                    j = index[actions] = len(tries)
                    tries.append(self.trie(actions))
                by_id[id(actions)] = j
            row_trie[i] = j
        return pack_tries(tries, row_trie)

    def decode_prompts(self, prompts: Sequence[np.ndarray],
                       action_sets: Optional[Sequence[Optional[tuple[str, ...]]]] = None) -> list[np.ndarray]:
        """The turn decoded after each prompt, stop token included. ``[m_i] int32``. ``action_sets``: each
        prompt's legal action texts or None (``action_sets``); None: unconstrained."""
        tokens, lengths = self.batch(prompts)
        trie = None
        if action_sets is not None and any(a is not None for a in action_sets):
            trie = self.trie_arrays(action_sets, len(tokens))
        self.rng, key = jax.random.split(self.rng)
        out = decode(self.graphdef, self.params, tokens, lengths, key, self.sampling, self.stop_ids,
                     jnp.int32(self.tokenizer.pad_id), self.allowed, trie, spec=self.spec)
        new, new_lengths = jax.device_get((out.tokens, out.lengths))
        return [new[i, : new_lengths[i]] for i in range(len(prompts))]

    def action_text(self, turn: np.ndarray) -> str:
        """A decoded turn as action text: its tokens before the stop token."""
        if len(turn) and int(turn[-1]) in self.stop_set:
            turn = turn[:-1]
        return self.tokenizer.decode(turn)

    def __call__(self, transcripts: Sequence[str],
                 actions: Optional[Sequence[Optional[Sequence[str]]]] = None) -> list[str]:
        """The next action text of every episode. An empty list in, an empty list out.

        ``actions``: one legal action set (or None) per transcript for this call, in place of the policy's own.
        """
        if not transcripts:
            return []
        turns = self.decode_prompts(self.prompts(transcripts), self.action_sets(transcripts, actions))
        return [self.action_text(t) for t in turns]

    act = __call__

    def with_actions(self, actions: Optional[ActionSource]) -> "ModelPolicy":
        """The same policy (parameters, knobs, seed) held to ``actions`` instead (None: unconstrained)."""
        return ModelPolicy(self.cfg, self.params, self.tokenizer, spec=self.spec, sampling=self.sampling,
                           context_len=self.context_len, seed=self.seed, allowed_tokens=self.allowed_tokens,
                           max_turns=self.max_turns, actions=actions)


def _one_seed(source: str | Path, params: Params, train_seed: Optional[int]) -> Params:
    """The parameters of seed ``train_seed`` of a run that trained several seeds side by side (stacked on a
    leading axis); a one-model run's own parameters. Picking none of several seeds is an error naming them."""
    seeds = run_seeds(source)
    if not seeds:
        if train_seed is not None:
            raise ValueError(f"load_policy: train_seed={train_seed}, but {source} holds one model, not seeds "
                             f"trained side by side")
        return params
    if train_seed not in seeds:
        raise ValueError(f"load_policy: {source} trained the seeds {seeds} side by side (one model each): pass "
                         f"train_seed= one of them" + ("" if train_seed is None else f", not {train_seed}"))
    index = seeds.index(train_seed)
    return jax.tree.map(lambda x: x[index], params)


def load_policy(
    source: str | Path | Params,
    kind: Optional[str] = None,
    *,
    beta: Optional[float] = None,
    temperature: Optional[float] = None,
    top_k: int = 0,
    top_p: float = 1.0,
    best_of: Optional[int] = None,
    greedy_candidate: Optional[bool] = None,
    max_new_tokens: Optional[int] = None,
    tokenizer: Optional[Tokenizer] = None,
    cfg: Optional[Config | ModelConfig] = None,
    step: Optional[int] = None,
    context_len: Optional[int] = None,
    allowed_tokens: Optional[Sequence[int]] = None,
    max_turns: Optional[int] = None,
    actions: Optional[ActionSource] = None,
    seed: int = 0,
    train_seed: Optional[int] = None,
) -> ModelPolicy:
    """A ``ModelPolicy`` from a checkpoint or from parameters.

    Args:
      source: a run directory (``train.out_dir``) or its ``checkpoints`` directory (the newest complete step,
        or ``step``), or a parameter dict (``cfg`` then required).
      kind: ``"ilql"``, ``"bc"``, ``"q"``, ``"utterance"`` or ``"actor"`` (``jaxrl_lm.rl.policy_extraction``);
        beta, temperature, top_k, top_p: its knobs (temperature 0 = greedy); best_of: candidate turns per step, the best final-token
        Q wins (``utterance`` needs ``best_of >= 2`` and a temperature above 0: it chooses among samples);
        greedy_candidate: with ``best_of >= 2``, one of the candidates is the greedy turn (``DecodeSpec``).
      max_new_tokens: token budget of one action turn, its EOT included.
        Left out (None), ``kind``, ``beta``, ``temperature``, ``best_of`` and ``max_new_tokens`` are those the run
        was evaluated with, from a full ``Config`` (the one saved in a run directory): the last of
        ``eval.policies``, ``eval.beta``, the first of ``eval.decodings`` (greedy: temperature 0; sampled:
        ``eval.temperature``) (``eval.candidate_temperature``,
        ``eval.candidates`` and ``eval.greedy_candidate`` for ``utterance``), ``eval.max_new_tokens``; with a bare
        ``ModelConfig``: ``ilql``, 1.0, 1.0, 1, False, 32.
      tokenizer: default: the run directory's own copy (``<run>/tokenizer``, written when training starts), else
        ``cfg.data.tokenizer`` for a full ``Config``, else the built-in byte tokenizer (a bare ``ModelConfig``).
      cfg: the run's ``Config`` (or just its ``ModelConfig``); default for a checkpoint: the config saved in it.
      context_len: longest prompt plus action, default ``data.seq_len`` (the window the model was trained on)
        capped at ``model.max_seq_len``; a bare ``ModelConfig`` uses ``max_seq_len``.
      allowed_tokens: ids an action may contain (EOT / EOS are always allowed); default every real id but
        BOS and PAD.
      max_turns: most recent turns a prompt keeps (None: as many whole turns as fit the context); set it to the
        longest history the training episodes hold when evaluation episodes run longer than them
        (``TaskSpec.context_turns``), so the model never reads positions it was not trained on. A model with
        ``context: observation`` always reads the latest observation alone (None or 1 only).
      actions: legal action texts every action must be one of (a fixed set, compiled now), or a function
        ``transcript -> texts or None`` asked for every episode at every call (e.g.
        ``jaxrl_lm.envs.base.transcript_legal_actions``: the episode's env's ``legal_actions()``); None: free text
        (module docstring).
      seed: of the sampling PRNG (each call draws a fresh key from it).
      train_seed: of a run that trained several seeds side by side (``--seeds``, an experiment's method), the
        seed whose model to load; required there, an error elsewhere.

    Example::

        policy = jaxrl_lm.load_policy(state.params, "ilql", cfg=cfg, beta=4.0, temperature=0.0)
        policy(["at 25\\n"])                           # -> ["go 19"]: one action text per transcript
    """
    if isinstance(source, (str, Path)):
        saved_cfg, params, _ = load_params(source, step)
        cfg = cfg or saved_cfg
        params = _one_seed(source, params, train_seed)
        if tokenizer is None and (run_dir(source) / RUN_TOKENIZER).is_dir():
            tokenizer = load_tokenizer(run_dir(source) / RUN_TOKENIZER)
    elif cfg is None:
        raise ValueError("load_policy: pass cfg (the run's Config or ModelConfig) along with a parameter dict")
    else:
        params = source
    model_cfg = cfg.model if isinstance(cfg, Config) else cfg
    if isinstance(cfg, Config):  # the settings the run was evaluated with, where the caller leaves them out
        e = cfg.eval
        kind = kind or e.policies[-1]
        utterance = kind == "utterance"
        beta = e.beta if beta is None else beta
        if temperature is None:  # the run's first decoding (eval.decodings: greedy = 0, sampled = eval.temperature)
            temperature = e.candidate_temperature if utterance else 0.0 if e.decodings[0] == "greedy" else \
                e.temperature
        best_of = (e.candidates if utterance else 1) if best_of is None else best_of
        if greedy_candidate is None:
            greedy_candidate = e.greedy_candidate and utterance and best_of >= 2
        max_new_tokens = e.max_new_tokens if max_new_tokens is None else max_new_tokens
    kind = kind or "ilql"
    beta, temperature = 1.0 if beta is None else beta, 1.0 if temperature is None else temperature
    best_of, max_new_tokens = best_of or 1, max_new_tokens or 32
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.data.tokenizer) if isinstance(cfg, Config) else build_char_tokenizer()
    if context_len is None:
        context_len = min(cfg.data.seq_len, model_cfg.max_seq_len) if isinstance(cfg, Config) else \
            model_cfg.max_seq_len
    if kind == "utterance" and (best_of < 2 or temperature <= 0):
        raise ValueError(f"load_policy: the utterance policy chooses among sampled turns: it needs best_of >= 2 "
                         f"and temperature > 0, got best_of={best_of}, temperature={temperature}")
    spec = DecodeSpec(kind=kind, top_k=top_k, max_new_tokens=max_new_tokens, best_of=best_of,
                      greedy_candidate=bool(greedy_candidate))
    return ModelPolicy(model_cfg, params, tokenizer, spec=spec, sampling=Sampling.make(beta, temperature, top_p),
                       context_len=context_len, seed=seed, allowed_tokens=allowed_tokens, max_turns=max_turns,
                       actions=actions)


def describe(policy: ModelPolicy) -> dict[str, Any]:
    """The policy's knobs, for reports."""
    s = policy.sampling
    return {"kind": policy.spec.kind, "beta": float(s.beta), "temperature": float(s.temperature),
            "top_k": policy.spec.top_k, "top_p": float(s.top_p), "best_of": policy.spec.best_of,
            "greedy_candidate": policy.spec.greedy_candidate,
            "max_new_tokens": policy.spec.max_new_tokens, "max_prompt_len": policy.max_prompt_len,
            "max_turns": policy.max_turns,
            "actions": None if policy.actions is None else "per call" if callable(policy.actions) else "fixed"}
