"""Stage 2 in the trainer: the frozen autoencoder link, sharded == single device, every head."""
import jax
import numpy as np
import optax
import pytest

from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax.parallel import sharding
from calm_jax.training import loop
from calm_jax.training import state as state_lib
from tests.run_helpers import metric_curve
from tests.run_helpers import tiny_run_config
from tests.conftest import TINY_VOCAB

pytestmark = pytest.mark.integration

ONE_DEVICE = jax.devices()[:1]   # sharding is tested once below; one device compiles faster


@pytest.fixture(scope="module")
def ae_workdir(tiny_tokenizer_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ae"))
  config = tiny_run_config("autoencoder.py:size=tiny", tiny_tokenizer_path, TINY_VOCAB,
                           train__steps=2)
  loop.train_and_evaluate(config, workdir, ONE_DEVICE)
  return workdir


def calm_config(ae_workdir, variant="size=tiny", **overrides):
  config = tiny_run_config(f"calm.py:{variant}", "", TINY_VOCAB, **overrides)
  config.autoencoder.workdir = ae_workdir
  return config


def test_calm_sharded_equals_single_device(ae_workdir, tmp_path):
  curves = {}
  for name, mesh, devices in [("one", (1, 1, 1), ONE_DEVICE),
                              ("sharded", (-1, 2, 2), None)]:
    config = calm_config(ae_workdir, train__steps=2)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    loop.train_and_evaluate(config, str(tmp_path / name), devices)
    curves[name] = metric_curve(str(tmp_path / name))
  assert len(curves["one"]) == 2
  np.testing.assert_allclose(curves["sharded"], curves["one"], rtol=2e-5)


def test_autoencoder_is_frozen_outside_the_optimizer(ae_workdir, tmp_path):
  config = calm_config(ae_workdir)
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, ONE_DEVICE)
  rules = sharding.rules(config)
  with sharding.activate(mesh, rules):
    parts = state_lib.build(config, mesh, rules)
  assert "autoencoder" not in parts["abstract_state"].params
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(parts["abstract_state"].opt_state)[0]]
  assert opt_paths and not any("autoencoder" in p for p in opt_paths)
  assert set(parts["abstract_frozen"]) == {"autoencoder"}
  # The tokenizer comes from the autoencoder run when config.data.tokenizer is empty.
  loop.train_and_evaluate(config, str(tmp_path), ONE_DEVICE)
  saved = config_lib.load_config(str(tmp_path))
  assert saved.data.tokenizer == config_lib.load_config(ae_workdir).data.tokenizer



def test_opening_a_run_restores_params_only(ae_workdir, tmp_path, monkeypatch):
  """runs.open_run: no optimizer, no train state, the autoencoder's config read once."""
  config = calm_config(ae_workdir, train__steps=1)
  loop.train_and_evaluate(config, str(tmp_path), ONE_DEVICE)
  calls = []
  real = runs.autoencoder_config
  monkeypatch.setattr(runs, "autoencoder_config", lambda c: calls.append(c) or real(c))
  monkeypatch.setattr(optax, "adamw", lambda *a, **k: pytest.fail("open_run built an optimizer"))
  run = runs.open_run(str(tmp_path), devices=ONE_DEVICE)
  assert len(calls) == 1 and "autoencoder" in run.params and run.step == 1
  assert not hasattr(run, "opt_state") and run.ae_config.stage == "autoencoder"


def test_mismatched_autoencoder_fails_before_compiling(ae_workdir, tmp_path):
  config = calm_config(ae_workdir, "size=tiny,K=2")
  with pytest.raises(config_lib.ConfigError, match="model.patch_size=2 does not match"):
    loop.train_and_evaluate(config, str(tmp_path), ONE_DEVICE)


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_other_heads_train_in_the_trainer(ae_workdir, tmp_path, head):
  config = calm_config(ae_workdir, f"size=tiny,head={head}", train__steps=2)
  result = loop.train_and_evaluate(config, str(tmp_path), ONE_DEVICE)
  assert np.isfinite(result["loss"]) and f"{head}_loss" in result
