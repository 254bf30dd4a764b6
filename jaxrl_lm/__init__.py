"""jaxrl_lm: value-based RL (token-level Q-learning first) for language models as multi-turn agents, in JAX/Flax.

The library path a notebook takes (``notebooks/quickstart.ipynb`` runs all of it)::

    import jaxrl_lm
    cfg = jaxrl_lm.load_config("configs/demo.yaml", token_q__backup="max")  # YAML + keyword overrides
    state = jaxrl_lm.init_state(cfg)                                    # TrainState of a new model
    update = jaxrl_lm.make_update(cfg)                                  # jitted, state donated
    for batch in jaxrl_lm.batches(cfg, steps=100):                      # dicts of [B, L] numpy arrays
        state, metrics = update(state, batch)                           # metrics: float32 device scalars

Public API (``help(jaxrl_lm.NAME)`` documents each, with shapes and an example):

- configs: ``load_config``, ``Config``, ``ConfigError``
- models and state: ``build_model``, ``split_model``, ``init_state``, ``TrainState``
- the update: ``make_update`` (the objective ``rl.objective``: ``jaxrl_lm.rl.register`` adds one); many seeds in
  one compile: ``init_states``, ``make_multi_seed_update``, ``train_seeds``, ``unstack``
- the loop: ``jaxrl_lm.train.loop.train`` (one run or stacked seeds, with hooks); ``jaxrl_lm.experiments.run.run``
  adds the config's data and evaluation, as ``scripts/train.py`` does
- data: ``make_dataset`` (a built-in task's offline episodes), ``batches``, ``load_tokenizer``
- checkpoints, policies and evaluation: ``load_params``, ``load_policy``, ``evaluate_params``, ``evaluate_policy``
- Hugging Face: ``export_hf``, ``import_hf``

``import jaxrl_lm`` loads only the configs, the model and the update; the data pipeline, environments,
decoding and Hugging Face names load on first use.
"""

import contextlib
import glob
import importlib
import os
import re
import sys
import tempfile
from typing import Any, Iterator

# JAX's platform, chosen before JAX first uses one (README, "Set up and run"). The default set-up installs the
# `aot` extra (libtpu and the CUDA compiler plugin: compiling for pods here, jaxrl_lm/train/aot.py), and JAX left
# to itself initialises every installed plugin: on a machine without accelerators the CUDA plugin logs an ERROR
# with a traceback, libtpu logs INVALID_ARGUMENT errors, and the CUDA plugin's libraries log "Could not find cuda
# drivers" (absl, from C++, at `import jax` and at plugin discovery). So when JAX_PLATFORMS is unset and JAX's own
# probes (those xla_bridge uses to skip CUDA and to suggest a TPU) find no GPU and no TPU, the CPU is chosen
# explicitly (the CUDA plugin then skips its version check and libtpu is never started), plugin discovery runs
# at once, and those known lines are dropped from stderr while `import jax` and discovery run; every other line
# is written back. The compile-only clients of aot.py work under this choice (scripts/aot_compile.py and the
# tests set JAX_PLATFORMS=cpu themselves). JAX_PLATFORMS=cpu set by the user gets the same filtering. Any visible
# accelerator, or JAX_PLATFORMS set to anything else (even ""), leaves everything to JAX, so a GPU or TPU machine
# finds its accelerator as it always did.
_PLUGIN_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|.*cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.")


def _accelerator_visible(hardware_utils: Any) -> bool:
    """Whether this machine shows an accelerator JAX could use: JAX's probes (``jax._src.hardware_utils``: NVIDIA
    device nodes, TPU chips on PCI, AMD GPUs through KFD; -1 = could not tell, counted as visible) and, to err on
    the side of JAX's default, TPU device nodes (``/dev/accel*``, ``/dev/vfio/<n>``)."""
    return bool(hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_tpu_chips_and_device_id()[0]
                or hardware_utils.num_available_amd_gpus(stop_at=1) != 0
                or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


@contextlib.contextmanager
def _stderr_without_plugin_noise(drop: list[bool]) -> Iterator[None]:
    """Collects what is written to file descriptor 2 (C++ logs included) while the block runs, then writes it back
    without the ``_PLUGIN_NOISE`` lines if ``drop[0]`` was set by then (else unchanged)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no stderr to filter (pythonw, a closed descriptor)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().splitlines(keepends=True)
            if drop[0]:
                lines = [line for line in lines if not _PLUGIN_NOISE.fullmatch(line.rstrip(b"\r\n"))]
            text = b"".join(lines)
            while text:
                text = text[os.write(2, text):]


_CPU_CHOSEN = os.environ.get("JAX_PLATFORMS") == "cpu"  # the user's own choice: the CUDA lines are noise there too
if "JAX_PLATFORMS" in os.environ and not _CPU_CHOSEN:
    import jax
else:
    _quiet = [_CPU_CHOSEN]
    with _stderr_without_plugin_noise(_quiet):
        import jax
        from jax._src import hardware_utils as _hardware_utils
        from jax._src import xla_bridge as _xla_bridge

        if _CPU_CHOSEN:
            _xla_bridge._discover_and_register_pjrt_plugins()  # the CUDA plugin's libraries load now, filtered
        elif not (jax.config.jax_platforms or _xla_bridge.backends_are_initialized()
                  or _accelerator_visible(_hardware_utils)):
            jax.config.update("jax_platforms", "cpu")
            _xla_bridge._discover_and_register_pjrt_plugins()  # the CUDA plugin's libraries load now, filtered
            _quiet[0] = True

from jaxrl_lm import models, rl, train
from jaxrl_lm.config import Config, ConfigError, load_config
from jaxrl_lm.models import build as build_model
from jaxrl_lm.models import split_model
from jaxrl_lm.train import TrainState, init_state, make_update

# Name -> module that defines it, imported on first access (PEP 562): these modules pull in grain, TFDS,
# scipy and Hugging Face, which a script that only trains from arrays never needs.
_LAZY = {
    "batches": "jaxrl_lm.experiments.run",
    "init_states": "jaxrl_lm.train.seeds",
    "make_multi_seed_update": "jaxrl_lm.train.seeds",
    "train_seeds": "jaxrl_lm.experiments.run",
    "unstack": "jaxrl_lm.train.seeds",
    "make_dataset": "jaxrl_lm.envs",
    "load_tokenizer": "jaxrl_lm.data",
    "load_params": "jaxrl_lm.checkpoints",
    "load_policy": "jaxrl_lm.model_policy",
    "evaluate_params": "jaxrl_lm.eval",
    "evaluate_policy": "jaxrl_lm.eval",
    "export_hf": "jaxrl_lm.interop",
    "import_hf": "jaxrl_lm.interop",
}
_SUBMODULES = ("batch", "checkpoints", "config", "data", "distributed", "envs", "eval", "experiments", "generate",
               "interop", "model_policy")

__all__ = [
    "Config", "ConfigError", "TrainState", "batches", "build_model", "evaluate_params", "evaluate_policy",
    "export_hf", "import_hf", "init_state", "init_states", "load_config", "load_params", "load_policy",
    "load_tokenizer",
    "make_dataset", "make_multi_seed_update", "make_update", "models", "rl", "split_model", "train",
    "train_seeds", "unstack", *_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"jaxrl_lm.{name}")
    else:
        raise AttributeError(f"module 'jaxrl_lm' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
