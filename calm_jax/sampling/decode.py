"""Batched generation with the backbone's KV cache, for CALM (chunk by chunk) and the AR baseline (token by token).

Prompt scheme (both models): the prompt ids are preceded by EOS, the document
boundary the models saw between documents in training (the CALM and AR stages
read one concatenated stream "doc EOS doc EOS ..."), so a prompt reads as the
start of a new document. CALM also needs a multiple of K tokens: the prompt is
left-filled with further EOS ids to the next multiple of K (1 to K EOS in all).
PAD is never fed as content. The AR baseline gets the single EOS only.
Runs trained on the reference's streams (data.document_eos=False: "BOS doc BOS doc",
the BOS coming from the tokenizer's encode) get no EOS; CALM's fill is then PAD,
whose embedding the reference keeps at zero (nn.Embedding's padding_idx), as its own
generate pads prompts with PAD.

Everything after the prompt runs in one jitted program: prefill with `extend`,
then a lax.while_loop that stops when every row has emitted EOS or the token
budget is spent (no host round trip per step). CALM step: the last backbone
state -> temperature sampling over head draws (temperature.sample_exact for any
T in (0, 1], or sample_batch_approx for T = 1/n) where one draw = a head sample
decoded by the frozen autoencoder (argmax of the K token logits) -> K tokens ->
`extend`. AR step: logits / T, optional top-k, one categorical draw -> `extend`.

use_cache=False recomputes the whole prefix every step (the reference path for
tests): same random stream, so the outputs must match the cached path.
EOS and PAD are the run's tokenizer's ids (eos_id, pad_id arguments).
"""
import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from calm_jax import errors
from calm_jax.sampling import temperature as temperature_lib


# A hashable copy of config.sampling (a static argument of the jitted loops).
Sampling = collections.namedtuple(
    "Sampling", ["temperature", "max_tokens", "num_samples", "method", "max_draws",
                 "draws_per_step", "fallback_pool", "batch_approx_samples", "top_k"])

# The tokenizer's ids the loops need: EOS ends a row, PAD fills it afterwards.
SpecialIds = collections.namedtuple("SpecialIds", ["eos", "pad"])

# Decoder logits (bytes) of head draws reduced to tokens at once (calm_draw's tiles).
DRAW_LOGITS_BYTES = 1 << 28

# A stage's sampler: prompt(ids) -> one prompt row (int32 [T, K] for CALM, [P] for AR);
# generate(params, prompts, rng) -> (tokens [B, >= max_tokens], stats), jitted.
Sampler = collections.namedtuple("Sampler", ["prompt", "generate"])


def special_ids(tokenizer):
  return SpecialIds(eos=int(tokenizer.eos_id), pad=int(tokenizer.pad_id))


def frozen_sampling(sampling_config, **overrides):
  """config.sampling (+ overrides) as a Sampling tuple."""
  values = {f: sampling_config[f] for f in Sampling._fields}
  values.update({k: v for k, v in overrides.items() if v is not None})
  return Sampling(**values)


def calm_prompt(ids, k, fill_id, boundary=True):
  """Prompt ids -> int32[T*K], left-filled with fill_id to a multiple of K.

  boundary: at least one fill token (the EOS that ended the previous document). Runs
  trained without document EOS (data.document_eos=False, the reference's streams, whose
  tokenizer starts every document with BOS) fill with PAD and need no boundary.
  """
  ids = [int(i) for i in ids]
  fill = 1 + (-(len(ids) + 1) % k) if boundary else -len(ids) % k
  if not ids and not fill:
    raise ValueError("calm_prompt: an empty prompt with no boundary token has no chunk.")
  return np.asarray([fill_id] * fill + ids, np.int32)


def ar_prompt(ids, eos_id=None):
  """Prompt ids -> int32[P (+1)]: EOS (document boundary) then the prompt; eos_id=None: no EOS."""
  prompt = ([] if eos_id is None else [eos_id]) + [int(i) for i in ids]
  if not prompt:
    raise ValueError("ar_prompt: the prompt is empty and has no boundary token.")
  return np.asarray(prompt, np.int32)


