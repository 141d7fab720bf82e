"""A reference checkpoint directory: config.json and its tensors, read one tensor at a time.

Weights are `model.safetensors` (read with numpy, memory-mapped) or `pytorch_model.bin`
(needs torch: `pip install -e '.[convert]'`; loaded with mmap=True, weights_only=True),
either possibly sharded with a `*.index.json` weight map, as save_pretrained writes them.
"""
import json
import os

import numpy as np

from calm_jax.convert import ConvertError
from calm_jax.convert import safetensors_io

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
BIN = "pytorch_model.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_config(hf_dir):
  path = os.path.join(hf_dir, CONFIG)
  if not os.path.exists(path):
    raise ConvertError(f"{path} not found: --input must be a reference checkpoint directory "
                       "(save_pretrained output with config.json and the weights).")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConvertError(f"{path} is not valid JSON ({e}).") from e


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConvertError("Reading pytorch_model.bin needs torch, which calm_jax does not install by "
                       "default: pip install -e '.[convert]' (or convert the checkpoint to "
                       "model.safetensors, which needs no torch).") from e
  return torch


class _BinFile:
  """A pytorch_model.bin state dict, memory-mapped by torch.load."""

  def __init__(self, path):
    torch = _torch()
    self.path = path
    try:
      self._sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ConvertError(
          f"{path} could not be loaded by torch.load ({type(e).__name__}: {e}).") from e
    self._sd = self._sd.get("state_dict", self._sd) if isinstance(self._sd, dict) else self._sd

  def keys(self):
    return list(self._sd)

  def shape(self, key):
    return tuple(self._sd[key].shape)

  def get(self, key):
    t = self._sd[key].detach()
    if t.dtype == _torch().bfloat16:
      t = t.float()           # numpy has no bfloat16; float32 holds every bfloat16 exactly
    return t.numpy()

  def close(self):
    self._sd = None


class CheckpointTensors:
  """The tensors of a checkpoint directory (all shards): keys(), shape(key), get(key) -> float32.

  get() returns one tensor at a time; nothing is read before it is asked for.
  """

  def __init__(self, hf_dir):
    self.hf_dir = hf_dir
    self._files, self._where = {}, {}
    for base, opener in ((SAFETENSORS, safetensors_io.SafetensorsFile), (BIN, _BinFile)):
      index = os.path.join(hf_dir, base + ".index.json")
      if os.path.exists(index):
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
        for name in sorted(set(weight_map.values())):
          self._open(name, opener)
        for key, name in weight_map.items():
          if key not in self._files[name].keys():
            raise ConvertError(f"{index} puts {key!r} in {name}, which does not hold it.")
          self._where[key] = name
        self.format = base
        return
      if os.path.exists(os.path.join(hf_dir, base)):
        self._open(base, opener)
        self._where = {key: base for key in self._files[base].keys()}
        self.format = base
        return
    raise ConvertError(f"{hf_dir} holds neither {SAFETENSORS} nor {BIN} (nor a sharded "
                       "*.index.json of either): no weights to convert.")

  def _open(self, name, opener):
    path = os.path.join(self.hf_dir, name)
    if not os.path.exists(path):
      raise ConvertError(f"{path} is named by the index but missing.")
    self._files[name] = opener(path)

  def keys(self):
    return list(self._where)

  def shape(self, key):
    return self._files[self._where[key]].shape(key)

  def get(self, key):
    """The tensor as float32 (a fresh array only when a cast is needed)."""
    x = self._files[self._where[key]].get(key)
    return np.asarray(x, np.float32)

  def location(self, key):
    return os.path.join(self.hf_dir, self._where[key])

  def close(self):
    for f in self._files.values():
      f.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
