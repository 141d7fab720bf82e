"""Tests for calm_jax/models/layers.py and attention.py against plain NumPy references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax.models import attention, layers

pytestmark = pytest.mark.unit

# unsafe_rbg keys: XLA compiles their random init far faster than threefry on CPU.
RNG = jax.random.key(0, impl="unsafe_rbg")


def init_apply(module, x):
  """(variables, output) from one compiled init + apply."""
  return jax.jit(lambda x: (lambda v: (v, module.apply(v, x)))(module.init(RNG, x)))(x)


def _np(x):
  return np.asarray(x, np.float64)


def test_rmsnorm_matches_numpy():
  x = np.random.RandomState(0).randn(2, 3, 8).astype(np.float32)
  norm = layers.RMSNorm(eps=1e-6)
  scale = np.linspace(0.5, 1.5, 8).astype(np.float32)
  params = {"params": {"scale": nn.Partitioned(jnp.asarray(scale), ("embed",))}}
  want = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(norm.apply(params, x), want, rtol=1e-5, atol=1e-6)


def test_rmsnorm_bfloat16_output_and_float32_param():
  x = jnp.ones((2, 4, 8), jnp.bfloat16)
  norm = layers.RMSNorm(eps=1e-6, dtype=jnp.bfloat16)
  v = norm.init(RNG, x)
  assert nn.unbox(v)["params"]["scale"].dtype == jnp.float32
  assert norm.apply(v, x).dtype == jnp.bfloat16


def rope_numpy(x, positions, theta):
  """Llama (rotate-half) RoPE, written with explicit loops over frequencies."""
  b, l, h, d = x.shape
  out = np.zeros_like(_np(x))
  for i in range(d // 2):
    freq = theta ** (-2.0 * i / d)
    ang = _np(positions)[:, :, None] * freq         # [B, L, 1]
    x1, x2 = _np(x[..., i]), _np(x[..., i + d // 2])
    out[..., i] = x1 * np.cos(ang) - x2 * np.sin(ang)
    out[..., i + d // 2] = x2 * np.cos(ang) + x1 * np.sin(ang)
  return out


def test_rope_matches_numpy_and_preserves_norm():
  x = np.random.RandomState(1).randn(2, 5, 3, 8).astype(np.float32)
  positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
  got = layers.apply_rope(jnp.asarray(x), positions, 10000.0)
  np.testing.assert_allclose(got, rope_numpy(x, positions, 10000.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
  # Relative: <rope(q, m), rope(k, n)> depends only on m - n.
  q, k = x[:1, :1], x[1:, :1]
  dot = lambda m, n: np.sum(np.asarray(layers.apply_rope(q, np.array([[m]]), 100.0))
                            * np.asarray(layers.apply_rope(k, np.array([[n]]), 100.0)))
  np.testing.assert_allclose(dot(3, 1), dot(12, 10), rtol=1e-4)


def test_dense_shapes_names_and_bias():
  d = layers.Dense((4, 2), ("embed", "heads", "head_dim"), init_std=0.02)
  x = jnp.ones((2, 3, 8))
  v = d.init(RNG, x)
  assert d.apply(v, x).shape == (2, 3, 4, 2)
  assert nn.get_partition_spec(v)["params"]["kernel"] == jax.P("embed", "heads", "head_dim")
  out = layers.Dense(8, ("heads", "head_dim", "embed"), init_std=0.02, use_bias=True)
  vo = out.init(RNG, jnp.ones((2, 3, 4, 2)))
  assert out.apply(vo, jnp.ones((2, 3, 4, 2))).shape == (2, 3, 8)
  assert nn.get_partition_spec(vo)["params"]["bias"] == jax.P("embed")
  with pytest.raises(ValueError, match="axes"):
    layers.Dense(8, ("embed",), init_std=0.02).init(RNG, x)


def test_embed_attend_is_tied():
  e = layers.Embed(vocab_size=11, features=4, init_std=0.02)
  v = e.init(RNG, jnp.zeros((2,), jnp.int32))
  table = np.asarray(nn.unbox(v)["params"]["embedding"])
  np.testing.assert_allclose(e.apply(v, jnp.array([3, 5])), table[[3, 5]])
  h = np.random.RandomState(0).randn(2, 4).astype(np.float32)
  np.testing.assert_allclose(e.apply(v, h, method="attend"), h @ table.T, rtol=1e-5, atol=1e-6)
  assert nn.get_partition_spec(v)["params"]["embedding"] == jax.P("vocab", "embed")


def test_swiglu_mlp_matches_numpy():
  m = layers.MLP(hidden=8, mlp=16, init_std=0.1)
  x = np.random.RandomState(2).randn(2, 3, 8).astype(np.float32)
  v, y = init_apply(m, x)
  p = jax.tree.map(np.asarray, nn.unbox(v)["params"])
  g, u = x @ p["gate"]["kernel"], x @ p["up"]["kernel"]
  want = (g / (1 + np.exp(-g)) * u) @ p["down"]["kernel"]
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def attention_numpy(q, k, v, mask_TxS):
  """softmax(q k^T / sqrt(d) + mask) v with KV heads repeated for GQA."""
  h, g = q.shape[2], k.shape[2]
  k = np.repeat(_np(k), h // g, axis=2)
  v = np.repeat(_np(v), h // g, axis=2)
  logits = np.einsum("bthd,bshd->bhts", _np(q), k) / np.sqrt(q.shape[-1])
  logits = np.where(mask_TxS[None, None], logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_attention_module_matches_numpy(heads, kv_heads):
  hidden, length = 16, 6
  att = attention.Attention(hidden, heads, kv_heads, rope_theta=10000.0, init_std=0.3)
  x = np.random.RandomState(3).randn(2, length, hidden).astype(np.float32)
  v, y = init_apply(att, x)
  p = jax.tree.map(np.asarray, nn.unbox(v)["params"])
  pos = np.arange(length)[None].repeat(2, 0)
  q = rope_numpy(np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]), pos, 10000.0)
  k = rope_numpy(np.einsum("bld,dhk->blhk", x, p["key"]["kernel"]), pos, 10000.0)
  val = np.einsum("bld,dhk->blhk", x, p["value"]["kernel"])
  causal = np.tril(np.ones((length, length), bool))
  o = attention_numpy(q, k, val, causal)
  want = np.einsum("blhk,hkd->bld", o, p["out"]["kernel"])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  spec = nn.get_partition_spec(v)["params"]
  assert spec["key"]["kernel"] == jax.P("embed", "kv_heads", "head_dim")
  assert spec["out"]["kernel"] == jax.P("heads", "head_dim", "embed")


def test_attention_is_causal():
  att = attention.Attention(16, 4, 2, rope_theta=10000.0, init_std=0.3)
  x = np.random.RandomState(4).randn(1, 6, 16).astype(np.float32)
  x2 = x.copy()
  x2[:, 4:] += 5.0                                     # change the future only
  v, y = init_apply(att, x)
  y2 = jax.jit(att.apply)(v, x2)
  np.testing.assert_allclose(y2[:, :4], y[:, :4], rtol=1e-5, atol=1e-6)
  assert not np.allclose(y2[:, 4:], y[:, 4:])


def test_gqa_kernel_matches_numpy_with_mask():
  rs = np.random.RandomState(5)
  q = rs.randn(2, 3, 4, 8).astype(np.float32)
  k = rs.randn(2, 5, 2, 8).astype(np.float32)
  v = rs.randn(2, 5, 2, 8).astype(np.float32)
  mask = np.arange(5)[None, :] <= (2 + np.arange(3))[:, None]     # queries at positions 2..4
  got = attention.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[None, None])
  np.testing.assert_allclose(got, attention_numpy(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,kv_heads", [(1, 2), (3, 1), (3, 4)])
def test_prefix_attention_reads_blocks_of_the_filled_prefix(t, kv_heads):
  """Block-wise attention over the cache (blocks of 4 slots; 10 slots, so the last block
  overlaps the one before) equals softmax attention with the mask key <= query position,
  for every fill level; slots past the prefix hold garbage that must not leak in."""
  rs = np.random.RandomState(6)
  s = 10
  q = rs.randn(2, t, 4, 8).astype(np.float32)
  k = rs.randn(2, s, kv_heads, 8).astype(np.float32)
  v = rs.randn(2, s, kv_heads, 8).astype(np.float32)
  run = jax.jit(lambda q, k, v, pos: attention.prefix_attention(q, k, v, pos, block=4))
  for pos in range(0, s - t + 1):
    mask = np.arange(s)[None, :] <= (pos + np.arange(t))[:, None]
    garbage_k, garbage_v = k.copy(), v.copy()
    garbage_k[:, pos + t:] = 1e4
    garbage_v[:, pos + t:] = 1e4
    got = run(q, garbage_k, garbage_v, pos)
    np.testing.assert_allclose(got, attention_numpy(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_kernel_choice_cudnn_only_for_gpu_half_precision_causal(monkeypatch):
  """cuDNN flash attention on a GPU for bf16/fp16 causal attention without an explicit mask
  (head_dim a multiple of 8, at most 128); the XLA path everywhere else."""
  q = jnp.zeros((1, 4, 2, 64), jnp.bfloat16)
  assert attention._implementation(q, q, has_mask=False) is None          # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention._implementation(q, q, has_mask=False) == "cudnn"
  assert attention._implementation(q, q, has_mask=True) is None
  assert attention._implementation(q.astype(jnp.float32), q, has_mask=False) is None
  assert attention._implementation(jnp.zeros((1, 4, 2, 12), jnp.bfloat16), q, False) is None


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_attention_paths_agree_on_cpu(dtype, tol):
  """The training kernel (jax.nn.dot_product_attention, is_causal), the same with an explicit
  mask, and the cache path (prefix_attention over a prefilled cache, blocks of 4) give the
  causal softmax attention of numpy, in float32 and bfloat16."""
  rs = np.random.RandomState(8)
  q, k, v = (rs.randn(2, 10, h, 16).astype(np.float32) for h in (4, 2, 2))
  want = attention_numpy(q, k, v, np.tril(np.ones((10, 10), bool)))
  cast = lambda a: jnp.asarray(a, dtype)
  causal = attention.dot_product_attention(cast(q), cast(k), cast(v), is_causal=True)
  masked = attention.dot_product_attention(cast(q), cast(k), cast(v),
                                           mask=jnp.tril(jnp.ones((10, 10), bool))[None, None])
  cached = attention.prefix_attention(cast(q), cast(k), cast(v), 0, block=4)
  for got in (causal, masked, cached):
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=tol, atol=tol)
