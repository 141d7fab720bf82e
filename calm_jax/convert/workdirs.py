"""calm-convert's two directions: a reference checkpoint directory <-> a calm_jax workdir.

Import (HF_DIR -> WORKDIR): config.json is mapped (hf_config.py), the tensors are
converted one at a time (keymap.py) into a params-only orbax checkpoint at step 0,
the tokenizer is written to WORKDIR/tokenizer/ (with the reference scripts' [PAD] added
when the tokenizer lacks a pad token), and WORKDIR/converted.json records the source,
the reference config.json and the params digest. A CALM checkpoint's frozen autoencoder
becomes its own converted stage-1 workdir, WORKDIR/autoencoder, linked from the CALM
config (config.autoencoder.workdir/step/digest). It comes from --autoencoder HF_AE_DIR
when given (and must then equal the ae_model.* weights if the CALM checkpoint holds
them), else from the ae_model.* weights with the config.json at the CALM config's
ae_path when that exists, else with sizes read off the tensors and AutoencoderConfig's
defaults for the rest (training-only fields and rms_norm_eps = 1e-6).

Export (WORKDIR -> HF_DIR): the reference's layout, config.json + model.safetensors with
every key its state_dict() has (aliases included), the tokenizer files, and for a CALM run
its autoencoder in HF_DIR/autoencoder (the reference's EnergyTransformer loads its
autoencoder from config.ae_path, which points there). Both directions are bit-exact
for float32 weights.
"""
import json
import logging
import os
import re
import shutil

import flax.linen as nn
import jax
import numpy as np

from calm_jax import checkpoint
from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax import stages
from calm_jax.convert import ConvertError
from calm_jax.convert import hf_config
from calm_jax.convert import hf_files
from calm_jax.convert import keymap
from calm_jax.convert import safetensors_io
from calm_jax.data import hf_tokenizer
from calm_jax.data import tokenizer as tokenizer_lib

STEP = 0                        # the step of a converted checkpoint
TOKENIZER_DIR = "tokenizer"
AUTOENCODER_DIR = "autoencoder"


def abstract_param_shapes(config, ae_config=None):
  """{path: shape} of the params of config's model (CALM: its frozen autoencoder included)."""
  model = stages.build_model(config, ae_model_config=ae_config.model if ae_config else None)
  k = config.model.patch_size
  batch = {"tokens": np.zeros((1, 2 * k), np.int32), "mask": np.ones((1, 2 * k), np.int32)}
  rngs = {n: jax.random.key(0) for n in ("params", "dropout", "sample")}
  abstract = jax.eval_shape(lambda: model.init(rngs, batch))["params"]
  return keymap.param_shapes(nn.unbox(abstract))


# -- Import ---------------------------------------------------------------------------------------
def _write_tokenizer(source, workdir, hf):
  """Copies the tokenizer into WORKDIR/tokenizer (or tokenizer.model); returns (path, tokenizer)."""
  tok = tokenizer_lib.load(source)
  if hf_tokenizer.is_hf_tokenizer(source):
    dest = os.path.join(workdir, TOKENIZER_DIR)
    os.makedirs(dest, exist_ok=True)
    src_dir = os.path.dirname(hf_tokenizer.tokenizer_json_path(source))
    for name in hf_tokenizer.SIDE_FILES:
      if os.path.exists(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dest, name))
    tok.save(dest)
    tok = tokenizer_lib.load(dest)
  else:
    dest = os.path.join(workdir, "tokenizer.model")
    shutil.copyfile(source, dest)
  if tok.vocab_size != hf["vocab_size"]:
    raise ConvertError(f"The tokenizer {source} has {tok.vocab_size} tokens but config.json has "
                       f"vocab_size={hf['vocab_size']}; pass the tokenizer this model was "
                       "trained with (--tokenizer).")
  for role in ("bos", "eos", "pad"):
    want = hf.get(f"{role}_token_id")
    if want is not None and getattr(tok, f"{role}_id") != want:
      raise ConvertError(f"The tokenizer {source} has {role} id {getattr(tok, f'{role}_id')} but "
                         f"config.json has {role}_token_id={want}; pass the tokenizer this model "
                         "was trained with (--tokenizer).")
  return os.path.abspath(dest), tok


