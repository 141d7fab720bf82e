"""calm-convert end to end on fake reference checkpoints written from the golden fixture.

The reference's save_pretrained layout (config.json with architectures and an empty
model_type, model.safetensors / pytorch_model.bin / shards, a tokenizer) is converted;
the workdirs then evaluate (calm-eval), generate (calm-generate), train stage 2 on the
converted autoencoder, fine-tune (config.init_from) and export back bit for bit.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax.cli import eval as cli_eval
from calm_jax.sampling import decode
from calm_jax import runs
from calm_jax.sampling import generate
from calm_jax.training import loop
from calm_jax.convert import ConvertError
from calm_jax.convert import workdirs
from calm_jax.data import tokenizer as tokenizer_lib
from calm_jax.stages import build_model
from tests import fixture_maker
from tests.test_reference import GOLDEN, needs_golden

pytestmark = [pytest.mark.reference, needs_golden]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """{'tok', 'ae', 'calm'}: a 256-token tokenizer (no pad: [PAD] becomes 255) and the HF dirs."""
  base = tmp_path_factory.mktemp("hf")
  tok = fixture_maker.train_tokenizer(str(base / "tok"), 256)
  ae, calm = fixture_maker.write_hf_dirs(GOLDEN, str(base / "st"), "safetensors", tok)
  return dict(tok=tok, ae=ae, calm=calm, base=base)


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("w") / "calm")
  summary = workdirs.import_checkpoint(hf["calm"], workdir)
  return workdir, summary


def _params_of(npz, kind):
  prefix = f"params/{kind}/"
  return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}


def test_the_workdir_links_its_autoencoder_and_tokenizer(hf, converted, tmp_path):
  workdir, summary = converted
  config = config_lib.load_config(workdir)
  assert config.stage == "calm" and config.autoencoder.step == 0
  assert config.autoencoder.workdir == os.path.join(workdir, "autoencoder")
  assert config.autoencoder.digest == summary["autoencoder_digest"]
  assert config.data.tokenizer == os.path.join(workdir, "tokenizer")
  assert config.model.targets_bf16_embeddings_in_training          # the reference's training mode
  with open(os.path.join(workdir, "converted.json")) as f:
    provenance = json.load(f)
  assert provenance["kind"] == "calm" and provenance["weights"] == "model.safetensors"
  assert provenance["reference_config"]["architectures"] == ["EnergyTransformer"]
  # The CALM's ae_model.* weights are the standalone autoencoder: same digest.
  ae = workdirs.import_checkpoint(hf["ae"], str(tmp_path / "ae"))
  assert ae["digest"] == summary["autoencoder_digest"]
  tok = tokenizer_lib.load(config.data.tokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 255, 256)


def test_restored_params_compute_the_fixture_outputs(converted):
  """The orbax checkpoint (scanned layers) holds the reference's weights: outputs to 1e-5."""
  workdir, _ = converted
  run = runs.open_run(workdir, devices=jax.devices()[:1])
  config = run.config.copy_and_resolve_references()
  config.train.compute_dtype = "float32"
  model = build_model(config, run.ae_config.model)
  arrays = np.load(GOLDEN)
  h = model.apply({"params": run.params}, arrays["in/input_ids"].astype(np.int32),
                  method="hidden_states")
  want = arrays["out/calm/backbone_last_hidden"]
  assert np.max(np.abs(np.asarray(h) - want)) <= 1e-5 * np.max(np.abs(want))
  z = arrays["out/calm/head_latent_predictions"][0].reshape(2, 7, -1)
  logits = model.apply({"params": run.params}, z, method="decode_latent")
  want = arrays["out/calm/brier_logits_sample0"]
  assert np.max(np.abs(np.asarray(logits).reshape(want.shape) - want)) <= 1e-5 * np.max(
      np.abs(want))


def _shorter_eval(workdir):
  """Evaluates on 64-token blocks (the converted config has the paper's 8192)."""
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["eval"].update(block_len=64, batch_size=8)
  with open(path, "w") as f:
    json.dump(config, f)


