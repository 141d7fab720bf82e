"""Tiny run configs and metrics readers shared by the tests that call the trainer."""
import json
import os

from calm_jax import config as config_lib

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def tiny_run_config(experiment, tokenizer_path, vocab_size, **overrides):
  """An experiment config shrunk for CPU tests; overrides as section__field=value."""
  config = config_lib.load_config_file(os.path.join(EXPERIMENTS, experiment))
  config.data.tokenizer = tokenizer_path
  config.data.vocab_size = config.model.vocab_size = vocab_size
  config.data.seq_len = 32
  config.eval.block_len = 32
  config.train.batch_size = 8
  config.train.steps = 4
  config.train.log_every = 1
  config.train.eval_every = 0
  config.checkpoint.every_steps = 1000
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def metric_curve(workdir, key="loss"):
  """The last logged value of `key` per step, in step order (resumed runs log steps again)."""
  values = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for row in map(json.loads, f):
      if key in row:
        values[row["step"]] = row[key]
  return [values[s] for s in sorted(values)]
