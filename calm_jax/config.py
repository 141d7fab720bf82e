"""Experiment configs: load from a file or a workdir, validate, save (resolved, locked) as JSON, compare on resume."""
import importlib.util
import json
import os

import ml_collections

from calm_jax import errors

CONFIG_FILE = "config.json"
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "experiments")

# Fields that may differ when a run is resumed: they change how verbosely a run goes
# or how it is evaluated, never what it computes. (train.steps may change too when the
# learning rate of the steps already taken stays the same: training/resume.py.)
RESUMABLE_FIELDS = (
    "train.log_every", "train.eval_every", "train.eval_batches",
    "train.allow_config_change", "train.profile_steps", "checkpoint.every_steps", "checkpoint.keep",
    "checkpoint.async_save", "data.worker_count", "data.prefetch", "data.eval", "data.max_bad_fraction",
    "eval", "sampling", "log",
)
# Fields the first start resolves (an unset value -> a concrete one, saved in config.json),
# with their unset value: a rerun that leaves them unset uses the saved value.
RESOLVED_AT_START = {"data.tokenizer": "", "autoencoder.step": -1, "autoencoder.digest": "",
                     "autoencoder.tokenizer_digest": ""}
PATH_FIELDS = ("data.tokenizer", "autoencoder.workdir")   # compared and saved as absolute paths


class ConfigError(errors.UserError, ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def load_config_file(spec):
  """Loads 'path/to/file.py[:variant args]' the way config_flags does (for tools and tests)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"Config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location("calm_experiment_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def load_experiment(spec):
  """experiments/<file>.py[:variant args] of this repository, read as data (load_config_file).

  For the library's few complete configs of its own (calm-convert's paper recipe); the
  library never imports the experiments package.
  """
  return load_config_file(os.path.join(EXPERIMENTS_DIR, spec))


def _from_json_value(value):
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _from_json_value(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_from_json_value(v) for v in value)
  return value


def save_config(config, workdir):
  """Writes the resolved config to WORKDIR/config.json (human-readable, reloadable)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  os.replace(tmp, path)
  return path


# Fields added after runs were saved, with the value that reproduces what such a run
# computed (stage None: every stage; a callable derives it from the saved config).
_ADDED_FIELDS = (
    (None, "init_from", ""),
    (None, "data.document_eos", True),
    (None, "data.pad_in_loss", False),
    (None, "train.profile_steps", (0, 0)),
    (None, "log", lambda c: ml_collections.ConfigDict(dict(wandb_project=""))),
    ("autoencoder", "model.encoder_bf16_embeddings_in_training", False),
    ("calm", "model.layer_norm_eps", lambda c: c.model.norm_eps),   # LayerNorms used norm_eps
    ("calm", "model.targets_bf16_embeddings_in_training", False),
    ("calm", "autoencoder.digest", ""),
    # data.skip_bad_records=True skipped any number of bad lines (dropped on load, below).
    (None, "data.max_bad_fraction", lambda c: 1.0 if c.data.get("skip_bad_records") else 0.001),
    ("ar", "model.logits_chunk", 0),                                 # unchunked logits
    ("calm", "model.logits_chunk", 0),
    ("calm", "autoencoder.tokenizer_digest", ""),
    ("calm", "model.target_std_scale", 1.0),                         # posterior-sample targets
    ("calm", "model.beta_start", lambda c: c.model.beta),            # one exponent throughout
    ("calm", "model.beta_anneal_steps", 0),
    ("calm", "model.head_hidden", 0),
    (None, "train.ema_decay", 0.0),                                  # no weight average                                # as wide as the backbone
)
# Fields that were replaced; a saved config's value is read by _ADDED_FIELDS, then dropped.
_REMOVED_FIELDS = ("data.skip_bad_records",)


def _get(config, name):
  node = config
  for part in name.split("."):
    if part not in node:
      return None
    node = node[part]
  return node


def _set(config, name, value):
  *parents, leaf = name.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def _add_missing_fields(config):
  for stage, name, value in _ADDED_FIELDS:
    if stage not in (None, config.get("stage")):
      continue
    parent, _, leaf = name.rpartition(".")
    node = _get(config, parent) if parent else config
    if node is not None and leaf not in node:
      node[leaf] = value(config) if callable(value) else value
  for name in _REMOVED_FIELDS:
    section, leaf = name.split(".")
    if section in config and leaf in config[section]:
      del config[section][leaf]
  return config