def _tokenizer_source(hf_dir, tokenizer):
  if tokenizer:
    return tokenizer
  if os.path.exists(os.path.join(hf_dir, hf_tokenizer.TOKENIZER_JSON)):
    return hf_dir
  raise ConvertError(f"{hf_dir} holds no tokenizer.json; pass --tokenizer (for the released "
                     "models: the reference repository's llama3_tokenizer/ directory).")


def _save_workdir(workdir, config, params, provenance):
  """Writes config.json, converted.json and the params-only checkpoint; returns the digest."""
  if os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)):
    raise ConvertError(f"{workdir} already holds a run (config.json); use a new --output.")
  digest = checkpoint.params_digest(params)
  config_lib.save_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  try:
    ckpt.save_params(STEP, params)
  finally:
    ckpt.close()
  with open(os.path.join(workdir, checkpoint.CONVERTED_FILE), "w") as f:
    json.dump(dict(provenance, params_digest=digest, step=STEP), f, indent=2)
  return digest


def _infer_autoencoder_config(tensors, calm_hf):
  """AutoencoderConfig fields of ae_model.*: sizes from the tensors, the rest defaults."""
  shape = tensors.shape
  vocab, hidden = shape("ae_model.encoder.embed_tokens.weight")
  count = lambda part: len({m.group(1) for k in tensors.keys()
                            if (m := re.match(rf"ae_model\.{part}\.(\d+)\.", k))})
  mlp_keys = [key for key in (f"ae_model.{part}.{part}_layers.0.mlp.gate_proj.weight"
                              for part in ("encoder", "decoder")) if key in tensors.keys()]
  hf = {"architectures": ["Autoencoder"], "vocab_size": vocab, "hidden_size": hidden,
        # With 0 + 0 layers (a linear autoencoder) no MLP records it, and none uses it.
        "intermediate_size": shape(mlp_keys[0])[0] if mlp_keys else hidden,
        "latent_size": shape("ae_model.encoder.hidden_to_latent.weight")[0] // 2,
        "patch_size": shape("ae_model.encoder.squeeze_layer.weight")[1] // hidden,
        "num_encoder_layers": count("encoder.encoder_layers"),
        "num_decoder_layers": count("decoder.decoder_layers"),
        # AutoencoderConfig's defaults: not recorded in the CALM checkpoint.
        "ae_dropout": 0.15, "kl_clamp": 0.5, "kl_weight": 1e-3, "rms_norm_eps": 1e-6,
        "initializer_range": 0.02, "hidden_act": "silu", "mlp_bias": False}
  for f in ("bos_token_id", "eos_token_id", "pad_token_id"):
    hf[f] = calm_hf.get(f)
  return hf


def _import_autoencoder(hf, tensors, prefix, workdir, tokenizer_path, provenance):
  """An autoencoder state dict (keys under `prefix`) -> a stage-1 workdir: (digest, params)."""
  source = provenance["source"]
  config = hf_config.autoencoder_config(hf, source)
  config.data.tokenizer = tokenizer_path
  rules = keymap.autoencoder_rules(config.model, prefix)
  params = keymap.import_params(_Prefixed(tensors, prefix), rules,
                                abstract_param_shapes(config), source)
  provenance = dict(provenance, kind=hf_config.AUTOENCODER, reference_config=hf)
  return _save_workdir(workdir, config, params, provenance), params


class _Prefixed:
  """The keys under `prefix` of a CheckpointTensors (the ae_model.* part of a CALM checkpoint)."""

  def __init__(self, tensors, prefix):
    self._t, self._p = tensors, prefix

  def keys(self):
    return [k for k in self._t.keys() if k.startswith(self._p)]

  def get(self, key):
    return self._t.get(key)

  def location(self, key):
    return self._t.location(key)


