r"""calm-diagnose: where a trained CALM run stands between oracles and baselines, with a one-line verdict.

  calm-diagnose --workdir W [--max_tokens 20000] [--train_tokens 200000] [--seed 0]

Prints the tables of calm_jax/eval/diagnose.py (autoencoder geometry, oracle energies,
Brier-n beside the unigram and bigram chunk models) and the verdict, and writes
W/diagnose.json.
"""
import os

from absl import flags

from calm_jax import cli
from calm_jax.eval import diagnose

FLAGS = flags.FLAGS


def main():
  report = diagnose.diagnose(FLAGS.workdir, FLAGS.max_tokens, FLAGS.train_tokens, FLAGS.seed,
                             fill_config=cli.inference_defaults)
  print(diagnose.format_report(report))
  print(f"wrote {os.path.join(FLAGS.workdir, 'diagnose.json')}")


def run():
  flags.DEFINE_string("workdir", None, "A CALM calm-train run directory.")
  flags.DEFINE_integer("max_tokens", 20_000, "Eval tokens measured.")
  flags.DEFINE_integer("train_tokens", 200_000, "Training tokens for the conditional oracles.")
  flags.DEFINE_integer("seed", 0, "Seed of every sample drawn.")
  cli.run_app(main, ["workdir"], [__name__])


if __name__ == "__main__":
  run()
