"""Experiment configs load for every variant and validation names the field and the fix."""
import json
import os

import pytest

from calm_jax import config as config_lib
from calm_jax import stages

pytestmark = pytest.mark.unit

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")

VARIANTS = [
    "autoencoder.py:size=tiny", "autoencoder.py:size=base", "autoencoder.py:size=tiny,K=8",
    "ar_baseline.py:size=tiny", "ar_baseline.py:size=S", "ar_baseline.py:size=M",
    "ar_baseline.py:size=L", "calm.py:size=tiny", "calm.py:size=M,head=flow",
    "calm.py:size=L,head=diffusion", "calm.py:size=XL", "calm.py:size=tiny,K=2",
    "calm.py:size=M,mesh=v5p-64", "ar_baseline.py:size=S,mesh=h100x32",
]


def _load(variant):
  return config_lib.load_config_file(os.path.join(EXPERIMENTS, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_validates(variant):
  config = _load(variant)
  if config.stage == "calm":
    config.autoencoder.workdir = "/some/run"
  stages.validate(config)


def test_paper_sizes():
  m = _load("calm.py:size=M").model
  assert (m.hidden, m.mlp, m.layers, m.heads, m.num_head_blocks) == (1024, 2752, 16, 16, 4)
  s = _load("ar_baseline.py:size=S").model
  assert (s.hidden, s.mlp, s.layers, s.heads) == (768, 2048, 12, 16)
  ae = _load("autoencoder.py:size=base").model
  assert (ae.hidden, ae.mlp, ae.latent_dim, ae.patch_size) == (512, 1280, 128, 4)


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="Unknown config variant 'sise'"):
    _load("autoencoder.py:sise=tiny")


@pytest.mark.parametrize("field,value,message", [
    ("data.seq_len", 254, "not a multiple of the chunk size"),
    ("data.vocab_size", 123, "config.model.vocab_size"),
    ("data.packing", "zigzag", "config.data.packing"),
    ("train.grad_accum_steps", 5, "grad_accum_steps"),
    ("train.nan_policy", "ignore", "nan_policy"),
])
def test_validation_errors(field, value, message):
  config = _load("autoencoder.py:size=tiny")
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    stages.validate(config)


def test_calm_requires_autoencoder_sane_beta_and_target_scale():
  config = _load("calm.py:size=tiny")
  with pytest.raises(config_lib.ConfigError, match="config.autoencoder.workdir"):
    stages.validate(config)
  config.autoencoder.workdir = "/x"
  config.model.beta = 2.0
  with pytest.raises(config_lib.ConfigError, match="strictly proper"):
    stages.validate(config)
  config.model.beta = 1.0
  config.model.beta_start = 0.0
  with pytest.raises(config_lib.ConfigError, match="config.model.beta_start=0.0"):
    stages.validate(config)
  config.model.beta_start = 1.0
  config.model.beta_anneal_steps = -1
  with pytest.raises(config_lib.ConfigError, match="beta_anneal_steps=-1"):
    stages.validate(config)
  config.model.beta_anneal_steps = 0
  config.model.target_std_scale = -1.0
  with pytest.raises(config_lib.ConfigError, match="config.model.target_std_scale=-1.0"):
    stages.validate(config)


def test_save_load_roundtrip_and_changes(tmp_path):
  config = _load("calm.py:size=tiny")
  config_lib.save_config(config, str(tmp_path))
  loaded = config_lib.load_config(str(tmp_path))
  assert config_lib.config_changes(loaded, config) == []
  assert loaded.mesh.rules == config.mesh.rules
  config.train.log_every += 10        # resumable: logging (train.steps: training/resume.py)
  assert config_lib.config_changes(loaded, config) == []
  config.model.hidden = 64
  assert config_lib.config_changes(loaded, config) == [("model.hidden", 128, 64)]


def test_autoencoder_mismatch_message():
  calm = _load("calm.py:size=tiny,K=2")
  ae = _load("autoencoder.py:size=tiny")
  with pytest.raises(config_lib.ConfigError, match=r"config.model.patch_size=2 does not match"):
    stages.check_autoencoder_compatible(calm, ae, "/runs/ae")


def test_missing_workdir_config(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="not a calm_jax workdir"):
    config_lib.load_config(str(tmp_path))


def test_fields_added_since_a_run_was_saved_are_filled_with_what_it_computed(tmp_path):
  """A config.json written before layer_norm_eps, init_from, ... loads as that run behaved."""
  from experiments import calm as calm_experiment  # pylint: disable=g-import-not-at-top
  config = calm_experiment.get_config("size=tiny")
  config.model.norm_eps = 1e-5
  old = json.loads(config.to_json())
  for section, field in (("model", "layer_norm_eps"),
                         ("model", "targets_bf16_embeddings_in_training"),
                         ("data", "document_eos"), ("data", "pad_in_loss"),
                         ("autoencoder", "digest"), ("model", "beta_start"),
                         ("model", "beta_anneal_steps")):
    del old[section][field]
  del old["init_from"]
  del old["data"]["max_bad_fraction"]
  old["data"]["skip_bad_records"] = False  # replaced by data.max_bad_fraction
  (tmp_path / "config.json").write_text(json.dumps(old))
  loaded = config_lib.load_config(str(tmp_path))
  assert loaded.data.max_bad_fraction == 0.001 and "skip_bad_records" not in loaded.data
  assert loaded.model.layer_norm_eps == 1e-5           # its LayerNorms used model.norm_eps
  assert not loaded.model.targets_bf16_embeddings_in_training
  assert loaded.data.document_eos and not loaded.data.pad_in_loss
  assert loaded.init_from == "" and loaded.autoencoder.digest == ""
  assert loaded.model.beta_start == loaded.model.beta and loaded.model.beta_anneal_steps == 0
  # Resuming with today's defaults flags only what the old run computed differently.
  # (an old run trained with one exponent, today's tiny anneals it from 1.0 over 1000 steps)
  assert config_lib.config_changes(loaded, config) == [
      ("model.beta_anneal_steps", 0, 1000), ("model.beta_start", 0.25, 1.0),
      ("model.layer_norm_eps", 1e-5, 1e-6)]
  config.model.update(layer_norm_eps=1e-5, beta_start=0.25, beta_anneal_steps=0)
  assert not config_lib.config_changes(loaded, config)
  old["data"]["skip_bad_records"] = True  # skipped any number of bad lines
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert config_lib.load_config(str(tmp_path)).data.max_bad_fraction == 1.0
