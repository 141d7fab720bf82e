"""The trainer: sharded == unsharded, exact resume, gradient accumulation, loss falls."""
import jax
import numpy as np
import pytest

from calm_jax import config as config_lib
from calm_jax import runs as runs_lib
from calm_jax.cli import train as cli_train
from calm_jax import stages
from calm_jax.training import loop
from calm_jax.training import state as state_lib
from tests.conftest import TINY_VOCAB
from tests.run_helpers import metric_curve as losses
from tests.run_helpers import tiny_run_config

pytestmark = pytest.mark.integration


def make_config(experiment, tiny_tokenizer_path, **overrides):
  return tiny_run_config(experiment, tiny_tokenizer_path, TINY_VOCAB, **overrides)


def test_autoencoder_sharded_equals_single_device(tiny_tokenizer_path, tmp_path):
  runs = {}
  for name, mesh, devices in [("one", (1, 1, 1), jax.devices()[:1]),
                              ("data_fsdp", (-1, 2, 1), None),
                              ("data_tensor", (-1, 1, 2), None)]:
    config = make_config("autoencoder.py:size=tiny", tiny_tokenizer_path, train__steps=3)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
    loop.train_and_evaluate(config, str(tmp_path / name), devices)
    runs[name] = losses(str(tmp_path / name))
  assert len(runs["one"]) == 3
  # The log carries the analytic FLOPs per token; a CPU has no peak, so no MFU.
  want = stages.train_flops_per_token(config)["total"]
  assert losses(str(tmp_path / "one"), "flops_per_token") == [want] * 3
  assert not losses(str(tmp_path / "one"), "mfu")
  np.testing.assert_allclose(runs["data_fsdp"], runs["one"], rtol=2e-5)
  np.testing.assert_allclose(runs["data_tensor"], runs["one"], rtol=2e-5)


def test_params_are_sharded_as_the_rules_say(tiny_tokenizer_path, tmp_path):
  config = make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 2, 2
  from calm_jax.parallel import sharding
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules(config)
  with sharding.activate(mesh, rules):
    parts = state_lib.build(config, mesh, rules)
  specs = jax.tree.map(lambda s: s.spec, parts["state_shardings"].params)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): spec
          for path, spec in jax.tree_util.tree_flatten_with_path(specs)[0]}
  embed = [spec for name, spec in flat.items() if "embed" in name.lower()]
  assert embed and all(spec == jax.sharding.PartitionSpec("tensor", "fsdp") for spec in embed)
  mlp = [spec for name, spec in flat.items() if "mlp" in name.lower() and len(spec) == 3]
  assert mlp and all("tensor" in tuple(spec) for spec in mlp)


def test_resume_continues_bit_identically(tiny_tokenizer_path, tmp_path):
  straight = str(tmp_path / "straight")
  loop.train_and_evaluate(make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path,
                                       train__steps=6), straight)
  resumed = str(tmp_path / "resumed")
  loop.train_and_evaluate(make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path,
                                       train__steps=3), resumed)
  loop.train_and_evaluate(make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path,
                                       train__steps=6), resumed)
  assert losses(resumed) == losses(straight)


def test_weight_ema_resumes_bit_identically_and_is_the_params_eval_reads(tiny_tokenizer_path,
                                                                         tmp_path):
  """With train.ema_decay the checkpoint's params item is the average (what calm-eval, generate,
  export and init_from read); the raw params resume training from the train state."""
  config = lambda steps, decay=0.9: make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path,
                                                train__steps=steps, train__ema_decay=decay)
  straight, resumed, plain = (str(tmp_path / name) for name in ("straight", "resumed", "plain"))
  loop.train_and_evaluate(config(6), straight)
  loop.train_and_evaluate(config(3), resumed)
  loop.train_and_evaluate(config(6), resumed)
  loop.train_and_evaluate(config(6, decay=0.0), plain)
  assert losses(resumed) == losses(straight) == losses(plain)   # the average never trains
  ema, ema_resumed, raw = (runs_lib.open_run(path, 6).params for path in (straight, resumed, plain))
  jax.tree.map(np.testing.assert_array_equal, ema, ema_resumed)
  gaps = jax.tree.leaves(jax.tree.map(lambda e, p: float(np.max(np.abs(e - p))), ema, raw))
  assert max(gaps) > 1e-6                 # the saved params are the average, not the last step's


def test_gradient_accumulation_matches_full_batch(tiny_tokenizer_path, tmp_path):
  full = make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path, train__steps=3,
                     train__batch_size=16)
  accum = make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path, train__steps=3,
                      train__batch_size=16, train__grad_accum_steps=2)
  loop.train_and_evaluate(full, str(tmp_path / "full"))
  loop.train_and_evaluate(accum, str(tmp_path / "acc"))
  np.testing.assert_allclose(losses(str(tmp_path / "acc")), losses(str(tmp_path / "full")),
                             rtol=1e-5)


def test_ar_loss_falls(tiny_tokenizer_path, tmp_path):
  config = make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path, train__steps=40,
                       train__log_every=5, train__eval_every=40, train__eval_batches=2,
                       optim__warmup_steps=5)
  result = loop.train_and_evaluate(config, str(tmp_path))
  curve = losses(str(tmp_path))
  assert curve[-1] < curve[0] - 1.0
  assert "eval/loss" in result


def test_workdir_with_other_config_is_refused(tiny_tokenizer_path, tmp_path):
  loop.train_and_evaluate(make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path,
                                       train__steps=1), str(tmp_path))
  other = make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path, train__steps=2)
  other.optim.lr = 1e-2
  with pytest.raises(config_lib.ConfigError, match="optim.lr"):
    loop.train_and_evaluate(other, str(tmp_path))


def test_compile_only_reports_per_device_memory(tiny_tokenizer_path, tmp_path):
  config = make_config("ar_baseline.py:size=tiny", tiny_tokenizer_path)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 4, 1
  report = cli_train.compile_only(config, str(tmp_path))
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  full_gib = report["params_total"] * 4 / 1024**3
  # Every weight matrix has an 'embed' dim sharded 4 ways over fsdp; norms stay replicated.
  assert full_gib / 4 <= report["per_device_gib"]["params"] < full_gib / 3
  assert report["per_device_gib"]["optimizer"] > report["per_device_gib"]["params"]
  # The analytic count per step (XLA's counts the scanned layer stack once: lower).
  per_token = stages.train_flops_per_token(config)["total"]
  assert report["flops_per_token"] == per_token
  assert report["flops_per_step_per_device"] == pytest.approx(per_token * 8 * 32 / 8)
  assert 0 < report["xla_flops_per_step_per_device"] < report["flops_per_step_per_device"]
  for key in ("compiled_temp", "compiled_arguments", "compiled_output"):
    assert report["per_device_gib"][key] >= 0
  assert (tmp_path / "compile_report.json").exists()


def test_compile_only_calm_without_autoencoder_run(tmp_path):
  config = make_config("calm.py:size=tiny", "")
  report = cli_train.compile_only(config, str(tmp_path))
  assert report["frozen_params_total"] > 0 and report["params_total"] > 0
