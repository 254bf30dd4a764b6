"""One process of a two-process training run for the multi-process fault drills
(tests/test_drills_multiprocess.py, docs/reliability.md): ``scripts/train.py``'s entry point, which can kill
itself with SIGKILL at a chosen moment.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
        python tests/multiprocess_drill_worker.py --kill-after-save 2 -- --config configs/demo.yaml ... \\
        mesh.coordinator_address=127.0.0.1:PORT mesh.num_processes=2 mesh.process_id=1

``--kill-after-save N``: SIGKILL this process right after its N-th checkpoint save of this launch returned (the
save's files are still being written in Orbax's background thread, and the other process is running on into its
next steps' collectives). Without it, the launch is a plain ``scripts/train.py`` run. Each save prints
``drill: saved step S`` (flushed) so the test can see how far a launch got.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from jaxrl_lm.experiments import run as run_lib
from jaxrl_lm.train import checkpoint as checkpoint_lib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-after-save", type=int, default=0, help="0 = never")
    ap.add_argument("train_argv", nargs=argparse.REMAINDER, help="-- then scripts/train.py's arguments")
    args = ap.parse_args()
    train_argv = args.train_argv[1:] if args.train_argv[:1] == ["--"] else args.train_argv
    save = checkpoint_lib.save
    saves = 0

    def save_then_maybe_die(manager, step, *a, **kw):
        nonlocal saves
        save(manager, step, *a, **kw)
        saves += 1
        print(f"drill: saved step {step}", flush=True)
        if saves == args.kill_after_save:
            print(f"drill: SIGKILL after saving step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_lib.save = save_then_maybe_die  # the loop calls checkpoint.save through the module
    run_lib.main(train_argv)


if __name__ == "__main__":
    sys.exit(main())
