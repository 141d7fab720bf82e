"""bf16 compute with float32 master weights: the train step casts weights once, not inside every layer."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from calm_jax.stages import build_model
from calm_jax.training import steps
from experiments import ar_baseline

pytestmark = pytest.mark.unit


def _model(dtype):
  config = ar_baseline.get_config("size=tiny")
  config.model.update(vocab_size=48, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2,
                      logits_chunk=0)
  config.train.compute_dtype = dtype
  return build_model(config)


def _nested_eqns(jaxpr, depth=0):
  for eqn in jaxpr.eqns:
    yield depth, eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _nested_eqns(getattr(inner, "jaxpr", inner), depth + 1)


def _step_and_args(dtype, grad_accum_steps):
  model = _model(dtype)
  tokens = np.random.RandomState(0).randint(0, 48, (6, 9)).astype(np.int32)
  batch = {"tokens": tokens, "mask": np.ones_like(tokens)}
  params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, batch)["params"])
  tx = optax.adamw(1e-3)
  step = steps.make_train_step(model, tx, lambda s: 1e-3, grad_accum_steps, 0.0)
  return step, (steps.init_train_state(params, tx, 0.0), {}, batch, jax.random.key(1))


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_bf16_step_casts_every_weight_once_outside_the_layer_loop(grad_accum_steps):
  step, args = _step_and_args("bfloat16", grad_accum_steps)
  state = args[0]
  weights = [x for path, x in jax.tree_util.tree_leaves_with_path(state.params)
             if path[-1].key in ("kernel", "embedding")]
  shapes = {w.shape for w in weights} | {w.shape[1:] for w in weights}   # stacked layers, sliced
  jaxpr = jax.make_jaxpr(step)(*args).jaxpr
  casts = [depth for depth, e in _nested_eqns(jaxpr)
           if e.primitive.name == "convert_element_type" and e.params["new_dtype"] == jnp.bfloat16
           and e.invars[0].aval.dtype == jnp.float32 and e.invars[0].aval.shape in shapes]
  assert casts.count(0) == len(weights)
  assert not [d for d in casts if d > 0]     # none inside the scans (layers, microbatches)
  new_state, metrics = jax.jit(step)(*args)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_float32_step_is_not_cast_and_bf16_loss_matches_casting_in_the_layers():
  assert steps.compute_params({"kernel": jnp.ones((2, 2))}, jnp.float32)["kernel"].dtype == jnp.float32
  step, args = _step_and_args("bfloat16", 1)
  state, _, batch, _ = args
  model = _model("bfloat16")
  in_layers = model.apply({"params": state.params}, batch)[0]        # each layer casts
  _, metrics = jax.jit(step)(*args)
  np.testing.assert_allclose(float(metrics["loss"]), float(in_layers), rtol=1e-6)
