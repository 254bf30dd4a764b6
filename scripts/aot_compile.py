"""Compile the update for a TPU slice or GPU node on this machine, before renting one:

    python scripts/aot_compile.py --config configs/models/gpt2_small.yaml --topology v5p-128 mesh.fsdp=64
    python scripts/aot_compile.py --config configs/models/llama_1b.yaml --topology h100-8 --slices 2

prints per-device memory against the chip's HBM, the mesh, the compile time, model FLOPs per step and the
implied step time at ``--mfu``; exits 1 (with what to change) when the step does not fit. It needs the ``aot``
extra (libtpu, the CUDA compiler plugin): ``pip install -e ".[aot]"``. See jaxrl_lm/train/aot.py.
"""

import os
import sys

# Compile-only devices need no local accelerator: keep JAX from probing for one (and from the plugins' noise).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxrl_lm.train.aot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
