"""Experiment configuration: frozen dataclasses loaded from YAML plus dotted overrides.

One path for scripts and notebooks alike::

    cfg = load_config("configs/base.yaml", ["model.n_layers=2"])       # CLI style
    cfg = load_config("configs/base.yaml", model__n_layers=2)          # keyword style

A YAML file may name other files under the top-level key ``include`` (paths relative to that file); they are
merged first, in order, and the including file's own keys win. Every key is checked against the dataclasses:
an unknown key, a value of the wrong type or outside its allowed set is a ``ConfigError`` naming the key (and
the file it came from). A key given twice in one override list is an error too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml

from jaxrl_lm.topology import TopologyError, parse_topology

# Scientific notation YAML 1.1 leaves as a string ("1e-3", "-2E+4"). Written so that no text backtracks (the
# looser "\d+\.?\d*" took quadratic time on a long run of digits: minutes for 100k of them).
_FLOAT_TEXT = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+")
# Integers are stored and used as 64-bit (seeds, sizes, step counts): a larger value is an error, not a wrap.
_INT_RANGE = (-(2**63), 2**63 - 1)

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key and where it came from."""


# ----------------------------------------------------------------------------------------------------------------
# Sections. Every field is documented in configs/base.yaml, beside its default.


# LoRA targets per block family (jaxrl_lm.models.blocks): each projection by its path inside a block (Hugging
# Face's names), grouped. ``model.lora.targets`` names groups, paths, or a path's last part where that is unique.
LORA_PROJECTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "gpt2": {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")},
    "llama": {"attention": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
              "mlp": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the trunk's projections (``jaxrl_lm.models.layers.LoraLinear``): a targeted projection
    computes ``x W + b + (alpha / rank) (x A) B``; with ``rank > 0`` only ``A``, ``B`` and the heads train."""

    rank: int = 0  # 0 = off: the model and its parameters are exactly those without adapters
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attention", "mlp")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def projections(self, family: str) -> tuple[str, ...]:
        """The targeted projections of a ``family`` block, as paths inside the block, in the block's order.

        Raises a ConfigError naming ``model.lora.targets`` for a target the family does not have.
        """
        groups = LORA_PROJECTIONS[family]
        every = tuple(p for paths in groups.values() for p in paths)
        chosen = set()
        for target in self.targets:
            named = [p for p in every if p.rsplit(".", 1)[-1] == target]
            if target in groups:
                chosen.update(groups[target])
            elif target in every or len(named) == 1:
                chosen.add(target if target in every else named[0])
            else:
                why = f"names {named}: say which" if named else f"is not a {family} projection"
                raise ConfigError(f"model.lora.targets: {show_value(target)} {why}; choose groups {sorted(groups)} or "
                                  f"projections {list(every)} (or a path's last part where it is unique)")
        return tuple(p for p in every if p in chosen)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 260  # the built-in byte tokenizer's vocabulary
    vocab_pad_multiple: int = 1
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = same as n_heads (no grouping); llama only
    d_ff: int = 0  # 0 = 4 * d_model (gpt2), 8/3 * d_model rounded up to a multiple of 64 (llama)
    max_seq_len: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attention_bias: bool = False  # llama family: Qwen2-style q/k/v biases
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters are always float32
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # The losses' reductions over the vocabulary (CQL and BC normalisers, the max backup) walk it in chunks of this
    # many ids instead of forming [..., Vp] logits (jaxrl_lm.rl.vocab); 0 = whole logits
    vocab_chunk: int = 0
    n_q_heads: int = 2
    q_head: Literal["mlp", "linear"] = "mlp"
    q_head_hidden_mult: int = 2
    q_head_bias: bool = True  # false: no per-action output bias, so a linear head merges exactly into an HF lm_head
    init_std: float = 0.02
    # What a hidden state reads: the whole episode so far, or only the latest observation turn (a fully observed
    # task's Markov state; jaxrl_lm.batch.trunk_inputs, jaxrl_lm.model_policy)
    context: Literal["history", "observation"] = "history"
    # LoRA adapters on the trunk (rank 0 = none); the parameters' layout depends on it, so it belongs to the model
    lora: LoraConfig = LoraConfig()

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.family == "gpt2":
            return 4 * self.d_model
        return int(64 * math.ceil((8 * self.d_model / 3) / 64))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """What every objective shares; an objective's own settings are the config section named after it."""

    objective: str = "token_q"  # a registered objective (jaxrl_lm.rl.objective); its section holds its settings
    time_step: Literal["token", "utterance"] = "token"
    gamma: float = 0.99
    target_ema: float = 0.005  # rate of every EMA parameter group (the target heads / trunk)
    # Head work runs only on decision positions, gathered into a static buffer of this fraction of the
    # batch's tokens (1.0 = every position fits). Positions beyond it are counted in metrics, never silent.
    decision_fraction: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-4
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global norm; 0 = off
    grad_accum: int = 1
    # Storage dtype of AdamW's first moment (optax's mu_dtype): bfloat16 halves it, an explicit memory option
    mu_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "task:grid"  # JSONL of episodes, a built TFDS directory, or task:NAME (a built-in task's data)
    task_episodes: int = 2000  # episodes generated for a task:NAME path
    task_behaviour: str = ""  # which of a task:NAME path's datasets (its behaviour policy); "" = the task's default
    tokenizer: str = ""  # tokenizer.json or HF directory; "" = the built-in byte tokenizer
    seq_len: int = 128
    batch_size: int = 8
    truncate_side: Literal["split", "left", "right"] = "split"
    pack: bool = True
    shuffle: bool = True
    skip_invalid: bool = False
    seed: int = 0
    num_epochs: int = 0  # passes over the episodes; 0 = repeat forever
    top_return_fraction: float = 1.0  # keep only the episodes with the top fraction of returns (filtered BC)
    # A directory for the frozen trunk bottom's outputs (train.frozen_layers), computed once and read back instead
    # of running the frozen blocks every step (jaxrl_lm.train.features); "" = off.
    feature_cache: str = ""
    feature_dtype: Literal["float32", "bfloat16"] = "float32"


MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the mesh axes that split the batch's rows (and every activation's rows)

# [logical axis, mesh axis | [mesh axes] | None]; see configs/base.yaml (mesh.rules) for how they are applied.
ShardingRule = tuple[str, Optional[Union[str, tuple[str, ...]]]]
DEFAULT_SHARDING_RULES: tuple[ShardingRule, ...] = (
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("mlp", "tensor"),
    ("mlp", "fsdp"),
    ("embed", "fsdp"),
    ("layers", None),
    ("q_heads", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1 = every device not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    num_slices: int = 1  # > 1: a hybrid mesh whose data axis spans slices (the slow interconnect)
    topology: str = ""  # "" = the devices present; "v5p-128", "v5e:4x4", "h100-8": see jaxrl_lm/topology.py
    rules: tuple[ShardingRule, ...] = DEFAULT_SHARDING_RULES
    max_replicated_fraction: float = 0.02
    distributed: Literal["auto", "on", "off"] = "auto"
    coordinator_address: str = ""  # "" = $JAX_COORDINATOR_ADDRESS or the cluster's own
    num_processes: int = 0  # 0 = $JAX_NUM_PROCESSES or the cluster's own
    process_id: int = -1  # -1 = $JAX_PROCESS_ID or the cluster's own


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    seed: int = 0
    log_every: int = 10
    out_dir: str = "runs/default"
    checkpoint_every: int = 100  # 0 = only at the end (and on SIGTERM)
    keep_checkpoints: int = 3
    keep_best_metric: str = ""  # "" = keep only the newest
    keep_best_mode: Literal["min", "max"] = "min"
    # A run directory (or its checkpoints/) whose newest online parameters start this run: the trained model and
    # every frozen or snapshot group (an actor's reference policy) begin there, EMA groups equal to them. A
    # multi-seed source gives seed i its i-th stacked parameters. "" = a fresh model from train.seed.
    init_from: str = ""
    # The trunk's bottom, frozen: 0 = everything trains; n = the embeddings and blocks 0..n-1 get no gradient, no
    # optimizer state and no EMA copy (jaxrl_lm.models.partition); -1 = the whole trunk (its final norm too): only
    # the heads train.
    frozen_layers: int = 0
    # Updates rejected in a row (a non-finite loss or gradient, or a batch without decisions: update.py) after
    # which the loop stops with an error. Checked at log steps (no host sync per step), so it stops at the first
    # log step after the run of skips reaches this length. 0 = never stop.
    max_consecutive_skips: int = 20


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # steps between evaluations of the policies during training (and at the last step); 0 = off
    task: str = ""  # built-in task to play; "" = the task of data.path task:NAME
    policies: tuple[str, ...] = ("bc", "ilql")  # policy extractions (POLICY_KINDS: bc | ilql | q | utterance | actor)
    beta: float = 4.0  # ilql advantage weight
    decodings: tuple[str, ...] = ("greedy", "sampled")  # DECODINGS each policy is evaluated with, side by side
    temperature: float = 1.0  # the sampled decoding's temperature (> 0)
    episodes: int = 0  # evaluation episodes; 0 = every start of the task once
    batch_size: int = 64  # episodes rolled out together
    max_new_tokens: int = 32  # token budget of one action turn
    candidates: int = 4  # the utterance policy: turns sampled from the LM head, the best by min_k Q is said
    candidate_temperature: float = 1.0  # the utterance policy's sampling temperature of its candidates
    greedy_candidate: bool = False  # the utterance policy: one of its candidates is the LM head's greedy turn
    legal_actions: bool = False  # decode only the task's legal actions (its env's legal_actions(), a token trie)


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """Online RL (``jaxrl_lm.experiments.online``): the run collects its own episodes into a replay buffer."""

    enabled: bool = False
    task: str = ""  # built-in task to play; "" = eval_task (eval.task, else data.path task:NAME)
    envs: int = 16  # episodes per collection round, stepped together (one batched decode per env step)
    updates_per_round: int = 16  # optimizer steps between rounds: updates per collected episode = this / envs
    overlap: bool = True  # collect round r+1 in a background thread during the updates that follow round r
    capacity: int = 4096  # replay slots (tokenized windows), oldest evicted first
    recency_half_life: float = 0.0  # 0 = sample the buffer uniformly; else the age (windows) where weight halves
    offline_fraction: float = 0.0  # share of each batch's episodes drawn from data.path's offline dataset
    imitate: Literal["all", "offline"] = "all"  # which episodes token_q's BC term clones: all, or only the offline
    # share (the batch's ``imitate`` field; docs/design.md section 10)
    policy: str = "ilql"  # collection policy (POLICY_KINDS)
    beta: float = 4.0  # ilql advantage weight
    temperature: float = 1.0  # collection sampling temperature (0 = greedy)
    best_of: int = 1  # candidates per turn (the utterance policy needs >= 2)
    epsilon: float = 0.0  # per env step, the probability of a turn sampled from the LM head (T = 1) instead
    max_new_tokens: int = 32  # token budget of one action turn
    max_steps: int = 0  # env steps per episode before it is cut (truncated); 0 = the task's evaluation budget
    seed: int = 0  # env starts, sampling and exploration (combined with train.seed)


# Objective sections: ``register_section(name, settings_class)`` (called by ``jaxrl_lm.rl.objective.register``)
# lets the config hold a top-level section ``name:`` whose keys are the fields of ``settings_class``. A settings
# class may define ``validate(self, where)`` for its cross-field checks (ConfigErrors naming ``where.field``).
_SECTIONS: dict[str, type] = {}


def register_section(name: str, settings: type) -> None:
    """Makes ``name:`` a config section read into the dataclass ``settings`` (an objective's own settings)."""
    if name in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"config section {name!r} is a built-in section; choose another objective name")
    if not dataclasses.is_dataclass(settings):
        raise TypeError(f"the settings of config section {name!r} must be a dataclass, got {settings!r}")
    _SECTIONS[name] = settings


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run. ``model`` .. ``eval`` are the built-in sections; ``sections`` holds the objective sections
    present (always the one of ``rl.objective``), read as attributes: ``cfg.token_q.backup``."""

    model: ModelConfig = ModelConfig()
    rl: RLConfig = RLConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    online: OnlineConfig = OnlineConfig()
    sections: tuple[tuple[str, Any], ...] = ()  # (objective name, its settings), sorted by name

    def section(self, name: str) -> Any:
        """The settings of objective section ``name``: as configured, else the settings class's defaults."""
        for key, settings in self.sections:
            if key == name:
                return settings
        if name not in _SECTIONS:
            raise ConfigError(f"no objective section {name!r}; registered: {sorted(_SECTIONS)}")
        return _SECTIONS[name]()

    @property
    def objective(self) -> Any:
        """The settings of the chosen objective (``cfg.section(cfg.rl.objective)``)."""
        return self.section(self.rl.objective)

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: objective sections read like the built-in ones.
        if name.startswith("__") or name not in _SECTIONS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return self.section(name)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name != "sections"}
        out.update({name: dataclasses.asdict(settings) for name, settings in self.sections})
        return out


# The policy extractions (jaxrl_lm.rl.policy_extraction): the one list, which eval.policies is checked against.
POLICY_KINDS: tuple[str, ...] = ("bc", "ilql", "q", "utterance", "actor")
# How an evaluated policy decodes: "greedy" (temperature 0) or "sampled" (at eval.temperature). A result that
# holds under only one of them is not the result a user reads, so evaluations report both by default.
DECODINGS: tuple[str, ...] = ("greedy", "sampled")


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation.


def _check_value(key: str, tp: Any, value: Any, where: str) -> Any:
    """Coerces ``value`` to the annotated type ``tp`` or raises a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for member in inner:
            try:
                return _check_value(key, member, value, where)
            except ConfigError:
                if len(inner) == 1:
                    raise
        names = " or ".join(_describe(a) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {show_value(value)}{where}")
    if origin is tuple:
        return _check_tuple(key, typing.get_args(tp), value, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {show_value(value)} is not one of {list(allowed)}{where}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {show_value(value)}{where}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {show_value(value)}{where}")
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise ConfigError(f"{key}: {show_value(value)} is outside the 64-bit integer range{where}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is plainly a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {show_value(value)}{where}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):  # .nan / .inf pass every range check below (nan < 0 is False)
            raise ConfigError(f"{key}: expected a finite number, got {show_value(value)}{where}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {show_value(value)}{where}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # a programming error in this file


def _check_tuple(key: str, args: tuple, value: Any, where: str) -> tuple:
    """A YAML list as a tuple: ``tuple[X, ...]`` (any length) or ``tuple[X, Y]`` (exactly these items)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {show_value(value)}{where}")
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif len(value) != len(args):
        raise ConfigError(f"{key}: expected a list of {len(args)} items, got {show_value(value)}{where}")
    return tuple(_check_value(f"{key}[{i}]", t, v, where) for i, (t, v) in enumerate(zip(args, value)))


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", type(None): "null"}


def _bounded_repr() -> reprlib.Repr:
    r = reprlib.Repr()  # Python 3.11's Repr takes no constructor arguments
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxstring, r.maxother, r.maxlong = 3, 8, 8, 8, 80, 80, 40
    return r


_REPR = _bounded_repr()


def show_value(value: Any) -> str:
    """A bounded repr for error messages: a YAML value may be huge or (through aliases) exponentially large, an
    episode file's line may hold megabytes or structures nested hundreds deep (``jaxrl_lm.data.episodes``)."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer past Python's 4300-digit str() limit
        return f"<a {type(value).__name__} too large to print>"


def _describe(tp: Any) -> str:
    """A field type in the words of the error messages: ``tuple[str, ...]`` -> ``a list of a string``."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list, each item {_describe(args[0])}"
        return f"a list [{', '.join(_describe(a) for a in args)}]"
    return _TYPE_NAMES.get(tp, str(tp))


def _build_config(values: dict[str, Any], sources: dict[str, str]) -> Config:
    """The top level: the built-in sections, and the objective sections by their registered names (the chosen
    objective's section is added with its defaults when absent)."""
    builtin = {f.name for f in dataclasses.fields(Config)} - {"sections"}
    values = dict(values)
    sections = {}
    for name in sorted(set(values) - builtin, key=str):  # YAML keys may be numbers or null too
        if name not in _SECTIONS:
            where = f" (from {sources[str(name)]})" if str(name) in sources else ""
            raise ConfigError(f"unknown config key {show_value(name)}{where}; known sections: {sorted(builtin)} and the "
                              f"objective sections {sorted(_SECTIONS)}")
        value = values.pop(name)
        if not isinstance(value, dict):
            where = f" (from {sources[name]})" if name in sources else ""
            raise ConfigError(f"{name}: expected a mapping of {_SECTIONS[name].__name__} fields, got "
                              f"{show_value(value)}{where}")
        sections[name] = _build(_SECTIONS[name], value, f"{name}.", sources)
    cfg = _build(Config, values, "", sources)
    if cfg.rl.objective not in _SECTIONS:
        where = f" (from {sources['rl.objective']})" if "rl.objective" in sources else ""
        raise ConfigError(f"rl.objective: {show_value(cfg.rl.objective)} is not a registered objective{where}; registered: "
                          f"{sorted(_SECTIONS)}")
    sections.setdefault(cfg.rl.objective, _SECTIONS[cfg.rl.objective]())
    return dataclasses.replace(cfg, sections=tuple(sorted(sections.items())))


def _build(cls: type, values: dict[str, Any], prefix: str, sources: dict[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is Config and f.name == "sections")}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        where = f" (from {sources[key]})" if key in sources else ""
        if name not in fields:
            raise ConfigError(f"unknown config key {show_value(key)}{where}; known keys here: {sorted(fields)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {show_value(value)}{where}")
            kwargs[name] = _build(tp, value, f"{key}.", sources)
        else:
            kwargs[name] = _check_value(key, tp, value, where)
    return cls(**kwargs)


def _merge(base: dict, new: dict, sources: dict[str, str], origin: str, prefix: str = "") -> dict:
    """Sections merge key by key; a field's value (never a mapping in a valid config) is replaced whole, so a
    nested or self-referencing YAML value (aliases) is never walked."""
    out = dict(base)
    for k, v in new.items():
        key = f"{prefix}{k}"
        if not prefix and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, sources, origin, f"{key}.")
        else:
            out[k] = v
            _record(v, key, sources, origin)
    return out


