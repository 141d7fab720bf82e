r"""calm-eval: the standalone evaluator of a trained run (BrierLM for CALM and AR, reconstruction for the autoencoder).

  calm-eval --workdir W [--data SPEC] [--step N|all] [--output FILE.json] \
      [--max_tokens N] [--seed S]

Reads W/config.json, restores params only (no optimizer state) into the mesh of
the devices here (a CALM run also restores its frozen autoencoder from
config.autoencoder.workdir), runs one pass over config.data.eval (or --data) in
blocks of config.eval.block_len tokens, prints a table and writes JSON.

Keys: autoencoder runs: token_accuracy, token_accuracy_noisy {sigma: accuracy}, kl;
CALM runs: brier1..brier4, brierlm, <head>_loss (energy_loss for the energy head);
AR runs: brier1..brier4, brierlm, cross_entropy, perplexity; CALM and AR runs also
unigram {brier1..4, brierlm}: the training-token-frequency model's exact Brier-n at the
same positions (unigram.py), the floor a model that learned anything must clear; every run: num_tokens,
step, workdir, block_len, data, seed, brier_samples. Block length moves BrierLM a lot (longer
context), so compare runs at the same block_len. The estimators are in
eval_lib.py and brier.py.

Output: --output, else W/eval_step_<N>.json; with --step all every checkpoint is
evaluated in order and one JSON line per step is appended to --output (else
W/eval_steps.jsonl), skipping steps already recorded there for the same data.
"""
import functools
import json
import logging
import math
import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
import tqdm

from calm_jax import brier
from calm_jax import cli
from calm_jax import eval_lib
from calm_jax import logging_setup
from calm_jax import restore
from calm_jax import sharding
from calm_jax import unigram
from calm_jax import user_errors
from calm_jax.data import pipeline

FLAGS = flags.FLAGS


def define_flags():
  """calm-eval's flags (--workdir is shared with calm_jax.train, which defines it on import)."""
  if "workdir" not in FLAGS:
    flags.DEFINE_string("workdir", None, "A calm-train run directory.")
  flags.DEFINE_string("data", None, "Data SPEC to evaluate on (default: config.data.eval), "
                      "e.g. jsonl:../shared/data/wikitext103/test.jsonl.")
  flags.DEFINE_string("step", None, "Checkpoint step, or 'all' (default: the latest).")
  flags.DEFINE_string("output", None, "JSON file to write (default: in the workdir).")
  flags.DEFINE_integer("max_tokens", None,
                       "Cap on evaluated tokens (default: config.eval.max_tokens; 0: all).")
  flags.DEFINE_integer("seed", 0, "Seed of the model samples (Brier-n, noisy accuracy).")
  flags.DEFINE_integer("brier_samples", None, "CALM: head samples per position for Brier-n "
                       "(default: config.eval.brier_samples; 2 is the paper's estimator, more "
                       "lowers its variance).")


_JITTED = {}   # id(model) -> (model, jitted step): one compilation per restored run


def _step_fn(model, stage, position_batch, brier_samples):
  """The per-batch evaluation function of a stage (jitted by the caller)."""
  if stage == "calm":
    return functools.partial(eval_lib.calm_terms, model, position_batch=position_batch,
                             num_samples=brier_samples)
  if stage == "ar":
    return functools.partial(eval_lib.ar_terms, model, position_batch=position_batch)

  def autoencoder(params, batch, rng):
    dropout, sample = jax.random.split(rng)
    _, metrics = model.apply({"params": params}, batch, train=False,
                             rngs={"dropout": dropout, "sample": sample})
    return metrics, batch["mask"].sum().astype(jax.numpy.float32)
  return autoencoder


def _finish_autoencoder(totals, weight, sigmas):
  mean = lambda k: totals[k] / max(weight, 1.0)
  return {"token_accuracy": mean("token_accuracy"),
          "token_accuracy_noisy": {f"{s:g}": mean(f"token_accuracy_noise_{s:g}") for s in sigmas},
          "kl": mean("kl")}