def load_config(workdir):
  """The resolved config a run saved into its workdir (fields added since filled, see above)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(
        f"{path} not found: {workdir!r} is not a calm_jax workdir "
        "(calm-train writes config.json there at start).")
  with open(path) as f:
    try:
      return _add_missing_fields(_from_json_value(json.load(f)))
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path} is not valid JSON ({e}); restore it or use a new workdir.") from e


def absolute_paths(config):
  """The config with its set PATH_FIELDS made absolute (relative to the current directory)."""
  for name in PATH_FIELDS:
    value = _get(config, name)
    if isinstance(value, str) and value:
      _set(config, name, os.path.abspath(value))
  return config


def with_saved_resolutions(config, saved):
  """A rerun's config: RESOLVED_AT_START fields it leaves unset take the saved (resolved) values.

  So a rerun of the same command compares equal to the saved config and uses exactly
  what the first start resolved (the tokenizer, the autoencoder step and digests),
  never a re-resolution (a newer autoencoder checkpoint). The saved config's paths are
  made absolute too (configs saved before they were).
  """
  absolute_paths(config)
  absolute_paths(saved)
  for name, unset in RESOLVED_AT_START.items():
    if _get(config, name) == unset and _get(saved, name) not in (None, unset):
      _set(config, name, _get(saved, name))
  return config


def flatten(config, prefix=""):
  """{'a.b': value} for every leaf, tuples and lists normalised to lists."""
  out = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = json.loads(json.dumps(value)) if isinstance(value, (tuple, list)) else value
  return out


def config_changes(saved, current):
  """Fields (other than RESUMABLE_FIELDS) whose values differ: [(name, saved, current)]."""
  a, b = flatten(saved), flatten(current)
  changes = []
  for name in sorted(set(a) | set(b)):
    if any(name == f or name.startswith(f + ".") for f in RESUMABLE_FIELDS):
      continue
    if a.get(name, "<missing>") != b.get(name, "<missing>"):
      changes.append((name, a.get(name, "<missing>"), b.get(name, "<missing>")))
  return changes


def require(condition, message):
  """Raises ConfigError(message) unless condition holds."""
  if not condition:
    raise ConfigError(message)


def validate(config):
  """The checks every stage shares, needing no devices or files (stages.validate adds the stage's).

  Raises ConfigError naming the field and the fix.
  """
  k = config.model.patch_size
  require(k >= 1, f"config.model.patch_size={k}: must be >= 1.")
  require(config.data.seq_len % k == 0,
          f"config.data.seq_len={config.data.seq_len} is not a multiple of the chunk size "
          f"K=config.model.patch_size={k}; use e.g. --config.data.seq_len="
          f"{max(k, config.data.seq_len // k * k)}.")
  require(config.eval.block_len % k == 0,
          f"config.eval.block_len={config.eval.block_len} is not a multiple of "
          f"K=config.model.patch_size={k}.")
  require(config.model.vocab_size == config.data.vocab_size,
          f"config.model.vocab_size={config.model.vocab_size} != config.data.vocab_size="
          f"{config.data.vocab_size}: set both to the tokenizer's vocabulary size.")
  require(config.data.packing in ("concat", "chunk_aligned"),
          f"config.data.packing={config.data.packing!r}: use 'concat' or 'chunk_aligned'.")
  require(config.train.compute_dtype in ("float32", "bfloat16"),
          f"config.train.compute_dtype={config.train.compute_dtype!r}: use 'float32' or 'bfloat16'.")
  require(config.train.nan_policy in ("halt", "skip"),
          f"config.train.nan_policy={config.train.nan_policy!r}: use 'halt' or 'skip'.")
  require(config.optim.schedule in ("constant", "cosine"),
          f"config.optim.schedule={config.optim.schedule!r}: use 'constant' or 'cosine'.")
  require(config.train.grad_accum_steps >= 1 and
           config.train.batch_size % config.train.grad_accum_steps == 0,
          f"config.train.batch_size={config.train.batch_size} is not divisible by "
          f"config.train.grad_accum_steps={config.train.grad_accum_steps}.")
  require(config.train.steps >= 0, f"config.train.steps={config.train.steps}: must be >= 0.")
  require(0.0 <= config.train.ema_decay < 1.0,
          f"config.train.ema_decay={config.train.ema_decay}: use a decay in [0, 1), e.g. 0.99 "
          "(an average over about 100 steps), or 0 for no moving average.")
  require(config.eval.brier_samples >= 2,
          f"config.eval.brier_samples={config.eval.brier_samples}: Brier-n needs >= 2 samples "
          "per position (2 is the paper's estimator).")
  profile = tuple(config.train.profile_steps)
  require(len(profile) == 2 and all(isinstance(s, int) and s >= 0 for s in profile)
          and (profile == (0, 0) or profile[0] < profile[1]),
          f"config.train.profile_steps={profile}: give (start, stop) steps with 0 <= start < stop, "
          "e.g. --config.train.profile_steps='(10, 20)', or (0, 0) for no profile.")
  require(bool(config.data.train), "config.data.train is empty: give a data SPEC (see README).")
  return config

