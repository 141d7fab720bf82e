"""Tests for calm_jax/models/transformer.py: shapes, KV cache, scan vs loop, remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.models import transformer
from experiments import common

pytestmark = pytest.mark.unit

# unsafe_rbg keys: XLA compiles their random init far faster than threefry on CPU.
RNG = jax.random.key(0, impl="unsafe_rbg")
X = np.random.RandomState(1).randn(2, 7, 32).astype(np.float32)


def tiny_config(scan_layers=True, remat="none"):
  c = common.backbone_config("tiny", vocab_size=64, patch_size=1)
  c.update(hidden=32, mlp=64, layers=2, heads=4, kv_heads=2, scan_layers=scan_layers,
           remat=remat)
  return c


def stack_layers(unscanned_params, n):
  """layers_0..layers_{n-1} -> one 'layers' tree with a leading layer axis."""
  p = dict(unscanned_params)
  layers = [p.pop(f"layers_{i}") for i in range(n)]
  p["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  return p


@pytest.fixture(scope="module")
def params():
  """{scan_layers: variables}; the scanned params are the loop's params stacked."""
  loop = nn.unbox(jax.jit(transformer.Transformer(tiny_config(False)).init)(RNG, X))
  return {False: loop, True: {"params": stack_layers(loop["params"], 2)}}


def test_scan_and_loop_agree_with_reshaped_params(params):
  scan = transformer.Transformer(tiny_config(True))
  abstract = nn.unbox(jax.eval_shape(scan.init, RNG, X))
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, params[True])
  h_scan = jax.jit(scan.apply)(params[True], X)
  h_loop = jax.jit(transformer.Transformer(tiny_config(False)).apply)(params[False], X)
  assert h_scan.shape == X.shape
  np.testing.assert_allclose(h_scan, h_loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_extend_equals_full_forward(params, scan_layers):
  c = tiny_config(scan_layers)
  model = transformer.Transformer(c)
  cache = transformer.init_cache(c, batch_size=2, max_len=12)
  assert cache["k"].shape == (2, 2, 12, 2, 8) and cache["pos"].dtype == jnp.int32

  @jax.jit
  def run(v, x, cache):
    full = model.apply(v, x)
    h, cache = model.apply(v, x[:, :4], cache, method="extend")      # prefill 4 positions
    hs = [h]
    for t in range(4, 7):                                            # then one at a time
      h, cache = model.apply(v, x[:, t:t + 1], cache, method="extend")
      hs.append(h)
    return full, jnp.concatenate(hs, axis=1), cache

  full, stepped, cache = run(params[scan_layers], X, cache)
  assert int(cache["pos"]) == 7
  np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5)
  assert not np.any(cache["k"][:, :, 7:])        # untouched slots stay empty


def test_scanned_params_have_layers_axis():
  v = jax.eval_shape(transformer.Transformer(tiny_config()).init, RNG, X)
  spec = nn.get_partition_spec(v)["params"]
  assert spec["layers"]["attn"]["query"]["kernel"] == jax.P("layers", "embed", "heads", "head_dim")
  assert spec["layers"]["attn"]["key"]["kernel"] == jax.P("layers", "embed", "kv_heads", "head_dim")
  assert spec["layers"]["mlp"]["down"]["kernel"] == jax.P("layers", "mlp", "embed")
  assert spec["final_norm"]["scale"] == jax.P("embed")


def test_remat_policies_keep_grads(params):
  x = X[:, :4]

  @jax.jit
  def grads(v):
    def loss(remat):
      model = transformer.Transformer(tiny_config(remat=remat))
      return lambda v: jnp.sum(model.apply(v, x) ** 2)
    return [jax.grad(loss(r))(v) for r in ("none", "full", "dots")]

  g_none, g_full, g_dots = grads(params[True])
  for g in (g_full, g_dots):
    for a, b in zip(jax.tree.leaves(g_none), jax.tree.leaves(g)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_remat_is_an_error():
  with pytest.raises(ValueError, match="config.model.remat"):
    jax.eval_shape(transformer.Transformer(tiny_config(remat="bogus")).init, RNG, X)


def test_bfloat16_compute(params):
  model = transformer.Transformer(tiny_config(), dtype=jnp.bfloat16)
  h = jax.jit(model.apply)(params[True], X)
  assert h.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(h)))
  h32 = jax.jit(transformer.Transformer(tiny_config()).apply)(params[True], X)
  np.testing.assert_allclose(np.asarray(h, np.float32), h32, atol=0.1)
  assert transformer.init_cache(model.config, 2, 8, model.dtype)["k"].dtype == jnp.bfloat16
