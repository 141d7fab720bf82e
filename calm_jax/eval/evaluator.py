"""The one evaluator: a pass of eval data through a stage's jitted terms, for the trainer, calm-eval, the quickstart, calm-diagnose and the benchmarks.

`accumulate` runs any terms function (eval/terms.py) over the eval batches and sums
its (values * weight, weight) on the host in float64. The trainer's periodic eval
(`model_metrics`) takes the model's own metrics of every stage; `evaluate_run` takes
the stage's terms (stages.py) on a restored run and returns:

  autoencoder runs: token_accuracy, token_accuracy_noisy {sigma: accuracy}, kl;
  CALM runs: brier1..brier4, brierlm, <head>_loss (energy_loss for the energy head);
  AR runs: brier1..brier4, brierlm, cross_entropy, perplexity; CALM and AR runs also
  unigram {brier1..4, brierlm}: the training-token-frequency model's exact Brier-n at the
  same positions (unigram.py), the floor a model that learned anything must clear; every
  run: num_tokens, step, workdir, block_len, data, seed, brier_samples, stage. Block length
  moves BrierLM a lot (longer context), so compare runs at the same block_len.
"""
import itertools
import os
import sys

import jax
import numpy as np

from calm_jax import errors
from calm_jax import progress as progress_lib
from calm_jax import stages
from calm_jax.data import pipeline
from calm_jax.data import sources
from calm_jax.eval import brier
from calm_jax.eval import unigram
from calm_jax.parallel import distributed
from calm_jax.parallel import sharding

_JITTED = {}   # (id(model), brier_samples) -> (model, jitted terms)


def jit_terms(fn, param_shardings, mesh, axis_rules):
  """fn(params, batch, rng) jitted with the params' shardings, the batch split over the mesh."""
  replicated = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(param_shardings, sharding.batch_sharding(mesh, axis_rules),
                                   replicated), out_shardings=replicated)


def _padding_batch(config):
  """An all-PAD, mask-0 local batch: what a process that ran out of eval data feeds."""
  shape = (config.eval.batch_size // jax.process_count(), config.eval.block_len)
  return {"tokens": np.zeros(shape, np.int32), "mask": np.zeros(shape, np.int32)}


def accumulate(step_fn, params, config, tokenizer, batch_sharding, rng, max_batches=0,
               max_tokens=0, on_batch=None):
  """(totals, num_tokens): step_fn's (values * weight) and weight summed over the eval batches.

  Batch i gets fold_in(rng, i). Stops after max_batches batches or once max_tokens real
  tokens are seen (0: no cap). on_batch(local_batch, tokens) runs after every batch.
  Multi-host: every process reads its own documents, so their passes differ in length;
  before each batch the processes exchange their real token counts (the coordination
  service), all run as many steps as the longest pass, and a process that ran out feeds
  mask-0 padding, which carries no weight.
  """
  totals, num_tokens = {"weight": 0.0}, 0
  iterator = pipeline.make_checked_iterator(config, tokenizer, "eval")
  for i in itertools.count():
    if max_batches and i >= max_batches:
      break
    local = next(iterator, None)
    counts = distributed.all_processes(
        "eval_batch", str(-1 if local is None else int(np.sum(local["mask"]))))
    if all(int(c) < 0 for c in counts):
      break
    local = _padding_batch(config) if local is None else local
    batch = sharding.to_global_batch(local, batch_sharding)
    values, weight = jax.device_get(step_fn(params, batch, jax.random.fold_in(rng, i)))
    for k, v in values.items():
      totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64) * float(weight)
    totals["weight"] += float(weight)
    tokens = sum(max(int(c), 0) for c in counts)
    num_tokens += tokens
    if on_batch is not None:
      on_batch(local, tokens)
    if max_tokens and num_tokens >= max_tokens:
      break
  return totals, num_tokens


def model_metrics(step_fn, params, config, tokenizer, batch_sharding, num_batches):
  """The trainer's periodic eval: {'eval/<metric>': weighted mean} over up to num_batches batches."""
  totals, _ = accumulate(step_fn, params, config, tokenizer, batch_sharding,
                         jax.random.key(config.train.seed + 1), max_batches=num_batches)
  weight = totals.pop("weight")
  return {f"eval/{k}": float(v) / max(weight, 1.0) for k, v in totals.items()}


