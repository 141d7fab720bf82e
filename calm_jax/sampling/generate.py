"""Continuations of a text prompt by a restored CALM or AR run (calm-generate, the quickstart): texts, ids and tokens/s.

The stage's sampler (stages.py -> sampling/decode.py) builds the prompt and the jitted
loop; all num_samples continuations run as one batch in one program, timed after
compilation.
"""
import logging
import time

import jax
import numpy as np

from calm_jax import errors
from calm_jax import progress
from calm_jax import stages
from calm_jax.sampling import decode


def check_sampling(sampling):
  """The flags of calm-generate (config.sampling + overrides) that cannot work: a UserError."""
  for name, low in (("max_tokens", 1), ("num_samples", 1), ("top_k", 0), ("max_draws", 1),
                    ("draws_per_step", 1), ("batch_approx_samples", 2)):
    if getattr(sampling, name) < low:
      raise errors.UserError(f"--{name}={getattr(sampling, name)} (config.sampling.{name}) must "
                             f"be at least {low}.")
  if sampling.method not in decode.METHODS:
    raise errors.UserError(f"--method={sampling.method!r}: use one of {', '.join(decode.METHODS)}.")


def _prompt_ids(run, prompt, sampling):
  """The prompt's token ids, checked against the context the run was trained on."""
  ids = run.tokenizer.encode(prompt)
  context = run.config.data.seq_len
  if len(ids) >= context:
    raise errors.UserError(
        f"--prompt is {len(ids)} tokens, not shorter than the {context}-token context this run "
        "was trained on (config.data.seq_len): the model has never seen such positions. "
        "Shorten the prompt.")
  if not ids and not run.config.data.document_eos:
    raise errors.UserError("--prompt is empty, and this run has no document boundary token to "
                           "start from (config.data.document_eos=False): give a prompt.")
  if len(ids) + sampling.max_tokens > context:
    logging.warning("The prompt (%d tokens) + --max_tokens=%d run past the %d-token context the "
                    "run was trained on; the last tokens are extrapolated.", len(ids),
                    sampling.max_tokens, context)
  return ids


def generate(run, prompt, sampling, seed=0):
  """Continuations of `prompt` (text) by `run`: dict with texts, token ids, tokens_per_s, stats.

  sampling: decode.frozen_sampling(run.config.sampling, ...overrides).
  """
  stage = stages.get(run.config)
  if stage.sampler is None:
    raise errors.UserError(
        f"{run.workdir} is a {run.config.stage!r} run; calm-generate needs a 'calm' or 'ar' run.")
  check_sampling(sampling)
  special = decode.special_ids(run.tokenizer)
  sampler = stage.sampler(run.model, run.config, sampling, special)
  row = sampler.prompt(_prompt_ids(run, prompt, sampling))
  prompts = np.tile(row[None], (sampling.num_samples,) + (1,) * row.ndim)
  rng = jax.random.key(seed)
  fn = lambda: sampler.generate(run.params, prompts, rng)
  # Two passes, each one jitted decode loop (no host round trip per token, so no finer
  # progress): compile and warm up, then the timed one.
  with progress.bar(total=2, desc=f"generate {sampling.num_samples} x {sampling.max_tokens} "
                    "tokens (compile, then timed)", unit="pass",
                    enabled=jax.process_index() == 0) as bar:
    jax.block_until_ready(fn())
    bar.update(1)
    start = time.perf_counter()
    tokens, stats = jax.block_until_ready(fn())
    seconds = time.perf_counter() - start
    bar.update(1)
  tokens, stats = jax.device_get((tokens, stats))
  rows = [decode.until_eos(r[:sampling.max_tokens], special) for r in tokens]
  produced = sum(len(r) for r in rows)
  return {"texts": [run.tokenizer.decode(r) for r in rows], "tokens": rows,
          "seconds": seconds, "tokens_per_s": produced / max(seconds, 1e-9),
          "stats": {k: int(v) for k, v in stats.items()}}
