"""Generation: the KV-cache loop equals a full recompute per step (same seed), the prompt scheme, AR top-k."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import config as config_lib
from calm_jax.sampling import decode
from calm_jax.data import tokenizer as tokenizer_lib
from calm_jax.stages import build_model
from experiments import common
from tests import jaxpr_walk

pytestmark = pytest.mark.integration

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
SP = decode.SpecialIds(eos=tokenizer_lib.EOS_ID, pad=tokenizer_lib.PAD_ID)
VOCAB = 16


def _tiny(experiment, k):
  variant = "size=tiny" + (f",K={k}" if experiment != "ar_baseline.py" else "")
  config = config_lib.load_config_file(os.path.join(EXPERIMENTS, f"{experiment}:{variant}"))
  config.model.vocab_size = config.data.vocab_size = VOCAB
  config.model.hidden, config.model.mlp = 32, 64
  if "layers" in config.model:
    config.model.update(dict(layers=1, heads=2, kv_heads=2, num_head_blocks=1,
                             latent_dim=8, noise_dim=8))
  else:
    config.model.latent_dim = 8
  return config


def _init(model, seq_len, scale):
  """Params with every leaf perturbed (the energy head's last layer starts at zero)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = jax.jit(lambda r: model.init({"params": r, "sample": r, "dropout": r},
                                        {"tokens": tokens, "mask": tokens}))(jax.random.key(0))
  params = jax.tree.map(lambda x: getattr(x, "value", x), params["params"],
                        is_leaf=lambda x: hasattr(x, "value"))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(r, x.shape)
                                   for x, r in zip(leaves, keys)])


@pytest.fixture(scope="module")
def tiny_calm():
  k = 2
  ae_config = _tiny("autoencoder.py", k)
  config = _tiny("calm.py", k)
  model = build_model(config, ae_model_config=ae_config.model)
  return model, _init(model, 4 * k, 0.3), config


def _sampling(**overrides):
  return decode.frozen_sampling(common.sampling_config(), **overrides)


@pytest.mark.parametrize("temperature,method", [(1.0, "exact"), (0.5, "exact"),
                                                (0.5, "batch_approx")])
def test_calm_generation_with_cache_equals_full_recompute(tiny_calm, temperature, method):
  model, params, _ = tiny_calm
  prompt = decode.calm_prompt([5, 6, 7], 2, SP.eos)
  prompt_BxTxK = np.tile(prompt.reshape(1, -1, 2), (3, 1, 1))
  sampling = _sampling(temperature=temperature, method=method, max_draws=64, draws_per_step=8,
                       fallback_pool=32, batch_approx_samples=16)
  outs = [decode.make_calm_generate(model, num_chunks=5, sampling=sampling, ids=SP,
                                         use_cache=c)(
      params, prompt_BxTxK, jax.random.key(3)) for c in (True, False)]
  (cached, stats), (full, _) = jax.device_get(outs)
  assert cached.shape == (3, 10)
  np.testing.assert_array_equal(cached, full)
  assert len({tuple(r) for r in cached}) > 1 or stats["num_chunks"] < 5   # rows differ: sampled


def test_calm_prompt_is_eos_filled_to_a_multiple_of_k():
  for k in (1, 2, 4):
    for n in range(6):
      prompt = decode.calm_prompt(list(range(10, 10 + n)), k, SP.eos)
      assert len(prompt) % k == 0 and prompt[0] == tokenizer_lib.EOS_ID
      assert tokenizer_lib.PAD_ID not in prompt.tolist()
      fill = len(prompt) - n
      assert 1 <= fill <= k and np.all(prompt[:fill] == tokenizer_lib.EOS_ID)
      assert prompt[fill:].tolist() == list(range(10, 10 + n))
      # Reference streams (no document EOS): PAD fill, no boundary token.
      if n:
        prompt = decode.calm_prompt(list(range(10, 10 + n)), k, SP.pad, boundary=False)
        assert len(prompt) % k == 0 and len(prompt) - n < k
        assert set(prompt[:len(prompt) - n].tolist()) <= {SP.pad}


def test_ar_generation_with_cache_equals_full_recompute_and_top1_is_greedy():
  config = _tiny("ar_baseline.py", 1)
  model = build_model(config)
  params = _init(model, 8, 0.5)
  prompt_BxP = np.tile(decode.ar_prompt([4, 5], SP.eos)[None], (2, 1))
  run = lambda **kw: jax.device_get(decode.make_ar_generate(model, max_tokens=6, ids=SP, **kw)(
      params, prompt_BxP, jax.random.key(0))[0])
  cached = run(temperature=0.7, top_k=0)
  np.testing.assert_array_equal(cached, run(temperature=0.7, top_k=0, use_cache=False))
  greedy = run(temperature=1.0, top_k=1)
  seq = prompt_BxP[:1]
  for _ in range(6):        # argmax decoding by full recompute
    if seq[0, -1] == tokenizer_lib.EOS_ID and seq.shape[1] > prompt_BxP.shape[1]:
      break
    logits = model.apply({"params": params}, seq, method="logits")
    seq = np.concatenate([seq, np.argmax(logits[:, -1:], -1)], axis=1)
  got = decode.until_eos(greedy[0], SP)
  want = decode.until_eos(seq[0, prompt_BxP.shape[1]:], SP)
  assert got == want


def test_calm_draw_reduces_decoder_logits_tile_by_tile(tiny_calm):
  """200 draws for 4 rows with a budget of 25 rows of logits: no [S*B, K, V] array is ever
  formed (the largest [..., K, V] one holds one tile), and the draws are valid tokens."""
  model, params, config = tiny_calm
  k, v = config.model.patch_size, config.model.vocab_size
  h_BxD = jax.random.normal(jax.random.key(2), (4, config.model.hidden))
  draw = decode.calm_draw(model, {"params": params}, h_BxD, max_logits_bytes=25 * 4 * k * v * 4)
  out = jax.jit(lambda r: draw(r, 200))(jax.random.key(0))
  assert out.shape == (200, 4, k) and out.dtype == jnp.int32
  assert 0 <= int(out.min()) and int(out.max()) < v
  assert len({tuple(x) for x in np.asarray(out).reshape(-1, k)}) > 1
  jaxpr = jax.make_jaxpr(lambda r: draw(r, 200))(jax.random.key(0))
  sizes = [np.prod(var.aval.shape[:-2])
           for e in jaxpr_walk.eqns(jaxpr.jaxpr) for var in e.outvars
           if tuple(getattr(var.aval, "shape", ())[-2:]) == (k, v)]
  assert sizes and max(sizes) <= 25 * 4 < 200 * 4