def test_calm_eval_and_generate(converted, tmp_path):
  workdir, _ = converted
  copy = str(tmp_path / "calm")
  shutil.copytree(workdir, copy)
  _shorter_eval(copy)
  [result] = cli_eval.main_eval(copy, data="builtin:python_docs:valid", max_tokens=200,
                                output=str(tmp_path / "eval.json"))
  assert result["stage"] == "calm" and result["num_tokens"] >= 200
  assert all(np.isfinite(result[f"brier{n}"]) for n in range(1, 5))
  assert np.isfinite(result["energy_loss"]) and result["brierlm"] >= 0
  [ae_result] = cli_eval.main_eval(os.path.join(workdir, "autoencoder"),
                                   data="builtin:python_docs:valid", max_tokens=200,
                                   output=str(tmp_path / "ae_eval.json"))
  assert 0.0 <= ae_result["token_accuracy"] <= 1.0
  run = runs.open_run(copy)
  spec = decode.frozen_sampling(run.config.sampling, temperature=1.0, max_tokens=8,
                                    num_samples=2)
  out = generate.generate(run, "The function returns", spec)
  assert len(out["texts"]) == 2 and all(len(t) <= 8 for t in out["tokens"])
  assert all(0 <= i < 256 and i != run.tokenizer.pad_id for t in out["tokens"] for i in t)


def _tiny_calm_config(converted_workdir, **train):
  """experiments/calm.py's tiny run with the converted model (and its autoencoder)."""
  conv = config_lib.load_config(converted_workdir)
  config = config_lib.load_config_file(os.path.join(ROOT, "experiments", "calm.py"))
  config.model = conv.model
  config.autoencoder = conv.autoencoder
  config.data.update(tokenizer=conv.data.tokenizer, vocab_size=conv.data.vocab_size,
                     train="builtin:python_docs", seq_len=32)
  config.train.update(batch_size=4, steps=2, log_every=1, eval_every=0, **train)
  config.checkpoint.update(every_steps=2, async_save=False)
  return config


def test_fine_tune_with_init_from(converted, tmp_path):
  workdir, summary = converted
  config = _tiny_calm_config(workdir)
  config.init_from = workdir + ":0"
  config.optim.update(lr=0.0, weight_decay=0.0)    # no update: the saved params are the converted
  loop.train_and_evaluate(config, str(tmp_path / "ft0"), devices=jax.devices()[:1])
  run = runs.open_run(str(tmp_path / "ft0"), devices=jax.devices()[:1])
  trainable = {k: v for k, v in run.params.items() if k != "autoencoder"}
  assert checkpoint.params_digest(trainable) == summary["digest"]
  config = _tiny_calm_config(workdir)
  config.init_from = workdir
  metrics = loop.train_and_evaluate(config, str(tmp_path / "ft"), devices=jax.devices()[:1])
  assert np.isfinite(metrics["loss"])
  config = _tiny_calm_config(workdir)
  config.init_from = workdir
  config.model.layers = 1
  with pytest.raises(config_lib.ConfigError, match="do not fit this model"):
    loop.train_and_evaluate(config, str(tmp_path / "bad"), devices=jax.devices()[:1])


def test_stage_two_on_the_converted_autoencoder(converted, tmp_path):
  workdir, _ = converted
  config = config_lib.load_config_file(os.path.join(ROOT, "experiments", "calm.py:size=tiny"))
  conv = config_lib.load_config(workdir)
  config.autoencoder.update(workdir=os.path.join(workdir, "autoencoder"), step=0,
                            digest=conv.autoencoder.digest)
  config.model.update(vocab_size=256, latent_dim=16, hidden=32, mlp=64, layers=1, heads=2,
                      kv_heads=2, num_head_blocks=1, noise_dim=8)
  config.data.update(tokenizer="", vocab_size=256, train="builtin:python_docs", seq_len=32)
  config.train.update(batch_size=4, steps=2, log_every=1, eval_every=0)
  config.checkpoint.update(every_steps=2, async_save=False)
  metrics = loop.train_and_evaluate(config, str(tmp_path / "s2"), devices=jax.devices()[:1])
  assert np.isfinite(metrics["loss"])
  assert config_lib.load_config(str(tmp_path / "s2")).data.tokenizer == conv.data.tokenizer
  config.autoencoder.digest = "0" * 64
  with pytest.raises(config_lib.ConfigError, match="different autoencoder"):
    loop.train_and_evaluate(config, str(tmp_path / "s2_bad"), devices=jax.devices()[:1])


def test_a_converted_workdir_is_not_resumed(converted):
  workdir, _ = converted
  config = _tiny_calm_config(workdir)
  with pytest.raises(checkpoint.CheckpointError, match="--config.init_from="):
    loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])


