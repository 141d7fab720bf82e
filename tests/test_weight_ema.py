"""The params' moving average (config.train.ema_decay): its update rule, the raw params it leaves
training, and a non-finite step that leaves it as it was."""
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


def _setup(ema_decay):
  config = ar_baseline.get_config("size=tiny")
  config.model.update(vocab_size=48, hidden=32, mlp=64, layers=1, heads=4, kv_heads=2,
                      logits_chunk=0)
  model = build_model(config)
  tokens = np.random.RandomState(0).randint(0, 48, (4, 9)).astype(np.int32)
  batch = {"tokens": tokens, "mask": np.ones_like(tokens)}
  params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, batch)["params"])
  tx = optax.adamw(1e-2)
  step = jax.jit(steps.make_train_step(model, tx, lambda s: 1e-2, 1, ema_decay))
  return step, steps.init_train_state(params, tx, ema_decay), batch


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)


def test_the_average_follows_the_params_with_a_warmed_up_decay():
  step, state, batch = _setup(0.9)
  assert isinstance(state, steps.EmaTrainState)
  _close(state.ema_params, state.params)                 # starts at the initial params
  ema = state.params
  for t in range(12):
    state, _ = step(state, {}, batch, jax.random.key(1))
    decay = min(0.9, (1 + t) / (10 + t))                 # 0.1, 0.18, ... then 0.9 from t = 80
    ema = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, ema, state.params)
    _close(state.ema_params, ema)
  assert steps.eval_params(state) is state.ema_params    # eval, generation, export read it
  moved = jax.tree.leaves(jax.tree.map(lambda e, p: float(jnp.max(jnp.abs(e - p))),
                                       state.ema_params, state.params))
  assert max(moved) > 0                                  # an average, not the params


def test_no_decay_keeps_the_plain_state_and_its_params():
  step, state, batch = _setup(0.0)
  assert type(state) is steps.TrainState                # the saved tree of runs before the EMA
  state, _ = step(state, {}, batch, jax.random.key(1))
  assert type(state) is steps.TrainState and steps.eval_params(state) is state.params


def test_a_skipped_update_leaves_the_average_as_it_was():
  step, state, batch = _setup(0.9)
  state, _ = step(state, {}, batch, jax.random.key(1))
  bad = jax.tree.map(lambda p: p * jnp.nan, state.params)
  after, _ = step(state.replace(params=bad), {}, batch, jax.random.key(1))
  assert int(after.skipped) == 1
  _close(after.ema_params, state.ema_params)
