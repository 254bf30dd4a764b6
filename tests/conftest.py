"""Test set-up, before jax is first imported (docs/design.md section 7): 8 forced host CPU devices, and XLA's CPU
backend at optimisation level 0 without fusion emitters. The tests run tiny models whose cost is all compile
time, which these flags cut about threefold; training and scripts/benchmark.py keep the default optimisation.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_TEST_FLAGS = {
    "--xla_force_host_platform_device_count": "8",
    "--xla_backend_optimization_level": "0",
    "--xla_cpu_use_fusion_emitters": "false",
}
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f"{k}={v}" for k, v in _TEST_FLAGS.items() if k not in _flags]
).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
