"""Tests for calm_jax/convert: safetensors I/O, config mapping, the key map's errors, scan layouts."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from calm_jax import config as config_lib
from calm_jax.convert import ConvertError
from calm_jax.convert import hf_config
from calm_jax.convert import hf_files
from calm_jax.convert import keymap
from calm_jax.convert import safetensors_io
from calm_jax.convert import workdirs
from calm_jax.convert import reference_check
from tests import fixture_maker

pytestmark = pytest.mark.unit

SIZES = dict(batch=2, length=16, seed=3,
             autoencoder=dict(vocab_size=61, hidden_size=24, intermediate_size=40,
                              latent_size=8),
             calm=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, num_mlp_layers=2,
                       noise_size=4, num_samples=3))


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
  return fixture_maker.make_fixture(str(tmp_path_factory.mktemp("fx") / "small"), **SIZES)


@pytest.fixture(scope="module")
def parts(fixture):
  arrays, meta = reference_check.load_fixture(fixture)
  return arrays, meta


def test_safetensors_io_round_trips_with_the_official_library(tmp_path):
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(0)
  tensors = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32),
             "b": np.arange(7, dtype=np.int64), "c": np.zeros((0, 2), np.float32),
             "h": rng.normal(size=(4,)).astype(np.float16)}
  path = str(tmp_path / "ours.safetensors")
  specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
  assert safetensors_io.write(path, specs, iter(tensors.values()), metadata={"format": "pt"}) == 4
  theirs = load_file(path)
  assert set(theirs) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(theirs[k], v)
  save_file(tensors, str(tmp_path / "theirs.safetensors"))
  f = safetensors_io.SafetensorsFile(str(tmp_path / "theirs.safetensors"))
  for k, v in tensors.items():
    assert f.shape(k) == v.shape
    np.testing.assert_array_equal(f.get(k), v)
  f.close()


def test_safetensors_reads_bfloat16(tmp_path):
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file
  x = torch.randn(3, 4).to(torch.bfloat16)
  save_file({"x": x}, str(tmp_path / "bf16.safetensors"))
  f = safetensors_io.SafetensorsFile(str(tmp_path / "bf16.safetensors"))
  got = f.get("x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())
  f.close()


def test_safetensors_write_checks_each_tensor_against_its_spec(tmp_path):
  with pytest.raises(ValueError, match="its spec says"):
    safetensors_io.write(str(tmp_path / "x.safetensors"), [("x", (2,), np.float32)],
                         iter([np.zeros(3, np.float32)]))


def test_kind_is_recognised_from_architectures_or_keys():
  assert hf_config.detect_kind({"architectures": ["Autoencoder"]}, [], "c") == "autoencoder"
  assert hf_config.detect_kind({"architectures": ["EnergyTransformer"], "model_type": ""}, [],
                               "c") == "calm"
  assert hf_config.detect_kind({"model_type": ""}, ["mlp_generator.noise_embd.weight"],
                               "c") == "calm"
  assert hf_config.detect_kind({}, ["encoder.squeeze_layer.weight"], "c") == "autoencoder"
  with pytest.raises(ConvertError, match="flow head is not mapped"):
    hf_config.detect_kind({"architectures": ["FlowTransformer"]}, [], "c")
  with pytest.raises(ConvertError, match="generative_head.net"):
    hf_config.detect_kind({}, ["generative_head.net.input_proj.weight"], "c")
  with pytest.raises(ConvertError, match="model_type='diffusion'"):
    hf_config.detect_kind({"architectures": ["EnergyTransformer"], "model_type": "diffusion"},
                          [], "c")
  with pytest.raises(ConvertError, match="neither architectures"):
    hf_config.detect_kind({}, ["lm_head.weight"], "c")


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("attention_bias", True, "attention_bias=True"),
    ("mlp_bias", True, "mlp_bias=True"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("attention_dropout", 0.1, "attention_dropout=0.1"),
    ("head_dim", 7, "head_dim=7"),
])
def test_unsupported_calm_fields_are_errors_naming_the_field(field, value, match):
  hf = dict(fixture_maker.CALM_DEFAULTS, **{field: value})
  with pytest.raises(ConvertError, match=match):
    hf_config.calm_config(hf, "HF/config.json")


def test_a_tiny_run_exports_whatever_its_training_targets_were():
  """num_target_samples / target_std_scale only shape the training loss: export allows them."""
  config = config_lib.load_experiment("calm.py:size=tiny")
  assert (config.model.num_target_samples, config.model.target_std_scale) == (1, 0.0)
  hf = hf_config.hf_calm_config(config, "autoencoder")
  assert (hf["num_samples"], hf["beta"], hf["patch_size"]) == (4, 0.25, 4)  # the final beta
  config.model.head_hidden = config.model.hidden      # the reference's width, said outright
  assert hf_config.hf_calm_config(config, "autoencoder")["hidden_size"] == config.model.hidden
  config.model.head_hidden = config.model.hidden // 2  # a narrower head: no reference layout
  with pytest.raises(ConvertError, match="head_hidden=64"):
    hf_config.hf_calm_config(config, "autoencoder")
  config.model.head_hidden = 0
  config.model.layer_norm_eps = 1e-5                  # changes the network: refused
  with pytest.raises(ConvertError, match="layer_norm_eps=1e-05"):
    hf_config.hf_calm_config(config, "autoencoder")


def test_config_mapping_reads_every_size():
  hf = dict(fixture_maker.CALM_DEFAULTS, hidden_size=48, num_attention_heads=6,
            num_key_value_heads=2, num_hidden_layers=3, num_mlp_layers=2, noise_size=5,
            num_samples=4, rope_theta=5e5, rms_norm_eps=1e-5, vocab_size=97, latent_size=12,
            patch_size=2, intermediate_size=96, beta=1.5)
  m = hf_config.calm_config(hf, "c").model
  assert (m.hidden, m.heads, m.kv_heads, m.layers, m.num_head_blocks, m.noise_dim) == (
      48, 6, 2, 3, 2, 5)
  assert (m.num_model_samples, m.rope_theta, m.norm_eps, m.vocab_size, m.latent_dim) == (
      4, 5e5, 1e-5, 97, 12)
  assert (m.patch_size, m.mlp, m.beta, m.num_target_samples, m.layer_norm_eps) == (
      2, 96, 1.5, 100, 1e-6)
  assert m.targets_bf16_embeddings_in_training
  ae = hf_config.autoencoder_config(dict(fixture_maker.AE_DEFAULTS, ae_dropout=0.2,
                                         num_encoder_layers=4), "c").model
  assert (ae.latent_dropout, ae.token_mask_rate, ae.mask_id, ae.encoder_layers) == (0.2, 0.2, 0, 4)
  assert ae.encoder_bf16_embeddings_in_training
  with pytest.raises(ConvertError, match="num_decoder_layers=3"):
    hf_config.autoencoder_config(dict(fixture_maker.AE_DEFAULTS, num_decoder_layers=3), "c")


def _converted_rules(parts, scan):
  arrays, meta = parts
  ae_config = hf_config.autoencoder_config(meta["config_kwargs"]["autoencoder"], "fx")
  config = hf_config.calm_config(meta["config_kwargs"]["calm"], "fx")
  config.model.scan_layers = scan
  shapes = workdirs.abstract_param_shapes(config, ae_config)
  return config, ae_config, keymap.calm_rules(config.model, ae_config.model), shapes


class _Edited:
  """A fixture's CALM state dict with keys added, removed or replaced."""

  def __init__(self, arrays, add=None, drop=(), replace=None):
    self._base = reference_check.FixtureTensors(arrays, "params/calm/", "fx")
    self._add, self._drop, self._replace = add or {}, set(drop), replace or {}

  def keys(self):
    return [k for k in self._base.keys() if k not in self._drop] + list(self._add)

  def get(self, key):
    if key in self._add:
      return self._add[key]
    if key in self._replace:
      return self._replace[key](self._base.get(key))
    return self._base.get(key)

  def location(self, key):
    return "fx/model.safetensors"


