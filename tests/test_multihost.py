"""Two processes on 127.0.0.1 (2 CPU devices each, jax.distributed) train like one process on 4 devices; and
``jaxrl_lm.distributed``'s decisions from the config and the environment."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import numpy as np
import pytest

from jaxrl_lm import distributed
from jaxrl_lm.checkpoints import reader
from jaxrl_lm.config import ConfigError
from jaxrl_lm.train import checkpoint, sharding
from multihost_worker import flat_params, make_cfg, train_steps

WORKER = Path(__file__).with_name("multihost_worker.py")
STEPS = 3
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """This test session's XLA flags, with 2 host devices per process instead of 8."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=2"])}


def run_two_processes(commands, tmp_path, name, meanwhile=lambda: None):
    """Runs ``python COMMAND`` for each of the two processes (2 host devices each), calls ``meanwhile()`` while
    they run, and returns its result once both exit 0; the processes are always killed and reaped."""
    logs = [(tmp_path / f"{name}{i}.log").open("w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, *command], env=worker_env(), cwd=WORKER.parent.parent, stdout=log,
                              stderr=subprocess.STDOUT) for command, log in zip(commands, logs)]
    try:
        result = meanwhile()
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    output = "\n".join(f"--- {name} {i}\n{(tmp_path / f'{name}{i}.log').read_text()[-3000:]}" for i in range(2))
    assert codes == [0, 0], output
    return result


@pytest.mark.slow
def test_two_processes_match_one_process_on_four_devices(tmp_path):
    port = free_port()
    commands = [[str(WORKER), "--process-id", str(i), "--num-processes", "2", "--port", str(port),
                 "--steps", str(STEPS), "--out", str(tmp_path / "out")] for i in range(2)]

    def reference():  # runs here, on 4 of this session's 8 devices, while the workers start
        cfg = make_cfg(mesh__data=2, mesh__fsdp=2)
        return train_steps(cfg, sharding.setup_parallelism(cfg, jax.devices()[:4]), STEPS)

    ref_losses, ref_state = run_two_processes(commands, tmp_path, "worker", meanwhile=reference)
    run = json.loads((tmp_path / "out" / "losses.json").read_text())
    assert (run["processes"], run["devices"]) == (2, 4)
    np.testing.assert_allclose(run["losses"], ref_losses, atol=1e-5)
    with np.load(tmp_path / "out" / "params.npz") as got:
        want = flat_params(jax.tree.map(np.asarray, ref_state.params))
        assert sorted(got.files) == sorted(want)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, err_msg=name)


def test_single_process_is_a_no_op():
    info = distributed.initialize(make_cfg(), environ={})
    assert (info.index, info.count, info.initialized, info.is_main) == (0, 1, False, True)


@pytest.mark.parametrize("mesh,environ,expected", [
    ({}, {}, False),
    ({"distributed": "off"}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
    ({"distributed": "on"}, {}, True),
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"coordinator_address": "10.0.0.1:1234"}, {}, True),
    ({}, {"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2"}, True),
    ({}, {"SLURM_STEP_NODELIST": "node1", "SLURM_NTASKS": "1"}, False),
    ({}, {"OMPI_COMM_WORLD_SIZE": "4"}, True),
    ({}, {"TPU_WORKER_HOSTNAMES": "t1,t2"}, True),
])
def test_when_to_initialize(mesh, environ, expected):
    cfg = make_cfg(**{f"mesh__{k}": v for k, v in mesh.items()})
    assert distributed.should_initialize(cfg.mesh, environ) is expected


def test_explicit_arguments_from_config_then_environment():
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    cfg = make_cfg(mesh__num_processes=2, mesh__process_id=0)
    assert distributed.explicit_arguments(cfg.mesh, environ) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
    with pytest.raises(ConfigError, match=r"\$JAX_PROCESS_ID must be an integer"):
        distributed.explicit_arguments(make_cfg().mesh, {"JAX_PROCESS_ID": "first"})


def test_a_coordinator_without_a_launcher_needs_the_process_layout():
    cfg = make_cfg(mesh__coordinator_address="10.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"also set mesh.num_processes \(or \$JAX_NUM_PROCESSES\), "
                                          r"mesh.process_id \(or \$JAX_PROCESS_ID\)"):
        distributed.initialize(cfg, environ={})


@pytest.mark.slow
def test_an_online_run_of_two_processes_checkpoints_each_buffer_and_resumes(tmp_path):
    """scripts/train.py as two processes (2 devices each), online: each process plays into its own replay buffer.
    The checkpoint holds both buffers (row p = process p's); one process restores the state and process 0's
    position and buffer; the two processes resume from it, each reading its own row."""
    port = free_port()
    out = tmp_path / "run"
    common = ["--config", "configs/demo.yaml", "--no-progress", f"mesh.coordinator_address=127.0.0.1:{port}",
              "mesh.num_processes=2", "train.log_every=1", "train.checkpoint_every=2", "data.task_episodes=100",
              "model.n_layers=1", f"train.out_dir={out}", "online.enabled=true", "online.envs=2",
              "online.updates_per_round=2", "online.max_new_tokens=6", "online.max_steps=4", "online.capacity=32",
              "online.offline_fraction=0.25", "online.overlap=false", "eval.every=0"]
    run_two_processes([["scripts/train.py", *common, "train.steps=2", f"mesh.process_id={i}"] for i in range(2)],
                      tmp_path, "online")
    directory = out / "checkpoints"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with reader(directory) as r:  # the raw item: one row per process
        meta = r.item_metadata(2)["replay"].tree
        target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) for k, m in meta.items()}
        rows = r.restore(2, args=ocp.args.Composite(replay=ocp.args.StandardRestore(target),
                                                     data=ocp.args.JsonRestore()))
    replay = {k: np.asarray(v) for k, v in rows.replay.items()}
    states = rows.data[checkpoint.PER_PROCESS]
    assert replay["lengths"].shape == (2, 32)
    for p in range(2):  # each row holds as many windows as its process inserted
        assert (replay["lengths"][p] > 0).sum() == min(states[p]["replay"]["inserted"], 32) > 0
    assert not np.array_equal(replay["tokens"][0], replay["tokens"][1])  # two buffers, not one twice
    restored = checkpoint.restore(directory, device)  # the state's structure comes from the saved config
    assert restored.step == 2 and int(restored.state.step) == 2
    for leaf in jax.tree.leaves(restored.state.params):
        assert leaf.sharding == device and np.all(np.isfinite(np.asarray(leaf)))
    assert restored.loader_state["replay"] == states[0]["replay"]  # one process reads process 0's position ...
    for k, v in restored.loader_arrays.items():  # ... and buffer
        np.testing.assert_array_equal(v, replay[k][0])

    port = free_port()
    resumed = [a.replace(a.split("=", 1)[1], f"127.0.0.1:{port}") if a.startswith("mesh.coordinator") else a
               for a in common]
    run_two_processes([["scripts/train.py", *resumed, "train.steps=3", "--resume", f"mesh.process_id={i}"]
                       for i in range(2)], tmp_path, "resumed")
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 3 and final["resumed_from"] == 2 and final["skipped"] == 0