def evaluate_run(run, data=None, max_tokens=None, seed=0, progress=True, brier_samples=None):
  """One pass of the eval data through `run`; returns the metrics dict (see the module docstring)."""
  config = run.config.copy_and_resolve_references()
  if data:
    config.data.eval = data
  if brier_samples is not None:
    if brier_samples < 2:
      raise user_errors.UserError(
          f"--brier_samples={brier_samples}: Brier-n needs at least 2 samples per position.")
    config.eval.brier_samples = brier_samples
  if max_tokens is None:
    max_tokens = config.eval.max_tokens
  stage = config.stage
  batch_sharding = sharding.batch_sharding(run.mesh, run.axis_rules)
  replicated = sharding.replicated(run.mesh)
  with sharding.activate(run.mesh, run.axis_rules):
    key = (id(run.model), config.eval.position_batch, config.eval.brier_samples)
    if key not in _JITTED or _JITTED[key][0] is not run.model:
      _JITTED[key] = (run.model, jax.jit(
          _step_fn(run.model, stage, config.eval.position_batch, config.eval.brier_samples),
          in_shardings=(run.param_shardings, batch_sharding, replicated),
          out_shardings=replicated))
    step_fn = _JITTED[key][1]
    accumulator = brier.BrierAccumulator()
    unigram_accumulator = brier.BrierAccumulator()
    if stage != "autoencoder":
      p_V, unigram_source = unigram.token_frequencies(config, run.tokenizer,
                                                      config.eval.unigram_tokens)
      k = config.model.patch_size if stage == "calm" else 1
    totals, weight, num_tokens = {}, 0.0, 0
    rng = jax.random.key(seed)
    iterator = pipeline.make_iterator(config, run.tokenizer, "eval")
    bar = tqdm.tqdm(desc=f"eval {stage}", unit="tok", unit_scale=True, file=sys.stdout,
                    disable=not progress or jax.process_index() != 0, dynamic_ncols=True,
                    total=max_tokens or None)
    for i, local in enumerate(iterator):
      batch = sharding.to_global_batch(local, batch_sharding)
      out = jax.device_get(step_fn(run.params, batch, jax.random.fold_in(rng, i)))
      tokens = int(np.sum(jax.device_get(batch["mask"])))
      num_tokens += tokens
      bar.update(tokens)
      if stage == "autoencoder":
        metrics, w = out
        for k, v in metrics.items():
          totals[k] = totals.get(k, 0.0) + float(v) * float(w)
        weight += float(w)
      else:
        sums_N, counts_N, loss_sum, loss_count = out
        accumulator.add(sums_N, counts_N)
        unigram_accumulator.add(*unigram.brier_sums(p_V, local["tokens"], local["mask"], k, k))
        totals["loss"] = totals.get("loss", 0.0) + float(loss_sum)
        weight += float(loss_count)
      if max_tokens and num_tokens >= max_tokens:
        break
    bar.close()
  if stage == "autoencoder":
    result = _finish_autoencoder(totals, weight, config.eval.noise_sigmas)
  else:
    result = accumulator.result()
    loss = totals.get("loss", 0.0) / max(weight, 1.0)
    if stage == "ar":
      result.update(cross_entropy=loss, perplexity=float(math.exp(min(loss, 700.0))))
    else:
      result[f"{config.model.head}_loss"] = loss
    result["positions"] = [int(c) for c in accumulator.counts_N]
    unigram_accumulator.sums_N = unigram.all_processes_sum(unigram_accumulator.sums_N)
    unigram_accumulator.counts_N = unigram.all_processes_sum(unigram_accumulator.counts_N)
    result["unigram"] = unigram_accumulator.result()
    result["unigram_source"] = unigram_source
  result.update(num_tokens=num_tokens, step=int(run.step), workdir=os.path.abspath(run.workdir),
                block_len=int(config.eval.block_len), data=config.data.eval, seed=seed,
                brier_samples=int(config.eval.brier_samples),
                stage=stage)
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


def _recorded_steps(path, data):
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    return {row["step"] for row in map(json.loads, filter(str.strip, f)) if row.get("data") == data}


def main_eval(workdir, data=None, step=None, output=None, max_tokens=None, seed=0,
              brier_samples=None):
  """What calm-eval does; returns the list of results written."""
  if step == "all":
    steps = restore.checkpoint_steps(workdir)
    run = restore.load_run(workdir, steps[0])
    output = output or os.path.join(workdir, "eval_steps.jsonl")
    done = _recorded_steps(output, data or run.config.data.eval)
    results = []
    for s in steps:
      if s in done:
        logging.info("step %d already in %s; skipped", s, output)
        continue
      result = evaluate_run(restore.restore_step(run, s), data, max_tokens, seed,
                            brier_samples=brier_samples)
      print_result(result)
      if jax.process_index() == 0:
        with open(output, "a") as f:
          f.write(json.dumps(result) + "\n")
      results.append(result)
    return results
  if step is not None and not step.isdigit():
    raise user_errors.UserError(f"--step={step!r}: give a checkpoint step number or 'all'.")
  run = restore.load_run(workdir, int(step) if step is not None else None)
  result = evaluate_run(run, data, max_tokens, seed, brier_samples=brier_samples)
  print_result(result)
  output = output or os.path.join(workdir, f"eval_step_{run.step}.json")
  if jax.process_index() == 0:
    with open(output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {output}")
  return [result]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging_setup.setup()
  with user_errors.exit_on_user_error():
    main_eval(FLAGS.workdir, FLAGS.data, FLAGS.step, FLAGS.output, FLAGS.max_tokens, FLAGS.seed,
              FLAGS.brier_samples)


def run():
  define_flags()
  cli.run_app(main, ["workdir"], ["calm_jax.evaluate", "calm_jax.train"])


if __name__ == "__main__":
  run()
