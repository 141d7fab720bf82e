r"""calm-eval: the standalone evaluator of a trained run (BrierLM for CALM and AR, reconstruction for the autoencoder).

  calm-eval --workdir W [--data SPEC] [--step N|all] [--output FILE.json] \
      [--max_tokens N] [--seed S] [--brier_samples S]

Reads W/config.json, restores params only (no optimizer state) into the mesh of
the devices here (a CALM run also restores its frozen autoencoder from
config.autoencoder.workdir), runs one pass over config.data.eval (or --data) in
blocks of config.eval.block_len tokens, prints a table and writes JSON. The keys are
listed in calm_jax/eval/evaluator.py; the estimators are in eval/terms.py and brier.py.

Output: --output, else W/eval_step_<N>.json; with --step all every checkpoint is
evaluated in order and one JSON line per step is appended to --output (else
W/eval_steps.jsonl), skipping steps already recorded there for the same data.
"""
import json
import logging
import os

from absl import flags
import jax

from calm_jax import cli
from calm_jax import errors
from calm_jax import runs
from calm_jax.eval import evaluator

FLAGS = flags.FLAGS


def define_flags():
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


def _recorded_steps(path, data):
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    return {row["step"] for row in map(json.loads, filter(str.strip, f)) if row.get("data") == data}


def _eval_all_steps(workdir, data, output, max_tokens, seed, brier_samples):
  steps = runs.checkpoint_steps(workdir)
  run = runs.open_run(workdir, steps[0], fill_config=cli.inference_defaults)
  output = output or os.path.join(workdir, "eval_steps.jsonl")
  done = _recorded_steps(output, data or run.config.data.eval)
  results = []
  for s in steps:
    if s in done:
      logging.info("step %d already in %s; skipped", s, output)
      continue
    result = evaluator.evaluate_run(runs.restore_step(run, s), data, max_tokens, seed,
                                    brier_samples=brier_samples)
    evaluator.print_result(result)
    if jax.process_index() == 0:
      with open(output, "a") as f:
        f.write(json.dumps(result) + "\n")
    results.append(result)
  return results


def main_eval(workdir, data=None, step=None, output=None, max_tokens=None, seed=0,
              brier_samples=None):
  """What calm-eval does; returns the list of results written."""
  evaluator.check_eval_args(data, max_tokens, brier_samples)      # before restoring anything
  if output and not os.path.isdir(os.path.dirname(os.path.abspath(output))):
    raise errors.UserError(f"--output={output!r}: its directory does not exist; create it or "
                           "write elsewhere.")
  if step == "all":
    return _eval_all_steps(workdir, data, output, max_tokens, seed, brier_samples)
  if step is not None and not step.isdigit():
    raise errors.UserError(f"--step={step!r}: give a checkpoint step number or 'all'.")
  run = runs.open_run(workdir, int(step) if step is not None else None,
                      fill_config=cli.inference_defaults)
  result = evaluator.evaluate_run(run, data, max_tokens, seed, brier_samples=brier_samples)
  evaluator.print_result(result)
  output = output or os.path.join(workdir, f"eval_step_{run.step}.json")
  if jax.process_index() == 0:
    with open(output, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {output}")
  return [result]


def main():
  main_eval(FLAGS.workdir, FLAGS.data, FLAGS.step, FLAGS.output, FLAGS.max_tokens, FLAGS.seed,
            FLAGS.brier_samples)


def run():
  define_flags()
  cli.run_app(main, ["workdir"], [__name__])


if __name__ == "__main__":
  run()
