"""A new user's first run: the README's set-up commands, the main job's output, the platform choice at import and
the progress bar's bound on steps in flight (jaxrl_lm/__init__.py, jaxrl_lm/train/loop.py,
jaxrl_lm/experiments/run.py).

The main job runs in a subprocess with the environment a user has (no JAX_PLATFORMS, no test XLA flags): with the
`aot` extra installed (the README's set-up installs it) JAX alone would print the CUDA plugin's traceback, libtpu's
errors and "Could not find cuda drivers" lines on this machine without accelerators.
"""

import os
import re
import shlex
import subprocess
import sys
import types

import jax
import pytest

import jaxrl_lm
from jaxrl_lm.config import REPO_ROOT, load_config
from jaxrl_lm.envs import task_dataset
from jaxrl_lm.train import loop

# What a clean start must not print: a traceback, an error or warning (Python's logging, absl's "E0000"/"W0000"
# lines), or anything from the accelerator plugins.
NOISE = re.compile(r"Traceback|\bERROR\b|\bWARNING\b|^[EW]\d{4} |absl|cuda|\bTPU\b|libtpu|accelerator", re.I | re.M)
TABLE_HEAD = "| policy | decoding | normalised score | success rate | mean return |"


def readme_setup_commands() -> list[str]:
    """The commands of the README's "Set up and run" block, in order (comment lines left out)."""
    section = (REPO_ROOT / "README.md").read_text().split("## Set up and run", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment without what conftest.py set for the tests (JAX_PLATFORMS, XLA_FLAGS)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    return {**env, **extra}


def test_ci_runs_exactly_the_readme_setup_commands():
    commands = readme_setup_commands()
    assert len(commands) == 2 and "python scripts/train.py --config configs/demo.yaml" in commands[0]
    ci = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if line and line[0] not in "#"]
    for command in commands:
        assert command in ci, f".ci/run does not run the README's set-up command {command!r}"


def test_the_readme_main_job_prints_its_result_and_no_noise(tmp_path):
    """The README's main job (its own command, cut to a few steps and a short evaluation) prints no traceback,
    error or accelerator warning, and ends with the evaluation table and the run's files."""
    main_job = readme_setup_commands()[0].split("&&")[-1].strip()
    argv = shlex.split(main_job)
    assert argv[:2] == ["python", "scripts/train.py"], main_job
    quick = ["train.steps=4", "train.log_every=2", "data.task_episodes=100", "eval.episodes=4", "eval.batch_size=4",
             "eval.max_new_tokens=8", f"train.out_dir={tmp_path / 'demo'}"]
    proc = subprocess.run([sys.executable, *argv[1:], *quick], cwd=REPO_ROOT, env=user_env(), capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert not NOISE.search(output), f"noise in the main job's output: {NOISE.search(output).group(0)!r}\n{output}"
    lines = proc.stdout.splitlines()
    head = lines.index(TABLE_HEAD)
    rows = [line for line in lines[head + 2:] if line.startswith("| ")]
    assert [tuple(row.split(" | ")[:2]) for row in rows] == [
        (f"| {p}", d) for p in ("bc (imitation: the LM head)", "ilql (offline Q-learning)") for d in ("greedy", "sampled")]
    assert lines[head + 2 + len(rows)].startswith("Against BC's better decoding (")
    assert lines[head - 1].startswith("grid after 4 steps (4 episodes")
    assert "metrics.jsonl" in lines[-1] and f"tensorboard --logdir {tmp_path / 'demo'}" in lines[-1]
    # bc and ilql, greedy and sampled, once, at the end
    assert (tmp_path / "demo" / "eval.jsonl").read_text().count("\n") == 4


def platform_after_import(env: dict[str, str]) -> tuple[str, str]:
    code = "import jaxrl_lm, jax; print(repr(jax.config.jax_platforms)); print(jax.devices()[0].platform)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_import_chooses_the_cpu_only_where_no_accelerator_is_visible():
    from jax._src import hardware_utils

    stdout, stderr = platform_after_import(user_env())
    if jaxrl_lm._accelerator_visible(hardware_utils):  # a GPU or TPU machine: JAX's own choice, untouched
        assert stdout.splitlines()[0] == "''"
    else:
        assert stdout.splitlines() == ["'cpu'", "cpu"]
        assert not NOISE.search(stderr), stderr
    # JAX_PLATFORMS set, even to "" (JAX's automatic choice), is the user's: nothing is chosen for them.
    stdout, _ = platform_after_import(user_env(JAX_PLATFORMS=""))
    assert stdout.splitlines()[0] == "''"
    # JAX_PLATFORMS=cpu chosen by the user: the CPU, and the same quiet import.
    stdout, stderr = platform_after_import(user_env(JAX_PLATFORMS="cpu"))
    assert stdout.splitlines() == ["'cpu'", "cpu"] and not NOISE.search(stderr), stderr


@pytest.mark.parametrize("probe", ["nvidia", "tpu_pci", "amd", "amd_unknown", "device_node"])
def test_any_visible_accelerator_leaves_the_platform_to_jax(monkeypatch, probe):
    fake = types.SimpleNamespace(has_visible_nvidia_gpu=lambda: probe == "nvidia",
                                 num_available_tpu_chips_and_device_id=lambda: (4 if probe == "tpu_pci" else 0, None),
                                 num_available_amd_gpus=lambda stop_at=None: {"amd": 1, "amd_unknown": -1}.get(probe, 0))
    monkeypatch.setattr(jaxrl_lm.glob, "glob", lambda pattern: ["/dev/accel0"] if probe == "device_node" else [])
    assert jaxrl_lm._accelerator_visible(fake)
    none = types.SimpleNamespace(has_visible_nvidia_gpu=lambda: False,
                                 num_available_tpu_chips_and_device_id=lambda: (0, None),
                                 num_available_amd_gpus=lambda stop_at=None: 0)
    monkeypatch.setattr(jaxrl_lm.glob, "glob", lambda pattern: [])
    assert not jaxrl_lm._accelerator_visible(none)


def test_the_loop_never_runs_more_than_its_steps_in_flight_ahead(tmp_path, monkeypatch):
    """When step n is dispatched, step n - STEPS_IN_FLIGHT has finished: the host waited for it, so the progress
    bar, which counts dispatched steps, is at most that many steps ahead of the device. (No hooks here: a hook
    runs after the device has caught up.)"""
    cfg = load_config("configs/demo.yaml", model__d_model=32, model__n_layers=1, data__task_episodes=100,
                      data__batch_size=8, data__seq_len=64, train__steps=12, train__log_every=12,
                      train__checkpoint_every=0, train__out_dir=str(tmp_path))
    dispatched: list[jax.Array] = []
    late: list[int] = []
    make_update = loop.make_update

    def watched_make_update(*args, **kwargs):
        update = make_update(*args, **kwargs)

        def watched(state, batch):
            behind = len(dispatched) + 1 - loop.STEPS_IN_FLIGHT  # the step that must have finished (1-based)
            if behind >= 1 and not dispatched[behind - 1].is_ready():
                late.append(behind)
            state, metrics = update(state, batch)
            dispatched.append(metrics["loss"])  # metrics are not donated: they outlive the next update
            return state, metrics

        return watched

    monkeypatch.setattr(loop, "make_update", watched_make_update)
    loop.train(cfg, episodes=task_dataset(cfg.data), progress=False, outputs=False)
    assert len(dispatched) == 12 and late == []
