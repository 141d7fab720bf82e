r"""calm-generate: continuations of a prompt from a trained CALM or AR baseline run, with tokens/s.

  calm-generate --workdir W --prompt "The quick" [--temperature 0.5] [--max_tokens 64] \
      [--num_samples 4] [--seed 0] [--method auto|exact|batch_approx] [--top_k K]

CALM: likelihood-free temperature sampling over head draws, exact for any T in
(0, 1] (temperature.sample_exact, capped at config.sampling.max_draws draws per
chunk, then the batch approximation; the count of such chunks is printed), or
--method batch_approx for T = 1/n (config.sampling.batch_approx_samples draws); the
default 'auto' takes batch_approx when 1/T is an integer (as the reference's generate()
does), exact otherwise.
AR baseline: softmax(logits / T) with optional top-k. Defaults come from
config.sampling (experiments/common.py). The prompt scheme and the loops are in
generation.py; all num_samples continuations run as one batch in one jitted
program, timed after compilation.
"""
import time

from absl import app
from absl import flags
import jax
import numpy as np

from calm_jax import cli
from calm_jax import generation
from calm_jax import logging_setup
from calm_jax import restore
from calm_jax import user_errors

FLAGS = flags.FLAGS


def define_flags():
  """calm-generate's flags (--workdir is shared with calm_jax.train, which defines it on import)."""
  if "workdir" not in FLAGS:
    flags.DEFINE_string("workdir", None, "A calm-train run directory (stage calm or ar).")
  flags.DEFINE_string("prompt", "", "The prompt text.")
  flags.DEFINE_float("temperature", None, "Sampling temperature (default config.sampling).")
  flags.DEFINE_integer("max_tokens", None, "New tokens per continuation.")
  flags.DEFINE_integer("num_samples", None, "Continuations (the batch).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.DEFINE_string("method", None, "CALM: 'auto' (batch_approx when 1/T is an integer, "
                      "else exact), 'exact' or 'batch_approx' (T = 1/n).")
  flags.DEFINE_integer("top_k", None, "AR baseline: top-k (0: off).")


def generate(run, prompt, sampling, seed=0):
  """Continuations of `prompt` (text) by `run`: dict with texts, token ids, tokens_per_s, stats."""
  if run.config.stage not in ("calm", "ar"):
    raise user_errors.UserError(
        f"{run.workdir} is a {run.config.stage!r} run; calm-generate needs a 'calm' or 'ar' run.")
  ids = run.tokenizer.encode(prompt)
  special = generation.special_ids(run.tokenizer)
  rng = jax.random.key(seed)
  if run.config.stage == "calm":
    k = run.config.model.patch_size
    if not 0.0 < sampling.temperature <= 1.0:
      raise user_errors.UserError(f"--temperature={sampling.temperature}: CALM samples without "
                                  "likelihoods and supports T in (0, 1].")
    eos_boundary = run.config.data.document_eos
    prompt_L = generation.calm_prompt(ids, k, special.eos if eos_boundary else special.pad,
                                      boundary=eos_boundary)
    prompt_BxTxK = np.tile(prompt_L.reshape(1, -1, k), (sampling.num_samples, 1, 1))
    num_chunks = -(-sampling.max_tokens // k)
    jitted = generation.make_calm_generate(run.model, num_chunks=num_chunks, sampling=sampling,
                                           ids=special)
    fn = lambda: jitted(run.params, prompt_BxTxK, rng)
  else:
    if sampling.temperature <= 0.0:
      raise user_errors.UserError(f"--temperature={sampling.temperature} must be > 0.")
    eos = special.eos if run.config.data.document_eos else None
    prompt_BxP = np.tile(generation.ar_prompt(ids, eos)[None], (sampling.num_samples, 1))
    jitted = generation.make_ar_generate(
        run.model, max_tokens=sampling.max_tokens, temperature=float(sampling.temperature),
        top_k=int(sampling.top_k), ids=special)
    fn = lambda: jitted(run.params, prompt_BxP, rng)
  jax.block_until_ready(fn())          # compile (and warm up) outside the timing
  start = time.perf_counter()
  tokens, stats = jax.block_until_ready(fn())
  seconds = time.perf_counter() - start
  tokens, stats = jax.device_get((tokens, stats))
  rows = [generation.until_eos(row[:sampling.max_tokens], special) for row in tokens]
  produced = sum(len(r) for r in rows)
  return {"texts": [run.tokenizer.decode(r) for r in rows], "tokens": rows,
          "seconds": seconds, "tokens_per_s": produced / max(seconds, 1e-9),
          "stats": {k: int(v) for k, v in stats.items()}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging_setup.setup()
  with user_errors.exit_on_user_error():
    run = restore.load_run(FLAGS.workdir)
    sampling = generation.frozen_sampling(
        run.config.sampling, temperature=FLAGS.temperature, max_tokens=FLAGS.max_tokens,
        num_samples=FLAGS.num_samples, method=FLAGS.method, top_k=FLAGS.top_k)
    out = generate(run, FLAGS.prompt, sampling, FLAGS.seed)
    print(f"\n{run.config.stage} step {run.step}, T={sampling.temperature}, "
          f"{sampling.num_samples} samples:")
    for i, text in enumerate(out["texts"]):
      print(f"--- sample {i}\n{FLAGS.prompt}{text}")
    print(f"---\n{sum(len(r) for r in out['tokens'])} tokens in {out['seconds']:.2f}s: "
          f"{out['tokens_per_s']:.1f} tokens/s; stats {out['stats']}")


def run():
  define_flags()
  cli.run_app(main, ["workdir"], ["calm_jax.sampling", "calm_jax.train"])


if __name__ == "__main__":
  run()
