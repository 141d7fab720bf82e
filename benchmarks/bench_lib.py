"""Shared pieces of the benchmarks: matched configs, compiled train steps with XLA FLOPs, param splits.

Both benchmarks compare the AR baseline and CALM on the same backbone (hidden size
and depth from experiments/common.BACKBONES). FLOPs come from XLA's cost analysis
of the compiled train step (calm_jax.training.compile.compile_train_step). XLA counts the body
of a while loop once, whatever its trip count, so the scanned layer stack that
the experiments use (config.model.scan_layers=True) is undercounted by
(layers - 1) layers (measured: tiny AR, 2 layers, 13.5 vs 20.5 GFLOP per step):
`train_step_flops` counts an unrolled copy of the same step. Timing uses the
experiment's own (scanned) program.
"""
import datetime
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax.parallel import sharding
from calm_jax.training import compile as compile_lib
from calm_jax.training import state as state_lib
from calm_jax.training import steps as steps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")

# Backbone sizes that both the AR baseline and CALM define.
SIZES = ("tiny", "M", "L")

# Top-level param keys -> the columns of the parameter table.
PARAM_GROUPS = {
    "backbone": ("transformer",),
    "head": ("head", "lm_head"),
    "compression": ("embed", "compress"),
    "frozen_autoencoder": ("autoencoder",),
}


def load(experiment, **variants):
  """experiments/<experiment>.py with variants, e.g. load('calm', size='tiny', K=4)."""
  arg = ",".join(f"{k}={v}" for k, v in variants.items())
  return config_lib.load_config_file(os.path.join(EXPERIMENTS, f"{experiment}.py:{arg}"))


def autoencoder_for(calm_config, size):
  """The stage-1 config that matches a CALM config: tiny for tiny, the paper's base otherwise."""
  ae = load("autoencoder", size="tiny" if size == "tiny" else "base",
            K=calm_config.model.patch_size)
  ae.model.latent_dim = calm_config.model.latent_dim
  ae.model.vocab_size = ae.data.vocab_size = calm_config.model.vocab_size
  return ae


def model_configs(size, ks, head="energy"):
  """{'ar': (config, None), 'calm_k4': (config, ae_config), ...} for the matched backbone."""
  out = {"ar": (load("ar_baseline", size=size), None)}
  for k in ks:
    c = load("calm", size=size, K=k, head=head)
    out[f"calm_k{k}"] = (c, autoencoder_for(c, size))
  return out


def set_shape(config, dtype, batch_size=None, seq_len=None):
  """Compute dtype, batch and sequence length (None keeps the experiment's)."""
  config.train.compute_dtype = dtype
  if batch_size:
    config.train.batch_size = batch_size
  if seq_len:
    config.data.seq_len = seq_len
  config.eval.block_len = config.data.seq_len
  return config


def param_groups(trainable, frozen):
  """Parameter counts per PARAM_GROUPS column, plus 'trainable' and 'other' (unexpected keys)."""
  tree = {**trainable, **frozen}
  counts = {name: 0 for name in PARAM_GROUPS}
  counts["other"] = 0
  for key, subtree in tree.items():
    group = next((g for g, keys in PARAM_GROUPS.items() if key in keys), "other")
    counts[group] += runs.param_count(subtree)
  counts["trainable"] = runs.param_count(trainable)
  return counts


def train_step_flops(config, ae_config, mesh, axis_rules):
  """FLOPs of one train step (all devices) from XLA's cost analysis of the unrolled layer stack."""
  unrolled = config.copy_and_resolve_references()
  unrolled.model.scan_layers = False
  parts = state_lib.build(unrolled, mesh, axis_rules, ae_config=ae_config)
  report = compile_lib.compile_train_step(unrolled, parts, mesh, axis_rules)
  per_device = report.get("xla_flops_per_step_per_device")
  return per_device * report["devices"] if per_device is not None else None


def random_batch(config, seed=0):
  """A {'tokens', 'mask'} batch of uniformly random ids (throughput needs no real text)."""
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, config.data.seq_len)
  tokens = rng.integers(4, config.model.vocab_size, size=shape, dtype=np.int32)
  return {"tokens": tokens, "mask": np.ones(shape, np.int32)}