def import_checkpoint(hf_dir, workdir, autoencoder=None, tokenizer=None):
  """Converts the reference checkpoint in hf_dir into the calm_jax workdir; returns a summary."""
  if os.path.exists(os.path.join(workdir, config_lib.CONFIG_FILE)):
    raise ConvertError(f"{workdir} already holds a run (config.json); use a new --output.")
  hf = hf_files.read_config(hf_dir)
  source = os.path.abspath(hf_dir)
  with hf_files.CheckpointTensors(hf_dir) as tensors:
    kind = hf_config.detect_kind(hf, tensors.keys(), os.path.join(hf_dir, hf_files.CONFIG))
    if kind == hf_config.CALM and autoencoder is None and not any(
        k.startswith("ae_model.") for k in tensors.keys()):
      raise ConvertError(f"{hf_dir} is a CALM checkpoint without its autoencoder (no ae_model.* "
                         "weights); pass --autoencoder HF_AE_DIR (the reference's Autoencoder "
                         "checkpoint it was trained with).")
    os.makedirs(workdir, exist_ok=True)
    tokenizer_path, tok = _write_tokenizer(_tokenizer_source(hf_dir, tokenizer), workdir, hf)
    provenance = dict(source=source, weights=tensors.format)
    if kind == hf_config.AUTOENCODER:
      digest, _ = _import_autoencoder(hf, tensors, "", workdir, tokenizer_path, provenance)
      logging.info("Converted the autoencoder %s into %s", hf_dir, workdir)
      return dict(kind=kind, workdir=workdir, digest=digest, vocab_size=tok.vocab_size)

    ae_workdir = os.path.join(os.path.abspath(workdir), AUTOENCODER_DIR)
    has_ae = any(k.startswith("ae_model.") for k in tensors.keys())
    if autoencoder is not None:
      ae_hf = hf_files.read_config(autoencoder)
      with hf_files.CheckpointTensors(autoencoder) as ae_tensors:
        if hf_config.detect_kind(ae_hf, ae_tensors.keys(), autoencoder) != hf_config.AUTOENCODER:
          raise ConvertError(f"--autoencoder={autoencoder} is not an Autoencoder checkpoint.")
        ae_digest, _ = _import_autoencoder(
            ae_hf, ae_tensors, "", ae_workdir, tokenizer_path,
            dict(source=os.path.abspath(autoencoder), weights=ae_tensors.format))
    else:
      ae_path = hf.get("ae_path")
      if ae_path and os.path.exists(os.path.join(ae_path, hf_files.CONFIG)):
        ae_hf, ae_from = hf_files.read_config(ae_path), f"the config.json at ae_path={ae_path}"
      else:
        ae_hf, ae_from = _infer_autoencoder_config(tensors, hf), "sizes of the ae_model.* tensors"
      ae_digest, _ = _import_autoencoder(
          ae_hf, tensors, "ae_model.", ae_workdir, tokenizer_path,
          dict(source=source + " (ae_model.*)", weights=tensors.format, config_from=ae_from))
    ae_config = config_lib.load_config(ae_workdir)

    config = hf_config.calm_config(hf, os.path.join(hf_dir, hf_files.CONFIG))
    stages.check_autoencoder_compatible(config, ae_config, ae_workdir)
    config.data.tokenizer = tokenizer_path
    config.autoencoder.update(workdir=ae_workdir, step=STEP, digest=ae_digest)
    rules = keymap.calm_rules(config.model, ae_config.model if has_ae else None)
    shapes = abstract_param_shapes(config, ae_config)
    if not has_ae:
      shapes = {p: s for p, s in shapes.items() if p[0] != "autoencoder"}
    params = keymap.import_params(tensors, rules, shapes, source)
    frozen = params.pop("autoencoder", None)
    if frozen is not None and checkpoint.params_digest(frozen) != ae_digest:
      raise ConvertError(f"The ae_model.* weights of {hf_dir} differ from --autoencoder="
                         f"{autoencoder}: this CALM model was trained with another autoencoder.")
    del frozen
    digest = _save_workdir(workdir, config, params,
                           dict(provenance, kind=kind, reference_config=hf))
  logging.info("Converted the CALM model %s into %s (autoencoder: %s)", hf_dir, workdir,
               ae_workdir)
  return dict(kind=kind, workdir=workdir, digest=digest, autoencoder=ae_workdir,
              autoencoder_digest=ae_digest, vocab_size=tok.vocab_size)