def check_eval_args(data=None, max_tokens=None, brier_samples=None):
  """The overrides of calm-eval / evaluate_run that cannot work: a UserError (no data read)."""
  if max_tokens is not None and max_tokens < 0:
    raise errors.UserError(f"--max_tokens={max_tokens}: give a token count, or 0 for the whole "
                           "eval set.")
  if brier_samples is not None and brier_samples < 2:
    raise errors.UserError(
        f"--brier_samples={brier_samples}: Brier-n needs at least 2 samples per position.")
  if data:
    sources.check_spec(data)


def _eval_config(run, data, max_tokens, brier_samples):
  check_eval_args(data, max_tokens, brier_samples)
  config = run.config.copy_and_resolve_references()
  if data:
    config.data.eval = data
  if brier_samples is not None:
    config.eval.brier_samples = brier_samples
  return config, config.eval.max_tokens if max_tokens is None else max_tokens


def _jitted(run, stage, config):
  """The stage's terms for `run`, jitted once per restored model and eval setting."""
  key = (id(run.model), config.eval.brier_samples)
  if key not in _JITTED or _JITTED[key][0] is not run.model:
    _JITTED[key] = (run.model, jit_terms(stage.eval_terms(run.model, config),
                                         run.param_shardings, run.mesh, run.axis_rules))
  return _JITTED[key][1]


def evaluate_run(run, data=None, max_tokens=None, seed=0, progress=True, brier_samples=None):
  """One pass of the eval data through `run`; returns the metrics dict (see the module docstring)."""
  config, max_tokens = _eval_config(run, data, max_tokens, brier_samples)
  stage = stages.get(config)
  uni = brier.BrierAccumulator()
  if stage.chunk is not None:
    k = stage.chunk(config)
    p_V, unigram_source = unigram.token_frequencies(config, run.tokenizer,
                                                    config.eval.unigram_tokens)
  bar = progress_lib.bar(desc=f"eval {config.stage}", unit="tok", unit_scale=True,
                         file=sys.stdout, enabled=progress and jax.process_index() == 0,
                         total=max_tokens or None)

  def on_batch(local, tokens):
    bar.update(tokens)
    if stage.chunk is not None:
      uni.add(*unigram.brier_sums(p_V, local["tokens"], local["mask"], k, k))

  with sharding.activate(run.mesh, run.axis_rules):
    totals, num_tokens = accumulate(
        _jitted(run, stage, config), run.params, config, run.tokenizer,
        sharding.batch_sharding(run.mesh, run.axis_rules), jax.random.key(seed),
        max_tokens=max_tokens, on_batch=on_batch)
  bar.close()
  result = stage.eval_result(totals, config)
  if stage.chunk is not None:
    result["unigram"] = brier.result_from_sums(unigram.all_processes_sum(uni.sums_N),
                                               unigram.all_processes_sum(uni.counts_N))
    result["unigram_source"] = unigram_source
  result.update(num_tokens=num_tokens, step=int(run.step), workdir=os.path.abspath(run.workdir),
                block_len=int(config.eval.block_len), data=config.data.eval, seed=seed,
                brier_samples=int(config.eval.brier_samples), stage=config.stage)
  return result


def _format_value(v):
  """Floats with 4 decimals, or 3 significant digits when that would print 0.0000."""
  if isinstance(v, float):
    return f"{v:.3e}" if 0 < abs(v) < 5e-4 else f"{v:.4f}"
  return str(v)


def format_table(result):
  """The result as aligned 'key  value' lines (nested dicts flattened as key[sub])."""
  rows = []
  for key, value in result.items():
    if isinstance(value, dict):
      rows += [(f"{key}[{k}]", v) for k, v in value.items()]
    else:
      rows.append((key, value))
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {_format_value(v)}" for k, v in rows)


def format_brier_comparison(result):
  """Brier-1..4 and BrierLM of the model beside the unigram baseline's at the same positions."""
  keys = [f"brier{n}" for n in range(1, brier.MAX_N + 1)] + ["brierlm"]
  uni = result["unigram"]
  lines = [f"{'':<8}  {'model':>10}  {'unigram':>10}  {'model/unigram':>13}"]
  for k in keys:
    ratio = result[k] / uni[k] if uni[k] > 0 else float("nan")
    lines.append(f"{k:<8}  {_format_value(result[k]):>10}  {_format_value(uni[k]):>10}  "
                 f"{ratio:>13.2f}")
  return "\n".join(lines)


def print_result(result):
  """The result table, and for CALM/AR runs the model-vs-unigram Brier table under it."""
  print(f"\n{format_table({k: v for k, v in result.items() if k != 'unigram'})}")
  if "unigram" in result:
    print(f"\n{format_brier_comparison(result)}")
