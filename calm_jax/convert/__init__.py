"""Reference (Hugging Face / PyTorch) CALM checkpoints <-> calm_jax workdirs: import and export.

  hf_config.py       config.json of the reference <-> calm_jax experiment configs
  keymap.py          state-dict keys <-> calm_jax param paths, layouts, aliases
  safetensors_io.py  model.safetensors read (memory-mapped) and written (streamed) with numpy
  hf_files.py        a checkpoint directory: config, (sharded) safetensors or pytorch_model.bin
  workdirs.py        the conversions themselves (`calm-convert`: calm_jax/cli/convert.py)

The numeric proof that a converted model computes what the reference computes is
calm_jax/convert/reference_check.py, run on the golden fixture.
"""
from calm_jax import errors


class ConvertError(errors.UserError, ValueError):
  """A checkpoint that cannot be converted; the message names the file, key or field and the fix."""