def calm_draw(model, variables, h_BxD, max_logits_bytes=DRAW_LOGITS_BYTES):
  """draw(rng, num) -> int32[num, B, K]: num head samples per row decoded by argmax.

  The decoder's float32 logits of the num * B draws ([num * B, K, V]) are reduced to tokens
  tile by tile (lax.map over tiles of draws, each at most max_logits_bytes of logits); a
  draw that fits in one tile uses `rng` directly.
  """
  b = h_BxD.shape[0]
  row_bytes = 4 * model.config.patch_size * model.config.vocab_size

  def draws(rng, num):
    h_NxBxD = jnp.broadcast_to(h_BxD, (num,) + h_BxD.shape)
    return model.apply(variables, h_NxBxD, method=model.sample_chunk, rngs={"sample": rng})

  def draw(rng, num):
    tiles = -(-num * b * row_bytes // max_logits_bytes)
    if tiles <= 1:
      return draws(rng, num)
    tile = -(-num // tiles)
    out_TxNxBxK = jax.lax.map(lambda key: draws(key, tile), jax.random.split(rng, tiles))
    return out_TxNxBxK.reshape((tiles * tile,) + out_TxNxBxK.shape[2:])[:num]

  return draw


METHODS = ("auto", "exact", "batch_approx")


def resolve_method(sampling):
  """'auto' -> 'batch_approx' when 1/T is an integer (the reference's sampler), else 'exact'."""
  if sampling.method != "auto":
    return sampling.method
  _, alpha = temperature_lib.split_inverse_temperature(sampling.temperature)
  return "batch_approx" if alpha == 0.0 else "exact"


def _sample_chunk(draw, rng, sampling):
  method = resolve_method(sampling)
  if method == "exact":
    return temperature_lib.sample_exact(
        draw, rng, sampling.temperature, max_draws=sampling.max_draws,
        draws_per_step=sampling.draws_per_step, fallback_pool=sampling.fallback_pool)
  if method == "batch_approx":
    return temperature_lib.sample_batch_approx(draw, rng, sampling.temperature,
                                               sampling.batch_approx_samples)
  raise ValueError(f"config.sampling.method={sampling.method!r}: use 'auto', 'exact' or "
                   "'batch_approx'.")


def _prefill(model, variables, prompt, total, use_cache, recompute):
  """(the model's output at the prompt's last position, cache): a KV-cache prefill of
  `total` positions, or recompute() and no cache (use_cache=False)."""
  if not use_cache:
    return recompute(), None
  cache = model.apply(variables, prompt.shape[0], total, method=model.init_cache)
  out, cache = model.apply(variables, prompt, cache, method=model.extend)
  return out[:, -1], cache


def _advance(model, variables, new, cache, use_cache, recompute):
  """(the model's output after the one new position `new`, cache): extend, or recompute()."""
  if not use_cache:
    return recompute(), cache
  out, cache = model.apply(variables, new[:, None], cache, method=model.extend)
  return out[:, 0], cache


def make_calm_generate(model, *, num_chunks, sampling, ids, use_cache=True):
  """The jitted CALM continuation f(params, prompt_BxTpxK, rng) -> (tokens_Bx(num_chunks*K), stats)."""
  return jax.jit(functools.partial(calm_generate, model, num_chunks=num_chunks,
                                   sampling=sampling, ids=ids, use_cache=use_cache))


def calm_generate(model, params, prompt_BxTpxK, rng, *, num_chunks, sampling, ids,
                  use_cache=True):
  """CALM continuation: (tokens_Bx(num_chunks*K), stats); jit it with `make_calm_generate`.

  sampling: a hashable view of config.sampling (`frozen_sampling`); ids: SpecialIds.
  Rows that have emitted EOS keep PAD from then on. stats: 'num_chunks' (loop steps run),
  'num_fallbacks' (chunks that hit max_draws), 'num_draws' (head draws in all).
  """
  variables = {"params": params}
  b, tp, k = prompt_BxTpxK.shape
  total = tp + num_chunks
  buf_BxTxK = jnp.zeros((b, total, k), jnp.int32).at[:, :tp].set(prompt_BxTpxK)

  def hidden_at(buf, c):
    """No-cache path: the backbone state after chunk c, recomputed over the whole buffer."""
    tokens = jnp.concatenate([buf, jnp.zeros((b, 1, k), jnp.int32)], axis=1).reshape(b, -1)
    h_BxTxD = model.apply(variables, tokens, method=model.hidden_states)
    return jax.lax.dynamic_index_in_dim(h_BxTxD, c, axis=1, keepdims=False)

  h_BxD, cache = _prefill(model, variables, prompt_BxTpxK, total, use_cache,
                          lambda: hidden_at(buf_BxTxK, tp - 1))

  def cond(carry):
    i, _, _, _, done_B, _, _ = carry
    return (i < num_chunks) & ~jnp.all(done_B)

  def body(carry):
    i, buf, cache, h_BxD, done_B, fallbacks, draws = carry
    chunk_BxK, stats = _sample_chunk(calm_draw(model, variables, h_BxD),
                                     jax.random.fold_in(rng, i), sampling)
    chunk_BxK = jnp.where(done_B[:, None], ids.pad, chunk_BxK)
    buf = jax.lax.dynamic_update_slice(buf, chunk_BxK[:, None], (0, tp + i, 0))
    done_B = done_B | jnp.any(chunk_BxK == ids.eos, axis=-1)
    h_BxD, cache = _advance(model, variables, chunk_BxK, cache, use_cache,
                            lambda: hidden_at(buf, tp + i))
    return (i + 1, buf, cache, h_BxD, done_B, fallbacks + stats["num_fallbacks"],
            draws + jnp.sum(stats["num_draws"]))

  zero = jnp.zeros((), jnp.int32)
  carry = (zero, buf_BxTxK, cache, h_BxD, jnp.zeros((b,), bool), zero, zero)
  steps, buf_BxTxK, _, _, _, fallbacks, draws = jax.lax.while_loop(cond, body, carry)
  tokens = buf_BxTxK[:, tp:].reshape(b, num_chunks * k)
  return tokens, {"num_chunks": steps, "num_fallbacks": fallbacks, "num_draws": draws}


def _ar_next(logits_BxV, rng, temperature, top_k):
  logits_BxV = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def make_ar_generate(model, *, max_tokens, temperature, top_k, ids, use_cache=True):
  """The jitted AR continuation f(params, prompt_BxP, rng) -> (tokens_Bxmax_tokens, stats)."""
  return jax.jit(functools.partial(ar_generate, model, max_tokens=max_tokens,
                                   temperature=temperature, top_k=top_k, ids=ids,
                                   use_cache=use_cache))


def ar_generate(model, params, prompt_BxP, rng, *, max_tokens, temperature, top_k, ids,
                use_cache=True):
  """AR baseline continuation: (tokens_Bxmax_tokens, stats {'num_steps'}); PAD after a row's EOS."""
  variables = {"params": params}
  b, p = prompt_BxP.shape
  total = p + max_tokens
  buf_BxT = jnp.zeros((b, total), jnp.int32).at[:, :p].set(prompt_BxP)

  def logits_at(buf, t):
    logits_BxTxV = model.apply(variables, buf, method=model.logits)
    return jax.lax.dynamic_index_in_dim(logits_BxTxV, t, axis=1, keepdims=False)

  logits_BxV, cache = _prefill(model, variables, prompt_BxP, total, use_cache,
                               lambda: logits_at(buf_BxT, p - 1))

  def cond(carry):
    i, _, _, _, done_B = carry
    return (i < max_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, buf, cache, logits_BxV, done_B = carry
    token_B = _ar_next(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k)
    token_B = jnp.where(done_B, ids.pad, token_B)
    buf = jax.lax.dynamic_update_slice(buf, token_B[:, None], (0, p + i))
    done_B = done_B | (token_B == ids.eos)
    logits_BxV, cache = _advance(model, variables, token_B, cache, use_cache,
                                 lambda: logits_at(buf, p + i))
    return i + 1, buf, cache, logits_BxV, done_B

  carry = (jnp.zeros((), jnp.int32), buf_BxT, cache, logits_BxV, jnp.zeros((b,), bool))
  steps, buf_BxT, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return buf_BxT[:, p:], {"num_steps": steps}


def until_eos(tokens, ids):
  """A row of generated ids cut before its first EOS (PAD dropped); ids: SpecialIds."""
  out = []
  for t in np.asarray(tokens).tolist():
    if t == ids.eos:
      break
    if t != ids.pad:
      out.append(t)
  return out


def calm_sampler(model, config, sampling, ids):
  """CALM's Sampler: prompts left-filled to whole chunks, likelihood-free temperature sampling."""
  k = config.model.patch_size
  if not 0.0 < sampling.temperature <= 1.0:
    raise errors.UserError(f"--temperature={sampling.temperature}: CALM samples without "
                           "likelihoods and supports T in (0, 1].")
  if sampling.method == "batch_approx" and temperature_lib.split_inverse_temperature(
      sampling.temperature)[1]:
    raise errors.UserError(f"--method=batch_approx needs T = 1/n (got --temperature="
                           f"{sampling.temperature}); use --method=exact for this T.")
  eos_boundary = config.data.document_eos
  fill = ids.eos if eos_boundary else ids.pad
  prompt = lambda token_ids: calm_prompt(token_ids, k, fill, boundary=eos_boundary).reshape(-1, k)
  return Sampler(prompt, make_calm_generate(model, num_chunks=-(-sampling.max_tokens // k),
                                            sampling=sampling, ids=ids))


def ar_sampler(model, config, sampling, ids):
  """The AR baseline's Sampler: EOS then the prompt, softmax(logits / T) with optional top-k."""
  if sampling.temperature <= 0.0:
    raise errors.UserError(f"--temperature={sampling.temperature} must be > 0.")
  eos = ids.eos if config.data.document_eos else None
  return Sampler(lambda token_ids: ar_prompt(token_ids, eos), make_ar_generate(
      model, max_tokens=sampling.max_tokens, temperature=float(sampling.temperature),
      top_k=int(sampling.top_k), ids=ids))
