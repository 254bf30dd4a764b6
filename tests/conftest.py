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


import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Test files holding a test marked ``slow`` run first, the rest after them, each group in its own order.

    ``--dist loadfile`` hands whole files to the workers in collection order (``--no-loadscope-reorder`` in
    pyproject.toml: xdist's default order, most tests first, put the one-test files such as the grid headline
    last, where a five-minute file ran alone). Long files first and short ones filling in at the end keeps both
    workers busy to the end.
    """
    slow_files = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow_files)  # stable: keeps each group's order


@pytest.fixture(scope="module")
def compile_once(tmp_path_factory):
    """A persistent XLA cache for one test module: each ``train()`` call jits a fresh closure of the same update,
    and with the cache the runs of a module compile it once (so that bitwise comparisons between an interrupted
    and an uninterrupted run test checkpointing alone, not two compiles)."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    compilation_cache.reset_cache()  # an earlier module may have decided "no cache" for this process
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("xla_cache")))
    yield
    compilation_cache.reset_cache()
    for k, v in old.items():
        jax.config.update(k, v)
