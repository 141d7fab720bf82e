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


# -- Data fixtures (tests/test_tokenizer.py, test_sources.py, test_pipeline.py) --
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY_VOCAB = 400


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
  """A 400-piece BPE model trained once per session on 300k characters of the builtin corpus."""
  from calm_jax.data import sources  # pylint: disable=g-import-not-at-top
  from calm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("tokenizer") / "tiny.model")
  tokenizer_lib.train_tokenizer(sources.iter_texts("builtin:python_docs"), TINY_VOCAB, path,
                                max_chars=300_000)
  return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
  from calm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tokenizer_lib.Tokenizer.load(tiny_tokenizer_path)


@pytest.fixture(scope="session")
def fork_server():
  """Starts command lines as processes forked from one that imported them (tests/cli_runner.py)."""
  from tests.cli_runner import ForkServer  # pylint: disable=g-import-not-at-top
  from tests.test_reliability import ROOT, _env  # pylint: disable=g-import-not-at-top
  server = ForkServer(_env(), ROOT)
  yield server
  server.close()