def test_import_errors_name_the_key(parts):
  arrays, _ = parts
  _, _, rules, shapes = _converted_rules(parts, scan=True)
  cases = [
      (dict(add={"lm_head.weight": np.zeros((2, 2), np.float32)}), "lm_head.weight"),
      (dict(drop=["transformer.layers.1.mlp.up_proj.weight"]),
       "'transformer.layers.1.mlp.up_proj.weight' is missing"),
      (dict(replace={"embed_proj.0.weight": lambda w: w[:, :-1]}),
       r"embed_proj.0.weight has shape \[64, 127\], but the sizes in config.json need \[64, 128\]"),
      (dict(replace={"generative_head.final_layer.linears.2.bias": lambda b: b + 1}),
       "differs from 'mlp_generator.final_layer.linears.2.bias'"),
      (dict(replace={"ae_model.decoder.lm_head_weight": lambda w: -w}),
       "'ae_model.decoder.lm_head_weight' differs from 'ae_model.encoder.embed_tokens.weight'"),
  ]
  for edit, match in cases:
    with pytest.raises(ConvertError, match=match):
      keymap.import_params(_Edited(arrays, **edit), rules, shapes, "fx")
  inv_freq = {"transformer.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
  keymap.import_params(_Edited(arrays, add=inv_freq), rules, shapes, "fx")   # old buffers: ignored


def test_scanned_and_unscanned_layouts_hold_the_same_weights(parts):
  arrays, _ = parts
  flat = {}
  for scan in (True, False):
    config, _, rules, shapes = _converted_rules(parts, scan)
    params = keymap.import_params(_Edited(arrays), rules, shapes, "fx")
    flat[scan] = keymap._flat(params)  # pylint: disable=protected-access
    back = dict(zip([k for r in rules for k in (r.key,) + r.aliases],
                    keymap.export_tensors(params, rules)))
    for key, value in back.items():
      np.testing.assert_array_equal(value, arrays["params/calm/" + key])
  stacked = flat[True][("transformer", "layers", "attn", "out", "kernel")]
  for i in range(config.model.layers):
    unscanned = flat[False][("transformer", f"layers_{i}", "attn", "out", "kernel")]
    np.testing.assert_array_equal(stacked[i], unscanned)


def test_bin_needs_torch_with_a_clear_error(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ConvertError, match=r"pip install -e '\.\[convert\]'"):
    hf_files.CheckpointTensors(str(tmp_path))


def test_missing_weights_and_config_are_errors(tmp_path):
  with pytest.raises(ConvertError, match="config.json not found"):
    hf_files.read_config(str(tmp_path))
  with pytest.raises(ConvertError, match="holds neither model.safetensors nor pytorch_model.bin"):
    hf_files.CheckpointTensors(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
  with pytest.raises(ConvertError, match="named by the index but missing"):
    hf_files.CheckpointTensors(str(tmp_path))
  assert not os.path.exists(tmp_path / "model-00001-of-00002.safetensors")


def test_conversion_holds_one_copy_of_the_model(tmp_path):
  """Import fills one tree tensor by tensor (the file is memory-mapped); export streams."""
  import tracemalloc
  from safetensors.numpy import save_file
  ae_kw = dict(fixture_maker.AE_DEFAULTS, vocab_size=2048, hidden_size=128, intermediate_size=320)
  calm_kw = dict(fixture_maker.CALM_DEFAULTS, vocab_size=2048, hidden_size=256,
                 intermediate_size=640, num_hidden_layers=4, num_mlp_layers=2)
  sd = fixture_maker.calm_state_dict(calm_kw, fixture_maker.autoencoder_state_dict(ae_kw, 0), 1)
  path = tmp_path / "model.safetensors"
  save_file(sd, str(path))
  largest = max(v.nbytes for v in sd.values())
  del sd
  config = hf_config.calm_config(calm_kw, "c")
  ae_config = hf_config.autoencoder_config(ae_kw, "c")
  rules = keymap.calm_rules(config.model, ae_config.model)
  shapes = workdirs.abstract_param_shapes(config, ae_config)
  model_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
  assert model_bytes > 4 * largest           # the bound below says something
  (tmp_path / "config.json").write_text("{}")
  tracemalloc.start()
  with hf_files.CheckpointTensors(str(tmp_path)) as tensors:
    params = keymap.import_params(tensors, rules, shapes, "c")
  _, peak = tracemalloc.get_traced_memory()
  assert peak < model_bytes + 3 * largest, (peak, model_bytes, largest)
  tracemalloc.reset_peak()
  before, _ = tracemalloc.get_traced_memory()
  safetensors_io.write(str(tmp_path / "out.safetensors"), keymap.export_specs(rules, shapes),
                       keymap.export_tensors(params, rules))
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak - before < 4 * largest, (peak - before, largest)
