"""Decode-step timing: one KV-cache step of the AR baseline or CALM at cache sizes 256..4,096 slots.

A step is the model's `extend` of one new token (AR) or chunk (CALM) per row, jitted with
the cache donated (updated in place), as the generation loop runs it. Two fills:
  * decode_step_s: the cache holds FILL positions (a short prompt) whatever its size, so the
    step time should not depend on the slots allocated (the target: 4,096 / 256 <= 1.5);
  * decode_step_full_s: the cache is nearly full (size - steps - warm-up), so attention reads
    the whole context: how the step grows with the context actually used.
Median of `steps` steps after 2 warm-up steps, each waited for. The steps of all cache sizes
(and fills) of one batch are timed in turns, one step of each per round, so a change in the
machine's load (a shared CPU) falls on every size alike and the ratios stay comparable.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_lib

CACHE_LENS = (256, 512, 1024, 2048, 4096)
FILL = 64
WARMUP = 2


def _inputs(rng, batch, length, k, vocab):
  """Random token ids [B, length] (AR, k=0) or chunks [B, length, K] (CALM)."""
  shape = (batch, length) + ((k,) if k else ())
  return jnp.asarray(rng.integers(4, vocab, shape), jnp.int32)


def time_steps(model, params, k, batch, cells, steps, seed=0):
  """Median seconds of one decode step for each (cache_len, fill) cell, timed in turns."""
  for cache_len, fill in cells:
    if fill + WARMUP + steps > cache_len:    # past the end, dynamic_update_slice clamps: wrong
      raise ValueError(f"{fill} filled + {WARMUP + steps} steps do not fit {cache_len} slots.")
  variables = {"params": params}
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  # params are an argument (not closed over): no weights baked into the executables.
  step = jax.jit(lambda v, c, x: model.apply(v, x, c, method=model.extend), donate_argnums=1)
  caches = []
  for cache_len, fill in cells:
    cache = model.apply(variables, batch, cache_len, method=model.init_cache)
    caches.append(step(variables, cache, _inputs(rng, batch, fill, k, vocab))[1])
  new = _inputs(rng, batch, 1, k, vocab)

  def one_step(j):
    out, caches[j] = step(variables, caches[j], new)
    jax.block_until_ready((out, caches[j]))

  calls = [functools.partial(one_step, j) for j in range(len(cells))]
  return [bench_lib.median(t) for t in bench_lib.time_in_turns(calls, WARMUP, steps)]


def measure(model, params, k, batches, cache_lens=CACHE_LENS, steps=8, full=True, fill=FILL):
  """{'decode_step_s': {'b1': {'256': s, ...}, ...}, 'decode_step_full_s': ...} of one model."""
  out = {"decode_step_s": {}, "decode_step_full_s": {}, "fill": fill, "steps": steps}
  for batch in batches:
    cells = [("decode_step_s", n, fill) for n in cache_lens]
    if full:
      cells += [("decode_step_full_s", n, n - steps - WARMUP) for n in cache_lens]
    seconds = time_steps(model, params, k, batch, [c[1:] for c in cells], steps)
    for (key, cache_len, _), s in zip(cells, seconds):
      out[key].setdefault(f"b{batch}", {})[str(cache_len)] = s
    for key in ("decode_step_s", "decode_step_full_s")[:1 + full]:
      ms = ", ".join(f"{n}: {1e3 * s:.3f}" for n, s in out[key][f"b{batch}"].items())
      print(f"    {key} b{batch} (ms by slots) {ms}", flush=True)
  return out