def test_export_reproduces_every_reference_parameter_bit_for_bit(hf, converted, tmp_path):
  from safetensors.numpy import load_file
  workdir, summary = converted
  out = str(tmp_path / "hf_back")
  workdirs.export_checkpoint(workdir, out)
  arrays = np.load(GOLDEN)
  for kind, path in (("calm", out), ("ae", os.path.join(out, "autoencoder"))):
    got, want = load_file(os.path.join(path, "model.safetensors")), _params_of(arrays, kind)
    assert set(got) == set(want)
    for key, value in want.items():
      assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  with open(GOLDEN.replace(".npz", ".json")) as f:
    kwargs = json.load(f)["config_kwargs"]["calm"]
  assert config["architectures"] == ["EnergyTransformer"] and config["model_type"] == "energy"
  assert config["ae_path"] == os.path.join(out, "autoencoder")
  assert {k: config[k] for k in kwargs if k != "model_type"} == {
      k: v for k, v in kwargs.items() if k != "model_type"}
  again = workdirs.import_checkpoint(out, str(tmp_path / "again"))
  assert (again["digest"], again["autoencoder_digest"]) == (summary["digest"],
                                                            summary["autoencoder_digest"])


def test_pytorch_bin_sharded_and_separate_autoencoder_inputs(hf, converted, tmp_path):
  _, summary = converted
  # Sharded safetensors with an index, as save_pretrained writes large models.
  from safetensors.numpy import load_file, save_file
  sharded = str(tmp_path / "sharded")
  shutil.copytree(hf["calm"], sharded)
  tensors = load_file(os.path.join(sharded, "model.safetensors"))
  os.remove(os.path.join(sharded, "model.safetensors"))
  keys = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((keys[::2], keys[1::2])):
    name = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, os.path.join(sharded, name), {"format": "pt"})
    weight_map.update({k: name for k in part})
  with open(os.path.join(sharded, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  assert workdirs.import_checkpoint(sharded, str(tmp_path / "w_sh"))["digest"] == summary["digest"]
  # --autoencoder given: must equal the ae_model.* weights.
  got = workdirs.import_checkpoint(hf["calm"], str(tmp_path / "w_ae"), autoencoder=hf["ae"])
  assert got["autoencoder_digest"] == summary["autoencoder_digest"]
  other_ae = str(tmp_path / "other_ae")
  shutil.copytree(hf["ae"], other_ae)
  ae_tensors = load_file(os.path.join(other_ae, "model.safetensors"))
  ae_tensors["encoder.norm.weight"] = ae_tensors["encoder.norm.weight"] + 1
  save_file(ae_tensors, os.path.join(other_ae, "model.safetensors"), {"format": "pt"})
  with pytest.raises(ConvertError, match="trained with another autoencoder"):
    workdirs.import_checkpoint(hf["calm"], str(tmp_path / "w_bad"), autoencoder=other_ae)
  # No ae_model.* and no --autoencoder: nothing to link.
  bare = str(tmp_path / "bare")
  shutil.copytree(hf["calm"], bare)
  save_file({k: v for k, v in tensors.items() if not k.startswith("ae_model.")},
            os.path.join(bare, "model.safetensors"), {"format": "pt"})
  with pytest.raises(ConvertError, match="--autoencoder HF_AE_DIR"):
    workdirs.import_checkpoint(bare, str(tmp_path / "w_bare"))
  assert workdirs.import_checkpoint(bare, str(tmp_path / "w_bare2"), autoencoder=hf["ae"])[
      "digest"] == summary["digest"]


def test_pytorch_model_bin(hf, converted, tmp_path):
  pytest.importorskip("torch", reason="pytorch_model.bin needs the [convert] extra (torch)")
  _, summary = converted
  _, calm = fixture_maker.write_hf_dirs(GOLDEN, str(tmp_path / "bin"), "bin", hf["tok"])
  got = workdirs.import_checkpoint(calm, str(tmp_path / "w_bin"))
  assert (got["digest"], got["autoencoder_digest"]) == (summary["digest"],
                                                        summary["autoencoder_digest"])


def test_calm_convert_command_line(hf, tmp_path):
  out = str(tmp_path / "cli_ae")
  result = subprocess.run(
      [sys.executable, "-m", "calm_jax.cli.convert", "--input", hf["ae"], "--output", out],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Converted the autoencoder into" in result.stdout
  again = subprocess.run(
      [sys.executable, "-m", "calm_jax.cli.convert", "--input", hf["ae"], "--output", out],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert again.returncode == 1 and "already holds a run" in again.stderr
