"""The kill drills' driver (tests/test_drills_kill.py, docs/reliability.md): runs training launches of
``scripts/train.py``'s entry point and kills them at chosen or random moments, then resumes them.

    python tests/drill_worker.py PLAN.json REPORT.json

PLAN: ``{"chains": [{"name", "argv", "out_dir", "steps", "launches": [TRIGGER, ...], "finish": n}], "seed": s}``
(``steps``: the run's train.steps). A chain
is one run directory. Each launch runs ``jaxrl_lm.experiments.run.main(argv)``, with ``--resume`` once the
directory holds a complete checkpoint (what a restarted pod does), in a child process forked from this one (the
heavy imports happen once, here, before JAX starts a backend or a thread, so forking is safe). After the
triggered launches, up to ``finish`` plain launches run the chain to its end. A TRIGGER says when the launch gets
``signal`` (``"KILL"`` or ``"TERM"``):

    {"at": "step", "n": k}                 right after the k-th update of the launch is dispatched (the step is
                                           still computing)
    {"at": "save", "n": k, "delay_ms": d}  d ms after the k-th checkpoint save returned (its files are being
                                           written in Orbax's background thread)
    {"at": "commit", "n": k}               when the k-th save has written every file and is about to rename its
                                           tmp directory to the step (Orbax's commit)
    {"at": "prefetch", "n": k}             inside the loader's prefetch thread, while it packs its k-th batch
    {"at": "eval", "n": k, "delay_ms": d}  d ms into the k-th evaluation (eval.every)
    {"at": "random", "delay_s": t}         sent by this process t seconds after the launch's first update
                                           (t < 0: a moment drawn uniformly over the steps still to run, u in
                                           [0, steps left): sent u - floor(u) step times after the launch's
                                           update floor(u) + 1, or at the next update if that comes first; a
                                           step time is the first launch without a trigger's, first to last
                                           update over the steps. Counting updates rather than seconds keeps
                                           the moment inside the run when later launches, which load the
                                           compiled programs from the cache, run faster than that first one)
    {"at": "none"}                         no signal

The child reports its updates, saves and the trigger on a pipe; REPORT holds, per launch: the trigger, how it
ended (``exit 0``, ``SIGKILL``), the steps updated, the complete checkpoints before and after, and whether a tmp
directory (an interrupted write) was left behind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

# Heavy imports before any fork; none of them starts a thread or a JAX backend.
import orbax.checkpoint._src.path.async_path as orbax_async_path
import tensorboardX  # noqa: F401  (the loop's MetricsLog imports it: torch, seconds)

from jaxrl_lm.data import loader as loader_lib
from jaxrl_lm.experiments import hooks as hooks_lib
from jaxrl_lm.experiments import run as run_lib
from jaxrl_lm.train import checkpoint as checkpoint_lib
from jaxrl_lm.train import loop as loop_lib

LAUNCH_TIMEOUT_S = 300  # a launch that runs longer is a hang: killed and reported


def complete_steps(out_dir: Path) -> list[int]:
    """Step directories Orbax lists as complete (a name of digits; tmp directories carry a suffix). Read from the
    file system, not through Orbax: this process must not start a JAX backend before it forks."""
    directory = out_dir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def debris(out_dir: Path) -> list[str]:
    directory = out_dir / "checkpoints"
    return sorted(p.name for p in directory.iterdir() if "tmp" in p.name) if directory.is_dir() else []


def child(argv: list[str], trigger: dict, signum: int, pipe: int, log: Path) -> None:
    """The launch: install the trigger, run the entry point, exit (never returns)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)

    def tell(line: str) -> None:
        os.write(pipe, (line + "\n").encode())

    def fire(where: str) -> None:
        tell(f"fire {where}")
        os.kill(os.getpid(), signum)

    def later(delay_ms: float, where: str) -> None:
        if delay_ms <= 0:
            fire(where)
        else:
            threading.Timer(delay_ms / 1000, fire, args=(where,)).start()

    at, n = trigger.get("at", "none"), int(trigger.get("n", 1))
    counts = {"update": 0, "save": 0, "commit": 0, "prefetch": 0, "eval": 0}

    make_update = loop_lib.make_update

    def counting_make_update(*args, **kw):
        update = make_update(*args, **kw)

        def wrapped(state, batch):
            out = update(state, batch)
            counts["update"] += 1
            tell("update")
            if at == "step" and counts["update"] == n:
                fire(f"step: update {n} dispatched")
            return out

        return wrapped

    loop_lib.make_update = counting_make_update

    save = checkpoint_lib.save

    def counting_save(manager, step, *args, **kw):
        save(manager, step, *args, **kw)
        counts["save"] += 1
        tell(f"save {step}")
        if at == "save" and counts["save"] == n:
            later(float(trigger.get("delay_ms", 0)), f"save: {trigger.get('delay_ms', 0)} ms into step {step}'s write")

    checkpoint_lib.save = counting_save

    rename = orbax_async_path.rename

    async def counting_rename(src, dst):
        if "orbax-checkpoint-tmp" in str(src) and str(Path(str(dst)).name).isdigit():
            counts["commit"] += 1
            if at == "commit" and counts["commit"] == n:
                fire(f"commit: before renaming {Path(str(src)).name}")
        return await rename(src, dst)

    orbax_async_path.rename = counting_rename

    fill_batch = loader_lib.fill_batch

    def counting_fill_batch(*args, **kw):
        counts["prefetch"] += 1
        if at == "prefetch" and counts["prefetch"] == n:
            fire(f"prefetch: packing batch {n} in thread {threading.current_thread().name}")
        return fill_batch(*args, **kw)

    loader_lib.fill_batch = counting_fill_batch

    evaluate = hooks_lib.evaluate_training_policies

    def counting_evaluate(*args, **kw):
        counts["eval"] += 1
        tell("eval")
        if at == "eval" and counts["eval"] == n:
            later(float(trigger.get("delay_ms", 0)), f"eval: {trigger.get('delay_ms', 0)} ms into evaluation {n}")
        return evaluate(*args, **kw)

    hooks_lib.evaluate_training_policies = counting_evaluate

    code = 0
    try:
        run_lib.main(argv)
    except BaseException:  # noqa: BLE001 - reported in the log; the exit code says it failed
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(chain: dict, trigger: dict, index: int, training_s: float | None, rng: random.Random) -> dict:
    out_dir = Path(chain["out_dir"])
    before = complete_steps(out_dir)
    argv = list(chain["argv"]) + (["--resume"] if before else [])
    signum = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}[trigger.get("signal", "KILL")]
    log = out_dir.parent / f"{out_dir.name}.launch{index}.log"
    read_fd, write_fd = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        child(argv, trigger, signum, write_fd, log)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    delay, after_updates, step_s = None, None, None
    if trigger.get("at") == "random":
        delay = float(trigger["delay_s"])
        if delay < 0:  # a moment within the work left, counted in updates (see the module docstring)
            steps = int(chain["steps"])
            u = rng.uniform(0.0, steps - (before[-1] if before else 0))
            after_updates, delay = int(u), u - int(u)
            step_s = (training_s or 0.05 * (steps - 1)) / (steps - 1)
    events: list[str] = []
    buffer, first_update, last_update, sent, status, done = b"", None, None, None, 0, False
    updates = 0

    def drain() -> None:
        nonlocal buffer, first_update, last_update, updates
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                events.append(line.decode())
                if line == b"update":
                    last_update = time.monotonic()
                    first_update = first_update or last_update
                    updates += 1

    while not done:
        drain()
        now = time.monotonic()
        if after_updates is not None:
            due = updates > after_updates + 1 or (updates == after_updates + 1 and now - last_update >= delay * step_s)
        else:
            due = delay is not None and first_update is not None and now - first_update >= delay
        if due and sent is None:
            try:
                os.kill(pid, signum)
                sent = now - first_update
            except ProcessLookupError:
                pass
        finished, status = os.waitpid(pid, os.WNOHANG)
        done = finished == pid
        if not done and now - start > LAUNCH_TIMEOUT_S:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            events.append(f"timeout after {LAUNCH_TIMEOUT_S} s")
            status, done = -1, True
        if not done:
            time.sleep(0.005)
    drain()
    os.close(read_fd)
    end = time.monotonic()
    if status == -1:
        ended = "timeout"
    elif os.WIFSIGNALED(status):
        ended = signal.Signals(os.WTERMSIG(status)).name
    else:
        ended = f"exit {os.WEXITSTATUS(status)}"
    fired = [e[5:] for e in events if e.startswith("fire ")]
    if sent is not None:
        fired.append(f"random: {signal.Signals(signum).name} sent {sent:.3f} s after the first update")
    final_path = out_dir / "final_metrics.json"
    return {
        "trigger": trigger, "resumed": bool(before), "ended": ended, "fired": fired,
        "updates": sum(e == "update" for e in events), "saves": [int(e[5:]) for e in events if e.startswith("save ")],
        "steps_before": before, "steps_after": complete_steps(out_dir), "debris_after": debris(out_dir),
        "seconds": end - start, "training_s": last_update - first_update if first_update is not None else None,
        "log": str(log),
        "final": json.loads(final_path.read_text()) if ended == "exit 0" and final_path.is_file() else None,
    }


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    rng = random.Random(plan.get("seed", 0))
    report = []
    training_s = None  # the first uninterrupted launch's time from its first to its last update: random delays
    for chain in plan["chains"]:
        out_dir = Path(chain["out_dir"])
        launches = []
        for i, trigger in enumerate(chain["launches"]):
            if complete_steps(out_dir)[-1:] == [int(chain["steps"])]:
                break  # the run is done: a launch would only start and stop
            launches.append(launch(chain, trigger, i, training_s, rng))
            if training_s is None and trigger.get("at", "none") == "none" and launches[-1]["ended"] == "exit 0":
                training_s = launches[-1]["training_s"]
        for _ in range(int(chain.get("finish", 0))):
            final = launches[-1]["final"] if launches else None
            if final is not None and not final.get("preempted"):
                break
            launches.append(launch(chain, {"at": "none"}, len(launches), training_s, rng))
        report.append({"name": chain["name"], "out_dir": str(out_dir), "launches": launches})
        Path(sys.argv[2]).write_text(json.dumps(report, indent=1))
    Path(sys.argv[2]).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