def _record(value: Any, key: str, sources: dict[str, str], origin: str) -> None:
    """Notes where ``key`` and, for a section, each of its fields came from (no deeper: see ``_merge``)."""
    sources[key] = origin
    if isinstance(value, dict) and "." not in key:
        for k in value:
            sources[f"{key}.{k}"] = origin


def _read_yaml(path: Path, sources: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    included = f" (included from {seen[-1]})" if seen else ""
    try:
        path = path.resolve()
        found = path.is_file()
    except (OSError, ValueError) as e:  # e.g. a NUL character in an include's name
        raise ConfigError(f"config file {show_value(str(path))} is not a usable path ({e}){included}") from None
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {[str(p) for p in seen]}")
    if not found:
        raise ConfigError(f"config file not found: {path}{included}")
    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); config files must be "
                          f"UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not readable YAML: nested too deeply") from None
    except ValueError as e:  # PyYAML's int(): a literal beyond Python's 4300-digit conversion limit
        raise ConfigError(f"{path}: not readable YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    includes = raw.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(inc, str) and inc for inc in includes):
        raise ConfigError(f"include: expected a file name or a list of file names, got {show_value(includes)} "
                          f"(from {path})")
    merged: dict = {}
    for inc in includes:
        merged = _merge(merged, _read_yaml(path.parent / inc, sources, seen + (path,)), sources, str(path.parent / inc))
    return _merge(merged, raw, sources, str(path))


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise ConfigError(f"override {show_value(key)}: the value is nested too deeply to read") from None
    except ValueError as e:  # PyYAML's int(): a literal beyond Python's 4300-digit conversion limit
        raise ConfigError(f"override {show_value(key)}: the value cannot be read: {e}") from None
    return key, value


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or relative to the repository root (so ``configs/x.yaml`` works from anywhere)."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    return REPO_ROOT / p


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, **kw: Any) -> Config:
    """Loads a Config from a YAML file (default: configs/base.yaml) and applies overrides.

    Args:
      path: YAML file; None means ``configs/base.yaml``.
      overrides: ``["model.n_layers=4", ...]``; values are parsed as YAML scalars.
      **kw: the same as keyword arguments, with ``__`` for the dot: ``model__n_layers=4``.

    A relative ``path`` that does not exist from the working directory is read from the repository root, so a
    notebook in any folder can say::

        cfg = jaxrl_lm.load_config("configs/demo.yaml", data__batch_size=8, token_q__backup="max")
    """
    sources: dict[str, str] = {}
    tree = _read_yaml(resolve_path(path or "configs/base.yaml"), sources)
    items = [_parse_override(o) for o in (overrides or [])]
    items += [(k.replace("__", "."), v) for k, v in kw.items()]
    seen: set[str] = set()
    for key, value in items:
        if key in seen:
            raise ConfigError(f"override {key!r} is given more than once")
        seen.add(key)
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"override {show_value(key)}: an empty name; expected section.key=value")
        node = tree
        for i, p in enumerate(parts[:-1]):
            sources.setdefault(".".join(parts[:i + 1]), "override")  # a section the override brings in
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {show_value(key)}: {p!r} is not a section")
        node[parts[-1]] = value
        sources[key] = "override"
    cfg = _build_config(tree, sources)
    validate(cfg)
    return cfg


