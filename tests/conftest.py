"""Shared test setup: 8 simulated CPU devices (before jax is imported) and small fixtures."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Many tests build the same tiny programs; a persistent cache compiles each once per run.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("CALM_TEST_COMPILE_CACHE", "/tmp/calm_jax_test_compile_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
