r"""calm-generate: continuations of a prompt from a trained CALM or AR baseline run, with tokens/s.

  calm-generate --workdir W --prompt "The quick" [--temperature 0.5] [--max_tokens 64] \
      [--num_samples 4] [--seed 0] [--method auto|exact|batch_approx] [--top_k K]

CALM: likelihood-free temperature sampling over head draws, exact for any T in
(0, 1] (sampling/temperature.sample_exact, capped at config.sampling.max_draws draws
per chunk, then the batch approximation; the count of such chunks is printed), or
--method batch_approx for T = 1/n (config.sampling.batch_approx_samples draws); the
default 'auto' takes batch_approx when 1/T is an integer (as the reference's generate()
does), exact otherwise. AR baseline: softmax(logits / T) with optional top-k. Defaults
come from config.sampling (experiments/common.py). The prompt scheme and the loops are
in sampling/decode.py.
"""
from absl import flags

from calm_jax import cli
from calm_jax import config as config_lib
from calm_jax import runs
from calm_jax.sampling import decode
from calm_jax.sampling import generate

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("workdir", None, "A calm-train run directory (stage calm or ar).")
  flags.DEFINE_string("prompt", "", "The prompt text.")
  flags.DEFINE_float("temperature", None, "Sampling temperature (default config.sampling).")
  flags.DEFINE_integer("max_tokens", None, "New tokens per continuation.")
  flags.DEFINE_integer("num_samples", None, "Continuations (the batch).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_string("method", None, "CALM: 'auto' (batch_approx when 1/T is an integer, "
                      "else exact), 'exact' or 'batch_approx' (T = 1/n).")
  flags.DEFINE_integer("top_k", None, "AR baseline: top-k (0: off).")


def main():
  saved = cli.inference_defaults(config_lib.load_config(FLAGS.workdir))
  sampling = decode.frozen_sampling(
      saved.sampling, temperature=FLAGS.temperature, max_tokens=FLAGS.max_tokens,
      num_samples=FLAGS.num_samples, method=FLAGS.method, top_k=FLAGS.top_k)
  generate.check_sampling(sampling)                 # bad flags fail before anything is restored
  run = runs.open_run(FLAGS.workdir, fill_config=cli.inference_defaults)
  out = generate.generate(run, FLAGS.prompt, sampling, FLAGS.seed)
  print(f"\n{run.config.stage} step {run.step}, T={sampling.temperature}, "
        f"{sampling.num_samples} samples:")
  for i, text in enumerate(out["texts"]):
    print(f"--- sample {i}\n{FLAGS.prompt}{text}")
  print(f"---\n{sum(len(r) for r in out['tokens'])} tokens in {out['seconds']:.2f}s: "
        f"{out['tokens_per_s']:.1f} tokens/s; stats {out['stats']}")


def run():
  define_flags()
  cli.run_app(main, ["workdir"], [__name__])


if __name__ == "__main__":
  run()