def replace(cfg: Config, **kw: Any) -> Config:
    """A copy of ``cfg`` with ``section__field=value`` replacements, validated like a loaded config."""
    tree = cfg.to_dict()
    for k, v in kw.items():
        if "__" not in k:
            raise ConfigError(f"replace: keyword {k!r} is not of the form section__field")
        section, field = k.split("__", 1)
        tree.setdefault(section, {})[field] = v
    new = _build_config(tree, {})
    validate(new)
    return new


def from_dict(saved: Mapping[str, Any]) -> Config:
    """A Config from ``Config.to_dict()`` output (a checkpoint's saved config), validated.

    Keys added since it was saved take their defaults. A config saved before objective sections existed kept the
    token-level Q-learning settings in ``rl``: those keys move to the ``token_q`` section. A config saved before
    ``eval.decodings`` existed was evaluated at its one ``eval.temperature`` (0 = greedy): that is its decoding.
    """
    tree = {section: dict(fields) for section, fields in saved.items()}
    ev = tree.get("eval", {})
    if "temperature" in ev and "decodings" not in ev:
        ev["decodings"] = ["greedy"] if ev["temperature"] == 0 else ["sampled"]
        ev["temperature"] = ev["temperature"] or EvalConfig.temperature
    rl = tree.get("rl", {})
    legacy = set(rl) - {f.name for f in dataclasses.fields(RLConfig)}
    if legacy and "token_q" in _SECTIONS:
        moved = {k: rl.pop(k) for k in legacy if k in {f.name for f in dataclasses.fields(_SECTIONS["token_q"])}}
        tree["token_q"] = {**moved, **tree.get("token_q", {})}
    cfg = _build_config(tree, {})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks; each error names the key to change."""
    m, rl, o, d = cfg.model, cfg.rl, cfg.optim, cfg.data
    positive = {
        "model.vocab_size": m.vocab_size, "model.vocab_pad_multiple": m.vocab_pad_multiple,
        "model.d_model": m.d_model, "model.n_layers": m.n_layers, "model.n_heads": m.n_heads,
        "model.max_seq_len": m.max_seq_len, "model.n_q_heads": m.n_q_heads,
        "model.q_head_hidden_mult": m.q_head_hidden_mult, "optim.grad_accum": o.grad_accum,
        "data.seq_len": d.seq_len, "data.batch_size": d.batch_size, "train.steps": cfg.train.steps,
        "train.log_every": cfg.train.log_every, "data.task_episodes": d.task_episodes,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"{key} must be positive, got {v}")
    if m.vocab_chunk < 0:
        raise ConfigError(f"model.vocab_chunk must be >= 0 (0 = whole logits), got {m.vocab_chunk}")
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    if m.n_heads % m.kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.kv_heads})")
    if m.family == "gpt2" and m.n_kv_heads not in (0, m.n_heads):
        raise ConfigError("model.n_kv_heads: grouped-query attention is a llama-family option; gpt2 uses 0")
    if m.family == "llama" and m.head_dim % 2:
        raise ConfigError(f"model: RoPE needs an even head dim, d_model/n_heads = {m.head_dim}")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if not 0.0 < rl.gamma <= 1.0:
        raise ConfigError(f"rl.gamma must be in (0, 1], got {rl.gamma}")
    if not 0.0 < rl.target_ema <= 1.0:
        raise ConfigError(f"rl.target_ema must be in (0, 1], got {rl.target_ema}")
    if not 0.0 < rl.decision_fraction <= 1.0:
        raise ConfigError(f"rl.decision_fraction must be in (0, 1], got {rl.decision_fraction}")
    if not 0.0 < d.top_return_fraction <= 1.0:
        raise ConfigError(f"data.top_return_fraction must be in (0, 1], got {d.top_return_fraction}")
    for key, v in {"optim.weight_decay": o.weight_decay, "optim.grad_clip": o.grad_clip,
                   "model.dropout": m.dropout}.items():
        if v < 0:
            raise ConfigError(f"{key} must be non-negative, got {v}")
    if d.batch_size % o.grad_accum:
        raise ConfigError(f"data.batch_size ({d.batch_size}) must be divisible by optim.grad_accum ({o.grad_accum})")
    if cfg.train.checkpoint_every < 0:
        raise ConfigError(f"train.checkpoint_every must be >= 0 (0 = only at the end), got {cfg.train.checkpoint_every}")
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be at least 1, got {cfg.train.keep_checkpoints}")
    if cfg.train.max_consecutive_skips < 0:
        raise ConfigError(f"train.max_consecutive_skips must be >= 0 (0 = never stop), got "
                          f"{cfg.train.max_consecutive_skips}")
    if d.feature_cache and not cfg.train.frozen_layers:
        raise ConfigError(f"data.feature_cache ({d.feature_cache}) stores a frozen trunk bottom's outputs: set "
                          f"train.frozen_layers (n blocks, or -1 for the whole trunk), or leave the cache out")
    if not -1 <= cfg.train.frozen_layers <= m.n_layers:
        raise ConfigError(f"train.frozen_layers must be -1 (the whole trunk), 0 (nothing) or a number of bottom "
                          f"blocks up to model.n_layers ({m.n_layers}), got {cfg.train.frozen_layers}")
    validate_lora(cfg)
    for name, settings in cfg.sections:
        if hasattr(settings, "validate"):
            settings.validate(name)
    validate_mesh(cfg.mesh)
    validate_eval(cfg)
    validate_online(cfg)


def validate_lora(cfg: Config) -> None:
    """``model.lora``, and its coherence with ``train.frozen_layers``; each error names the key."""
    lora, m = cfg.model.lora, cfg.model
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank must be >= 0 (0 = no adapters), got {lora.rank}")
    lora.projections(m.family)  # every target named, even while rank is 0: a typo should not wait
    if not lora.rank:
        return
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be positive (the update is scaled by alpha / rank), got {lora.alpha}")
    if not lora.targets:
        raise ConfigError("model.lora.targets is empty: name the projections that get adapters (e.g. [attention, "
                          "mlp]), or set model.lora.rank: 0")
    if cfg.train.frozen_layers in (-1, m.n_layers):
        raise ConfigError(f"train.frozen_layers ({cfg.train.frozen_layers}) freezes every block, so the LoRA factors "
                          f"of model.lora.rank ({lora.rank}) would never train: freeze fewer blocks, or set "
                          f"model.lora.rank: 0")


def eval_task(cfg: Config) -> str:
    """The built-in task the training loop evaluates on: ``eval.task``, else the task of ``data.path task:NAME``."""
    if cfg.eval.task:
        return cfg.eval.task
    return cfg.data.path[len("task:"):] if cfg.data.path.startswith("task:") else ""


def validate_eval(cfg: Config) -> None:
    """The ``eval`` section; each error names the key."""
    e = cfg.eval
    if e.every < 0:
        raise ConfigError(f"eval.every must be >= 0 (0 = off), got {e.every}")
    for key, v in {"eval.episodes": e.episodes, "eval.batch_size": e.batch_size - 1,
                   "eval.max_new_tokens": e.max_new_tokens - 1}.items():
        if v < 0:
            raise ConfigError(f"{key} must be {'>= 0' if key == 'eval.episodes' else 'positive'}, got {v}")
    bad = [k for k in e.policies if k not in POLICY_KINDS]
    if bad or not e.policies:
        raise ConfigError(f"eval.policies: {bad or 'empty'}; choose from {', '.join(POLICY_KINDS)}")
    if not e.decodings or len(set(e.decodings)) != len(e.decodings) or set(e.decodings) - set(DECODINGS):
        raise ConfigError(f"eval.decodings: {list(e.decodings)}; give one or both of {', '.join(DECODINGS)}, "
                          f"each once")
    if "sampled" in e.decodings and not e.temperature > 0:
        raise ConfigError(f"eval.temperature is the sampled decoding's temperature and must be > 0, got "
                          f"{e.temperature}; to evaluate greedily only, set eval.decodings: [greedy]")
    if e.candidates < 2 or e.candidate_temperature <= 0:
        raise ConfigError(f"eval.candidates must be >= 2 and eval.candidate_temperature positive (the utterance "
                          f"policy chooses among sampled turns), got {e.candidates}, {e.candidate_temperature}")
    if e.every and not eval_task(cfg):
        raise ConfigError(f"eval.every is {e.every} but there is no task to play: set eval.task (data.path "
                          f"{cfg.data.path!r} is not a built-in task:NAME)")


def validate_online(cfg: Config) -> None:
    """The ``online`` section (checked whether or not it is enabled: a typo should not wait for the day it is)."""
    o = cfg.online
    for key, v in {"online.envs": o.envs, "online.updates_per_round": o.updates_per_round,
                   "online.capacity": o.capacity, "online.max_new_tokens": o.max_new_tokens,
                   "online.best_of": o.best_of}.items():
        if v < 1:
            raise ConfigError(f"{key} must be positive, got {v}")
    for key, v in {"online.offline_fraction": o.offline_fraction, "online.epsilon": o.epsilon}.items():
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{key} must lie in [0, 1], got {v}")
    if o.recency_half_life < 0 or o.temperature < 0 or o.max_steps < 0:
        raise ConfigError("online.recency_half_life, online.temperature and online.max_steps must be >= 0, got "
                          f"{o.recency_half_life}, {o.temperature}, {o.max_steps}")
    if o.policy not in POLICY_KINDS:
        raise ConfigError(f"online.policy {o.policy!r} is not a policy kind; choose one of {list(POLICY_KINDS)}")
    if o.policy == "utterance" and (o.best_of < 2 or o.temperature <= 0):
        raise ConfigError("online.policy utterance chooses among sampled turns: set online.best_of >= 2 and "
                          "online.temperature > 0")
    if o.enabled and not (o.task or eval_task(cfg)):
        raise ConfigError("online.enabled: name the task to play (online.task, eval.task or data.path task:NAME)")
    if o.enabled and o.imitate == "offline":
        if o.offline_fraction <= 0:
            raise ConfigError("online.imitate: offline clones only the offline share of each batch: set "
                              "online.offline_fraction > 0")
        if cfg.rl.objective != "token_q":
            raise ConfigError(f"online.imitate: offline marks the tokens token_q's BC term may clone; rl.objective "
                              f"{cfg.rl.objective!r} would ignore the mark: use token_q or online.imitate: all")
    if o.enabled and o.offline_fraction > 0 and not cfg.data.path:
        raise ConfigError(f"online.offline_fraction {o.offline_fraction} mixes in data.path's episodes: set "
                          f"data.path (or online.offline_fraction: 0)")


def online_task(cfg: Config) -> str:
    """The task the online collector plays: ``online.task``, else the evaluation task."""
    return cfg.online.task or eval_task(cfg)


def validate_mesh(mesh: MeshConfig) -> None:
    """Axis sizes, the sharding rule table and the process fields; each error names the key."""
    if mesh.data != -1 and mesh.data < 1:
        raise ConfigError(f"mesh.data must be positive or -1 (every remaining device), got {mesh.data}")
    for key, v in {"mesh.fsdp": mesh.fsdp, "mesh.tensor": mesh.tensor, "mesh.num_slices": mesh.num_slices}.items():
        if v < 1:
            raise ConfigError(f"{key} must be positive, got {v}")
    if mesh.data != -1 and mesh.data % mesh.num_slices:
        raise ConfigError(f"mesh.data ({mesh.data}) must be divisible by mesh.num_slices ({mesh.num_slices}): "
                          f"the data axis is the one that spans slices")
    if not 0.0 <= mesh.max_replicated_fraction <= 1.0:
        raise ConfigError(f"mesh.max_replicated_fraction must be in [0, 1], got {mesh.max_replicated_fraction}")
    for i, (logical, axes) in enumerate(mesh.rules):
        named = (axes,) if isinstance(axes, str) else axes or ()
        unknown = [a for a in named if a not in MESH_AXES]
        if not logical or unknown or len(set(named)) != len(named):
            raise ConfigError(f"mesh.rules[{i}]: {[logical, axes]!r} must be [logical axis, mesh axis | "
                              f"[distinct mesh axes] | null] with mesh axes from {list(MESH_AXES)}")
    if mesh.topology:
        try:
            parse_topology(mesh.topology, mesh.num_slices)
        except TopologyError as e:
            raise ConfigError(str(e)) from None
    if mesh.num_processes < 0 or mesh.process_id < -1:
        raise ConfigError(f"mesh.num_processes ({mesh.num_processes}) must be >= 0 (0 = from the environment) and "
                          f"mesh.process_id ({mesh.process_id}) >= -1 (-1 = from the environment)")
    if mesh.num_processes and mesh.process_id >= mesh.num_processes:
        raise ConfigError(f"mesh.process_id ({mesh.process_id}) must be below mesh.num_processes "
                          f"({mesh.num_processes})")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a run saves beside its outputs)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