# -- Export ---------------------------------------------------------------------------------------
def _restore_numpy_params(workdir, step, shapes):
  """The params of `workdir` at `step` on one device (one full copy), as a nested dict."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  flat = {p: jax.ShapeDtypeStruct(s, np.float32, sharding=device) for p, s in shapes.items()}
  abstract = keymap._nest(flat)  # pylint: disable=protected-access
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise checkpoint.CheckpointError(f"{workdir} has no checkpoint to export.")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise checkpoint.CheckpointError(f"{workdir} has no checkpoint at step {step} ({steps}).")
    return ckpt.restore_params(step, abstract), step
  finally:
    ckpt.close()


def _reference_config(workdir):
  path = os.path.join(workdir, checkpoint.CONVERTED_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get("reference_config")


def _write_hf_dir(out_dir, hf, rules, shapes, params, tokenizer_path):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, hf_files.CONFIG), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  n = safetensors_io.write(os.path.join(out_dir, hf_files.SAFETENSORS),
                           keymap.export_specs(rules, shapes),
                           keymap.export_tensors(params, rules), metadata={"format": "pt"})
  tok = tokenizer_lib.load(tokenizer_path)
  if hf_tokenizer.is_hf_tokenizer(tokenizer_path):
    src_dir = os.path.dirname(hf_tokenizer.tokenizer_json_path(tokenizer_path))
    for name in hf_tokenizer.SIDE_FILES:
      if os.path.exists(os.path.join(src_dir, name)):
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    tok.save(out_dir)
  else:
    shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))
  return n


def export_checkpoint(workdir, hf_dir, step=None):
  """Writes the run in `workdir` (autoencoder or CALM, energy head) in the reference's layout."""
  config = config_lib.load_config(workdir)
  tok = tokenizer_lib.load(config.data.tokenizer)
  stages.require(config, ("autoencoder", "calm"), f"{workdir} is a {{stage!r}} run; calm-convert "
                 "--to hf exports the autoencoder and CALM (energy head) stages.")
  if not stages.get(config).needs_autoencoder:
    shapes = abstract_param_shapes(config)
    params, step = _restore_numpy_params(workdir, step, shapes)
    hf = hf_config.hf_autoencoder_config(config, _reference_config(workdir), tok)
    rules = keymap.autoencoder_rules(config.model)
    n = _write_hf_dir(hf_dir, hf, rules, shapes, params, config.data.tokenizer)
    return dict(kind=config.stage, hf_dir=hf_dir, step=step, tensors=n)
  ae_config = runs.autoencoder_config(config)
  ae_ckpt, ae_step = runs.autoencoder_step(config)
  ae_ckpt.close()
  ae_out = os.path.join(os.path.abspath(hf_dir), AUTOENCODER_DIR)
  export_checkpoint(config.autoencoder.workdir, ae_out, ae_step)
  shapes = abstract_param_shapes(config, ae_config)
  trainable = {p: s for p, s in shapes.items() if p[0] != "autoencoder"}
  params, step = _restore_numpy_params(workdir, step, trainable)
  frozen, _ = _restore_numpy_params(
      config.autoencoder.workdir, ae_step,
      {p[1:]: s for p, s in shapes.items() if p[0] == "autoencoder"})
  params = dict(params, autoencoder=frozen)
  hf = hf_config.hf_calm_config(config, ae_out, _reference_config(workdir), tok)
  rules = keymap.calm_rules(config.model, ae_config.model)
  n = _write_hf_dir(hf_dir, hf, rules, shapes, params, config.data.tokenizer)
  return dict(kind=config.stage, hf_dir=hf_dir, step=step, tensors=n, autoencoder=ae_out)