class TrainBench:
  """A compiled train step with random params (and a random frozen autoencoder for CALM).

  Use inside sharding.activate(mesh, rules). Attributes: parts (training.state.build),
  compiled, state, frozen, flops_per_step (train_step_flops; None with count_flops=False:
  the unrolled compile takes minutes at size M), compile_s, params.
  """

  def __init__(self, config, ae_config, mesh, axis_rules, seed=0, count_flops=True):
    self.config = config
    self.parts = parts = state_lib.build(config, mesh, axis_rules, ae_config=ae_config)
    self.params = param_groups(parts["abstract_state"].params, parts["abstract_frozen"])
    self.state = state_lib.init_state(parts, seed)

    def frozen_init(rng):
      return runs.split_frozen(nn.unbox(parts["init_params"](rng)))[1]

    self.frozen = jax.jit(frozen_init, out_shardings=parts["frozen_shardings"])(
        jax.random.key(seed + 1))
    self.batch_sharding = sharding.batch_sharding(mesh, axis_rules)
    step = steps_lib.jit_train_step(parts, mesh, axis_rules, config.train.grad_accum_steps)
    self.batch = sharding.to_global_batch(random_batch(config, seed), self.batch_sharding)
    self.rng = jax.random.key(seed)
    start = time.perf_counter()
    self.compiled = step.lower(self.state, self.frozen, self.batch, self.rng).compile()
    self.compile_s = time.perf_counter() - start
    self.flops_per_step = (train_step_flops(config, ae_config, mesh, axis_rules) if count_flops
                           else None)

  def step(self):
    """One train step, waited for."""
    self.state, metrics = self.compiled(self.state, self.frozen, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))

  def time_steps(self, warmup, repeats):
    """Seconds of each of `repeats` steps after `warmup` untimed ones (each waited for)."""
    return time_in_turns([self.step], warmup, repeats)[0]

  def inference_params(self):
    """{trainable..., 'autoencoder': frozen} as the generation and eval code take them."""
    return {**steps_lib.eval_params(self.state), **self.frozen}


def time_in_turns(calls, warmup, repeats):
  """[seconds of each of `repeats` calls] per callable, called in turns (one call of each per
  round, after `warmup` untimed rounds), so a change in the machine's load (a shared CPU)
  falls on all of them alike and their ratios stay comparable. Each call must wait for its
  result (jax.block_until_ready)."""
  times = [[] for _ in calls]
  for i in range(warmup + repeats):
    for call, seconds in zip(calls, times):
      start = time.perf_counter()
      call()
      if i >= warmup:
        seconds.append(time.perf_counter() - start)
  return times


def dig(tree, *keys):
  """tree[k1][k2]...; None where a key (or a level) is missing."""
  for key in keys:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def ratio(a, b):
  """a / b; None when either is missing (or b is 0)."""
  return a / b if a is not None and b else None


def median(values):
  return float(statistics.median(values))


def machine_info():
  """Backend, device kind and host load, for the JSON and RESULTS.md."""
  devices = jax.devices()
  info = {
      "date": datetime.date.today().isoformat(),
      "backend": jax.default_backend(),
      "device_kind": str(devices[0].device_kind),
      "num_devices": len(devices),
      "host_cpus": os.cpu_count(),
      "platform": platform.platform(),
      "jax": jax.__version__,
  }
  if hasattr(os, "getloadavg"):
    info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
  return info


def write_json(path, data):
  """Writes JSON atomically (a crash never leaves half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)
  return path


def finish(result, output, tables, extra_files=""):
  """Records the end-of-run load, writes `result` to `output`, prints the tables: the result."""
  result["machine"]["load_average_end"] = machine_info().get("load_average_1_5_15")
  write_json(output, result)
  print("\n" + tables)
  print(f"\nwrote {output}{extra_files}")
  return result


def format_table(header, rows):
  """A Markdown table (also readable on a terminal) with columns padded to their widest cell."""
  cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"
  rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
  return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def fmt(value, spec=".3g"):
  """A number for a table cell; '-' for None."""
  if value is None:
    return "-"
  if isinstance(value, int) and spec == ",":
    return f"{value:,}"
  return format(value, spec)
